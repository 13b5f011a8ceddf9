"""Keep secrets out of logs, Events, statuses, error messages and process listings.

* `redact(url)`: a storage URL fit to show, parsed and rendered by SQLAlchemy itself
  (`make_url`, `render_as_string(hide_password=True)`), with secret-looking query parameters
  (`?password=`, `token`, `sslpassword`, ...) masked too; what SQLAlchemy cannot parse
  (`journal://`, junk) falls back to a regex that masks `user:pass@`.
* `scrub(text, *secrets)`: `text` with the given secrets removed: a URL is replaced by its
  redacted form and every secret part of it (its password, decoded and URL-encoded, secret query
  values) by `***`; any other `scheme://user:pass@` left in the text is masked as well.
* `register_secret(value)` and `SecretFilter`: the operator registers every Secret value it reads;
  the filter, installed on the logging handlers (`install_log_filter`), scrubs all of them from
  every formatted log record.

An unencoded `@` in a password (`postgresql://u:p@ss@h/db`): SQLAlchemy's URL parser and libpq's
(psycopg2.extensions.parse_dsn) both split at the FIRST `@`, so they take the password `p` and the
host `ss@h` (and the connection fails: there is no such host). Whoever wrote the URL most likely
meant the password `p@ss`, so redaction hides everything between the user's `:` and the LAST `@`
before the host: `postgresql://u:***@h/db`, and `scrub` treats `p`, `ss` and `p@ss` as secrets
(a driver's "could not translate host name "ss@h"" becomes "***@h").
"""

from __future__ import annotations

import base64
import logging
import re
import threading
from typing import Iterable
from urllib.parse import quote, quote_plus, unquote

MASK = "***"

# Query parameters whose value is a secret (case-insensitive substring): password, passwd, pwd,
# sslpassword, secret, client_secret, token, access_token, key, api_key, sslkey, credentials ...
_SECRET_PARAM = re.compile(r"pass|pwd|secret|token|key|credential", re.IGNORECASE)
# Secrets shorter than this are only replaced where they stand alone (not inside a longer word),
# so that a one-letter password does not mask every such letter of a message.
_SHORT = 4
_WORD = "A-Za-z0-9"

# A URL in free text: a scheme, then everything up to whitespace or a quote, less trailing punctuation.
_URL_TOKEN = re.compile(r"(?<![A-Za-z0-9+.\-])[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>`]*[^\s'\"<>`.,:;)\]}]")
# scheme://user:password@ with the password running to the LAST @ (an unencoded @ in a password).
_USERINFO = re.compile(r"^(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^:/@\s]*):(?P<password>.*)@(?P<rest>[^@]*)$", re.S)
# SQLAlchemy's own reading of the password (engine/url.py): up to the first @.
_SQLA_PASSWORD = re.compile(r"[\w+]+://[^:/]*:(?P<password>[^@]*)@")
_QUERY_PARAM = re.compile(r"(?P<head>[?&;](?P<name>[^=&;?#\s]+)=)(?P<value>[^&;#\s]*)")


# --- URLs ----------------------------------------------------------------------------------------


def is_secret_param(name: str) -> bool:
    """Whether a URL query parameter of this name carries a secret (password, token, key ...)."""
    return bool(_SECRET_PARAM.search(name))


def _mask_token(url: str) -> str:
    """Regex redaction for what SQLAlchemy cannot parse: `user:pass@` and secret query values."""
    match = _USERINFO.match(url)
    if match:
        url = f"{match['head']}:{MASK}@{match['rest']}"
    return _QUERY_PARAM.sub(lambda m: m["head"] + MASK if is_secret_param(m["name"]) and not
                            m["value"].startswith(MASK) else m[0], url)


def _parse(url: str):
    """SQLAlchemy's URL for url, or None (journal://, not a URL, a bad port ...)."""
    if not url or "://" not in url or url.startswith("journal://"):
        return None
    try:
        from sqlalchemy.engine import make_url

        return make_url(url)
    except Exception:
        return None


def _split_host(parsed) -> tuple[str | None, str | None]:
    """(the host, what SQLAlchemy put in the host from an unencoded @ in the password)."""
    host = parsed.host
    if host and "@" in host:
        leaked, host = host.rsplit("@", 1)
        return host, leaked
    return host, None


def redact(url: str) -> str:
    """url fit for a log, an Event, a status or a terminal: no password, no secret query value."""
    if not isinstance(url, str) or "://" not in url:
        return url
    parsed = _parse(url)
    if parsed is None:
        return _mask_token(url)
    try:
        host, leaked = _split_host(parsed)
        safe = parsed.set(host=host, query={})
        if leaked is not None and safe.password is None:
            safe = safe.set(password="x")  # rendered as ***
        text = safe.render_as_string(hide_password=True)
        if parsed.query:
            pairs = []
            for name in sorted(parsed.query):
                values = parsed.query[name]
                for value in (values,) if isinstance(values, str) else values:
                    shown = MASK if is_secret_param(name) else quote(value, safe="/:,.-_~")
                    pairs.append(f"{quote_plus(name)}={shown}")
            text += "?" + "&".join(pairs)
        return text
    except Exception:  # never let redaction itself fail: mask by regex
        return _mask_token(url)


