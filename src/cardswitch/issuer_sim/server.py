"""The simulated issuer's TCP server: a thin asyncio shell around ``IssuerLogic``.

One ``IssuerHost`` per simulated bank. Per connection an ``asyncio.Protocol``
feeds a ``FrameReader``; every whole frame is decoded, decided at once on the
event loop (so the in-memory ledger needs no locks), written through to
SQLite, and answered once its rows are committed and the card's ``delay_ms``
has passed (``loop.call_later``; other requests keep flowing). Many requests
may be in flight on a connection; answers go out in whatever order they are
ready.

A request with something to verify (a PIN block, track 2 with a CVV, an
ARQC: ``IssuerLogic.must_wait``) goes through ``IssuerLogic.process`` in a
task instead: the bank's HSM verifies, then the ledger decides. The bank
holds an ``HsmClient`` (pool of 2) to ``network.hsm.listen``; it starts
whether or not the HSM is up, reconnects in the background, and until a
connection is up every such request gets 96 while the others go on.

Keys: in a test network (clear keys), the PVK is used at start-up, on this
side, to compute each card's PVV or IBM offset from its PIN (card issuance);
the PINs are then dropped and only the PVV/offset is stored. For the HSM
the clear keys are put under the Thales test LMK (the HSM simulator's
default; pass ``lmk`` for another). In a live network the keys are under the
LMK already and the cards carry their PVV or offset.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
from collections.abc import Callable, Iterable
from datetime import datetime, timezone

from cardswitch.config import Bank, Endpoint, Key, Network
from cardswitch.hsm_sim.client import HsmClient
from cardswitch.hsm_sim.lmk import Lmk
from cardswitch.iso8583.constants import RC, F, response_mti
from cardswitch.iso8583.dialect import DecodeError, Dialect, EncodeError, Message, get_dialect
from cardswitch.iso8583.framing import FrameReader, FrameTooLarge, Framing, FramingError, swap_tpdu
from cardswitch.issuer_sim.cards import pin_ref_for
from cardswitch.issuer_sim.checks import Verifier
from cardswitch.issuer_sim.hsmverifier import BankKeys, HsmVerifier
from cardswitch.issuer_sim.ledger import ECHOED, IssuerLogic, Outcome
from cardswitch.issuer_sim.linkmac import add_mac, mac_field_of, verify_mac
from cardswitch.issuer_sim.store import Reader, db_path, load, open_writer, statements
from cardswitch.pan import mask_pan

log = logging.getLogger("cardswitch.issuer_sim")

Clock = Callable[[], datetime]


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _issuer(bank: Bank):
    """The bank's card issuance step: a card's PVV or IBM offset from its PIN
    (``cards.pin_ref_for``) with the bank's clear test PVK, if it has one."""
    pvk = bank.pvk.clear_bytes() if bank.pvk is not None and bank.pvk.is_clear else None
    return lambda card: pin_ref_for(card, pvk)


def _clear_key(key: Key | None, what: str, bank_id: str) -> bytes | None:
    if key is None:
        return None
    if not key.is_clear:
        log.warning("%s: %s is under the LMK; the simulator needs it clear (mode = \"test\")", bank_id, what)
        return None
    return key.clear_bytes()


HSM_POOL = 2
HSM_TIMEOUT_S = 1.0         # well inside the switch's issuer timeout
HSM_RECONNECT_MAX_S = 1.0


