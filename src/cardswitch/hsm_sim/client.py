"""HSM client: Thales payShield legacy host commands (variant LMK) over TCP.

Used by the switch and the simulated banks; works against ``hsm_sim`` and,
unchanged, against a real payShield (hsm.md).

Layers, bottom up:

* Pure parts, testable without sockets: field checks and the byte layout of
  each command (``build_*``), the split of an answer into response code, error
  code and fields (:func:`parse_response`), and :class:`PendingTable`, which
  gives every request in flight on a connection a header that is unique among
  them and matches answers back by that header.
* :class:`_Connection`, a thin ``asyncio.Protocol`` over ``FramedProtocol``
  (2-byte length, then the header): one timer per request, nothing else.
* :class:`HsmClient`: a pool of connections kept up in the background with
  backoff, least-in-flight selection, and the typed command methods.

Failure semantics (what the switch maps to response code 96): no connection up
raises :class:`HsmUnavailable` at once, nothing waits; no answer within
``timeout_s`` raises :class:`HsmTimeout` (a late answer is discarded); an error
code other than ``00`` (``01`` is a result for verify commands) raises
:class:`HsmError`. Arguments that cannot form a valid command raise
:class:`HsmRequestError` (also a ``ValueError``) before anything is sent.

Nothing here logs a key, PIN block, PAN, CVV or MAC input: log lines name the
command, the error code and the connection only.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
from dataclasses import dataclass
from typing import Generic, TypeVar

from cardswitch.config import Endpoint
from cardswitch.iso8583.framing import Framing
from cardswitch.switch.backoff import Backoff
from cardswitch.switch.framed import FramedProtocol

log = logging.getLogger("cardswitch.hsm.client")

__all__ = [
    "ERROR_MEANINGS", "GeneratedKey", "HsmBusy", "HsmClient", "HsmError", "HsmFailure",
    "HsmProtocolError", "HsmRequestError", "HsmTimeout", "HsmUnavailable", "PendingTable",
    "account12", "parse_response", "response_code_of",
]

# hsm.md 4
ERROR_MEANINGS: dict[str, str] = {
    "00": "no error",
    "01": "verification failure",
    "02": "inappropriate key length",
    "04": "invalid key type code",
    "05": "invalid key length flag",
    "10": "source key parity error",
    "11": "destination key parity error",
    "12": "no keys loaded",
    "13": "LMK error",
    "15": "invalid input data",
    "20": "PIN block does not contain valid values",
    "23": "invalid PIN block format code",
    "24": "PIN shorter than 4 or longer than 12 digits",
    "26": "invalid key scheme",
    "27": "incompatible key length",
    "41": "internal error",
    "68": "command disabled",
    "80": "data length error",
}

MAX_FRAME = 0xFFFF          # what a 2-byte length can say


# -- errors ------------------------------------------------------------------

class HsmFailure(Exception):
    """Any HSM call that did not give a result: the transaction gets 96."""


class HsmUnavailable(HsmFailure):
    """No connection to the HSM is up (or the one carrying the request was lost)."""


class HsmBusy(HsmUnavailable):
    """Every connection holds its cap of requests in flight."""


class HsmTimeout(HsmFailure):
    def __init__(self, command: str, timeout_s: float) -> None:
        super().__init__(f"HSM {command}: no answer within {timeout_s * 1000:.0f} ms")
        self.command = command
        self.timeout_s = timeout_s


class HsmError(HsmFailure):
    """The HSM answered with an error code (hsm.md 4)."""

    def __init__(self, command: str, code: str) -> None:
        self.command = command
        self.code = code
        self.meaning = ERROR_MEANINGS.get(code, "unknown error code")
        super().__init__(f"HSM {command} error {code}: {self.meaning}")


class HsmProtocolError(HsmFailure):
    """An answer that is not a well-formed response to the command sent."""

    def __init__(self, command: str, detail: str) -> None:
        super().__init__(f"HSM {command}: {detail}")
        self.command = command
        self.detail = detail


class HsmRequestError(HsmFailure, ValueError):
    """Arguments that cannot form the command; nothing was sent. The message
    names the field, never its value (it may be a PIN block or a PAN)."""


# -- pure helpers ------------------------------------------------------------

def account12(pan: str) -> str:
    """The 12 right-most PAN digits excluding the check digit (zero-padded on
    the left for a PAN shorter than 13 digits)."""
    if not pan.isdigit() or len(pan) < 2:
        raise HsmRequestError("PAN: expected digits")
    return pan[:-1][-12:].rjust(12, "0")


def response_code_of(command: str) -> str:
    """NC -> ND, CA -> CB, M6 -> M7 (the second character advanced by one)."""
    return command[0] + chr(ord(command[1]) + 1)


def parse_response(command: str, payload: bytes) -> tuple[str, bytes]:
    """(error code, response fields) of the answer to ``command`` (header removed).

    An answer with another response code (``ZZ`` for a frame the HSM could not
    read, or a wrong code) and an error code is reported as that error code;
    anything else malformed raises :class:`HsmProtocolError`.
    """
    if len(payload) < 4:
        raise HsmProtocolError(command, f"answer of {len(payload)} bytes is too short")
    code_b = payload[2:4]
    if not code_b.isdigit():
        raise HsmProtocolError(command, "error code is not 2 digits")
    code = code_b.decode()
    if payload[:2] != response_code_of(command).encode():
        if code != "00":
            return code, b""
        raise HsmProtocolError(command, f"response code {payload[:2]!r}, expected {response_code_of(command)}")
    return code, payload[4:]


_KEY = re.compile(r"(?:[0-9A-F]{16}|[UX][0-9A-F]{32}|[TY][0-9A-F]{48}|Z[0-9A-F]{16})")
_HEX = re.compile(r"[0-9A-F]*")
_KEY_LEN = {"U": 33, "X": 33, "T": 49, "Y": 49, "Z": 17}


_PAIR = re.compile(r"[0-9A-F]{32}")


def _key(name: str, key: str, pair: bool = False) -> str:
    """A key under the LMK (or a ZMK/TMK): 16H, U/X + 32H, T/Y + 48H, Z + 16H;
    with ``pair`` (CVK, PVK) also 32H, two single-length keys as payShield takes them."""
    k = key.upper() if isinstance(key, str) else ""
    if not (_KEY.fullmatch(k) or (pair and _PAIR.fullmatch(k))):
        raise HsmRequestError(f"{name}: not a key under the LMK (16H, U+32H or T+48H)")
    return k


def _hex(name: str, value: str, n: int | None = None) -> str:
    v = value.upper() if isinstance(value, str) else ""
    if not _HEX.fullmatch(v) or (n is not None and len(v) != n) or not v:
        raise HsmRequestError(f"{name}: expected {n or 'some'} hex characters")
    return v


def _num(name: str, value: str | int, n: int) -> str:
    v = f"{value:0{n}d}" if isinstance(value, int) and value >= 0 else value
    if not isinstance(v, str) or len(v) != n or not (v.isascii() and v.isdigit()):
        raise HsmRequestError(f"{name}: expected {n} digits")
    return v


def _fmt(name: str, value: str | int) -> str:
    return _num(name, value, 2)


def _bin(name: str, value: bytes, n: int) -> bytes:
    if not isinstance(value, (bytes, bytearray)) or len(value) != n:
        raise HsmRequestError(f"{name}: expected {n} bytes")
    return bytes(value)


def take_key(body: bytes, pos: int = 0) -> tuple[str, int]:
    """Read one key token (16H, or a scheme letter and its hex) from a response."""
    n = _KEY_LEN.get(chr(body[pos]), 16) if pos < len(body) else 16
    token = body[pos:pos + n]
    if len(token) != n:
        raise ValueError("response ends inside a key")
    return token.decode("ascii"), pos + n


def _cmd(code: str, *parts: str | bytes) -> bytes:
    return code.encode() + b"".join(p.encode("ascii") if isinstance(p, str) else p for p in parts)


# -- command layouts (hsm.md 3) -----------------------------------------------

def build_pin_translate(code: str, src_key: str, dst_zpk: str, pin_block: str, account: str,
                        src_fmt: str = "01", dst_fmt: str = "01", max_pin_len: int | str = 12) -> bytes:
    """CA (source TPK) or CC (source ZPK)."""
    return _cmd(code, _key("source key", src_key), _key("destination ZPK", dst_zpk),
                _num("max PIN length", max_pin_len, 2), _hex("PIN block", pin_block, 16),
                _fmt("source format", src_fmt), _fmt("destination format", dst_fmt),
                _num("account", account, 12))


def build_pin_translate_dukpt(bdk: str, dst_zpk: str, ksn: str, pin_block: str, account: str,
                              dst_fmt: str = "01") -> bytes:
    """CI: DUKPT (BDK, KSN) to a ZPK."""
    return _cmd("CI", _key("BDK", bdk), _key("destination ZPK", dst_zpk), "605",
                _hex("KSN", ksn, 20), _hex("PIN block", pin_block, 16),
                _fmt("destination format", dst_fmt), _num("account", account, 12))


def build_verify_pvv(code: str, pin_key: str, pvk: str, pin_block: str, fmt: str, account: str,
                     pvki: str | int, pvv: str) -> bytes:
    """DC (TPK) or EC (ZPK)."""
    return _cmd(code, _key("PIN key", pin_key), _key("PVK", pvk, pair=True), _hex("PIN block", pin_block, 16),
                _fmt("PIN block format", fmt), _num("account", account, 12),
                _num("PVKI", pvki, 1), _num("PVV", pvv, 4))


def build_verify_ibm(code: str, pin_key: str, pvk: str, max_len: int | str, pin_block: str,
                     fmt: str, check_len: int | str, account: str, dec_table: str,
                     validation_data: str, offset: str) -> bytes:
    """DA (TPK) or EA (ZPK): IBM 3624 offset."""
    vd = validation_data.upper() if isinstance(validation_data, str) else ""
    if len(vd) != 12 or not (vd.isascii() and vd.isalnum()):
        raise HsmRequestError("PIN validation data: expected 12 characters")
    off = offset.upper() if isinstance(offset, str) else ""
    if not 1 <= len(off) <= 12:
        raise HsmRequestError("offset: expected 1 to 12 hex characters")
    return _cmd(code, _key("PIN key", pin_key), _key("PVK", pvk), _num("max PIN length", max_len, 2),
                _hex("PIN block", pin_block, 16), _fmt("PIN block format", fmt),
                _num("check length", check_len, 2), _num("account", account, 12),
                _num("decimalisation table", dec_table, 16), vd, _hex("offset", off.ljust(12, "F"), 12))


def _pan(pan: str) -> str:
    if not isinstance(pan, str) or not (pan.isascii() and pan.isdigit()) or not 1 <= len(pan) <= 19:
        raise HsmRequestError("PAN: expected up to 19 digits")
    return pan


def build_cw(cvk: str, pan: str, expiry: str, service_code: str) -> bytes:
    return _cmd("CW", _key("CVK", cvk, pair=True), _pan(pan), ";", _num("expiry", expiry, 4),
                _num("service code", service_code, 3))


def build_cy(cvk: str, cvv: str, pan: str, expiry: str, service_code: str) -> bytes:
    return _cmd("CY", _key("CVK", cvk, pair=True), _num("CVV", cvv, 3), _pan(pan), ";",
                _num("expiry", expiry, 4), _num("service code", service_code, 3))


def build_mac(code: str, key_type: str, key: str, data: bytes, algorithm: int | str = 3,
              padding: int | str = 1, mac_len: int = 16, mac: str | None = None) -> bytes:
    """M6 (generate) or M8 (verify, with ``mac``): whole message, binary input."""
    if key_type not in ("003", "008"):
        raise HsmRequestError("MAC key type: expected 003 (TAK) or 008 (ZAK)")
    alg = _num("MAC algorithm", algorithm, 1)
    if alg not in ("1", "3"):
        raise HsmRequestError("MAC algorithm: expected 1 or 3")
    pad = _num("padding", padding, 1)
    if pad not in ("0", "1", "2"):
        raise HsmRequestError("padding: expected 0 (none), 1 or 2")
    if mac is not None:
        mac_len = len(mac)
    if mac_len not in (8, 16):
        raise HsmRequestError("MAC: expected 8 or 16 hex characters")
    if not isinstance(data, (bytes, bytearray)) or len(data) > 0xFFFF:
        raise HsmRequestError("MAC data: expected bytes, at most 65535")
    tail = b"" if mac is None else _hex("MAC", mac, mac_len).encode()
    return _cmd(code, "0", "0", "1" if mac_len == 16 else "0", alg, pad, key_type,
                _key("MAC key", key), f"{len(data):04X}", bytes(data), tail)


def build_kq(mode: int | str, scheme: int | str, mk_ac: str, pan_psn: bytes, atc: bytes,
             un: bytes, data: bytes, arqc: bytes, arc: bytes) -> bytes:
    """KQ: EMV ARQC verification / ARPC generation; binary fields are raw bytes."""
    m = _num("KQ mode", mode, 1)
    if m not in ("0", "1", "2"):
        raise HsmRequestError("KQ mode: expected 0, 1 or 2")
    s = _num("KQ scheme", scheme, 1)
    if not isinstance(data, (bytes, bytearray)) or len(data) > 0xFF:
        raise HsmRequestError("transaction data: expected bytes, at most 255")
    return _cmd("KQ", m, s, _key("MK-AC", mk_ac), _bin("PAN/PSN", pan_psn, 8), _bin("ATC", atc, 2),
                _bin("unpredictable number", un, 4), f"{len(data):02X}", bytes(data), ";",
                _bin("ARQC", arqc, 8), _bin("ARC", arc, 2))


def _key_length_flag(key: str) -> str:
    return {"U": "1", "X": "1", "T": "2", "Y": "2"}.get(key[:1], "0")


def build_a0(key_type: str, scheme: str = "U", export_under: str | None = None,
             export_flag: str = "0", export_scheme: str | None = None) -> bytes:
    kt = _hex("key type", key_type, 3)
    if scheme not in ("U", "T", "Z", "X", "Y"):
        raise HsmRequestError("key scheme: expected U, T, X, Y or Z")
    if export_under is None:
        return _cmd("A0", "0", kt, scheme)
    if export_flag not in ("0", "1"):
        raise HsmRequestError("ZMK/TMK flag: expected 0 (ZMK) or 1 (TMK)")
    return _cmd("A0", "1", kt, scheme, ";", export_flag, _key("ZMK/TMK", export_under),
                export_scheme or scheme)


def build_bu(key_type_code2: str, key: str) -> bytes:
    k = _key("key", key)
    return _cmd("BU", _hex("key type code", key_type_code2, 2), _key_length_flag(k), k)


def build_fa(zmk: str, zpk_under_zmk: str) -> bytes:
    return _cmd("FA", _key("ZMK", zmk), _key("ZPK under ZMK", zpk_under_zmk))


def build_b2(data: bytes) -> bytes:
    if len(data) > 0xFFFF:
        raise HsmRequestError("echo data: at most 65535 bytes")
    return _cmd("B2", f"{len(data):04X}", data)


def parse_pin_block(command: str, body: bytes) -> str:
    """PIN length 2N, PIN block 16H, format 2N -> the PIN block."""
    if len(body) < 20 or not body[:2].isdigit():
        raise HsmProtocolError(command, "answer too short for a PIN block")
    return body[2:18].decode("ascii")


# -- matching requests to answers on one connection -------------------------

T = TypeVar("T")


class PendingTable(Generic[T]):
    """The requests in flight on one connection, each under a header unique among them.

    Headers are a wrapping counter written as ``header_len`` upper-case hex
    digits; one still in flight is skipped, so at most ``limit`` (capped below
    the number of distinct headers) are outstanding. Answers are matched by
    header, not by order, although the HSM answers in order.
    """

    __slots__ = ("header_len", "capacity", "limit", "_next", "_items")

    def __init__(self, header_len: int = 4, limit: int = 1024) -> None:
        if header_len < 1:
            raise ValueError("the HSM message header must be at least 1 character")
        if limit < 1:
            raise ValueError("in-flight limit must be positive")
        self.header_len = header_len
        self.capacity = 16 ** min(header_len, 8)
        self.limit = min(limit, self.capacity)
        self._next = 0
        self._items: dict[bytes, T] = {}

    def __len__(self) -> int:
        return len(self._items)

    @property
    def full(self) -> bool:
        return len(self._items) >= self.limit

    def add(self, item: T) -> bytes:
        """The header under which ``item`` is now in flight; HsmBusy when full."""
        items = self._items
        if len(items) >= self.limit:
            raise HsmBusy(f"{len(items)} HSM requests already in flight on this connection")
        n, cap, hl = self._next, self.capacity, self.header_len
        while True:
            header = b"%0*X" % (hl, n)
            n = n + 1 if n + 1 < cap else 0
            if header not in items:
                break
        self._next = n
        items[header] = item
        return header

    def pop(self, header: bytes) -> T | None:
        return self._items.pop(header, None)

    def drain(self) -> list[T]:
        out = list(self._items.values())
        self._items.clear()
        return out


# -- one connection -----------------------------------------------------------

class _Pending:
    __slots__ = ("fut", "command", "timer")

    def __init__(self, fut: asyncio.Future, command: str) -> None:
        self.fut = fut
        self.command = command
        self.timer: asyncio.TimerHandle | None = None


def _fail(entry: _Pending, exc: Exception) -> None:
    if entry.timer is not None:
        entry.timer.cancel()
    if not entry.fut.done():
        entry.fut.set_exception(exc)


class _Connection(FramedProtocol):
    def __init__(self, client: HsmClient, slot: int, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(Framing("2byte", client.header_len, MAX_FRAME), client.timeout_s, loop)
        self.client = client
        self.slot = slot
        self.pending: PendingTable[_Pending] = PendingTable(client.header_len, client.max_in_flight)
        self.gone: asyncio.Future = loop.create_future()
        self.timeouts_in_row = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            except OSError:  # pragma: no cover - not a TCP socket
                pass

    def submit(self, command: str, payload: bytes) -> asyncio.Future:
        entry = _Pending(self.loop.create_future(), command)
        header = self.pending.add(entry)
        if not self.write_frame(payload, header):
            self.pending.pop(header)
            raise HsmUnavailable(f"HSM connection {self.slot} is closing")
        entry.timer = self.loop.call_later(self.client.timeout_s, self._expire, header)
        return entry.fut

    def frame_received(self, header: bytes, payload: bytes) -> None:
        entry = self.pending.pop(header)
        if entry is None:
            self.client.late_answers += 1
            log.debug("HSM answer with no request in flight under its header discarded",
                      extra={"conn": self.slot})
            return
        self.timeouts_in_row = 0
        if entry.timer is not None:
            entry.timer.cancel()
        if not entry.fut.done():
            entry.fut.set_result(payload)

    def _expire(self, header: bytes) -> None:
        entry = self.pending.pop(header)
        if entry is None:
            return
        entry.timer = None
        self.client.timeouts += 1
        _fail(entry, HsmTimeout(entry.command, self.client.timeout_s))
        self.timeouts_in_row += 1
        limit = self.client.drop_after_timeouts
        if limit and self.timeouts_in_row >= limit and not self.closed:
            # A connection that answers nothing (half-open, wedged) is replaced.
            log.warning("HSM connection %d: %d timeouts in a row, reconnecting", self.slot,
                        self.timeouts_in_row, extra={"conn": self.slot})
            self.close()

    def frame_error(self, kind: str, detail: str) -> None:
        log.warning("HSM connection %d: %s (%s), closing", self.slot, kind, detail,
                    extra={"conn": self.slot})

    def fail_pending(self, why: str) -> None:
        for entry in self.pending.drain():
            _fail(entry, HsmUnavailable(f"HSM {entry.command}: {why}"))

    def lost(self, exc: Exception | None) -> None:
        self.fail_pending("connection lost with the request in flight")
        if not self.gone.done():
            self.gone.set_result(None)


# -- the client ---------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class GeneratedKey:
    under_lmk: str
    under_zmk_or_tmk: str | None
    check_value: str


class HsmClient:
    """A pool of connections to one HSM and the typed host commands.

    ``start()`` makes one connection attempt per slot (bounded by
    ``connect_timeout_s``) and returns whether or not the HSM answered; slots
    then reconnect in the background with jittered exponential backoff.
    ``available`` is true while at least one connection is up.

    ``max_in_flight`` caps the requests outstanding on one connection
    (:class:`HsmBusy` past it). ``drop_after_timeouts`` consecutive timeouts on
    a connection with no answer between them close it so that it is
    reconnected (0: never).
    """

    def __init__(self, endpoint: Endpoint, *, pool_size: int = 2, header_len: int = 4,
                 timeout_s: float = 2.0, connect_timeout_s: float = 1.0,
                 max_in_flight: int = 1024, drop_after_timeouts: int = 3,
                 reconnect_initial_s: float = 0.1, reconnect_max_s: float = 5.0) -> None:
        if pool_size < 1:
            raise ValueError("pool_size must be at least 1")
        if timeout_s <= 0 or connect_timeout_s <= 0:
            raise ValueError("timeouts must be positive")
        PendingTable(header_len, max_in_flight)  # validates both
        self.endpoint = endpoint
        self.pool_size = pool_size
        self.header_len = header_len
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.max_in_flight = max_in_flight
        self.drop_after_timeouts = drop_after_timeouts
        self._backoff = (reconnect_initial_s, reconnect_max_s)
        Backoff(*self._backoff)                  # validates them
        self._conns: list[_Connection | None] = [None] * pool_size
        self._tasks: list[asyncio.Task] = []
        self._rr = 0
        self._running = False
        self._up = asyncio.Event()      # set while at least one connection is up
        # counters, for metrics and tests
        self.timeouts = 0
        self.late_answers = 0
        self.connects = 0

    # -- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        if self._running:
            return
        loop = asyncio.get_running_loop()
        self._running = True
        first = [loop.create_future() for _ in range(self.pool_size)]
        self._tasks = [loop.create_task(self._keep_connected(i, first[i]), name=f"hsm-conn-{i}")
                       for i in range(self.pool_size)]
        await asyncio.wait(first)

    async def stop(self) -> None:
        self._running = False
        tasks, self._tasks = self._tasks, []
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def __aenter__(self) -> HsmClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def available(self) -> bool:
        return any(c is not None and not c.closed for c in self._conns)

    @property
    def connections_up(self) -> int:
        return sum(1 for c in self._conns if c is not None and not c.closed)

    @property
    def in_flight(self) -> int:
        return sum(len(c.pending) for c in self._conns if c is not None)

    async def wait_available(self, timeout_s: float) -> bool:
        """True once a connection is up, False if none is within ``timeout_s``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not self.available:
            remaining = deadline - loop.time()
            if not self._running or remaining <= 0:
                return False
            self._up.clear()   # stale when a connection closed and its task has not yet seen it
            try:
                await asyncio.wait_for(self._up.wait(), remaining)
            except asyncio.TimeoutError:
                return False
        return True

    async def _keep_connected(self, slot: int, first: asyncio.Future) -> None:
        loop = asyncio.get_running_loop()
        backoff = Backoff(*self._backoff)
        host, port = self.endpoint.host, self.endpoint.port
        reported_down = False
        while True:
            conn: _Connection | None = None
            try:
                try:
                    _, conn = await asyncio.wait_for(
                        loop.create_connection(lambda: _Connection(self, slot, loop), host, port),
                        self.connect_timeout_s)
                except (OSError, asyncio.TimeoutError) as e:
                    if not first.done():
                        first.set_result(False)
                    if not reported_down:
                        log.warning("HSM %s unreachable (connection %d): %s", self.endpoint, slot,
                                    e.__class__.__name__ if isinstance(e, asyncio.TimeoutError) else e,
                                    extra={"conn": slot})
                        reported_down = True
                    await asyncio.sleep(backoff.next())
                    continue
                self.connects += 1
                reported_down = False
                backoff.reset()
                self._conns[slot] = conn
                self._up.set()
                log.info("HSM %s connection %d up", self.endpoint, slot, extra={"conn": slot})
                if not first.done():
                    first.set_result(True)
                await asyncio.shield(conn.gone)
                log.warning("HSM %s connection %d lost", self.endpoint, slot, extra={"conn": slot})
            finally:
                if conn is not None:
                    if self._conns[slot] is conn:
                        self._conns[slot] = None
                    if not self.available:
                        self._up.clear()
                    if not conn.closed:   # cancelled by stop()
                        conn.fail_pending("HSM client stopped")
                        conn.close()
                if not first.done():
                    first.set_result(False)
            await asyncio.sleep(backoff.next())

    # -- one call ------------------------------------------------------------

    def _pick(self) -> _Connection:
        conns = self._conns
        n = len(conns)
        start = self._rr
        self._rr = start + 1 if start + 1 < n else 0
        best: _Connection | None = None
        best_load = 0
        for i in range(n):
            c = conns[(start + i) % n]
            if c is None or c.closed:
                continue
            load = len(c.pending)
            if best is None or load < best_load:
                best, best_load = c, load
        if best is None:
            raise HsmUnavailable(f"no connection to the HSM at {self.endpoint} is up")
        return best

    async def call(self, command: str, payload: bytes, *, verify: bool = False) -> bytes | None:
        """Send ``payload`` (command code and fields) and return the response
        fields; None for error ``01`` when ``verify`` (a verification result)."""
        if len(payload) + self.header_len > MAX_FRAME:
            raise HsmRequestError(f"HSM {command}: command of {len(payload)} bytes does not fit a frame")
        answer = await self._pick().submit(command, payload)
        code, body = parse_response(command, answer)
        if code == "00":
            return body
        if verify and code == "01":
            return None
        log.info("HSM %s answered error %s (%s)", command, code, ERROR_MEANINGS.get(code, "unknown"))
        raise HsmError(command, code)

    async def _verify(self, command: str, payload: bytes) -> bool:
        return await self.call(command, payload, verify=True) is not None

    # -- typed commands (hsm.md 3) -------------------------------------------

    async def diagnostics(self) -> tuple[str, str]:
        """NC: (LMK check value, firmware version)."""
        body = await self.call("NC", b"NC")
        if len(body) < 16:
            raise HsmProtocolError("NC", "answer too short for an LMK check value")
        return body[:16].decode("ascii", "replace"), body[16:].decode("ascii", "replace").strip()

    async def echo(self, data: bytes | str) -> bytes | str:
        """B2: the HSM sends ``data`` back."""
        raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
        body = await self.call("B2", build_b2(raw))
        return body.decode("utf-8", "replace") if isinstance(data, str) else body

    async def translate_pin(self, src_tpk: str, dst_zpk: str, pin_block: str, account12: str,
                            src_fmt: str = "01", dst_fmt: str = "01", max_pin_len: int = 12) -> str:
        """CA: a PIN block from a terminal's TPK to a ZPK; the destination block."""
        cmd = build_pin_translate("CA", src_tpk, dst_zpk, pin_block, account12, src_fmt, dst_fmt, max_pin_len)
        return parse_pin_block("CA", await self.call("CA", cmd))

    async def translate_pin_zpk(self, src_zpk: str, dst_zpk: str, pin_block: str, account12: str,
                                src_fmt: str = "01", dst_fmt: str = "01", max_pin_len: int = 12) -> str:
        """CC: a PIN block from one ZPK to another."""
        cmd = build_pin_translate("CC", src_zpk, dst_zpk, pin_block, account12, src_fmt, dst_fmt, max_pin_len)
        return parse_pin_block("CC", await self.call("CC", cmd))

    async def translate_pin_dukpt(self, bdk: str, dst_zpk: str, ksn: str, pin_block: str,
                                  account12: str, dst_fmt: str = "01") -> str:
        """CI: a DUKPT-encrypted PIN block (BDK, 20H KSN) to a ZPK."""
        cmd = build_pin_translate_dukpt(bdk, dst_zpk, ksn, pin_block, account12, dst_fmt)
        return parse_pin_block("CI", await self.call("CI", cmd))

    async def verify_pin_pvv_tpk(self, tpk: str, pvk: str, pin_block: str, fmt: str, account12: str,
                                 pvki: str | int, pvv: str) -> bool:
        """DC: Visa PVV verification of a PIN block under a TPK."""
        return await self._verify("DC", build_verify_pvv("DC", tpk, pvk, pin_block, fmt, account12, pvki, pvv))

    async def verify_pin_pvv_zpk(self, zpk: str, pvk: str, pin_block: str, fmt: str, account12: str,
                                 pvki: str | int, pvv: str) -> bool:
        """EC: Visa PVV verification of a PIN block under a ZPK."""
        return await self._verify("EC", build_verify_pvv("EC", zpk, pvk, pin_block, fmt, account12, pvki, pvv))

    async def verify_pin_ibm_tpk(self, tpk: str, pvk: str, max_len: int | str, pin_block: str, fmt: str,
                                 check_len: int | str, account12: str, dec_table: str,
                                 validation_data: str, offset: str) -> bool:
        """DA: IBM 3624 offset verification of a PIN block under a TPK."""
        return await self._verify("DA", build_verify_ibm("DA", tpk, pvk, max_len, pin_block, fmt, check_len,
                                                         account12, dec_table, validation_data, offset))

    async def verify_pin_ibm_zpk(self, zpk: str, pvk: str, max_len: int | str, pin_block: str, fmt: str,
                                 check_len: int | str, account12: str, dec_table: str,
                                 validation_data: str, offset: str) -> bool:
        """EA: IBM 3624 offset verification of a PIN block under a ZPK."""
        return await self._verify("EA", build_verify_ibm("EA", zpk, pvk, max_len, pin_block, fmt, check_len,
                                                         account12, dec_table, validation_data, offset))

    async def generate_cvv(self, cvk: str, pan: str, expiry: str, service_code: str) -> str:
        """CW: the 3-digit CVV (CVC, iCVV with service code 999, CVV2 with 000)."""
        body = await self.call("CW", build_cw(cvk, pan, expiry, service_code))
        if len(body) < 3 or not body[:3].isdigit():
            raise HsmProtocolError("CW", "answer does not hold a 3-digit CVV")
        return body[:3].decode("ascii")

    async def verify_cvv(self, cvk: str, cvv: str, pan: str, expiry: str, service_code: str) -> bool:
        """CY: True when the CVV matches."""
        return await self._verify("CY", build_cy(cvk, cvv, pan, expiry, service_code))

    async def generate_mac(self, key_type: str, key: str, data: bytes, algorithm: int = 3,
                           padding: int = 1, mac_len: int = 16) -> str:
        """M6: the ISO 9797-1 MAC of ``data`` (binary, whole message), ``mac_len`` hex."""
        body = await self.call("M6", build_mac("M6", key_type, key, data, algorithm, padding, mac_len))
        mac = body[:mac_len]
        if len(mac) != mac_len:
            raise HsmProtocolError("M6", "answer too short for the MAC")
        return mac.decode("ascii")

    async def verify_mac(self, key_type: str, key: str, data: bytes, mac: str, algorithm: int = 3,
                         padding: int = 1) -> bool:
        """M8: True when ``mac`` (8 or 16 hex) is the MAC of ``data``."""
        return await self._verify("M8", build_mac("M8", key_type, key, data, algorithm, padding, mac=mac))

    async def generate_key(self, key_type: str, export_under: str | None = None,
                           export_flag: str = "0", scheme: str = "U",
                           export_scheme: str | None = None) -> GeneratedKey:
        """A0: a new random key under the LMK; with ``export_under`` also under
        that ZMK (``export_flag`` "0") or TMK ("1"), in ``export_scheme``
        (default: ``scheme``; "X" is plain TDES ECB halves, what a terminal can open)."""
        body = await self.call("A0", build_a0(key_type, scheme, export_under, export_flag, export_scheme))
        try:
            under_lmk, pos = take_key(body)
            under_zmk = None
            if export_under is not None:
                under_zmk, pos = take_key(body, pos)
        except ValueError:
            raise HsmProtocolError("A0", "answer ends inside a key") from None
        kcv = body[pos:].decode("ascii", "replace")
        if not kcv:
            raise HsmProtocolError("A0", "answer has no check value")
        return GeneratedKey(under_lmk, under_zmk, kcv)

    async def key_check_value(self, key_type_code2: str, key: str) -> str:
        """BU: the check value of a key under the LMK (16H, as the HSM gives it)."""
        body = await self.call("BU", build_bu(key_type_code2, key))
        if not body:
            raise HsmProtocolError("BU", "answer has no check value")
        return body.decode("ascii", "replace")

    async def import_zpk(self, zmk: str, zpk_under_zmk: str) -> tuple[str, str]:
        """FA: a ZPK received under a ZMK, re-encrypted under the LMK; (key, check value)."""
        body = await self.call("FA", build_fa(zmk, zpk_under_zmk))
        try:
            under_lmk, pos = take_key(body)
        except ValueError:
            raise HsmProtocolError("FA", "answer ends inside a key") from None
        return under_lmk, body[pos:].decode("ascii", "replace")

    async def verify_arqc(self, mode: int | str, scheme: int | str, mk_ac: str, pan_psn: bytes,
                          atc: bytes, un: bytes, data: bytes, arqc: bytes, arc: bytes) -> bytes | bool:
        """KQ. Mode 0: True / False (ARQC wrong). Mode 1: the 8-byte ARPC, or
        False when the ARQC is wrong. Mode 2: the ARPC (no ARQC check)."""
        cmd = build_kq(mode, scheme, mk_ac, pan_psn, atc, un, data, arqc, arc)
        body = await self.call("KQ", cmd, verify=True)
        if body is None:
            return False
        if cmd[2:3] == b"0":
            return True
        if len(body) < 8:
            raise HsmProtocolError("KQ", "answer too short for an ARPC")
        return body[:8]
