"""Secrets stay out of what Strata shows: redacted URLs, scrubbed messages, logs, argv, the CLI.

Every place is tried with the same URL shapes (a percent-encoded @, an unencoded @, a password in
the query, a plain password with other query options, sqlite, journal, mysql); the database is
the real PostgreSQL of tests/services.py (trust auth: any password is accepted).
"""

from __future__ import annotations

import base64
import copy
import io
import json
import logging
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import quote

import pytest
import yaml
from sqlalchemy.engine import make_url

from strata.redaction import (
    SecretFilter, install_log_filter, redact, register_secret, registered_secrets, scrub, url_secrets,
)
from strata.study import StorageError, open_storage
from tests.k8s.fixtures import k8s_api  # noqa: F401  (the Kubernetes API emulator, for KubeApi)
from tests.services import free_port, wait_for

# (URL, its redacted form, the secret substrings that must never show)
SHAPES: list[tuple[str, str, list[str]]] = [
    ("postgresql+psycopg2://u:s3cr%40t@h/db", "postgresql+psycopg2://u:***@h/db", ["s3cr%40t", "s3cr@t", "s3cr"]),
    ("postgresql+psycopg2://u:p@ss@h:5432/db", "postgresql+psycopg2://u:***@h:5432/db", ["p@ss", ":p@", "ss@h"]),
    ("postgresql+psycopg2://u@h/db?password=s3cret", "postgresql+psycopg2://u@h/db?password=***", ["s3cret"]),
    ("postgresql://u:pw@h/db?sslmode=require", "postgresql://u:***@h/db?sslmode=require", ["pw@", ":pw"]),
    ("sqlite:///x.db", "sqlite:///x.db", []),
    ("journal:///tmp/x.journal", "journal:///tmp/x.journal", []),
    ("mysql+pymysql://u:pw@h/db", "mysql+pymysql://u:***@h/db", ["pw@", ":pw"]),
]
SHAPE_IDS = ["encoded-at", "unencoded-at", "query-password", "sslmode", "sqlite", "journal", "mysql"]


def assert_hidden(text: str, secrets: list[str]) -> None:
    for secret in secrets:
        assert secret not in text, f"{secret!r} shows in {text!r}"


# --- redact ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("url, redacted, secrets", SHAPES, ids=SHAPE_IDS)
def test_redact_hides_the_password_and_keeps_the_rest(url, redacted, secrets):
    assert redact(url) == redacted
    assert_hidden(redact(url), secrets)
    assert redact(redact(url)) == redacted  # idempotent: a redacted URL stays as it is


def test_study_redact_is_the_same_helper():
    from strata import study

    for url, redacted, _ in SHAPES:
        assert study.redact(url) == redacted


def test_an_unencoded_at_is_read_as_sqlalchemy_and_libpq_read_it_and_redaction_hides_all_of_it():
    """Both parsers split at the first @: password "p", host "ss@h". The writer meant "p@ss": hide
    everything between the user's ":" and the last @, so neither reading of the password shows."""
    import psycopg2.extensions

    url = "postgresql+psycopg2://u:p@ss@h:5432/db"
    parsed = make_url(url)
    assert (parsed.username, parsed.password, parsed.host, parsed.port) == ("u", "p", "ss@h", 5432)
    libpq = psycopg2.extensions.parse_dsn("postgresql://u:p@ss@h:5432/db")
    assert (libpq["user"], libpq["password"], libpq["host"]) == ("u", "p", "ss@h")
    # SQLAlchemy's own rendering would show half of it
    assert parsed.render_as_string(hide_password=True) == "postgresql+psycopg2://u:***@ss@h:5432/db"

    assert redact(url) == "postgresql+psycopg2://u:***@h:5432/db"
    assert {"p", "ss", "p@ss"} <= set(url_secrets(url))
    assert redact("postgresql+psycopg2://u:a@b@c@h/db") == "postgresql+psycopg2://u:***@h/db"


@pytest.mark.parametrize("param", ["password", "PASSWORD", "passwd", "pwd", "sslpassword", "secret",
                                   "client_secret", "token", "access_token", "api_key", "Key"])