class IssuerHost:
    """A simulated issuing bank listening for the switch.

    ``listen`` overrides the bank's first host endpoint (tests use port 0).
    ``hsm`` is where its HSM listens (``run_banks`` passes
    ``network.hsm.listen``); None: no HSM, so nothing can be verified (PIN
    transactions get 96). ``lmk``: the LMK the HSM holds, to put clear test
    keys under (default: the Thales test LMK). ``verifier`` replaces the HSM
    verifier altogether (tests).
    """

    def __init__(self, bank: Bank, data_dir: str | os.PathLike, *, listen: Endpoint | None = None,
                 clock: Clock | None = None, max_cached: int = 100_000,
                 hsm: Endpoint | None = None, lmk: Lmk | None = None,
                 verifier: Verifier | None = None, hsm_timeout_s: float = HSM_TIMEOUT_S) -> None:
        self.bank = bank
        self.hsm = hsm
        self._lmk = lmk
        self._hsm_timeout_s = hsm_timeout_s
        self.verifier: Verifier | None = verifier
        self.hsm_client: HsmClient | None = None
        self._tasks: set[asyncio.Task] = set()
        self.data_dir = data_dir
        self.listen = listen or bank.host
        self._clock = clock or _utcnow
        self._max_cached = max_cached
        link = bank.link
        self.dialect: Dialect = get_dialect(link.dialect)
        header = bytes.fromhex(link.header) if link.header else b""
        self.framing = Framing(kind=link.framing, header_len=len(header), max_frame=link.max_frame)
        self._read_timeout = link.read_timeout_ms / 1000.0
        self._zak = _clear_key(bank.zak, "ZAK", bank.id)
        self.logic: IssuerLogic | None = None
        self._writer = None
        self._reader: Reader | None = None
        self._server: asyncio.AbstractServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._conns: set[_Connection] = set()
        self._last_write: asyncio.Future | None = None
        self._inflight = 0
        self._idle: asyncio.Event | None = None
        # counters, for tests and operators
        self.requests = 0
        self.bad_frames = 0
        self.errors = 0

    @property
    def port(self) -> int:
        if self._server is None or not self._server.sockets:
            raise RuntimeError("not started")
        return self._server.sockets[0].getsockname()[1]

    @property
    def db_path(self) -> str:
        return str(db_path(self.data_dir, self.bank.id))

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._idle = asyncio.Event()
        self._idle.set()
        self._writer = await asyncio.to_thread(open_writer, self.data_dir, self.bank.id)
        cards = self.bank.cards
        pin_ref = _issuer(self.bank)
        loaded = await asyncio.to_thread(self._writer.call,
                                         lambda con: load(con, cards, self._max_cached, pin_ref))
        del pin_ref                 # the clear PVK goes with it
        self._reader = Reader(self.db_path)
        try:
            if self.verifier is None:
                self.verifier = await self._start_hsm()
            self.logic = IssuerLogic(
                self.bank.id, self.bank.bins, loaded.secret,
                accounts=loaded.accounts, txns=loaded.txns, next_id=loaded.next_id,
                lookup=self._reader.lookup, max_cached=self._max_cached, complete=loaded.complete,
                verifier=self.verifier)
            self._server = await self._loop.create_server(
                lambda: _Connection(self), self.listen.host, self.listen.port, reuse_address=True)
        except OSError as e:
            await self._stop_hsm()
            await self._close_storage()
            raise OSError(e.errno, f"{self.bank.id}: cannot listen on {self.listen}: {e.strerror or e}") from None
        except BaseException:
            await self._stop_hsm()
            await self._close_storage()
            raise
        log.info("%s: issuer simulator listening on %s:%s (%d cards, %d new; %s/%s)",
                 self.bank.id, self.listen.host, self.port, len(loaded.accounts), loaded.new_cards,
                 self.dialect.name, self.framing.kind)

    async def _start_hsm(self) -> HsmVerifier:
        keys = BankKeys.from_bank(self.bank, self._lmk)
        can = ", ".join(sorted(keys.capabilities)) or "nothing"
        if not keys.capabilities:
            log.warning("%s: no ZPK and PVK, CVK or MK-AC: PINs cannot be verified (answered 96), "
                        "CVVs and ARQCs are not checked", self.bank.id)
            return HsmVerifier(self.bank.id, keys, None)
        if self.hsm is None:
            log.warning("%s: no HSM configured: PIN, CVV and chip requests will be answered 96", self.bank.id)
            return HsmVerifier(self.bank.id, keys, None)
        client = HsmClient(self.hsm, pool_size=HSM_POOL, timeout_s=self._hsm_timeout_s,
                           reconnect_max_s=HSM_RECONNECT_MAX_S)
        await client.start()
        self.hsm_client = client
        if client.available:
            log.info("%s: HSM %s up (verifies: %s)", self.bank.id, self.hsm, can)
        else:
            log.warning("%s: HSM %s not reachable yet; retrying in the background, PIN, CVV and "
                        "chip requests get 96 until it is", self.bank.id, self.hsm)
        return HsmVerifier(self.bank.id, keys, client)

    async def _stop_hsm(self) -> None:
        client, self.hsm_client = self.hsm_client, None
        if client is not None:
            await client.stop()

    async def stop(self) -> None:
        """Stop accepting, answer everything in flight (delayed answers too), then close."""
        if self._server is None:
            return
        self._server.close()
        for c in list(self._conns):
            c.pause()
        if self._inflight:
            await self._idle.wait()
        for c in list(self._conns):
            c.close()
        await self._server.wait_closed()
        self._server = None
        await self._stop_hsm()
        await self._close_storage()
        log.info("%s: issuer simulator stopped", self.bank.id)

    async def _close_storage(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            await asyncio.to_thread(writer.close)
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    # -- one frame ---------------------------------------------------------------

    def on_frame(self, conn: _Connection, header: bytes, payload: bytes) -> None:
        received = self._loop.time()
        self.requests += 1
        try:
            msg = self.dialect.decode(payload)
        except DecodeError as e:
            self.bad_frames += 1
            part = e.partial
            if F.MTI in part and F.STAN in part:
                log.warning("%s: undecodable %s (%s): answered 30", self.bank.id, part[F.MTI], e.reason)
                resp = {k: v for k, v in part.items() if k != F.MTI}
                resp[F.MTI] = response_mti(part[F.MTI])
                resp[F.RESPONSE_CODE] = RC.FORMAT_ERROR
                self._answer(conn, header, resp, None, received, 0, None)
            else:
                log.warning("%s: undecodable frame dropped (%s)", self.bank.id, e.reason)
            return
        mac_field = mac_field_of(msg)
        if mac_field and self._zak is not None and not verify_mac(payload, msg, self.dialect, self._zak):
            log.warning("%s %s: MAC (field %s) does not verify under the ZAK: answered 63",
                        self.bank.id, msg.get(F.MTI), mac_field)
            resp = _safe_respond(msg, RC.SECURITY_VIOLATION)
            if resp is not None:
                self._answer(conn, header, resp, None, received, 0, None)
            return
        mac_field = mac_field if self._zak is not None else None
        logic = self.logic
        try:
            now = self._clock()
            if logic.must_wait(msg, now):
                # Security checks first (the HSM), then the ledger step.
                self._begin()
                task = self._loop.create_task(logic.process(msg, now))
                self._tasks.add(task)
                task.add_done_callback(lambda t: self._processed(t, conn, header, msg, received, mac_field))
                return
            outcome = logic.handle(msg, now)
        except Exception:
            self._failed(conn, header, msg, received)
            return
        self._conclude(conn, header, msg, outcome, received, mac_field)

    def _processed(self, task: asyncio.Task, conn: _Connection, header: bytes, msg: Message,
                   received: float, mac_field: str | None) -> None:
        self._tasks.discard(task)
        try:
            if task.cancelled():
                self._failed(conn, header, msg, received, "cancelled")
            elif task.exception() is not None:
                self._failed(conn, header, msg, received, exc=task.exception())
            else:
                self._conclude(conn, header, msg, task.result(), received, mac_field)
        finally:
            self._end()

    def _conclude(self, conn: _Connection, header: bytes, msg: Message, outcome: Outcome,
                  received: float, mac_field: str | None) -> None:
        """Write what the outcome changed, and answer once it is committed."""
        try:
            if outcome.response is None:
                return
            stmts = statements(outcome)
            if stmts:
                fut = self._writer.write_many(stmts, self._loop)
            else:  # a replay: answered once what it repeats is committed
                last = self._last_write
                fut = last if last is not None and not last.done() else None
        except Exception:
            self._failed(conn, header, msg, received)
            return
        if stmts:
            self._last_write = fut
        self._answer(conn, header, outcome.response, fut, received, outcome.delay_ms, mac_field)

    def _failed(self, conn: _Connection, header: bytes, msg: Message, received: float,
                why: str = "", exc: BaseException | None = None) -> None:
        """Answer 96 for a request that could not be handled (inside an except
        block, or with ``exc``, the traceback is logged)."""
        self.errors += 1
        log.error("%s %s %s: failed to handle (%s); answered 96", self.bank.id, msg.get(F.MTI),
                  mask_pan(msg.get(F.PAN, "")), why or "error", exc_info=exc if exc is not None else not why)
        resp = _safe_respond(msg, RC.SYSTEM_MALFUNCTION)
        if resp is not None:
            self._answer(conn, header, resp, None, received, 0, None)

    def _begin(self) -> None:
        self._inflight += 1
        self._idle.clear()

    def _end(self) -> None:
        self._inflight -= 1
        if self._inflight == 0:
            self._idle.set()

    def _answer(self, conn: _Connection, header: bytes, resp: Message, committed: asyncio.Future | None,
                received: float, delay_ms: int, mac_field: str | None) -> None:
        """Send ``resp`` once ``committed`` is done and ``delay_ms`` after ``received``."""
        self._begin()
        loop = self._loop

        def when_committed(fut: asyncio.Future | None) -> None:
            msg = resp
            if fut is not None and (fut.cancelled() or fut.exception() is not None):
                self.errors += 1
                log.error("%s: journal write failed (%s); answered 96", self.bank.id,
                          "cancelled" if fut.cancelled() else fut.exception())
                msg = _safe_respond(resp, RC.SYSTEM_MALFUNCTION, is_response=True) or resp
            wait = received + delay_ms / 1000.0 - loop.time()
            if wait > 0:
                loop.call_later(wait, self._send, conn, header, msg, mac_field)
            else:
                self._send(conn, header, msg, mac_field)

        if committed is None or committed.done():
            when_committed(committed)
        else:
            committed.add_done_callback(when_committed)

    def _send(self, conn: _Connection, header: bytes, resp: Message, mac_field: str | None) -> None:
        try:
            try:
                if mac_field is not None:
                    raw = add_mac(resp, self.dialect, self._zak)
                else:
                    raw = self.dialect.encode(resp)
            except (EncodeError, ValueError) as e:
                self.errors += 1
                log.error("%s: cannot encode the %s response (%s); answered 96", self.bank.id,
                          resp.get(F.MTI), e)
                bare = {k: resp[k] for k in (F.MTI, F.STAN) if k in resp}
                bare[F.RESPONSE_CODE] = RC.SYSTEM_MALFUNCTION
                raw = self.dialect.encode(bare)
            conn.write(self.framing.encode(raw, swap_tpdu(header)))
        except Exception:
            self.errors += 1
            log.exception("%s: failed to send a response", self.bank.id)
        finally:
            self._end()


def _safe_respond(msg: Message, rc: str, is_response: bool = False) -> Message | None:
    """A bare answer with code ``rc`` echoing the usual fields; None when no MTI to answer."""
    mti = msg.get(F.MTI, "")
    if not (len(mti) == 4 and mti.isdigit()):
        return None
    out: Message = {F.MTI: mti if is_response else response_mti(mti)}
    for k in ECHOED + (F.NETWORK_MGMT_CODE,):
        v = msg.get(k)
        if v is not None:
            out[k] = v
    out[F.RESPONSE_CODE] = rc
    return out


class _Connection(asyncio.Protocol):
    __slots__ = ("host", "reader", "transport", "_timer", "peer")

    def __init__(self, host: IssuerHost) -> None:
        self.host = host
        self.reader = FrameReader(host.framing)
        self.transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.peer = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.peer = transport.get_extra_info("peername")
        self.host._conns.add(self)
        log.info("%s: switch connected from %s", self.host.bank.id, self.peer)

    def connection_lost(self, exc: Exception | None) -> None:
        self.host._conns.discard(self)
        self._cancel_timer()
        log.info("%s: connection from %s closed", self.host.bank.id, self.peer)

    def data_received(self, data: bytes) -> None:
        try:
            frames = self.reader.feed(data)
        except (FrameTooLarge, FramingError) as e:
            self.host.bad_frames += 1
            log.warning("%s: closing connection from %s: %s", self.host.bank.id, self.peer, e)
            self.close()
            return
        for header, payload in frames:
            self.host.on_frame(self, header, payload)
        if self.reader.pending == 0 or frames:
            self._cancel_timer()
        if self.reader.pending and self._timer is None and self.transport is not None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(self.host._read_timeout, self._read_timed_out)

    def _read_timed_out(self) -> None:
        self._timer = None
        self.host.bad_frames += 1
        log.warning("%s: closing connection from %s: frame not complete within the read timeout",
                    self.host.bank.id, self.peer)
        self.close()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def write(self, data: bytes) -> None:
        t = self.transport
        if t is None or t.is_closing():
            log.info("%s: connection gone, response dropped", self.host.bank.id)
            return
        t.write(data)

    def pause(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def close(self) -> None:
        self._cancel_timer()
        if self.transport is not None:
            self.transport.close()


async def run_banks(network: Network, data_dir: str | os.PathLike | None = None,
                    bank_ids: Iterable[str] | None = None,
                    ready: Callable[..., object] | None = None) -> None:
    """Serve every simulated bank (or those of ``bank_ids``) until cancelled.

    Each bank listens on its first host endpoint and verifies PINs, CVVs and
    ARQCs with the HSM at ``network.hsm.listen`` (started before the banks by
    ``cardswitch up``; a bank also starts without it, see the module doc).
    ``ready`` is called once all listen, with the list of ``IssuerHost`` when
    it takes an argument.
    On cancellation every host drains and stops, then CancelledError goes on.
    """
    data_dir = network.switch.data_dir if data_dir is None else data_dir
    wanted = None if bank_ids is None else set(bank_ids)
    if wanted is not None:
        unknown = wanted - {b.id for b in network.banks}
        if unknown:
            raise ValueError(f"unknown bank id(s): {', '.join(sorted(unknown))}")
    banks = [b for b in network.banks if b.simulate and (wanted is None or b.id in wanted)]
    hosts: list[IssuerHost] = []
    try:
        for b in banks:
            h = IssuerHost(b, data_dir, hsm=network.hsm.listen)
            await h.start()
            hosts.append(h)
        if ready is not None:
            if _takes_argument(ready):
                res = ready(hosts)
            else:
                res = ready()
            if inspect.isawaitable(res):
                await res
        await asyncio.Event().wait()
    finally:
        await asyncio.gather(*(h.stop() for h in hosts), return_exceptions=True)


def _takes_argument(fn: Callable[..., object]) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
               for p in params)
