"""The HSM simulator's TCP server (hsm.md 1): a thin asyncio shell over ``Hsm``.

Each frame is a 2-byte big-endian length, then the header (``header_len``
bytes, echoed unchanged), then the command. A connection may have many
requests in flight; they are answered in the order they came. The work of a
command is done at once when its frame arrives (it takes microseconds); an
artificial latency only holds its response back, and the responses behind
it on the same connection wait for it, so the order holds.

Fault injection per command (``"*"`` applies to every command without its
own entry):

- ``latency_ms``: hold the response back this long;
- ``fail``: ``"down"`` (no answer at all: the request is swallowed),
  ``"close"`` (the connection is closed, with responses already due sent
  first), or a 2-digit error code (answered with that code and no fields);
- ``disabled``: answered with error 68 as a real HSM does for a command its
  security settings do not allow.

All three can be changed at run time with the methods of :class:`HsmServer`.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from cardswitch.hsm_sim.commands import SHORT_FRAME, Hsm, error_response
from cardswitch.hsm_sim.lmk import Lmk
from cardswitch.iso8583.framing import FrameReader, FrameTooLarge, Framing, FramingError

log = logging.getLogger("cardswitch.hsm_sim")

DOWN = "down"
CLOSE = "close"
ALL = "*"
_MAX_FRAME = 0xFFFF
_HIGH_WATER = 1 << 20           # write buffer above which a connection stops reading


@dataclass(slots=True)
class HsmOptions:
    header_len: int = 4
    latency_ms: dict[str, float] = field(default_factory=dict)
    fail: dict[str, str] = field(default_factory=dict)       # "down" | "close" | "NN"
    disabled: frozenset[str] | set[str] = frozenset()
    key_cache: int = 4096                                     # decrypted keys kept (LRU)


def _check_fail(mode: str) -> str:
    if mode in (DOWN, CLOSE) or (len(mode) == 2 and mode.isascii() and mode.isdigit()):
        return mode
    raise ValueError(f"failure mode {mode!r}: expected 'down', 'close' or a 2-digit error code")


def _check_latency(ms: float) -> float:
    ms = float(ms)
    if not ms >= 0:
        raise ValueError(f"latency {ms} ms must be >= 0")
    return ms


class HsmStats:
    """Counters per command: requests, responses by error code, swallowed requests."""

    __slots__ = ("responses", "dropped", "closed", "connections")

    def __init__(self) -> None:
        self.responses: dict[tuple[str, str], int] = {}   # (command, error code) -> count
        self.dropped: dict[str, int] = {}                 # "down" per command
        self.closed: dict[str, int] = {}                  # "close" per command
        self.connections = 0

    def count(self, cmd: str, code: str) -> None:
        k = (cmd, code)
        self.responses[k] = self.responses.get(k, 0) + 1

    def requests(self, cmd: str) -> int:
        return (sum(n for (c, _), n in self.responses.items() if c == cmd)
                + self.dropped.get(cmd, 0) + self.closed.get(cmd, 0))

    def snapshot(self) -> dict[str, dict[str, object]]:
        """``{command: {"requests": n, "codes": {code: n}, "dropped": n, "closed": n}}``."""
        out: dict[str, dict[str, object]] = {}
        for (cmd, code), n in sorted(self.responses.items()):
            e = out.setdefault(cmd, {"requests": 0, "codes": {}, "dropped": 0, "closed": 0})
            e["codes"][code] = n           # type: ignore[index]
            e["requests"] += n             # type: ignore[operator]
        for what, d in (("dropped", self.dropped), ("closed", self.closed)):
            for cmd, n in d.items():
                e = out.setdefault(cmd, {"requests": 0, "codes": {}, "dropped": 0, "closed": 0})
                e[what] = n
                e["requests"] += n         # type: ignore[operator]
        return out


class _Connection(asyncio.Protocol):
    """One client connection: frames in, responses out in request order."""

    __slots__ = ("srv", "reader", "transport", "pending", "closing")

    def __init__(self, srv: HsmServer) -> None:
        self.srv = srv
        self.reader = FrameReader(Framing("2byte", 0, _MAX_FRAME))
        self.transport: asyncio.Transport | None = None
        # Responses held back (latency) and everything behind them: [frame, ready].
        self.pending: deque[list] = deque()
        self.closing = False

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.transport = transport
        transport.set_write_buffer_limits(high=_HIGH_WATER)
        self.srv._conns.add(self)
        self.srv.stats.connections += 1

    def connection_lost(self, exc) -> None:
        self.srv._conns.discard(self)
        self.pending.clear()
        self.closing = True

    def pause_writing(self) -> None:
        # The client is not reading its responses: stop reading its requests.
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and not self.closing:
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        try:
            frames = self.reader.feed(data)
        except (FrameTooLarge, FramingError) as e:   # not reachable with 2-byte lengths; kept safe
            frames = e.frames
            self.closing = True
        srv = self.srv
        answer = srv._answer
        out: list[bytes] = []
        pending = self.pending
        for _, payload in frames:
            frame, delay = answer(payload)
            if frame is None:
                if delay < 0:          # "close"
                    self.closing = True
                    break
                continue               # "down": swallowed
            if not pending and delay <= 0:
                out.append(frame)
            else:
                slot = [frame, delay <= 0]
                pending.append(slot)
                if delay > 0:
                    asyncio.get_running_loop().call_later(delay / 1000.0, self._release, slot)
        t = self.transport
        if t is None:
            return
        if out:
            t.write(b"".join(out) if len(out) > 1 else out[0])
        if pending:
            self._flush()
        if self.closing:
            self.pending.clear()
            t.close()

    def _release(self, slot: list) -> None:
        slot[1] = True
        self._flush()

    def _flush(self) -> None:
        pending = self.pending
        out: list[bytes] = []
        while pending and pending[0][1]:
            out.append(pending.popleft()[0])
        t = self.transport
        if out and t is not None and not t.is_closing():
            t.write(b"".join(out))


class HsmServer:
    """The simulator on a TCP port. ``await start()``, then ``.port``; ``await stop()``."""

    def __init__(self, options: HsmOptions | None = None, *, lmk: Lmk | None = None,
                 host: str = "127.0.0.1", port: int = 0, hsm: Hsm | None = None) -> None:
        opts = options or HsmOptions()
        if opts.header_len < 0:
            raise ValueError("header_len must be >= 0")
        self.header_len = opts.header_len
        self.host = host
        self.port = port
        self.hsm = hsm or Hsm(lmk, key_cache=opts.key_cache, disabled=opts.disabled)
        self.hsm.disabled.update(opts.disabled)
        self._latency: dict[str, float] = {c: _check_latency(v) for c, v in opts.latency_ms.items() if v}
        self._fail: dict[str, str] = {c: _check_fail(v) for c, v in opts.fail.items()}
        self.stats = HsmStats()
        self._server: asyncio.AbstractServer | None = None
        self._conns: set[_Connection] = set()

    # -- run time controls ---------------------------------------------------------

    def set_latency(self, cmd: str, ms: float | None) -> None:
        """Hold ``cmd``'s responses back ``ms`` milliseconds (``"*"``: every command); None/0 clears."""
        if ms:
            self._latency[cmd] = _check_latency(ms)
        else:
            self._latency.pop(cmd, None)

    def set_failure(self, cmd: str, mode: str | None) -> None:
        """Make ``cmd`` fail: ``"down"``, ``"close"`` or an error code; None clears."""
        if mode is None:
            self._fail.pop(cmd, None)
        else:
            self._fail[cmd] = _check_fail(mode)

    def disable(self, *cmds: str) -> None:
        self.hsm.disabled.update(cmds)

    def enable(self, *cmds: str) -> None:
        self.hsm.disabled.difference_update(cmds)

    def clear_faults(self) -> None:
        """No latency, no failures, nothing disabled."""
        self._latency.clear()
        self._fail.clear()
        self.hsm.disabled.clear()

    @property
    def connections(self) -> int:
        return len(self._conns)

    # -- the request path -----------------------------------------------------------

    def _answer(self, payload: bytes) -> tuple[bytes | None, float]:
        """``(frame, delay_ms)``; frame None with delay 0 = swallow, delay -1 = close."""
        hl = self.header_len
        header = payload[:hl]
        body = payload[hl:]
        cmd = body[:2].decode("latin-1") if len(body) >= 2 else "ZZ"
        fail = self._fail
        mode = fail.get(cmd) or fail.get(ALL) if fail else None
        if mode is not None:
            if mode == DOWN:
                self.stats.dropped[cmd] = self.stats.dropped.get(cmd, 0) + 1
                return None, 0
            if mode == CLOSE:
                self.stats.closed[cmd] = self.stats.closed.get(cmd, 0) + 1
                return None, -1
            resp = error_response(body, mode)
        else:
            resp = self.hsm.handle(body) if len(body) >= 2 else SHORT_FRAME
        self.stats.count(cmd, resp[2:4].decode("latin-1"))
        lat = self._latency
        delay = (lat.get(cmd) or lat.get(ALL) or 0) if lat else 0
        n = len(header) + len(resp)
        return n.to_bytes(2, "big") + header + resp, delay

    # -- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Connection(self), self.host, self.port,
                                                reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("HSM simulator listening on %s:%d", self.host, self.port)

    async def stop(self) -> None:
        srv, self._server = self._server, None
        if srv is None:
            return
        srv.close()
        for c in list(self._conns):
            if c.transport is not None:
                c.transport.close()
        await srv.wait_closed()

    async def __aenter__(self) -> HsmServer:
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()