def test_query_parameters_that_look_secret_are_masked(param):
    url = f"postgresql+psycopg2://u@h/db?sslmode=require&{param}=hunter2x&application_name=strata"
    shown = redact(url)
    assert "hunter2x" not in shown
    assert f"{param}=***" in shown
    assert "sslmode=require" in shown and "application_name=strata" in shown
    assert "hunter2x" in url_secrets(url)


@pytest.mark.parametrize("url, redacted", [
    ("journal://u:s3cr3t@/tmp/x.journal", "journal://u:***@/tmp/x.journal"),
    ("postgresql+psycopg2://u:s3cr3t@h:notaport/db", "postgresql+psycopg2://u:***@h:notaport/db"),
    ("postgresql+psycopg2://u:s3cr3t@[::1/db", "postgresql+psycopg2://u:***@[::1/db"),
    ("weird+scheme://u:s3c@r3t@h/db?token=t0ken", "weird+scheme://u:***@h/db?token=***"),
    ("junk", "junk"),
    ("", ""),
    ("/just/a/path", "/just/a/path"),
], ids=["journal", "bad-port", "bad-ipv6", "unknown-scheme", "junk", "empty", "path"])
def test_what_sqlalchemy_cannot_parse_falls_back_to_masking_user_pass_at(url, redacted):
    assert redact(url) == redacted
    assert_hidden(redact(url), ["s3cr3t", "s3c@", "r3t", "t0ken"])


# --- scrub -----------------------------------------------------------------------------------------


PASSWORDS = {"encoded-at": "s3cr@t", "unencoded-at": "p@ss", "query-password": "s3cret", "sslmode": "pw",
             "mysql": "pw"}


@pytest.mark.parametrize("url, redacted, secrets", SHAPES, ids=SHAPE_IDS)
def test_scrub_removes_the_url_and_its_password_from_free_text(url, redacted, secrets):
    password = PASSWORDS.get(_shape_id(url), "")
    text = f"opening {url} failed: bad password {password or '-'} ({quote(password, safe='') or '-'})."
    clean = scrub(text, url)
    assert clean.startswith(f"opening {redacted} failed: bad password ")
    assert_hidden(clean, secrets)
    if password:
        assert clean.endswith("bad password *** (***).")
    assert scrub(clean, url) == clean


def _shape_id(url: str) -> str:
    return SHAPE_IDS[[shape[0] for shape in SHAPES].index(url)]


def test_scrub_hides_the_pieces_a_driver_echoes_for_an_unencoded_at():
    url = "postgresql+psycopg2://u:p@ss@db.example:5432/optuna"
    message = 'could not translate host name "ss@db.example" to address; password p; p@ss'
    clean = scrub(message, url)
    assert clean == 'could not translate host name "***@db.example" to address; password ***; ***'


def test_scrub_keeps_short_secrets_from_eating_words_and_hides_plain_secret_values():
    assert scrub("pw is pw, not pwned", "postgresql://u:pw@h/db") == "*** is ***, not pwned"
    assert scrub("key AKIA-Secret-9 leaked", "AKIA-Secret-9") == "key *** leaked"
    assert scrub("encoded a%2Fb%40c here", "a/b@c") == "encoded *** here"


def test_scrub_masks_any_user_password_url_in_text_even_unknown_ones():
    text = "tried mysql://root:topsecret@10.0.0.1/db and http://host:8080/x and postgresql://u@h/db?password=pw1"
    clean = scrub(text)
    assert "topsecret" not in clean and "pw1" not in clean
    assert "mysql://root:***@10.0.0.1/db" in clean
    assert "http://host:8080/x" in clean  # nothing secret: left alone
    assert "postgresql://u@h/db?password=***" in clean


# --- open_storage: error messages and the connect timeout ---------------------------------------


@pytest.mark.parametrize("url, secret", [
    ("postgresql+psycopg2://u:Pa55word@127.0.0.1:notaport/db", "Pa55word"),
    ("postgresql+psycopg2://u:Pa55word@[::1/db", "Pa55word"),
    ("postgresql+psycopg2://u:Pa55word@127.0.0.1:99999/db", "Pa55word"),
    ("postgresql+psycopg2://u:Pa%40ss@127.0.0.1:99999/db", "Pa@ss"),
    ("postgresql+psycopg2://u:Pa@ssw0rd@127.0.0.1:1/db", "ssw0rd"),
    ("postgresql+psycopg2://u:Pa@ss:w0rd@127.0.0.1:5432/db", "w0rd"),  # SQLAlchemy: port "w0rd@127.0.0.1:5432"
    ("nosuchdialect://u:Pa55word@h/db", "Pa55word"),
    ("mysql+nosuchdriver://u:Pa55word@h/db", "Pa55word"),
], ids=["bad-port", "bad-ipv6", "port-out-of-range", "encoded-at", "unencoded-at", "at-and-colon", "no-dialect",
        "no-driver"])
