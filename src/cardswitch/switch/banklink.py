"""A link to one issuing bank's host: the switch is the client (wire.md 8).

The connection manager (one task per link) connects, signs on (0800 70=001),
sends an echo test (0800 70=301) whenever nothing has been received for
``echo_interval_s``, and on connection loss or a failed sign-on/echo goes
offline and reconnects with jittered exponential backoff (0.1 s doubling to
5 s), cycling through the bank's endpoints.

Requests cost one future and one ``loop.call_later`` timer each, no task:

- ``request(msg, timeout_s)`` stamps the link's own STAN into ``msg["11"]``
  (mutating ``msg``: the caller reads the STAN used from it, to journal it),
  sends, and returns the response matched by response MTI class + 11 + 37.
- ``LinkDown`` is raised at once, with nothing sent, when the link is not
  online. ``LinkTimeout`` means the request was sent and no answer came in
  time: the issuer may have acted on it (the caller reverses). A response
  arriving after that goes to ``on_late(msg)``, as does any response matching
  nothing in flight. Requests in flight when a connection drops stay pending
  until their own timeout (an answer may still come on the next connection).

From the issuer's side: an 0800 is answered 0810 with 39 = 00 echoing 7, 11,
70 (and 33 when present). Any other request or advice goes to
``on_unsolicited(msg)``, which may return the answer to send (a Message, or
an awaitable of one, or None for no answer); without that callback it is
answered MTI+10 with 39 = 12 (invalid transaction: the switch takes no
requests from an issuer link), echoing the wire.md 4 fields and 37.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Awaitable, Callable, Sequence

from cardswitch.config import Endpoint, LinkOptions
from cardswitch.iso8583.constants import MTI, RC, F, NetMgmt, response_mti
from cardswitch.iso8583 import macfield
from cardswitch.iso8583.dialect import DecodeError, Message, get_dialect
from cardswitch.switch.backoff import Backoff
from cardswitch.switch.framed import FramedProtocol, framing_of
from cardswitch.switch.matching import InFlight, InFlightFull
from cardswitch.switch.replies import error_response, is_request_mti

log = logging.getLogger("cardswitch.banklink")

# Link states.
STARTING = "starting"         # created, manager not yet running
CONNECTING = "connecting"
SIGNING_ON = "signing_on"
ONLINE = "online"
OFFLINE = "offline"           # between connections (waiting to reconnect)
STOPPED = "stopped"

_NETMGMT_NAMES = {NetMgmt.SIGN_ON: "sign-on", NetMgmt.SIGN_OFF: "sign-off", NetMgmt.ECHO: "echo"}

# Answer to a request the issuer sends when nothing handles it (documented above).
UNSOLICITED_RC = RC.INVALID_TRANSACTION


class LinkError(Exception):
    pass


class LinkDown(LinkError):
    """The link is not online: nothing was sent."""


class LinkTimeout(LinkError):
    """Sent, but no answer within the timeout: the outcome at the issuer is unknown."""


@dataclass(slots=True)
class LinkStats:
    requests: int = 0             # requests sent via request()
    responses: int = 0            # answers matched to a pending request
    timeouts: int = 0
    late: int = 0                 # responses matching nothing pending
    link_down: int = 0            # request() refused because the link was not online
    unsolicited: int = 0          # requests/advices received from the issuer (0800 excluded)
    issuer_netmgmt: int = 0       # 0800 received from the issuer
    echoes: int = 0               # echo tests sent
    sign_ons: int = 0             # successful sign-ons
    connects: int = 0             # TCP connections made
    connect_failures: int = 0
    disconnects: int = 0          # connections lost or closed
    frames_in: int = 0
    frames_out: int = 0
    decode_errors: int = 0
    framing_errors: int = 0       # too large, bad length prefix or stalled frame: closed
    bad_macs: int = 0             # responses whose MAC was missing or wrong


def utc_mmddhhmmss(now: datetime | None = None) -> str:
    """Field 7: transmission date and time, UTC."""
    return (now or datetime.now(timezone.utc)).strftime("%m%d%H%M%S")


def netmgmt_request(code: str, switch_institution_id: str, now: datetime | None = None) -> Message:
    """An 0800 from the switch (field 11 is stamped when sent)."""
    return {F.MTI: MTI.NETWORK_REQUEST, F.TRANSMISSION_DT: utc_mmddhhmmss(now),
            F.FORWARDER_ID: switch_institution_id, F.NETWORK_MGMT_CODE: code}


def netmgmt_answer(req: Message) -> Message:
    """0810, 39 = 00, echoing 7, 11, 70 (and 33) of an issuer's 0800."""
    resp: Message = {F.MTI: response_mti(req[F.MTI])}
    for k in (F.TRANSMISSION_DT, F.STAN, F.FORWARDER_ID):
        v = req.get(k)
        if v is not None:
            resp[k] = v
    resp[F.RESPONSE_CODE] = RC.APPROVED
    v = req.get(F.NETWORK_MGMT_CODE)
    if v is not None:
        resp[F.NETWORK_MGMT_CODE] = v
    return resp