async def run_hsm(network, ready: Callable[..., object] | asyncio.Event | None = None,
                  options: HsmOptions | None = None) -> None:
    """Serve the simulator on ``network.hsm.listen`` until cancelled.

    The LMK is ``network.hsm.lmk_file`` (a path as written, relative to the
    current directory) or the Thales test LMK. ``ready`` is an Event to set or
    a callable, called with the server when it takes an argument, once listening.
    """
    cfg = network.hsm
    lmk = Lmk.from_file(cfg.lmk_file) if cfg.lmk_file else Lmk.test()
    server = HsmServer(options, lmk=lmk, host=cfg.listen.host, port=cfg.listen.port)
    await server.start()
    try:
        if isinstance(ready, asyncio.Event):
            ready.set()
        elif ready is not None:
            res = ready(server) if _takes_argument(ready) else ready()
            if inspect.isawaitable(res):
                await res
        await asyncio.Event().wait()
    finally:
        await server.stop()


def _takes_argument(fn: Callable[..., object]) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
               for p in params)


def parse_overrides(items: Iterable[str], what: str) -> dict[str, str]:
    """``["CA=5", "*=down"]`` -> ``{"CA": "5", "*": "down"}`` (for the command line)."""
    out: dict[str, str] = {}
    for item in items:
        cmd, sep, value = item.partition("=")
        if not sep or not cmd or not value:
            raise ValueError(f"{what}: expected CMD=VALUE, not {item!r}")
        out[cmd.strip()] = value.strip()
    return out