def test_storage_errors_are_one_line_without_the_password(url, secret):
    with pytest.raises(StorageError) as raised:
        open_storage(url)
    message = str(raised.value)
    assert len(message.splitlines()) == 1
    assert message.startswith("cannot open Optuna storage ")
    assert secret not in message and "Pa55" not in message
    assert "%40ss" not in message


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A TCP port that accepts connections and never answers (nothing ever reads from them)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield sock.getsockname()[1]


OPEN_STORAGE = """
import sys, time
from strata.study import StorageError, open_storage
started = time.monotonic()
try:
    open_storage(sys.argv[1])
except StorageError as error:
    print(f"{time.monotonic() - started:.2f}")
    print(error)
"""


def open_in_subprocess(url: str, timeout_variable: str | None, limit: float = 20) -> tuple[float, str]:
    """(seconds open_storage took to fail, its message), in a subprocess: without a connect timeout
    libpq waits on the silent server for ever, uninterruptibly, and would hang the test run."""
    env = {k: v for k, v in os.environ.items() if k != "STRATA_DB_CONNECT_TIMEOUT"}
    if timeout_variable is not None:
        env["STRATA_DB_CONNECT_TIMEOUT"] = timeout_variable
    try:
        result = subprocess.run([sys.executable, "-c", OPEN_STORAGE, url], capture_output=True, text=True,
                                timeout=limit, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail(f"open_storage({redact(url)}) still waiting after {limit:g}s")
    assert result.returncode == 0 and result.stdout, result.stdout + result.stderr
    seconds, message = result.stdout.split("\n", 1)
    return float(seconds), message.rstrip("\n")


@pytest.mark.parametrize("url", [
    "postgresql+psycopg2://u:s3cr%40t@127.0.0.1:{port}/db",
    "postgresql+psycopg2://u@127.0.0.1:{port}/db?password=s3cret",
], ids=["password", "query-password"])
def test_an_unanswering_database_fails_within_seconds_naming_the_host(silent_server, url):
    elapsed, message = open_in_subprocess(url.format(port=silent_server), None)
    assert elapsed < 8, f"took {elapsed:.1f}s"
    assert len(message.splitlines()) == 1, message
    assert message.startswith("cannot open Optuna storage ") and "timeout" in message
    assert "127.0.0.1" in message and str(silent_server) in message
    assert "s3cr" not in message


def test_the_connect_timeout_follows_strata_db_connect_timeout(silent_server):
    elapsed, message = open_in_subprocess(f"postgresql+psycopg2://u:pw@127.0.0.1:{silent_server}/db", "2")
    assert elapsed < 4.5 and "timeout" in message
    _, message = open_in_subprocess(f"postgresql+psycopg2://u:pw@127.0.0.1:{silent_server}/db", "soon")
    assert message == "STRATA_DB_CONNECT_TIMEOUT: not a number of seconds: 'soon'"


def test_a_reachable_database_with_a_password_still_opens(postgres_url):
    # trust auth: the password is accepted and ignored; the timeout must not get in the way
    with_password = postgres_url.replace("postgres@", "postgres:s3cr%40t@", 1)
    storage = open_storage(with_password)
    assert storage.get_all_studies() == []
    storage.engine.dispose()


# --- the log filter and the kubernetes client's REST logger --------------------------------------


@pytest.fixture
def verbose_logging() -> Iterator[io.StringIO]:
    """The root logger as Kopf's --verbose leaves it (DEBUG, one stream handler); restored after."""
    root = logging.getLogger()
    saved = (root.level, root.handlers[:])
    rest = logging.getLogger("kubernetes.client.rest")
    saved_rest = rest.level
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG)
    rest.setLevel(logging.NOTSET)
    try:
        yield stream
    finally:
        root.handlers[:] = saved[1]
        root.setLevel(saved[0])
        rest.setLevel(saved_rest)
        for h in [handler, *saved[1]]:
            for f in [f for f in h.filters if isinstance(f, SecretFilter)]:
                h.removeFilter(f)


