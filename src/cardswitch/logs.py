"""Logs: one JSON object per line on stderr (operations.md 3), with trace IDs.

Nothing that reaches a log may hold a full PAN, PIN block, track data, CVV
or clear key: callers pass masked values; ``redact`` is a last guard that
masks any long digit run that passes Luhn in a formatted message, and drops
what follows the separator of anything shaped like track 2.

Trace IDs
---------
One trace ID follows a transaction through its terminal leg and its bank leg.
It lives in the context variable ``trace_id``; ``JsonFormatter`` adds it as
``"trace"`` to every line logged while it is set. ``Pipeline.handle`` binds
it first thing::

    async def handle(self, req, conn=None, raw=b""):
        bind_trace()                  # a fresh ID for this request's task
        ...

That is enough because the acceptor runs each request in a task of its own
(``loop.create_task`` copies the current context, so a value set inside the
task stays inside it), and everything the transaction does from there sees
the same value: coroutines it awaits (``BankLink.request`` and the HSM
client run inside the caller's task), tasks it creates (they copy the
context), and ``loop.call_soon``/``call_later`` callbacks it schedules (the
bank link's per-request timeout timer), because each copies the context at
creation. What runs elsewhere belongs to no transaction and logs without a
trace: a connection's own callbacks (a bank response arriving in
``data_received``, an unmatched late answer, the acceptor's done-callbacks)
and long-lived workers started outside any request (the store-and-forward
queue). A line there that should carry one passes ``extra={"trace": ...}``
(it wins over the context), or the worker wraps one item's work in
``trace_scope(that_trace)``. A caller that already has an ID (say, from a peer
node) passes it: ``bind_trace(that_id)``.

``trace_scope()`` is the same as a context manager that restores the previous
value on exit, for code that does not run in a task of its own.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import re
import secrets
import sys
from collections.abc import Iterator
from contextvars import ContextVar
from datetime import datetime, timezone

import orjson

from cardswitch.pan import luhn_ok, mask_pan

# -- trace IDs -------------------------------------------------------------------

trace_id: ContextVar[str] = ContextVar("cardswitch_trace_id", default="")

_prefix = ""
_counter: Iterator[int] = iter(())


def _reseed() -> None:
    """A random 32-bit prefix per process, then a counter: unique without a
    syscall per ID. Re-drawn in a forked child so siblings never collide."""
    global _prefix, _counter
    _prefix = secrets.token_hex(4)
    _counter = itertools.count(secrets.randbelow(1 << 16))


_reseed()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reseed)


def new_trace_id() -> str:
    """16 lower-case hex digits: 8 of process prefix, 8 of counter."""
    return f"{_prefix}{next(_counter) & 0xFFFFFFFF:08x}"


def bind_trace(trace: str | None = None) -> str:
    """Set the trace ID of the current context (a new one unless given); return it.

    Call it at the start of a task that is one transaction: the value stays in
    that task's context and in whatever the task spawns.
    """
    tid = trace or new_trace_id()
    trace_id.set(tid)
    return tid


def current_trace() -> str:
    """The trace ID bound in the current context, or ``""``."""
    return trace_id.get()


@contextlib.contextmanager
def trace_scope(trace: str | None = None) -> Iterator[str]:
    """``bind_trace`` for a block: the previous value comes back on exit."""
    tid = trace or new_trace_id()
    token = trace_id.set(tid)
    try:
        yield tid
    finally:
        trace_id.reset(token)


# -- redaction ---------------------------------------------------------------------

# A run of 12-19 digits, and when a track-2 separator follows, the track's
# data after it (expiry, service code, discretionary data).
_DIGITS = re.compile(r"(\d{12,19})(?:([=D])\d*)?")


def _mask(m: re.Match) -> str:
    pan = m.group(1)
    if m.group(2):                      # track 2 shape: nothing after the PAN survives
        return mask_pan(pan) + m.group(2) + "***"
    return mask_pan(pan) if luhn_ok(pan) else m.group(0)


def redact(text: str) -> str:
    return _DIGITS.sub(_mask, text)


# -- formatting --------------------------------------------------------------------


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (UTC), level, logger, msg, and when known
    proc, trace, bank, terminal, conn, exc.

    ``trace`` is the ``extra={"trace": ...}`` of the call when given, else the
    ``trace_id`` bound in the context the line was logged from (the formatter
    runs synchronously in the caller with a ``StreamHandler``).
    """

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
        trace = getattr(record, "trace", None) or trace_id.get()
        if trace:
            out["trace"] = trace
        for key in ("bank", "terminal", "conn"):
            v = getattr(record, key, None)
            if v is not None:
                out[key] = v
        if record.exc_info:
            out["exc"] = redact(self.formatException(record.exc_info))
        return orjson.dumps(out, default=str).decode()


def setup_logging(level: int = logging.INFO, process: str = "") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(process))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