def unsolicited_answer(req: Message, code: str = UNSOLICITED_RC) -> Message | None:
    """MTI+10 declining an issuer's request: echoes the wire.md 4 fields and 37."""
    return error_response(req, code, also=(F.RRN,))


class _Pending:
    __slots__ = ("stan", "fut", "timer")

    def __init__(self, stan: str, fut: asyncio.Future) -> None:
        self.stan = stan
        self.fut = fut
        self.timer: asyncio.TimerHandle | None = None


class _LinkConn(FramedProtocol):
    def __init__(self, link: "BankLink") -> None:
        super().__init__(link._framing, link._read_timeout_s, link._loop)
        self.link = link
        self.lost_fut: asyncio.Future = link._loop.create_future()

    def frame_received(self, header: bytes, payload: bytes) -> None:
        self.link._on_frame(self, payload)

    def data_received(self, data: bytes) -> None:
        self.link._last_rx = self.loop.time()
        super().data_received(data)

    def frame_error(self, kind: str, detail: str) -> None:
        self.link.stats.framing_errors += 1
        self.link.log.warning("bank %s: %s; closing the connection", self.link.bank_id, detail)

    def lost(self, exc: Exception | None) -> None:
        self.link._on_lost(self, exc)
        if not self.lost_fut.done():
            self.lost_fut.set_result(exc)