def test_the_filter_scrubs_registered_secrets_from_messages_arguments_and_tracebacks(verbose_logging):
    url = f"postgresql+psycopg2://u:Fi1ter%40Pw-{uuid.uuid4().hex[:6]}@db.local/optuna"
    password = make_url(url).password
    register_secret(url)
    assert url in registered_secrets()
    install_log_filter()
    log = logging.getLogger("strata.test")

    log.info("connecting to %s", url)
    log.debug("password %s, encoded %s, base64 %s", password, password.replace("@", "%40"),
              base64.b64encode(url.encode()).decode())
    log.warning(f"literal {url} in the message")
    try:
        raise RuntimeError(f"driver echoed {url} and {password}")
    except RuntimeError:
        log.exception("failed")

    output = verbose_logging.getvalue()
    assert "postgresql+psycopg2://u:***@db.local/optuna" in output
    assert "Traceback" in output and "driver echoed" in output
    assert_hidden(output, [password, password.replace("@", "%40"), "Fi1ter", base64.b64encode(url.encode()).decode()])


@pytest.mark.parametrize("url, redacted, secrets", SHAPES, ids=SHAPE_IDS)
def test_reading_a_secret_registers_it_and_the_rest_logger_never_logs_its_body(k8s_api, verbose_logging,
                                                                               url, redacted, secrets):
    from strata.kube.api import KubeApi
    from strata.kube.handlers import _protect_secrets_in_logs

    name = f"db-{uuid.uuid4().hex[:8]}"
    k8s_api.create("secrets", {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": "default"},
                               "data": {"url": base64.b64encode(url.encode()).decode(),
                                        "other": base64.b64encode(b"an-0ther-s3cret").decode()}})
    _protect_secrets_in_logs()  # what the operator's startup handler does after Kopf set up logging
    assert not logging.getLogger("kubernetes.client.rest").isEnabledFor(logging.DEBUG)
    api_client = k8s_api.kubernetes_client()
    try:
        assert KubeApi(api_client).read_secret_key("default", name, "url") == url
    finally:
        api_client.close()
    assert url in registered_secrets() and "an-0ther-s3cret" in registered_secrets()
    logging.getLogger("strata.operator").info("storage %s, other an-0ther-s3cret", url)

    output = verbose_logging.getvalue()
    assert "response body" not in output
    assert f"storage {redacted}, other ***" in output
    assert_hidden(output, [*secrets, "an-0ther-s3cret", base64.b64encode(url.encode()).decode()])


# --- local trainer processes: the URL goes in the environment, not argv --------------------------


def test_trainer_command_for_pods_and_local_processes():
    from strata.executors import trainer_command

    assert trainer_command(None, "ns.study", 3, None) == ["python", "-m", "strata_trainer", "--study", "ns.study",
                                                          "--trial", "3"]
    assert trainer_command("sqlite:///x.db", "s", 1, "/ckpt", "py") == [
        "py", "-m", "strata_trainer", "--storage", "sqlite:///x.db", "--study", "s", "--trial", "1",
        "--checkpoints", "/ckpt"]


def local_url(url: str, directory: Path, port: int) -> str:
    """The shape with a host that refuses at once (a closed local port) and files under directory."""
    return (url.replace("@h/", f"@127.0.0.1:{port}/").replace("@h:5432/", f"@127.0.0.1:{port}/")
            .replace("sqlite:///x.db", f"sqlite:///{directory}/x.db")
            .replace("journal:///tmp/x.journal", f"journal://{directory}/x.journal"))


def start_trainer(url: str, directory: Path):
    from strata.executors import LocalProcessExecutor

    # no retrying of the unreachable storage (strata.retrying_storage): fail at once
    executor = LocalProcessExecutor(url, "no-such-study", None, directory / "logs", 1,
                                    env={"STRATA_STORAGE_RETRY_SECONDS": "0"})
    executor.start(0)
    proc, _ = executor._procs[0]
    # Right after a vfork-ed exec the new image's argv may not be set up yet: cmdline reads empty.
    argv = wait_for(lambda: Path(f"/proc/{proc.pid}/cmdline").read_bytes(), timeout=10,
                    message="the trainer's argv").split(b"\0")
    environ = Path(f"/proc/{proc.pid}/environ").read_bytes().split(b"\0")
    return executor, argv, environ


