"""Logging: one line per record, as text for people or JSON for journald and shippers, secrets masked.

``setup_logging("json", "INFO")`` writes objects like::

    {"ts": "2026-11-02T10:04:05.123Z", "level": "INFO", "logger": "batchd.accumulator",
     "msg": "batch.created", "event": "batch.created", "batch_id": "msgbatch_01...", "requests": 812}

(on one line). Extra fields come from ``extra={...}`` or from :func:`log_event`. Every line passes through
:func:`redact` first: ``sk-ant-...`` keys, bearer tokens, URL passwords and any value given to
:func:`register_secret` (the daemon registers its API key at start) are masked.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import sys
import threading
from collections.abc import Mapping
from typing import IO, Any, Literal

__all__ = [
    "JsonFormatter",
    "RedactingFilter",
    "TextFormatter",
    "log_event",
    "redact",
    "register_secret",
    "setup_logging",
]

MASK = "***"
# Secrets this short would mask ordinary words all over the logs; no real credential is that short.
_MIN_SECRET_LEN = 4
# Patterns that are secrets whoever configured them: Anthropic keys, Authorization values, URL passwords.
_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"sk-ant-[A-Za-z0-9_\-]+"), "sk-ant-" + MASK),
    (re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9._~+/=\-]+"), r"\1" + MASK),
    (re.compile(r"(?i)(x-api-key['\"]?\s*[:=]\s*['\"]?)[^\s'\",}]+"), r"\1" + MASK),
    (re.compile(r"([a-z][a-z0-9+.\-]*://[^:/@\s]*:)[^@\s/]+@"), r"\1" + MASK + "@"),
)

_secrets_lock = threading.Lock()
_secrets: set[str] = set()
_secrets_re: re.Pattern[str] | None = None


def register_secret(value: str | None) -> None:
    """Mask ``value`` wherever it appears in later log output. ``None`` and very short values are ignored."""
    global _secrets_re
    if value is None or len(value) < _MIN_SECRET_LEN:
        return
    with _secrets_lock:
        _secrets.add(value)
        # Longest first, so a secret that contains another is masked whole.
        alternatives = sorted(_secrets, key=len, reverse=True)
        _secrets_re = re.compile("|".join(re.escape(s) for s in alternatives))


def redact(text: str) -> str:
    """``text`` with registered secrets and key-like strings replaced by ``***``."""
    registered = _secrets_re
    if registered is not None:
        text = registered.sub(MASK, text)
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, Mapping):
        return {k: _redact_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact_value(v) for v in value]
    return value


# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_RECORD_ATTRS = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}


def _extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _RECORD_ATTRS and not k.startswith("_")}


class RedactingFilter(logging.Filter):
    """Masks secrets in a record's message and extra fields, in place (so every later handler sees it masked).

    Attach it to handlers: a logger's filters do not see records propagated from child loggers.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:
            return True  # bad %-args: let the formatter fail and report it through handleError, as usual
        masked = redact(message)
        if masked != message:
            # Freeze the formatted text: re-applying args to a masked template could reveal or break it.
            record.msg, record.args = masked, None
        for key, value in _extra_fields(record).items():
            setattr(record, key, _redact_value(value))
        return True


def _timestamp(record: logging.LogRecord) -> str:
    when = dt.datetime.fromtimestamp(record.created, tz=dt.UTC)
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, the extra fields, and ``exc`` for a traceback."""

    _CORE = ("ts", "level", "logger", "msg")

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in _extra_fields(record).items():
            # A field may not overwrite the envelope; it keeps its value under key_.
            out[f"{key}_" if key in self._CORE else key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        # default=str: a field that is not JSON (a datetime, a Path) is logged as its text rather than lost.
        return redact(json.dumps(out, default=str, ensure_ascii=False, separators=(",", ":")))


def _text_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str, ensure_ascii=False)
    if text == "" or any(c.isspace() or c in '"=' for c in text):
        return json.dumps(text, ensure_ascii=False)  # quoted, so the line still splits on spaces
    return text


class TextFormatter(logging.Formatter):
    """``2026-11-02T10:04:05.123Z INFO batchd.accumulator: batch.created batch_id=... requests=812``.

    The record is one line (newlines in the message are escaped); a traceback, if any, follows it.
    """

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage().replace("\n", "\\n")
        parts = [_timestamp(record), record.levelname, f"{record.name}:", message]
        extras = _extra_fields(record)
        if extras.get("event") == record.msg:
            extras.pop("event")  # log_event's message is already the event name
        parts.extend(f"{key}={_text_value(value)}" for key, value in extras.items())
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return redact(line)


_HANDLER_NAME = "batchd"


def setup_logging(
    fmt: Literal["text", "json"] = "text", level: str = "INFO", *, stream: IO[str] | None = None
) -> logging.Handler:
    """Send every log record (batchd's and its libraries') to ``stream`` (stderr) in ``fmt``, at ``level``.

    Calling it again replaces the handler it installed before, so the CLI and tests can reconfigure freely.
    """
    if fmt not in ("text", "json"):
        raise ValueError(f"log format must be 'text' or 'json', not {fmt!r}")
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
        old.close()
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(RedactingFilter())
    root.addHandler(handler)
    root.setLevel(numeric)
    # The SDK and aiohttp log every request at INFO; at our INFO that would drown the events that matter.
    quiet = numeric if numeric <= logging.DEBUG else max(numeric, logging.WARNING)
    for noisy in ("httpx", "httpx2", "anthropic", "aiohttp.access", "arq.worker", "arq.jobs"):
        logging.getLogger(noisy).setLevel(quiet)
    return handler


def log_event(
    logger: logging.Logger,
    event: str,
    /,
    *,
    level: int = logging.INFO,
    exc_info: bool | BaseException | None = None,
    **fields: Any,
) -> None:
    """Log one line for ``event`` (e.g. "batch.created") carrying ``fields`` as structured data.

    Fields whose names clash with LogRecord attributes (``name``, ``msg``, ...) get a trailing ``_``.
    """
    if not logger.isEnabledFor(level):
        return
    extra: dict[str, Any] = {"event": event}
    for key, value in fields.items():
        extra[f"{key}_" if key in _RECORD_ATTRS else key] = value
    # stacklevel=2: the record names the caller's line, not this helper's.
    logger.log(level, event, extra=extra, exc_info=exc_info, stacklevel=2)