class BankLink:
    """The switch's client connection to one issuer host (with failover endpoints)."""

    def __init__(
        self,
        bank_id: str,
        endpoints: Sequence[Endpoint],
        options: LinkOptions,
        *,
        switch_institution_id: str,
        echo_interval_s: float,
        connect_timeout_s: float = 2.0,
        on_unsolicited: Callable[[Message], Message | None | Awaitable[Message | None]] | None = None,
        on_late: Callable[[Message], Any] | None = None,
        on_state: Callable[[str, str], Any] | None = None,
        netmgmt_timeout_s: float = 5.0,
        backoff: Backoff | None = None,
        logger: logging.Logger | None = None,
        first_stan: int = 1,
        mac: Any = None,
    ) -> None:
        if not endpoints:
            raise ValueError(f"bank {bank_id}: no endpoints")
        self.bank_id = bank_id
        self.endpoints = list(endpoints)
        self.options = options
        self.switch_institution_id = switch_institution_id
        self.echo_interval_s = echo_interval_s        # <= 0: no echo tests
        self.connect_timeout_s = connect_timeout_s
        self.netmgmt_timeout_s = netmgmt_timeout_s
        self.on_unsolicited = on_unsolicited
        self.on_late = on_late
        self.on_state = on_state
        self.log = logger or log
        self.stats = LinkStats()
        self._dialect = get_dialect(options.dialect)
        self._framing, self._header = framing_of(options)
        self._read_timeout_s = options.read_timeout_ms / 1000.0
        self._backoff = backoff or Backoff()
        self._inflight = InFlight(first_stan)
        self._loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self._state = STARTING
        self._conn: _LinkConn | None = None
        self._endpoint: Endpoint | None = None
        self._manager: asyncio.Task | None = None
        self._stopping = False
        self._last_rx = 0.0
        self._online_waiters: list[asyncio.Future] = []
        self._tasks: set[asyncio.Task] = set()       # async on_unsolicited answers
        # Link MACs (wire.md 7): an object with async sign(data) -> hex and
        # async verify(data, mac) -> bool, or None for a link without a ZAK.
        self.mac = mac

    # -- public --------------------------------------------------------------

    @property
    def state(self) -> str:
        return self._state

    @property
    def online(self) -> bool:
        return self._state == ONLINE

    @property
    def endpoint(self) -> Endpoint | None:
        """The endpoint of the current (or last attempted) connection."""
        return self._endpoint

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    async def start(self) -> None:
        """Spawn the connection manager; returns at once (see ``wait_online``)."""
        if self._manager is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._stopping = False
        self._manager = self._loop.create_task(self._run(), name=f"banklink-{self.bank_id}")

    async def wait_online(self, timeout: float | None = None) -> bool:
        """Wait until the link is online; False on timeout or when stopped."""
        if self._state == ONLINE:
            return True
        if self._stopping or self._loop is None:
            return False
        fut = self._loop.create_future()
        self._online_waiters.append(fut)
        try:
            await asyncio.wait_for(fut, timeout)
            return self._state == ONLINE
        except asyncio.TimeoutError:
            return False
        finally:
            if fut in self._online_waiters:
                self._online_waiters.remove(fut)

    async def stop(self, signoff_timeout_s: float = 1.0) -> None:
        """Sign off if online, close the connection, stop reconnecting.

        Requests still in flight fail with ``LinkTimeout`` (their outcome at
        the issuer is unknown).
        """
        if self._manager is None:
            return
        self._stopping = True
        conn = self._conn
        if self._state == ONLINE and conn is not None:
            await self._netmgmt(conn, NetMgmt.SIGN_OFF, signoff_timeout_s)
        self._set_state(STOPPED)
        self._manager.cancel()
        try:
            await self._manager
        except (asyncio.CancelledError, Exception):
            pass
        self._manager = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        for p in self._inflight.clear():
            if p.timer is not None:
                p.timer.cancel()
            if not p.fut.done():
                p.fut.set_exception(LinkTimeout(f"bank {self.bank_id}: link stopped with the request in flight"))
        for t in list(self._tasks):
            t.cancel()

    async def request(self, msg: Message, timeout_s: float) -> Message:
        """Send ``msg`` with the link's STAN (written into ``msg["11"]``); its response.

        Raises LinkDown (nothing sent), LinkTimeout (sent, unanswered; also a
        response whose MAC is wrong), or the codec's EncodeError (nothing sent).
        """
        if self.mac is None:
            return await self.request_future(msg, timeout_s)
        return await self._request_maced(msg, timeout_s)

    async def _request_maced(self, msg: Message, timeout_s: float) -> Message:
        """Reserve the STAN, MAC the message as it will be sent, then send it."""
        if self._state != ONLINE:
            self.stats.link_down += 1
            raise LinkDown(f"bank {self.bank_id} is {self._state}")
        inflight = self._inflight
        try:
            stan = inflight.next_stan()
        except InFlightFull as e:
            raise LinkDown(f"bank {self.bank_id}: {e}") from None
        msg[F.STAN] = stan
        p = _Pending(stan, self._loop.create_future())
        inflight.add(stan, msg[F.MTI], msg.get(F.RRN, ""), p)
        try:
            field, covered = macfield.prepare(self._dialect, msg)
            msg[field] = await self.mac.sign(covered)
            payload = self._dialect.encode(msg)
        except BaseException:
            inflight.pop(stan, p)
            raise
        conn = self._conn
        if conn is None or conn.closed or not conn.write_frame(payload, self._header):
            inflight.pop(stan, p)
            raise LinkDown(f"bank {self.bank_id}: not connected")
        p.timer = self._loop.call_later(timeout_s, self._on_timeout, p)
        self.stats.frames_out += 1
        self.stats.requests += 1
        return await p.fut

    async def _verify_then_resolve(self, p: _Pending, msg: Message, payload: bytes) -> None:
        ok = False
        try:
            ok = await self.mac.verify(macfield.mac_input(self._dialect, msg, payload),
                                       macfield.received_mac(msg))
        except Exception as e:  # the HSM could not say: treat as unanswered
            self.log.warning("bank %s: cannot check the MAC of STAN %s: %s", self.bank_id, p.stan,
                             type(e).__name__)
        if p.fut.done():
            return
        if ok:
            self.stats.responses += 1
            p.fut.set_result(msg)
        else:
            self.stats.bad_macs += 1
            p.fut.set_exception(LinkTimeout(f"bank {self.bank_id}: response to STAN {p.stan} "
                                            "has a missing or wrong MAC"))

    def request_future(self, msg: Message, timeout_s: float) -> asyncio.Future:
        """Like ``request`` without a coroutine: LinkDown/EncodeError are raised here."""
        if self._state != ONLINE:
            self.stats.link_down += 1
            raise LinkDown(f"bank {self.bank_id} is {self._state}")
        try:
            p = self._send(msg, timeout_s)
        except InFlightFull as e:
            self.stats.link_down += 1
            raise LinkDown(f"bank {self.bank_id}: {e}") from None
        self.stats.requests += 1
        return p.fut

    # -- sending and matching ------------------------------------------------

    def _send(self, msg: Message, timeout_s: float) -> _Pending:
        conn = self._conn
        if conn is None or conn.closed:
            raise LinkDown(f"bank {self.bank_id}: not connected")
        inflight = self._inflight
        stan = inflight.next_stan()
        msg[F.STAN] = stan
        payload = self._dialect.encode(msg)
        loop = self._loop
        p = _Pending(stan, loop.create_future())
        inflight.add(stan, msg[F.MTI], msg.get(F.RRN, ""), p)
        if not conn.write_frame(payload, self._header):  # closing under us: nothing sent
            inflight.pop(stan, p)
            raise LinkDown(f"bank {self.bank_id}: not connected")
        p.timer = loop.call_later(timeout_s, self._on_timeout, p)
        self.stats.frames_out += 1
        return p

    def _abandon(self, p: _Pending) -> None:
        """Forget an 0800 of our own whose connection went away."""
        if self._inflight.pop(p.stan, p) is not None and p.timer is not None:
            p.timer.cancel()
        p.fut.cancel()

    def _on_timeout(self, p: _Pending) -> None:
        if self._inflight.pop(p.stan, p) is None:
            return
        if not p.fut.done():
            self.stats.timeouts += 1
            p.fut.set_exception(LinkTimeout(f"bank {self.bank_id}: no answer to STAN {p.stan}"))

    def _on_frame(self, conn: _LinkConn, payload: bytes) -> None:
        self.stats.frames_in += 1
        try:
            msg = self._dialect.decode(payload)
        except DecodeError as e:
            self._undecodable(conn, e)
            return
        mti = msg[F.MTI]
        if mti[2:3] in ("1", "3"):
            p = self._inflight.match(msg)
            if p is not None:
                p.timer.cancel()
                if self.mac is not None and mti[:3] != "081" and not p.fut.done():
                    task = self._loop.create_task(self._verify_then_resolve(p, msg, payload))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
                    return
                if not p.fut.done():
                    self.stats.responses += 1
                    p.fut.set_result(msg)
                    return
            self._late(msg)
        elif mti == MTI.NETWORK_REQUEST:
            self.stats.issuer_netmgmt += 1
            self._answer(conn, netmgmt_answer(msg))
        else:
            self._unsolicited(conn, msg)

    def _late(self, msg: Message) -> None:
        self.stats.late += 1
        cb = self.on_late
        if cb is None:
            self.log.warning("bank %s: unmatched response %s stan=%s rrn=%s rc=%s", self.bank_id,
                             msg.get(F.MTI), msg.get(F.STAN), msg.get(F.RRN), msg.get(F.RESPONSE_CODE))
            return
        try:
            cb(msg)
        except Exception:
            self.log.exception("bank %s: on_late failed", self.bank_id)

    def _unsolicited(self, conn: _LinkConn, msg: Message) -> None:
        self.stats.unsolicited += 1
        mti = msg[F.MTI]
        cb = self.on_unsolicited
        if cb is None:
            self.log.warning("bank %s: unsolicited %s stan=%s answered %s", self.bank_id, mti,
                             msg.get(F.STAN), UNSOLICITED_RC)
            self._answer(conn, unsolicited_answer(msg))
            return
        try:
            res = cb(msg)
        except Exception:
            self.log.exception("bank %s: on_unsolicited failed on %s stan=%s", self.bank_id, mti, msg.get(F.STAN))
            self._answer(conn, unsolicited_answer(msg, RC.SYSTEM_MALFUNCTION))
            return
        if inspect.isawaitable(res):
            task = asyncio.ensure_future(res)
            self._tasks.add(task)
            task.add_done_callback(lambda t, c=conn, m=msg: self._unsolicited_done(t, c, m))
        elif res is not None:
            self._answer(conn, res)

    def _unsolicited_done(self, task: asyncio.Future, conn: _LinkConn, msg: Message) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self.log.error("bank %s: on_unsolicited failed on %s stan=%s: %r", self.bank_id,
                           msg.get(F.MTI), msg.get(F.STAN), exc)
            self._answer(conn, unsolicited_answer(msg, RC.SYSTEM_MALFUNCTION))
        elif task.result() is not None:
            self._answer(conn, task.result())

    def _answer(self, conn: _LinkConn, resp: Message | None) -> None:
        if resp is None:
            return
        try:
            payload = self._dialect.encode(resp)
        except Exception as e:
            self.log.error("bank %s: answer %s does not encode: %.120s", self.bank_id,
                           resp.get(F.MTI) if isinstance(resp, dict) else type(resp).__name__, e)
            return
        if conn.write_frame(payload, self._header):
            self.stats.frames_out += 1

    def _undecodable(self, conn: _LinkConn, e: DecodeError) -> None:
        self.stats.decode_errors += 1
        partial = e.partial
        mti = partial.get(F.MTI)
        self.log.warning("bank %s: undecodable frame (mti=%s stan=%s): %.120s", self.bank_id, mti,
                         partial.get(F.STAN), e.reason)
        # A request from the issuer we cannot read is answered 30 where possible;
        # an unreadable response leaves its request to time out.
        if is_request_mti(mti) and F.STAN in partial:
            self._answer(conn, unsolicited_answer(partial, RC.FORMAT_ERROR))

    # -- connection manager --------------------------------------------------

    def _set_state(self, state: str) -> None:
        if state == self._state:
            return
        self._state = state
        if state == ONLINE or state == STOPPED:
            for w in self._online_waiters:
                if not w.done():
                    w.set_result(None)
        cb = self.on_state
        if cb is not None:
            try:
                cb(self.bank_id, state)
            except Exception:
                self.log.exception("bank %s: on_state failed", self.bank_id)

    def _on_lost(self, conn: _LinkConn, exc: Exception | None) -> None:
        self.stats.disconnects += 1
        if conn is self._conn and self._state == ONLINE and not self._stopping:
            self.log.warning("bank %s: connection to %s lost%s", self.bank_id, self._endpoint,
                             f": {exc}" if exc else "")
            self._set_state(OFFLINE)

    async def _run(self) -> None:
        idx = 0
        n = len(self.endpoints)
        backoff = self._backoff
        while not self._stopping:
            ep = self.endpoints[idx % n]
            try:
                reached_online = await self._session(ep)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug must not leave the link down for good
                self.log.exception("bank %s: connection manager error", self.bank_id)
                reached_online = False
            if self._stopping:
                break
            if reached_online:
                backoff.reset()
            self._set_state(OFFLINE)
            idx += 1
            await asyncio.sleep(backoff.next())

    async def _session(self, ep: Endpoint) -> bool:
        """One connection: connect, sign on, serve. True if it went online."""
        loop = self._loop
        self._endpoint = ep
        self._set_state(CONNECTING)
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: _LinkConn(self), ep.host, ep.port),
                self.connect_timeout_s)
        except (OSError, asyncio.TimeoutError) as e:
            self.stats.connect_failures += 1
            self.log.info("bank %s: cannot connect to %s: %s", self.bank_id, ep,
                          e or type(e).__name__)
            return False
        self.stats.connects += 1
        self._conn = conn
        self._last_rx = loop.time()
        try:
            self._set_state(SIGNING_ON)
            resp = await self._netmgmt(conn, NetMgmt.SIGN_ON)
            if resp is None:
                return False
            if resp.get(F.RESPONSE_CODE) != RC.APPROVED:
                self.log.warning("bank %s: sign-on at %s refused (39=%s)", self.bank_id, ep,
                                 resp.get(F.RESPONSE_CODE))
                return False
            self.stats.sign_ons += 1
            self.log.info("bank %s: online at %s", self.bank_id, ep)
            self._set_state(ONLINE)
            await self._serve(conn)
            return True
        finally:
            if self._state == ONLINE:
                self._set_state(OFFLINE)
            conn.close()
            if self._conn is conn:
                self._conn = None

    async def _netmgmt(self, conn: _LinkConn, code: str, timeout_s: float | None = None) -> Message | None:
        """Send an 0800 and wait for its answer; None when it times out or the connection goes."""
        timeout_s = self.netmgmt_timeout_s if timeout_s is None else timeout_s
        try:
            p = self._send(netmgmt_request(code, self.switch_institution_id), timeout_s)
        except (LinkDown, InFlightFull):
            return None
        fut = p.fut
        try:
            await asyncio.wait({fut, conn.lost_fut}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not fut.done():
                self._abandon(p)  # connection lost (or we were cancelled)
        if fut.cancelled():
            return None
        exc = fut.exception()
        if exc is not None:
            self.log.warning("bank %s: 0800 %s to %s not answered in %.1f s", self.bank_id,
                             _NETMGMT_NAMES.get(code, code), self._endpoint, timeout_s)
            return None
        return fut.result()

    async def _serve(self, conn: _LinkConn) -> None:
        """While online: echo when idle; return when the connection is gone or an echo fails."""
        loop = self._loop
        interval = self.echo_interval_s
        lost = conn.lost_fut
        while not lost.done():
            if interval <= 0:
                await lost
                return
            idle = loop.time() - self._last_rx
            if idle >= interval:
                self.stats.echoes += 1
                resp = await self._netmgmt(conn, NetMgmt.ECHO)
                if lost.done():
                    return
                if resp is None or resp.get(F.RESPONSE_CODE) != RC.APPROVED:
                    if resp is not None:
                        self.log.warning("bank %s: echo refused (39=%s)", self.bank_id,
                                         resp.get(F.RESPONSE_CODE))
                    self._set_state(OFFLINE)
                    return
                continue
            await asyncio.wait({lost}, timeout=interval - idle)
