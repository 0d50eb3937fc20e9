"""URLs from the user: checked once at validation, redacted everywhere they are shown.

A key never belongs in a URL: a URL is written to the run's ConfigMap, to logs, to error messages and from there
to the run's status and Events. So `check_http_url` refuses userinfo (`https://user:key@host`) and query strings
(`?api_key=...`), naming where the key belongs instead, and `redact` strips both from any text that is shown,
as a second line of defence for URLs that did not come through validation (a server's own error message).
"""

from __future__ import annotations

import logging
import re
from urllib.parse import urlsplit

from .yamlfile import shorten

# Where each URL field's credentials belong (said when a URL carries them).
KEY_HOME = {
    "models.endpoint": "an environment variable named by models.apiKeyEnv",
    "evaluate.judge.endpoint": "an environment variable named by evaluate.judge.apiKeyEnv (on a cluster, "
                               "from a Secret through secretEnv)",
    "storage.endpointUrl": "the AWS variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY; on a cluster "
                           "storage.credentialsSecret)",
}

_HOST = re.compile(r"^(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}"
                   r"[A-Za-z0-9])?)*|\[[0-9A-Fa-f:.]+\])$")
# The CRD's mirror of check_http_url (the apiserver evaluates it; CEL's matches is RE2, so no look-arounds).
HTTP_URL_PATTERN = r"^https?://[A-Za-z0-9.\[\]:-]+(/[A-Za-z0-9._~!&'()*+,;=:/%-]*)?$"


def check_http_url(value: str, field: str) -> str:
    """An http(s) base URL without credentials, query or fragment; ValueError says what is wrong (never echoing
    the credentials). Returns it without a trailing slash."""
    if any(c in value for c in "\r\n\t ") or any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError("must be a URL without spaces, tabs, line breaks or control characters")
    if not re.match(r"^https?://", value):
        raise ValueError("must be an http:// or https:// URL")
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:
        raise ValueError("must be an http:// or https:// URL (its host or port cannot be read)") from None
    if "@" in parts.netloc:
        home = KEY_HOME.get(field, "an environment variable (from a Secret on a cluster)")
        raise ValueError(f"must not contain credentials (user:password@): a key belongs in {home}, never in "
                         "the URL (it would be shown in logs, the run's ConfigMap and its status)")
    if parts.query or parts.fragment or "?" in value or "#" in value:
        raise ValueError("must not have a query string or fragment (keys in a URL would be shown in logs and the "
                         f"run's status; a key belongs in {KEY_HOME.get(field, 'an environment variable')})")
    host = parts.hostname or ""
    if not host or not _HOST.match(host if ":" not in host else f"[{host}]"):
        raise ValueError(f"must name a host (got {shorten(redact(value), 100)!r})")
    if port == 0:
        raise ValueError("must have a port between 1 and 65535")
    if not re.match(HTTP_URL_PATTERN, value):
        raise ValueError("must be an http:// or https:// URL of letters, digits and URL punctuation only")
    return value.rstrip("/")


# scheme://[userinfo@]rest[?query][#fragment]; rest stops at whitespace and quotes.
_URL = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^\s/?#@'\"<>]*@)?"
                  r"(?P<rest>[^\s?#'\"<>]*)(?P<query>[?#][^\s'\"<>]*)?")


def _strip(match: re.Match) -> str:
    out = match["scheme"] + match["rest"]
    if match["userinfo"]:
        out = match["scheme"] + "***@" + match["rest"]
    if match["query"]:
        out += "?***"
    return out


def redact(text: object) -> str:
    """The text with every URL's userinfo and query string replaced by ***."""
    return _URL.sub(_strip, str(text))


def redact_log_records() -> None:
    """Every log record of this process gets its message redacted when it is made (whichever handler, kopf's
    included, writes it). Records are made only for enabled levels, so this costs nothing for debug lines
    that are not logged."""
    factory = logging.getLogRecordFactory()
    if getattr(factory, "redacting", False):
        return

    def make(*args, **kwargs) -> logging.LogRecord:
        record = factory(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # a broken format string: logging reports it when the record is emitted, as without us
            return record
        if "://" in message:
            record.msg, record.args = redact(message), None
        return record

    make.redacting = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(make)