@pytest.mark.parametrize("url, redacted, secrets", SHAPES, ids=SHAPE_IDS)
def test_a_local_trainer_gets_the_storage_url_in_its_environment_not_its_argv(tmp_path, url, redacted, secrets):
    url = local_url(url, tmp_path, free_port())
    executor, argv, environ = start_trainer(url, tmp_path)
    executor.stop_all()
    argv_text = b" ".join(argv).decode()
    assert b"strata_trainer" in argv and b"--study" in argv and b"no-such-study" in argv
    assert "--storage" not in argv_text and url not in argv_text
    assert_hidden(argv_text, secrets)
    assert f"STRATA_STORAGE_URL={url}".encode() in environ


def test_the_trainer_reads_the_storage_url_from_its_environment(tmp_path):
    url = local_url("postgresql+psycopg2://u:s3cr%40t@h/db", tmp_path, free_port())
    executor, argv, _ = start_trainer(url, tmp_path)
    try:
        exits = wait_for(executor.poll, timeout=90, message="the trainer to exit")
    finally:
        executor.stop_all()
    log = executor.log_path(0).read_text()
    # it got as far as opening that storage (nothing listens there): exit 2, one line, redacted
    assert exits[0].exit_code == 2, log
    assert "--storage or STRATA_STORAGE_URL is required" not in log
    assert f"cannot open Optuna storage {redact(url)}" in log
    assert_hidden(log, ["s3cr%40t", "s3cr@t"])


# --- `strata run`: the header line ---------------------------------------------------------------

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
ONE_TRIAL_STUDY: dict[str, Any] = {
    "apiVersion": "hpo.strata.dev/v1alpha1",
    "kind": "HPOStudy",
    "metadata": {"name": "secret"},
    "spec": {
        "searchSpace": {"convLayers": {"type": "int", "low": 1, "high": 1},
                        "learningRate": {"type": "categorical", "choices": [0.003]}},
        "sampler": {"name": "random", "seed": 1},
        "trials": {"max": 1, "parallel": 1, "maxFailed": 1, "retries": 0, "timeoutSeconds": 120},
        "training": {"subsetSize": 100, "inputSize": 16, "epochs": 1, "epochsWhenReusing": 1},
    },
}


@pytest.mark.skipif(not (FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file(),
                    reason="Debian package dataset-fashion-mnist is not installed")
@pytest.mark.parametrize("shape", ["encoded-at", "query-password"])
def test_strata_run_shows_the_storage_redacted_and_the_study_still_runs(tmp_path, postgres_url, shape):
    password = f"Cl1%40{uuid.uuid4().hex[:8]}" if shape == "encoded-at" else f"Cl1pw{uuid.uuid4().hex[:8]}"
    if shape == "encoded-at":
        url = postgres_url.replace("postgres@", f"postgres:{password}@", 1)
    else:
        url = f"{postgres_url}?password={password}"
    decoded = password.replace("%40", "@")
    study_file = tmp_path / "study.yaml"
    study_file.write_text(yaml.safe_dump(copy.deepcopy(ONE_TRIAL_STUDY), sort_keys=False))
    strata = Path(sys.executable).with_name("strata")

    result = subprocess.run([str(strata), "run", str(study_file), "--storage", url, "--quiet",
                             "--report", str(tmp_path / "report.json")],
                            cwd=tmp_path, capture_output=True, text=True, timeout=180)

    assert result.returncode == 0, result.stdout + result.stderr
    header = next(line for line in result.stderr.splitlines() if line.startswith("study secret: storage "))
    assert f"storage {redact(url)}," in header
    everything = result.stdout + result.stderr + (tmp_path / "report.json").read_text() + "".join(
        p.read_text() for p in (tmp_path / "secret.logs").iterdir())
    assert_hidden(everything, [password, decoded, url])
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["phase"] == "Succeeded" and report["trials"][0]["state"] == "COMPLETE"
