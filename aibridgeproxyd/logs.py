"""Logging set-up: text or one JSON object per line.

Context travels as ``extra={"connect_id": ..., "request_id": ...}`` on each record, so every
line about a connection carries its connect_id and every line about a request its request_id.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
from typing import Any

_STANDARD_ATTRS = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


def record_extras(record: logging.LogRecord) -> dict[str, Any]:
    """The ``extra`` fields of a log record, in the order they were given."""
    return {
        k: v for k, v in vars(record).items() if k not in _STANDARD_ATTRS and not k.startswith("_")
    }


def _text_value(value: Any) -> str:
    """A text-format ``key=value``'s value: quoted as a JSON string when it would otherwise
    not read back as one value (spaces, line breaks, quotes, ``=``, empty), so that a prompt or
    an error message stays on its line."""
    if not isinstance(value, str):
        # null, true, 12.5: as JSON writes them, so that a string "None" reads apart from null.
        if value is None or isinstance(value, bool | int | float):
            return json.dumps(value)
        value = str(value)
    if not value or any(c in value for c in ' "=\\') or not value.isprintable():
        return json.dumps(value, ensure_ascii=False)
    if value in ("null", "true", "false"):
        return json.dumps(value)  # the string, not the JSON value
    return value


class TextFormatter(logging.Formatter):
    """One line per record: UTC time, level, logger, message, then the ``extra`` fields as
    ``key=value``."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.datetime.fromtimestamp(record.created, datetime.UTC).strftime(
            "%Y-%m-%dT%H:%M:%S.%f"
        )[:-3]
        line = f"{stamp}Z {record.levelname:<7} {record.name}: {record.getMessage()}"
        extras = record_extras(record)
        if extras:
            line += " " + " ".join(f"{k}={_text_value(v)}" for k, v in extras.items())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per record, with the ``extra`` fields as keys."""

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC)
            .isoformat()
            .replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record_extras(record).items():
            payload[key] = (
                value if isinstance(value, str | int | float | bool | type(None)) else str(value)
            )
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        return json.dumps(payload, ensure_ascii=False)


def setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    numeric = getattr(logging, level.upper())
    root.setLevel(numeric)
    # mitmproxy logs every client and server connect at INFO; that is debug detail for a daemon.
    logging.getLogger("mitmproxy").setLevel(
        logging.DEBUG if numeric <= logging.DEBUG else logging.WARNING
    )
    for noisy in ("hpack", "aiosqlite", "asyncio", "urllib3", "botocore"):
        logging.getLogger(noisy).setLevel(max(numeric, logging.WARNING))
