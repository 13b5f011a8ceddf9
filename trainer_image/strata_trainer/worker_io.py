"""What the warm worker and the stand-in worker share of the worker protocol, without torch: the log
format, one trial's log file while it runs, and an answer line to the operator's side."""

from __future__ import annotations

import json
import logging
from typing import IO, Any

from strata.redaction import SecretFilter

log = logging.getLogger(__name__)
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class TrialLog:
    """Route the root logger to one trial's log file while that trial runs (as a trial process would);
    secret values are scrubbed from every line."""

    def __init__(self, path: str | None):
        self.path = path
        self.handler: logging.Handler | None = None

    def __enter__(self) -> "TrialLog":
        if self.path:
            try:
                self.handler = logging.FileHandler(self.path, encoding="utf-8")
            except OSError as error:  # the trial still runs; its lines go to the worker's own log
                log.warning("cannot write the trial log %s: %s", self.path, error)
                return self
            self.handler.setFormatter(logging.Formatter(LOG_FORMAT))
            self.handler.addFilter(SecretFilter())
            logging.getLogger().addHandler(self.handler)
        return self

    def __exit__(self, *_: object) -> None:
        if self.handler is not None:
            logging.getLogger().removeHandler(self.handler)
            self.handler.close()


def send(answers: IO[str], message: dict[str, Any]) -> None:
    """One answer line (JSON) to whoever reads the worker's answers."""
    answers.write(json.dumps(message) + "\n")
    answers.flush()
