"""Logs: one JSON object per line on stderr (operations.md 3).

Nothing that reaches a log may hold a full PAN, PIN block, track data, CVV
or clear key: callers pass masked values; ``redact`` is a last guard that
masks any long digit run that passes Luhn in a formatted message.
"""

from __future__ import annotations

import logging
import re
import sys
from datetime import datetime, timezone

import orjson

from cardswitch.pan import luhn_ok, mask_pan

_DIGITS = re.compile(r"\d{12,19}")


def redact(text: str) -> str:
    return _DIGITS.sub(lambda m: mask_pan(m.group()) if luhn_ok(m.group()) else m.group(), text)


class JsonFormatter(logging.Formatter):
    def __init__(self, process: str = "") -> None:
        super().__init__()
        self.process_name = process

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact(record.getMessage()),
        }
        if self.process_name:
            out["proc"] = self.process_name
        for key in ("trace", "bank", "terminal", "conn"):
            v = getattr(record, key, None)
            if v is not None:
                out[key] = v
        if record.exc_info:
            out["exc"] = redact(self.formatException(record.exc_info))
        return orjson.dumps(out).decode()


def setup_logging(level: int = logging.INFO, process: str = "") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(process))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
