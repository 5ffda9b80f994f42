"""A link to one issuing bank's host: the switch is the client (wire.md 8).

The connection manager (one task per link) connects, signs on (0800 70=001),
sends an echo test (0800 70=301) whenever nothing has been received for
``echo_interval_s``, and on connection loss or a failed sign-on/echo goes
offline and reconnects with jittered exponential backoff (0.1 s doubling to
5 s).

Failover (a bank may list several hosts, the first is primary): each host
has an ``EndpointHealth`` (routing.routes). A refused or timed-out connect,
a refused or unanswered sign-on or echo mark the host down at once;
``failure_threshold`` request timeouts in a row (no answer in between) mark
it unhealthy too, and when the bank has another host the link leaves it
(new requests get LinkDown until the next host is signed on). Reconnecting
tries the usable hosts in order, the primary first, with no pause between
them; only when every host is down does it back off and try them all. While
on a lesser host, the link probes each better one every ``probe_interval_s``
(connect and sign on, beside the live connection) and moves new requests to
it once it has signed on. A connection the link leaves is not dropped: it
drains (answers to the requests sent on it are still taken) and is signed
off and closed once nothing sent on it is pending. ``hosts()`` reports each
host's state and health (for metrics).

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
from cardswitch.routing.routes import EndpointHealth, pick_host
from cardswitch.switch.backoff import Backoff
from cardswitch.switch.framed import FramedProtocol, framing_of, worth_logging
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
    failovers: int = 0            # times new requests moved to another host than the last one


# A host's part in the link (HostStatus.state).
HOST_ACTIVE = "active"            # signed on, carries new requests
HOST_DRAINING = "draining"        # left: answers to what was sent on it are still taken
HOST_CONNECTING = "connecting"    # connect or sign-on in progress (a reconnect or a probe)
HOST_IDLE = "idle"                # no connection


@dataclass(slots=True, frozen=True)
class HostStatus:
    """One host of a bank link, as metrics and operators see it."""

    endpoint: Endpoint
    primary: bool                 # the first host the bank lists
    state: str                    # HOST_ACTIVE | HOST_DRAINING | HOST_CONNECTING | HOST_IDLE
    healthy: bool
    consecutive_failures: int
    in_flight: int                # requests sent to this host, not yet answered or timed out
    connects: int
    connect_failures: int
    timeouts: int
    responses: int


class _Host:
    """A bank host: its health and counters (the link's connections point here)."""

    __slots__ = ("endpoint", "primary", "health", "opening", "connects", "connect_failures",
                 "timeouts", "responses")

    def __init__(self, endpoint: Endpoint, primary: bool, health: EndpointHealth) -> None:
        self.endpoint = endpoint
        self.primary = primary
        self.health = health
        self.opening = False
        self.connects = 0
        self.connect_failures = 0
        self.timeouts = 0
        self.responses = 0


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
    __slots__ = ("stan", "fut", "timer", "conn", "admin")

    def __init__(self, stan: str, fut: asyncio.Future) -> None:
        self.stan = stan
        self.fut = fut
        self.timer: asyncio.TimerHandle | None = None
        self.conn: _LinkConn | None = None     # the connection it went out on, until settled
        self.admin = False                     # an 0800 of the link's own (not counted in health)


class _LinkConn(FramedProtocol):
    def __init__(self, link: "BankLink", host: _Host) -> None:
        super().__init__(link._framing, link._read_timeout_s, link._loop)
        self.link = link
        self.host = host
        self.lost_fut: asyncio.Future = link._loop.create_future()
        self.last_rx = link._loop.time()
        self.sent = 0                 # requests sent on this connection still pending
        self.draining = False         # left by the link: close once ``sent`` is 0
        self.drain_timer: asyncio.TimerHandle | None = None

    def frame_received(self, header: bytes, payload: bytes) -> None:
        self.link._on_frame(self, payload)

    def data_received(self, data: bytes) -> None:
        self.last_rx = self.loop.time()
        super().data_received(data)

    def frame_error(self, kind: str, detail: str) -> None:
        stats = self.link.stats
        stats.framing_errors += 1
        if worth_logging(stats.framing_errors):
            self.link.log.warning("bank %s: %s from %s; closing the connection (%d framing errors)",
                                  self.link.bank_id, detail, self.host.endpoint, stats.framing_errors)

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
        failure_threshold: int = 3,
        probe_interval_s: float = 5.0,
        drain_timeout_s: float = 120.0,
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
        self._conn: _LinkConn | None = None          # the active connection (new requests go here)
        self._endpoint: Endpoint | None = None
        self._manager: asyncio.Task | None = None
        self._stopping = False
        self._online_waiters: list[asyncio.Future] = []
        # Failover: one health per host, in the bank's order (first = primary).
        self._hosts = [_Host(ep, i == 0, EndpointHealth(failure_threshold, probe_interval_s))
                       for i, ep in enumerate(self.endpoints)]
        self._health = {h: h.health for h in self._hosts}
        self.drain_timeout_s = drain_timeout_s        # a left connection is closed after this at most
        self._draining: set[_LinkConn] = set()
        self._kick: asyncio.Future | None = None      # wakes the manager when the link leaves a host
        self._last_host: _Host | None = None
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

    def hosts(self) -> list[HostStatus]:
        """Each host of the bank, in the configured order (first = primary)."""
        active = self._conn if self._state == ONLINE else None
        out = []
        for h in self._hosts:
            conns = [c for c in self._draining if c.host is h]
            if active is not None and active.host is h:
                state = HOST_ACTIVE
                conns.append(active)
            elif h.opening:
                state = HOST_CONNECTING
            elif conns:
                state = HOST_DRAINING
            else:
                state = HOST_IDLE
            out.append(HostStatus(
                endpoint=h.endpoint, primary=h.primary, state=state, healthy=h.health.healthy,
                consecutive_failures=h.health.failures, in_flight=sum(c.sent for c in conns),
                connects=h.connects, connect_failures=h.connect_failures, timeouts=h.timeouts,
                responses=h.responses))
        return out

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
        for c in list(self._draining):
            if c.drain_timer is not None:
                c.drain_timer.cancel()
            c.close()
        self._draining.clear()
        for p in self._inflight.clear():
            if p.timer is not None:
                p.timer.cancel()
            p.conn = None
            if not p.fut.done():
                p.fut.set_exception(LinkTimeout(f"bank {self.bank_id}: link stopped with the request in flight"))
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def reserve_stan(self) -> str:
        """A STAN for a request sent later with ``request(..., stan=)``: the caller
        journals it first (write-ahead), or keeps it for the repeats of an advice.
        Only moves the counter on; LinkDown when every STAN is in flight."""
        try:
            return self._inflight.next_stan()
        except InFlightFull as e:
            raise LinkDown(f"bank {self.bank_id}: {e}") from None

    async def request(self, msg: Message, timeout_s: float, stan: str | None = None) -> Message:
        """Send ``msg`` with the link's STAN (written into ``msg["11"]``); its response.

        ``stan``: send with that STAN (from ``reserve_stan``, or an advice's
        repeat) instead of the next one; LinkDown when it is in flight now.
        Raises LinkDown (nothing sent), LinkTimeout (sent, unanswered; also a
        response whose MAC is wrong), or the codec's EncodeError (nothing sent).
        """
        if self.mac is None:
            return await self.request_future(msg, timeout_s, stan)
        return await self._request_maced(msg, timeout_s, stan)

    async def _request_maced(self, msg: Message, timeout_s: float, stan: str | None = None) -> Message:
        """Reserve the STAN, MAC the message as it will be sent, then send it."""
        if self._state != ONLINE:
            self.stats.link_down += 1
            raise LinkDown(f"bank {self.bank_id} is {self._state}")
        inflight = self._inflight
        if stan is not None and stan in inflight:
            raise LinkDown(f"bank {self.bank_id}: STAN {stan} is in flight")
        try:
            stan = stan or inflight.next_stan()
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
        p.conn = conn
        conn.sent += 1
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

    def request_future(self, msg: Message, timeout_s: float, stan: str | None = None) -> asyncio.Future:
        """Like ``request`` without a coroutine: LinkDown/EncodeError are raised here."""
        if self._state != ONLINE:
            self.stats.link_down += 1
            raise LinkDown(f"bank {self.bank_id} is {self._state}")
        try:
            p = self._send(msg, timeout_s, stan)
        except InFlightFull as e:
            self.stats.link_down += 1
            raise LinkDown(f"bank {self.bank_id}: {e}") from None
        self.stats.requests += 1
        return p.fut

    # -- sending and matching ------------------------------------------------

    def _send(self, msg: Message, timeout_s: float, stan: str | None = None,
              conn: _LinkConn | None = None) -> _Pending:
        """Send on ``conn`` (default: the active connection)."""
        if conn is None:
            conn = self._conn
        if conn is None or conn.closed:
            raise LinkDown(f"bank {self.bank_id}: not connected")
        inflight = self._inflight
        if stan is None:
            stan = inflight.next_stan()
        elif stan in inflight:
            raise LinkDown(f"bank {self.bank_id}: STAN {stan} is in flight")
        msg[F.STAN] = stan
        payload = self._dialect.encode(msg)
        loop = self._loop
        p = _Pending(stan, loop.create_future())
        inflight.add(stan, msg[F.MTI], msg.get(F.RRN, ""), p)
        if not conn.write_frame(payload, self._header):  # closing under us: nothing sent
            inflight.pop(stan, p)
            raise LinkDown(f"bank {self.bank_id}: not connected")
        p.conn = conn
        p.admin = msg[F.MTI] == MTI.NETWORK_REQUEST
        conn.sent += 1
        p.timer = loop.call_later(timeout_s, self._on_timeout, p)
        self.stats.frames_out += 1
        return p

    def _settle(self, p: _Pending) -> None:
        """``p`` is no longer pending on the connection it went out on."""
        conn = p.conn
        if conn is None:
            return
        p.conn = None
        conn.sent -= 1
        if conn.sent <= 0 and conn.draining:
            self._close_left(conn)

    def _abandon(self, p: _Pending) -> None:
        """Forget an 0800 of our own whose connection went away."""
        if self._inflight.pop(p.stan, p) is not None and p.timer is not None:
            p.timer.cancel()
        self._settle(p)
        p.fut.cancel()

    def _on_timeout(self, p: _Pending) -> None:
        if self._inflight.pop(p.stan, p) is None:
            return
        conn = p.conn
        self._settle(p)
        if not p.fut.done():
            self.stats.timeouts += 1
            p.fut.set_exception(LinkTimeout(f"bank {self.bank_id}: no answer to STAN {p.stan}"))
        if conn is None or p.admin:       # the manager judges its own 0800s
            return
        host = conn.host
        host.timeouts += 1
        if conn.closed:                   # sent on a connection since gone: says nothing of the host now
            return
        if host.health.mark_failure(self._loop.time()):
            self.log.warning("bank %s: host %s unhealthy after %d timeouts in a row", self.bank_id,
                             host.endpoint, host.health.failures)
            if conn is self._conn and len(self._hosts) > 1 and not self._stopping:
                self._leave(conn, "timeouts")

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
                self._settle(p)
                host = conn.host
                host.responses += 1
                host.health.mark_success(self._loop.time())
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
            if worth_logging(self.stats.late):
                self.log.warning("bank %s: unmatched response %s stan=%s rrn=%s rc=%s (%d so far)", self.bank_id,
                                 msg.get(F.MTI), msg.get(F.STAN), msg.get(F.RRN), msg.get(F.RESPONSE_CODE),
                                 self.stats.late)
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
            if worth_logging(self.stats.unsolicited):
                self.log.warning("bank %s: unsolicited %s stan=%s answered %s (%d so far)", self.bank_id, mti,
                                 msg.get(F.STAN), UNSOLICITED_RC, self.stats.unsolicited)
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
        if worth_logging(self.stats.decode_errors):
            self.log.warning("bank %s: undecodable frame (mti=%s stan=%s): %.120s (%d so far)", self.bank_id,
                             mti, partial.get(F.STAN), e.reason, self.stats.decode_errors)
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
        if conn.drain_timer is not None:
            conn.drain_timer.cancel()
            conn.drain_timer = None
        self._draining.discard(conn)
        if conn is self._conn:
            self._conn = None
            if self._state == ONLINE and not self._stopping:
                self.log.warning("bank %s: connection to %s lost%s", self.bank_id, conn.host.endpoint,
                                 f": {exc}" if exc else "")
                self._set_state(OFFLINE)

    # -- failover: leaving a host, draining what was sent to it ----------------

    def _host_down(self, host: _Host, why: str) -> None:
        if host.health.mark_down(self._loop.time()):
            self.log.warning("bank %s: host %s marked unhealthy (%s)", self.bank_id, host.endpoint, why)

    def _activate(self, conn: _LinkConn) -> None:
        """``conn`` (signed on) carries new requests from now on; the one before it drains."""
        old = self._conn
        host = conn.host
        self._conn = conn
        self._endpoint = host.endpoint
        if old is not None and old is not conn:
            self._retire(old)
        last, self._last_host = self._last_host, host
        if last is not None and last is not host:
            self.stats.failovers += 1
            self.log.warning("bank %s: new requests go to %s (%s) instead of %s", self.bank_id, host.endpoint,
                             "primary" if host.primary else "failover host", last.endpoint)
        else:
            self.log.info("bank %s: online at %s", self.bank_id, host.endpoint)
        self._set_state(ONLINE)

    def _leave(self, conn: _LinkConn, why: str) -> None:
        """Stop sending to the active connection's host; reconnect elsewhere."""
        self.log.warning("bank %s: leaving %s (%s); %d requests sent there still awaited", self.bank_id,
                         conn.host.endpoint, why, conn.sent)
        self._conn = None
        self._set_state(OFFLINE)
        self._retire(conn)
        kick = self._kick
        if kick is not None and not kick.done():
            kick.set_result(None)

    def _retire(self, conn: _LinkConn) -> None:
        """No new requests on ``conn``; answers to those sent on it are still taken."""
        if conn.closed or conn.draining:
            return
        conn.draining = True
        self._draining.add(conn)
        if conn.sent <= 0:
            self._close_left(conn)
        else:
            conn.drain_timer = self._loop.call_later(self.drain_timeout_s, self._close_left, conn)

    def _close_left(self, conn: _LinkConn) -> None:
        """A left connection with nothing pending: sign off (a healthy host), close."""
        if not conn.draining:
            return
        conn.draining = False
        self._draining.discard(conn)
        if conn.drain_timer is not None:
            conn.drain_timer.cancel()
            conn.drain_timer = None
        if conn.closed:
            return
        if not conn.host.health.healthy or self._stopping:
            conn.close()
            return
        task = self._loop.create_task(self._sign_off_and_close(conn))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _sign_off_and_close(self, conn: _LinkConn) -> None:
        try:
            await self._netmgmt(conn, NetMgmt.SIGN_OFF, min(self.netmgmt_timeout_s, 1.0))
        finally:
            conn.close()

    # -- connection manager --------------------------------------------------

    def _candidates(self, now: float) -> list[_Host]:
        """Hosts to try, most preferred first: the usable ones, or all when none is."""
        usable = [h for h in self._hosts if h.health.usable(now)]
        return usable or list(self._hosts)

    async def _run(self) -> None:
        backoff = self._backoff
        while not self._stopping:
            went_online = False
            for host in self._candidates(self._loop.time()):
                try:
                    conn = await self._open(host)
                except asyncio.CancelledError:
                    raise
                except Exception:  # a bug must not leave the link down for good
                    self.log.exception("bank %s: connection manager error", self.bank_id)
                    self._host_down(host, "internal error")
                    conn = None
                if self._stopping:
                    if conn is not None:
                        conn.close()
                    return
                if conn is None:
                    continue
                went_online = True
                self._activate(conn)
                try:
                    await self._serve()
                except asyncio.CancelledError:
                    raise
                except Exception:
                    self.log.exception("bank %s: connection manager error", self.bank_id)
                    active, self._conn = self._conn, None
                    if active is not None:
                        active.close()
                break
            if self._stopping:
                break
            if went_online:
                backoff.reset()
            self._set_state(OFFLINE)
            await asyncio.sleep(backoff.next())

    async def _open(self, host: _Host, probe: bool = False) -> _LinkConn | None:
        """Connect to ``host`` and sign on; the connection, or None (host marked down).

        A probe (a better host, while another one serves) leaves the link's
        state alone.
        """
        loop = self._loop
        ep = host.endpoint
        host.opening = True
        host.health.mark_attempt(loop.time())
        if not probe:
            self._endpoint = ep
            self._set_state(CONNECTING)
        conn: _LinkConn | None = None
        ok = False
        try:
            try:
                _, conn = await asyncio.wait_for(
                    loop.create_connection(lambda: _LinkConn(self, host), ep.host, ep.port),
                    self.connect_timeout_s)
            except (OSError, asyncio.TimeoutError) as e:
                self.stats.connect_failures += 1
                host.connect_failures += 1
                self.log.info("bank %s: cannot connect to %s: %s", self.bank_id, ep, e or type(e).__name__)
                self._host_down(host, "cannot connect")
                return None
            self.stats.connects += 1
            host.connects += 1
            if not probe:
                self._set_state(SIGNING_ON)
            resp = await self._netmgmt(conn, NetMgmt.SIGN_ON)
            if resp is None:
                self._host_down(host, "sign-on unanswered")
                return None
            if resp.get(F.RESPONSE_CODE) != RC.APPROVED:
                self.log.warning("bank %s: sign-on at %s refused (39=%s)", self.bank_id, ep,
                                 resp.get(F.RESPONSE_CODE))
                self._host_down(host, "sign-on refused")
                return None
            self.stats.sign_ons += 1
            host.health.mark_success(loop.time())
            ok = True
            return conn
        finally:
            host.opening = False
            if conn is not None and not ok:
                conn.close()

    async def _netmgmt(self, conn: _LinkConn, code: str, timeout_s: float | None = None,
                       abort: asyncio.Future | None = None) -> Message | None:
        """Send an 0800 on ``conn`` and wait for its answer; None when it times out,
        the connection goes, or ``abort`` completes first."""
        timeout_s = self.netmgmt_timeout_s if timeout_s is None else timeout_s
        try:
            p = self._send(netmgmt_request(code, self.switch_institution_id), timeout_s, conn=conn)
        except (LinkDown, InFlightFull):
            return None
        fut = p.fut
        waits = {fut, conn.lost_fut}
        if abort is not None:
            waits.add(abort)
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not fut.done():
                self._abandon(p)  # connection lost (or we were cancelled)
        if fut.cancelled():
            return None
        exc = fut.exception()
        if exc is not None:
            self.log.warning("bank %s: 0800 %s to %s not answered in %.1f s", self.bank_id,
                             _NETMGMT_NAMES.get(code, code), conn.host.endpoint, timeout_s)
            return None
        return fut.result()

    def _probe_target(self, current: _Host, now: float) -> _Host | None:
        """A host preferred to ``current`` whose probe is due, or None."""
        better = self._hosts[:self._hosts.index(current)]
        return pick_host(better, self._health, now) if better else None

    def _next_probe(self, current: _Host) -> float | None:
        """When the next probe of a host preferred to ``current`` is due."""
        due = [h.health.retry_at for h in self._hosts[:self._hosts.index(current)]]
        return min(due) if due else None

    async def _serve(self) -> None:
        """While online: echo tests when idle, probes of better hosts (moving to
        one that signs on); returns when the active connection is gone or left."""
        loop = self._loop
        try:
            while not self._stopping:
                conn = self._conn
                if conn is None or conn.closed or self._state != ONLINE:
                    return
                kick = self._kick = loop.create_future()
                now = loop.time()
                wait: float | None = None
                interval = self.echo_interval_s
                if interval > 0:
                    idle = now - conn.last_rx
                    if idle >= interval:
                        if not await self._echo(conn, kick):
                            return
                        continue
                    wait = interval - idle
                better = self._probe_target(conn.host, now)
                if better is not None:
                    new = await self._open(better, probe=True)
                    if new is not None:
                        if self._stopping:
                            new.close()
                            return
                        self._activate(new)   # the connection before it drains
                    continue
                due = self._next_probe(conn.host)
                if due is not None:
                    wait = max(0.0, due - now) if wait is None else min(wait, max(0.0, due - now))
                await asyncio.wait({conn.lost_fut, kick}, timeout=wait,
                                   return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._kick = None

    async def _echo(self, conn: _LinkConn, kick: asyncio.Future) -> bool:
        """An echo test on the active connection; False when it failed (connection closed)."""
        self.stats.echoes += 1
        resp = await self._netmgmt(conn, NetMgmt.ECHO, abort=kick)
        if conn.lost_fut.done() or conn is not self._conn:
            return False
        if resp is None or resp.get(F.RESPONSE_CODE) != RC.APPROVED:
            if resp is not None:
                self.log.warning("bank %s: echo refused (39=%s)", self.bank_id, resp.get(F.RESPONSE_CODE))
            self._host_down(conn.host, "echo test failed")
            self._conn = None
            self._set_state(OFFLINE)
            conn.close()
            return False
        return True