def url_secrets(url: str) -> list[str]:
    """The secret substrings of a URL, longest first: its password as SQLAlchemy/libpq read it and as
    written (with an unencoded @: every part of it), decoded and URL-encoded, and secret query values.
    Not the URL itself (scrub replaces that by its redacted form)."""
    if not isinstance(url, str) or "://" not in url:
        return []
    found: list[str] = []
    parsed = _parse(url)
    if parsed is not None:
        _, leaked = _split_host(parsed)
        if parsed.password is not None:
            found.append(str(parsed.password))
        if leaked is not None:
            found.append(leaked)
            found.append(f"{parsed.password or ''}@{leaked}")
        for name, values in parsed.query.items():
            if is_secret_param(name):
                found.extend((values,) if isinstance(values, str) else values)
        written = _SQLA_PASSWORD.match(url)  # the password as written: what SQLAlchemy unquoted
        if written and written["password"]:
            found.append(written["password"])
            if leaked is not None:
                found.append(f"{written['password']}@{leaked}")
    else:
        match = _USERINFO.match(url)
        if match and match["password"]:  # up to the last @; and its pieces, split where parsers split
            found.append(match["password"])  # (a driver may echo "ss:w0rd@h" of "u:p@ss:w0rd@h" as a port)
            found.extend(re.split(r"[@:]", match["password"]))
    for m in _QUERY_PARAM.finditer(url):
        if is_secret_param(m["name"]) and m["value"]:
            found.append(m["value"])
    return _variants(found)


def _variants(values: Iterable[str]) -> list[str]:
    result: set[str] = set()
    for value in values:
        if not value:
            continue
        for variant in (value, unquote(value), quote(value, safe=""), quote_plus(value), quote(value, safe=" +")):
            if variant:
                result.add(variant)
    return sorted(result, key=lambda s: (-len(s), s))


# --- free text -----------------------------------------------------------------------------------


class _Scrubber:
    """One compiled pattern for a set of secrets: URLs become their redacted form, the rest ***."""

    def __init__(self, secrets: Iterable[str]):
        replacement: dict[str, str] = {}
        for secret in secrets:
            if not isinstance(secret, str) or not secret:
                continue
            if "://" in secret:
                replacement.setdefault(secret, redact(secret))
                for part in url_secrets(secret):
                    replacement.setdefault(part, MASK)
            for part in _variants([secret]):
                replacement.setdefault(part, redact(part) if "://" in part else MASK)
        replacement = {k: v for k, v in replacement.items() if k != v and k != MASK}
        self.replacement = replacement
        needles = sorted(replacement, key=lambda s: (-len(s), s))
        long = [re.escape(s) for s in needles if len(s) >= _SHORT]
        short = [re.escape(s) for s in needles if len(s) < _SHORT]
        alternatives = long + ([f"(?<![{_WORD}])(?:{'|'.join(short)})(?![{_WORD}])"] if short else [])
        self.pattern = re.compile("|".join(alternatives)) if alternatives else None

    def __call__(self, text: str) -> str:
        if self.pattern is not None:
            text = self.pattern.sub(lambda m: self.replacement[m[0]], text)
        return _URL_TOKEN.sub(lambda m: _mask_token(m[0]) if "@" in m[0] or "=" in m[0] else m[0], text)


def scrub(text: str, *secrets: str) -> str:
    """text without the given secrets: a URL among them appears redacted, its password (decoded,
    URL-encoded, every part of one with an unencoded @) and any other secret as ***. Also masks any
    other `scheme://user:pass@` and secret query values in the text. Use it on error messages,
    statuses and Events: `scrub(str(error), url)`."""
    if not isinstance(text, str):
        text = str(text)
    return _Scrubber(secrets)(text)


# --- the operator's registry and log filter ------------------------------------------------------

_lock = threading.Lock()
_registered: set[str] = set()
_scrubber: _Scrubber | None = None


def register_secret(value: str) -> None:
    """Remember a secret value (a Secret's key the operator read) so the log filter hides it: the
    value, the secret parts of it if it is a URL, and its base64 form (as in a Secret's body)."""
    global _scrubber
    if not isinstance(value, str) or not value:
        return
    parts = {value}
    try:
        parts.add(base64.b64encode(value.encode()).decode())
    except Exception:
        pass
    with _lock:
        if parts <= _registered:
            return
        _registered.update(parts)
        _scrubber = None


def registered_secrets() -> frozenset[str]:
    """The secret values registered so far (what SecretFilter hides)."""
    with _lock:
        return frozenset(_registered)


def scrub_registered(text: str) -> str:
    """scrub(text, *every registered secret), with the pattern compiled once per change."""
    global _scrubber
    with _lock:
        scrubber = _scrubber
        if scrubber is None:
            scrubber = _scrubber = _Scrubber(_registered)
    return scrubber(text)


class SecretFilter(logging.Filter):
    """Rewrites each record's formatted message (and traceback) without the registered secrets and
    without `user:pass@` in any URL. Never drops a record."""

    _formatter = logging.Formatter()

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "_strata_scrubbed", False):
            return True
        try:
            message = record.getMessage()
            clean = scrub_registered(message)
            if clean != message or record.args:
                record.msg, record.args = clean, None
            if record.exc_info and not record.exc_text:
                record.exc_text = self._formatter.formatException(record.exc_info)
            if record.exc_text:
                record.exc_text = scrub_registered(record.exc_text)
            if record.stack_info:
                record.stack_info = scrub_registered(record.stack_info)
            record._strata_scrubbed = True
        except Exception:  # a record that cannot be formatted: let logging report it as usual
            pass
        return True


def install_log_filter(*loggers: logging.Logger | str) -> SecretFilter:
    """Add one SecretFilter to every handler of the root logger and of the given loggers (once)."""
    secret_filter = next((f for h in logging.getLogger().handlers for f in h.filters if isinstance(f, SecretFilter)),
                         None) or SecretFilter()
    for logger in (logging.getLogger(), *loggers):
        if isinstance(logger, str):
            logger = logging.getLogger(logger)
        for handler in logger.handlers:
            if not any(isinstance(f, SecretFilter) for f in handler.filters):
                handler.addFilter(secret_filter)
    return secret_filter
