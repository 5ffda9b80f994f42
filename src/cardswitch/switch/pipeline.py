"""The transaction pipeline: every terminal request, top to bottom.

``Pipeline.handle`` is what the acceptor calls for each decoded request. Each
flow below is a short list of named steps (``cardswitch.switch.steps`` holds
the pure ones); the only waiting is on the issuer and on the journal.

What the switch owes an issuer after the fact (reversal advices, stand-in
advices) goes through the persistent store-and-forward queue
(``cardswitch.switch.saf``), always journaled before the transaction's own
outcome; ``recover_pending`` settles, at start, what a crash left open.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping

from cardswitch.iso8583.constants import (
    MTI,
    PROC_BATCH_CLOSE,
    PROC_BATCH_UPLOAD_TRAILER,
    RC,
    F,
    NetMgmt,
    TxnType,
)
from cardswitch.logs import bind_trace
from cardswitch.iso8583 import macfield
from cardswitch.iso8583.dialect import Message, get_dialect
from cardswitch.iso8583.validate import format_errors, missing_fields
from cardswitch.pan import mask_pan
from cardswitch.switch import messages, steps
from cardswitch.switch.banklink import LinkDown, LinkTimeout
from cardswitch.switch.clock import field7, iso_utc, utc_now
from cardswitch.switch.dedupe import duplicate_key
from cardswitch.switch.records import Cancel, Kind, Status, TxnRecord
from cardswitch.switch.saf import (
    CREDIT_LEG,
    DEBIT_LEG,
    REVERSAL,
    STAND_IN,
    SafEntry,
    SafForwarder,
    issuer_original_mti,
    reversal_entry,
    reversal_of_advice,
    stand_in_entry,
)
from cardswitch.switch.security import STATE_PREFIX, SecurityError
from cardswitch.switch.standin import Request as StandInRequest
from cardswitch.switch.standin import StandInService
from cardswitch.switch.standin import auth_code as standin_auth_code
from cardswitch.switch.steps import Context, Txn

log = logging.getLogger("cardswitch.switch")

# Request MTI -> the flow that handles it.
FINANCIAL_MTIS = frozenset({MTI.AUTH_REQUEST, "0101", MTI.FIN_REQUEST, MTI.FIN_REQUEST_REPEAT})
REVERSAL_MTIS = frozenset({MTI.REVERSAL_REQUEST, MTI.REVERSAL_REQUEST_REPEAT})


class PinError(Exception):
    """The PIN block could not be translated; carries the response code."""

    def __init__(self, rc: str) -> None:
        super().__init__(rc)
        self.rc = rc


# Timed-out requests remembered for their late answers (per process, newest kept).
LATE_MEMORY = 50_000


class Pipeline:
    wants_raw = True   # the acceptor hands us the bytes as received: MACs are checked over them

    def __init__(self, ctx: Context, journal, links: Mapping[str, object], *,
                 rrn: Callable[[], str], translate_pin, issuer_timeout_s: float,
                 stats=None, security=None, saf: SafForwarder | None = None,
                 standin: StandInService | None = None, dedupe=None) -> None:
        self.ctx = ctx
        self.journal = journal
        self.links = links
        self.next_rrn = rrn
        self.translate_pin = translate_pin        # async (block, info, bank, pan) -> block under ZPK
        self.issuer_timeout_s = issuer_timeout_s
        self.stats = stats
        self.switch_inst = ctx.network.switch.institution_id
        self._banks = {b.id: b for b in ctx.network.banks}
        self._done: dict[int, asyncio.Future] = {}  # records still in flight -> done when final
        self._loop = asyncio.get_event_loop()
        self.security = security                  # switch.security.Security, or None: no MACs
        self.dialect = get_dialect(ctx.network.switch.link.dialect)
        # Advices owed to the issuers (reversals, stand-in), persistent.
        self.saf = saf if saf is not None else SafForwarder(
            journal, links, switch_inst=self.switch_inst,
            issuer_insts={b.id: b.institution_id for b in ctx.network.banks},
            secret=ctx.token_secret, timeout_s=issuer_timeout_s)
        self.standin = standin if standin is not None else StandInService(ctx.network, ctx.token_secret)
        # Duplicates across switch processes (dedupe.DuplicateGuard: async claim(key) -> bool,
        # True when first), or None: duplicates are caught per process only.
        self.dedupe = dedupe
        # (bank, issuer STAN, RRN) of requests that timed out -> their record, for late answers.
        self._timed_out: OrderedDict[tuple[str, str, str], TxnRecord] = OrderedDict()
        self.late_answers = 0

    # -- entry point -----------------------------------------------------------

    async def handle(self, req: Message, conn=None, raw: bytes = b"") -> Message | None:
        bind_trace()    # one trace ID for the terminal leg and the bank leg (logs.py)
        resp = await self._dispatch(req, raw)
        if resp is not None and self.security is not None and resp.get(F.MTI) != MTI.NETWORK_RESPONSE \
                and self.security.keys.has_tak(resp.get(F.TERMINAL_ID, "")):
            await self._seal(resp)
        return resp

    async def _dispatch(self, req: Message, raw: bytes) -> Message | None:
        mti = req.get(F.MTI, "")
        if mti in FINANCIAL_MTIS or mti in REVERSAL_MTIS:
            return await self.financial(req, raw)
        if mti in (MTI.RECONCILE_REQUEST, MTI.BATCH_UPLOAD):
            rc = await self.verify_mac(req, raw) if F.TERMINAL_ID in req else None
            if rc is not None:
                return self._housekeeping(req, rc)
            return self.batch_close(req) if mti == MTI.RECONCILE_REQUEST else self.batch_upload(req)
        if mti == MTI.NETWORK_REQUEST:
            return await self.network(req)
        if len(mti) == 4 and mti.isdigit() and mti[2] in "0246":
            # A request of a class we do not serve: answered, never dropped.
            return messages.terminal_response(req, RC.INVALID_TRANSACTION)
        return None  # responses and advices from a terminal get no answer

    def overloaded(self, req: Message) -> Message | None:
        """The acceptor sheds a request beyond its overall in-flight cap: 91 at once,
        with an RRN and the business date like any other answer (not journaled:
        a resend is processed normally)."""
        if req.get(F.MTI, "")[2:3] not in ("0", "2", "4"):
            return None
        return messages.terminal_response(req, RC.ISSUER_INOPERATIVE, business_date=self.ctx.business_date,
                                          rrn=req.get(F.RRN) or self.next_rrn())

    def format_error(self, partial: Message, reason: str) -> Message | None:
        return messages.format_error_response(partial)

    # -- financial requests, reversals -------------------------------------------

    async def verify_mac(self, req: Message, raw: bytes) -> str | None:
        """63: a terminal with a TAK sent no MAC or a wrong one (wire.md 7); the
        request goes no further. 96 when the HSM cannot say."""
        sec = self.security
        tid = req.get(F.TERMINAL_ID, "")
        if sec is None or not sec.keys.has_tak(tid):
            return None
        mac = macfield.received_mac(req)
        try:
            await sec.verify_terminal_mac(tid, macfield.mac_input(self.dialect, req, raw) if mac else b"", mac)
        except SecurityError as e:
            log.warning("terminal %s stan %s: %s", tid, req.get(F.STAN), e)
            return e.rc
        return None

    async def _seal(self, resp: Message) -> None:
        """MAC a response to a terminal that has a TAK (wire.md 4)."""
        try:
            field, covered = macfield.prepare(self.dialect, resp)
            resp[field] = await self.security.terminal_mac(resp[F.TERMINAL_ID], covered)
        except SecurityError as e:
            resp.pop(F.MAC, None)
            resp.pop(F.MAC_SECONDARY, None)
            log.warning("terminal %s: response sent without a MAC: %s", resp.get(F.TERMINAL_ID), e)

    async def financial(self, req: Message, raw: bytes = b"") -> Message:
        ctx = self.ctx
        t = Txn(req=req, mti=req[F.MTI], received=utc_now(), t0=time.perf_counter())
        rc = steps.classify(t) or steps.validate(t, ctx) or steps.detect_duplicate(t, ctx)
        if rc is None and t.replay_of is None and self.dedupe is not None:
            rc = await self.claim(t)
        rec = steps.start_record(t, ctx, self.journal.next_id())
        if t.replay_of is not None:
            return await self.replay(t)
        if rc is not None:                      # unreadable or a duplicate: not indexed
            return self.finish_local(t, rc)
        ctx.index.add(rec)                      # from here on, a resend is a duplicate
        rc = steps.identify_terminal(t, ctx)
        if rc is None and self.security is not None:
            rc = await self.verify_mac(req, raw)
        rc = (rc
              or steps.check_allowed(t, ctx)
              or (None if t.kind == Kind.REVERSAL else
                  steps.read_card(t, ctx) or steps.check_amount(t, ctx) or steps.check_batch(t, ctx)))
        if rc is not None:
            return self.finish_local(t, rc)
        self._done[rec.id] = self._loop.create_future()
        try:
            rc = steps.find_original(t, ctx)
            if rc is None and t.kind == Kind.REVERSAL:
                rc = await self.reverse(t)
                return await self.respond(t, rc)
            rc = rc or steps.route(t, ctx)
            if rc is None:
                rc = await self.ask_issuer(t)
            return await self.respond(t, rc)
        except Exception:
            log.exception("transaction %s failed", rec.id)
            if t.written_ahead and rec.status == Status.PENDING and rec.cancelled == Cancel.NONE:
                # It may have reached the issuer: undo whatever it did there.
                rec.status = Status.ERROR
                self._reverse_record(rec)
            return await self.respond(t, RC.SYSTEM_MALFUNCTION)

    async def claim(self, t: Txn) -> str | None:
        """94 when another switch process saw this request first (shared guard)."""
        req = t.req
        key = duplicate_key(req[F.TERMINAL_ID], req[F.STAN], req[F.TRANSMISSION_DT], t.mti,
                            self.ctx.business_date)
        try:
            first = await self.dedupe.claim(key)
        except Exception as e:                  # the guard decides how it fails; never a crash here
            log.warning("duplicate guard failed (%s): request let through", type(e).__name__)
            return None
        return None if first else RC.DUPLICATE

    async def ask_issuer(self, t: Txn) -> str:
        """Translate the PIN, write ahead (with the issuer STAN), send, wait for the answer.

        No answer in time: the request is reversed at the issuer (queued 0420)
        and the terminal gets 91, or stand-in decides when the bank's profile
        allows it; a link that is down: stand-in or 91, nothing to reverse.
        """
        rec = t.record
        assert rec is not None and t.route is not None and t.info is not None
        bank = self._banks[t.route.bank_id]
        link = self.links.get(bank.id)
        if link is None:
            return RC.ISSUER_INOPERATIVE
        pin = ""
        if F.PIN_BLOCK in t.req:
            try:
                pin = await self.translate_pin(t.req[F.PIN_BLOCK], t.info, bank, t.pan)
            except PinError as e:
                return e.rc
        original = ""
        if t.original is not None:           # void, completion: name the issuer-side original
            o = t.original
            original = _field90(o, self.switch_inst, t.info.acquirer.institution_id)
        now = utc_now()
        rec.rrn = t.req.get(F.RRN) or self.next_rrn()
        rec.issuer_transmitted = field7(now)
        out = messages.issuer_request(
            t.req, mti=t.mti[:3] + "0", pan=t.pan, expiry=t.expiry,
            transmitted=rec.issuer_transmitted, business_date=rec.business_date, rrn=rec.rrn,
            acquirer_inst=t.info.acquirer.institution_id, switch_inst=self.switch_inst,
            issuer_inst=bank.institution_id, pin_block=pin, original=original,
            mcc=t.info.mcc, acceptor=t.info.acceptor)
        try:
            rec.issuer_stan = out[F.STAN] = link.reserve_stan()
        except LinkDown:
            rec.issuer_stan = rec.issuer_transmitted = ""
            return await self.unreachable(t, link, timed_out=False)
        # Write ahead: durable, with the STAN and field 7 the issuer will see,
        # before the issuer sees it (a crash from here on is reversed at start).
        await self.journal.insert(rec, self._loop)
        t.written_ahead = True
        resp = await self._send(link, out, rec)
        if resp is None:
            timed_out = rec.status == Status.TIMEOUT
            if timed_out:
                self._remember_timeout(bank.id, rec.issuer_stan, rec)
                if t.kind != Kind.BALANCE:
                    # The issuer may have approved what the terminal will never see:
                    # undo it there (wire.md 8), through the persistent queue.
                    self._queue_reversal(rec)
            else:
                rec.issuer_stan = rec.issuer_transmitted = ""        # nothing was sent
                if rec.response_code == RC.SYSTEM_MALFUNCTION:       # the switch's fault, not the bank's
                    return rec.response_code
            return await self.unreachable(t, link, timed_out=timed_out)
        rc = resp.get(F.RESPONSE_CODE, RC.SYSTEM_MALFUNCTION)
        rec.auth_code = resp.get(F.AUTH_CODE, "") if rc == RC.APPROVED else ""
        for k in messages.ISSUER_RESULT_FIELDS:
            if k in resp:
                t.extra[k] = resp[k]
        if rc == RC.APPROVED and t.to_route is not None and t.to_route.bank_id != bank.id:
            rc = await self.transfer_credit(t, out)
        return rc

    async def _send(self, link, out: Message, rec: TxnRecord) -> Message | None:
        """The issuer's answer to ``out`` (sent with the STAN already in it); None
        when the link is down (nothing sent) or no answer came in time."""
        t0 = time.perf_counter()
        try:
            resp = await link.request(out, self.issuer_timeout_s, stan=out[F.STAN])
            observe = getattr(self.stats, "observe_issuer", None)
            if observe is not None:
                observe(link.bank_id, time.perf_counter() - t0)
            return resp
        except (LinkDown, SecurityError) as e:
            # Nothing sent (no MAC for it: the HSM is away, or the link is down).
            rec.response_code = e.rc if isinstance(e, SecurityError) else RC.ISSUER_INOPERATIVE
            return None
        except LinkTimeout:
            rec.response_code = RC.ISSUER_INOPERATIVE
            rec.status = Status.TIMEOUT
            return None

    async def unreachable(self, t: Txn, link, *, timed_out: bool) -> str:
        """The issuer could not answer: stand-in when its profile allows, else 91
        (a timed-out request is then marked reversed: its 0420 is queued)."""
        rec = t.record
        assert rec is not None and t.route is not None
        rc = await self.stand_in(t, link)
        if rc == RC.APPROVED:
            return rc
        if timed_out and t.kind != Kind.BALANCE:
            rec.cancelled = Cancel.REVERSED
            self.journal.mark_cancelled(rec.id, Cancel.REVERSED, None)
        return rc

    async def stand_in(self, t: Txn, link) -> str:
        """Approve on the issuer's behalf (standin.py rules) and queue the 0220; or
        the code to answer instead (91 when stand-in does not apply)."""
        rec = t.record
        assert rec is not None and t.route is not None
        bank_id = t.route.bank_id
        if not self.standin.enabled(bank_id) or t.to_route is not None:
            return RC.ISSUER_INOPERATIVE
        now = utc_now()
        decision = await self.standin.decide(
            StandInRequest(bank_id=bank_id, mti=t.mti, txn_type=rec.proc[:2], amount=rec.amount,
                           has_pin=F.PIN_BLOCK in t.req, has_original=F.ORIGINAL_DATA in t.req,
                           pan_token=rec.pan_token, expiry=t.expiry),
            rec.business_date, now)
        if not decision.approve:
            log.info("txn %s %s: no stand-in for %s (%s): %s", rec.id, rec.pan_masked, bank_id,
                     decision.reason, decision.rc)
            return decision.rc
        try:
            stan = link.reserve_stan()
        except LinkDown:
            return RC.ISSUER_INOPERATIVE
        # The stand-in's issuer-side identity is its 0220 advice (a later 0420 names it).
        rec.stand_in = True
        rec.status = Status.PENDING
        rec.auth_code = standin_auth_code(rec.id)
        rec.issuer_stan, rec.issuer_transmitted = stan, field7(now)
        if not rec.rrn:
            rec.rrn = t.req.get(F.RRN) or self.next_rrn()
        if not t.written_ahead:
            # The row goes first: an advice is never in the journal without its transaction.
            self.journal.insert(rec)
            t.written_ahead = True
        self.saf.enqueue(stand_in_entry(rec, entry_id=self.saf.next_id(),
                                        pan_sealed=self.saf.seal(t.pan, rec.rrn),
                                        acquirer_inst=self._acquirer_inst(rec), created_at=iso_utc(now)))
        t.extra.pop(F.ADDITIONAL_AMOUNTS, None)
        t.extra[F.AUTH_CODE] = rec.auth_code
        log.warning("txn %s %s: approved in stand-in for %s (auth %s)", rec.id, rec.pan_masked, bank_id,
                    rec.auth_code)
        return RC.APPROVED

    async def transfer_credit(self, t: Txn, debit_out: Message) -> str:
        """Second leg of an interbank transfer; a failed credit reverses the debit (wire.md 8)."""
        rec = t.record
        assert rec is not None and t.to_route is not None
        bank = self._banks[t.to_route.bank_id]
        link = self.links.get(bank.id)
        resp = None
        if link is not None:
            rec.to_issuer_transmitted = field7(utc_now())
            out = messages.transfer_credit_request(debit_out, to_pan=t.to_pan,
                                                   transmitted=rec.to_issuer_transmitted,
                                                   issuer_inst=bank.institution_id)
            try:
                rec.to_issuer_stan = out[F.STAN] = link.reserve_stan()
            except LinkDown:
                rec.to_issuer_stan = ""
            if rec.to_issuer_stan:
                await self.journal.finish(rec, self._loop)     # write ahead the credit leg
                resp = await self._send(link, out, rec)
                if resp is None and rec.status != Status.TIMEOUT:
                    rec.to_issuer_stan = ""                     # nothing was sent
        rc = RC.ISSUER_INOPERATIVE if resp is None else resp.get(F.RESPONSE_CODE, RC.SYSTEM_MALFUNCTION)
        if rc == RC.APPROVED:
            rec.to_auth_code = resp.get(F.AUTH_CODE, "") if resp else ""
            return rc
        credit_unknown = rec.status == Status.TIMEOUT   # the credit may have happened
        rec.status = Status.PENDING
        t.extra.pop(F.ADDITIONAL_AMOUNTS, None)          # the debit leg's balances no longer hold
        self._queue_reversal(rec, DEBIT_LEG)
        if credit_unknown:
            self._remember_timeout(bank.id, rec.to_issuer_stan, rec)
            self._queue_reversal(rec, CREDIT_LEG)
        return rc

    async def reverse(self, t: Txn) -> str:
        """A terminal's 0400: undo the original at its issuer, once."""
        orig = t.original
        rec = t.record
        assert orig is not None and rec is not None
        rec.amount, rec.issuer_id, rec.orig_id = orig.amount, orig.issuer_id, orig.id
        done = self._done.get(orig.id)
        if done is not None and not done.done():
            await asyncio.shield(done)       # the terminal gave up before the issuer answered
        if orig.cancelled != Cancel.NONE:
            return RC.APPROVED               # already reversed, voided or completed: nothing changes
        if orig.status not in (Status.APPROVED, Status.TIMEOUT) or not orig.issuer_stan:
            return RC.APPROVED               # nothing reached the issuer that needs undoing
        orig.cancelled, orig.cancelled_by = Cancel.REVERSED, rec.id
        self.journal.mark_cancelled(orig.id, Cancel.REVERSED, rec.id)
        if orig.kind == Kind.VOID and orig.orig_id is not None:
            # The void is undone at the issuer, so its purchase stands again.
            purchase = self.ctx.index.get(orig.orig_id)
            if purchase is not None and purchase.cancelled == Cancel.VOIDED:
                purchase.cancelled, purchase.cancelled_by = Cancel.NONE, None
                self.journal.mark_cancelled(purchase.id, Cancel.NONE, None)
        # The terminal's answer does not wait for the issuer: the 0420 is queued
        # (store-and-forward) and delivered behind it.
        self._reverse_record(orig)
        return RC.APPROVED

    # -- store-and-forward ----------------------------------------------------------

    def _reverse_record(self, rec: TxnRecord) -> None:
        """0420s for what ``rec`` did at its issuer and, for an interbank
        transfer, at the receiving issuer."""
        if rec.issuer_stan:
            self._queue_reversal(rec, DEBIT_LEG)
        if rec.to_issuer_stan and rec.to_issuer_id and rec.to_issuer_id != rec.issuer_id:
            self._queue_reversal(rec, CREDIT_LEG)

    def _queue_reversal(self, rec: TxnRecord, leg: str = DEBIT_LEG) -> SafEntry | None:
        """Journal and queue the 0420 of one leg of ``rec`` (written before its outcome)."""
        bank_id = rec.to_issuer_id if leg == CREDIT_LEG else rec.issuer_id
        try:
            stan = self.saf.reserve_stan(bank_id)
        except (KeyError, LinkDown) as e:
            log.error("txn %s: cannot queue the reversal for %s: %s", rec.id, bank_id, e)
            return None
        now = utc_now()
        entry = reversal_entry(rec, entry_id=self.saf.next_id(), leg=leg, stan=stan,
                               transmitted=field7(now), acquirer_inst=self._acquirer_inst(rec),
                               business_date=self.ctx.business_date, created_at=iso_utc(now))
        self.saf.enqueue(entry)
        return entry

    def _acquirer_inst(self, rec: TxnRecord) -> str:
        acq = self._banks.get(rec.acquirer_id)
        return acq.institution_id if acq else ""

    def recover_pending(self) -> tuple[int, int]:
        """At start: every row written ahead with no outcome (the switch stopped
        while it was at an issuer) is marked timed out and reversed: a 0420 for
        each request that may have reached an issuer (both legs of a transfer,
        and a stand-in's 0220), unless one is queued already. Returns (rows, advices)."""
        rows = self.journal.pending()
        queued = 0
        now = utc_now()
        for row in rows:
            rec = self.ctx.index.get(row.id) or row
            existing = self.journal.saf_entries(txn_id=rec.id)
            covered = {(e.bank_id, e.orig_stan, e.orig_transmitted) for e in existing if e.kind == REVERSAL}
            wanted: list[tuple[str, Callable[[int, str], SafEntry]]] = []

            def add(leg: str) -> None:
                bank_id = rec.to_issuer_id if leg == CREDIT_LEG else rec.issuer_id
                stan_, tx_ = ((rec.to_issuer_stan, rec.to_issuer_transmitted) if leg == CREDIT_LEG
                              else (rec.issuer_stan, rec.issuer_transmitted))
                if (bank_id, stan_, tx_) in covered:
                    return
                covered.add((bank_id, stan_, tx_))
                wanted.append((bank_id, lambda i, s, leg=leg: reversal_entry(
                    rec, entry_id=i, leg=leg, stan=s, transmitted=field7(now),
                    acquirer_inst=self._acquirer_inst(rec), business_date=self.ctx.business_date,
                    created_at=iso_utc(now))))

            if rec.kind != Kind.BALANCE and rec.issuer_stan and rec.issuer_id:
                add(DEBIT_LEG)
            if rec.to_issuer_stan and rec.to_issuer_id and rec.to_issuer_id != rec.issuer_id:
                add(CREDIT_LEG)
            for adv in existing:
                if adv.kind == STAND_IN and (adv.bank_id, adv.stan, adv.transmitted) not in covered:
                    covered.add((adv.bank_id, adv.stan, adv.transmitted))
                    wanted.append((adv.bank_id, lambda i, s, adv=adv: reversal_of_advice(
                        adv, entry_id=i, stan=s, transmitted=field7(now),
                        business_date=self.ctx.business_date, created_at=iso_utc(now))))
            for bank_id, make in wanted:
                try:
                    stan = self.saf.reserve_stan(bank_id)
                except (KeyError, LinkDown) as e:
                    log.error("txn %s: cannot queue the reversal for %s: %s", rec.id, bank_id, e)
                    continue
                self.saf.enqueue(make(self.saf.next_id(), stan))
                queued += 1
            rec.status = Status.TIMEOUT
            rec.response_code = rec.response_code or RC.ISSUER_INOPERATIVE
            rec.completed_at = rec.completed_at or iso_utc(now)
            if rec.cancelled == Cancel.NONE and (wanted or covered):
                rec.cancelled = Cancel.REVERSED
            self.journal.finish(rec)
            if rec.cancelled == Cancel.REVERSED:
                self.journal.mark_cancelled(rec.id, Cancel.REVERSED, rec.cancelled_by)
            log.warning("txn %s %s: no outcome before the switch stopped: timed out, %d reversal(s) queued",
                        rec.id, rec.pan_masked, len(wanted))
        return len(rows), queued

    # -- late answers ----------------------------------------------------------------

    def _remember_timeout(self, bank_id: str, stan: str, rec: TxnRecord) -> None:
        key = (bank_id, stan, rec.rrn)
        self._timed_out[key] = rec
        if len(self._timed_out) > LATE_MEMORY:
            self._timed_out.popitem(last=False)

    def on_late(self, bank_id: str, msg: Message) -> None:
        """``BankLink.on_late``: an answer that came after its request timed out.

        A late 0430/0230 delivers its queued advice (on a link without MACs:
        late answers are not MAC-checked). A late 0110/0210 is kept
        on the transaction's row (``late_response_code``, for the operators):
        the terminal already had 91 and the 0420 is already queued, so nothing
        else changes; a terminal's repeat from then on is answered 68.
        """
        mti = msg.get(F.MTI, "")
        if mti[:3] in ("043", "023"):
            if getattr(self.links.get(bank_id), "mac", None) is not None:
                # A late answer's MAC is not checked: on a MAC'd link only a checked
                # answer (to the advice's repeat) may settle an advice.
                return
            if not self.saf.on_late(bank_id, msg):
                log.info("bank %s: late %s for no queued advice (stan %s)", bank_id, mti, msg.get(F.STAN))
            return
        rec = self._timed_out.pop((bank_id, msg.get(F.STAN, ""), msg.get(F.RRN, "")), None)
        rc = msg.get(F.RESPONSE_CODE, "")
        if rec is None:
            log.warning("bank %s: unmatched response %s stan=%s rrn=%s rc=%s", bank_id, mti,
                        msg.get(F.STAN), msg.get(F.RRN), rc)
            return
        self.late_answers += 1
        rec.late_response_code = rc
        self.journal.set_late_response(rec.id, rc)
        log.warning("txn %s %s: %s answered %s after the timeout; the terminal had %s, the reversal "
                    "is queued", rec.id, rec.pan_masked, bank_id, rc, rec.response_code or RC.ISSUER_INOPERATIVE)

    async def replay(self, t: Txn) -> Message:
        """A repeat of a request already received: the same answer, nothing changes.

        Except one case: the original timed out (91) and its issuer's answer
        came later; the repeat is answered 68, "response received too late"
        (the transaction stays reversed)."""
        seen = t.replay_of
        assert seen is not None
        done = self._done.get(seen.id)
        if done is not None and not done.done():
            await asyncio.shield(done)
        stored = self.ctx.index.response_for(seen.id)
        if stored is not None:
            resp = dict(stored)
        else:
            extra: Message = {}
            if seen.auth_code:
                extra[F.AUTH_CODE] = seen.auth_code
            if seen.balances:
                extra[F.ADDITIONAL_AMOUNTS] = seen.balances
            resp = messages.terminal_response(t.req, seen.response_code or RC.SYSTEM_MALFUNCTION,
                                              business_date=seen.business_date, rrn=seen.rrn, extra=extra)
        if seen.status == Status.TIMEOUT and seen.late_response_code \
                and resp.get(F.RESPONSE_CODE) == RC.ISSUER_INOPERATIVE:
            resp[F.RESPONSE_CODE] = RC.RESPONSE_TOO_LATE
            resp.pop(F.AUTH_CODE, None)
        return resp

    async def respond(self, t: Txn, rc: str) -> Message:
        """Finish the record, make it durable if approved, mark what it cancels, answer."""
        rec = t.record
        assert rec is not None
        rec.response_code = rc
        if rec.status not in (Status.TIMEOUT, Status.ERROR):
            rec.status = Status.APPROVED if rc == RC.APPROVED else Status.DECLINED
        if rc != RC.APPROVED:
            rec.auth_code = ""
        rec.completed_at = iso_utc(utc_now())
        rec.latency_us = int((time.perf_counter() - t.t0) * 1e6)
        if not rec.rrn:
            rec.rrn = t.req.get(F.RRN) or self.next_rrn()
        if rc == RC.APPROVED and t.original is not None and t.kind in (Kind.VOID, Kind.COMPLETION):
            o = t.original
            o.cancelled = Cancel.VOIDED if t.kind == Kind.VOID else Cancel.COMPLETED
            o.cancelled_by = rec.id
            self.journal.mark_cancelled(o.id, o.cancelled, rec.id)
        rec.balances = t.extra.get(F.ADDITIONAL_AMOUNTS, "") if rc == RC.APPROVED else ""
        resp = messages.terminal_response(t.req, rc, business_date=rec.business_date, rrn=rec.rrn,
                                          extra=t.extra)
        self.ctx.index.remember_response(rec.id, resp)
        fut = self.journal.finish(rec, self._loop) if t.written_ahead else self.journal.insert(rec, self._loop)
        if rc == RC.APPROVED:
            await fut                        # approval reaches the terminal only once durable
        done = self._done.pop(rec.id, None)
        if done is not None and not done.done():
            done.set_result(None)
        self._count(t, rc)
        return resp

    def finish_local(self, t: Txn, rc: str) -> Message:
        """A request that never leaves the switch: journal it declined, answer."""
        rec = t.record
        assert rec is not None
        rec.response_code = rc
        rec.status = Status.DECLINED
        rec.completed_at = iso_utc(utc_now())
        rec.latency_us = int((time.perf_counter() - t.t0) * 1e6)
        rec.rrn = t.req.get(F.RRN) or self.next_rrn()
        self.journal.insert(rec)
        self._count(t, rc)
        if rc == RC.FORMAT_ERROR:
            return messages.terminal_response(t.req, rc)
        return messages.terminal_response(t.req, rc, business_date=rec.business_date, rrn=rec.rrn)

    # -- batch close and upload (wire.md 6) -------------------------------------

    def _refuse_housekeeping(self, req: Message, required: tuple[str, ...]) -> Message | None:
        """30 for a malformed 0500/0320, 03 for an unknown terminal; else None."""
        if format_errors(req) or missing_fields(req, required):
            return messages.terminal_response(req, RC.FORMAT_ERROR)
        info, rc = self.ctx.registry.check_terminal(req[F.TERMINAL_ID], req[F.MERCHANT_ID])
        if info is None or rc != RC.APPROVED:
            return self._housekeeping(req, rc or RC.INVALID_MERCHANT)
        return None

    def batch_close(self, req: Message) -> Message:
        ctx = self.ctx
        refused = self._refuse_housekeeping(req, steps.BATCH_CLOSE_REQUIRED)
        if refused is not None:
            return refused
        tid, batch, proc = req[F.TERMINAL_ID], req[F.BATCH_NUMBER], req[F.PROC]
        ours = ctx.index.totals(tid, batch)
        if proc == PROC_BATCH_CLOSE:
            if ctx.index.is_closed(tid, batch):
                return self._housekeeping(req, RC.APPROVED)
            theirs = steps.terminal_totals(req)
            if theirs == ours:
                self.journal.record_batch_close(tid, batch, ctx.business_date, RC.APPROVED, ours, theirs)
                ctx.index.close_batch(tid, batch)
                return self._housekeeping(req, RC.APPROVED)
            self.journal.record_batch_close(tid, batch, ctx.business_date, RC.RECONCILE_ERROR, ours, theirs)
            resp = self._housekeeping(req, RC.RECONCILE_ERROR)
            resp.update(steps.totals_fields(ours))
            return resp
        if proc == PROC_BATCH_UPLOAD_TRAILER:
            if not ctx.index.is_closed(tid, batch):
                theirs = steps.terminal_totals(req)
                self.journal.record_batch_close(tid, batch, ctx.business_date, RC.APPROVED, ours, theirs)
                ctx.index.close_batch(tid, batch)
            return self._housekeeping(req, RC.APPROVED)
        return self._housekeeping(req, RC.INVALID_TRANSACTION)

    def batch_upload(self, req: Message) -> Message:
        refused = self._refuse_housekeeping(req, steps.UPLOAD_REQUIRED)
        if refused is not None:
            return refused
        self.journal.record_upload(req[F.TERMINAL_ID], req[F.BATCH_NUMBER], _upload_row(req))
        return self._housekeeping(req, RC.APPROVED)

    def _housekeeping(self, req: Message, rc: str) -> Message:
        resp = messages.terminal_response(req, rc, business_date=self.ctx.business_date)
        for k in (F.CREDITS_NUMBER, F.CREDITS_AMOUNT, F.DEBITS_NUMBER, F.DEBITS_AMOUNT, F.RRN, F.AUTH_CODE):
            if k in req:
                resp[k] = req[k]
        resp[F.RESPONSE_CODE] = rc
        return resp

    # -- network management -------------------------------------------------------

    async def network(self, req: Message) -> Message:
        if format_errors(req) or missing_fields(req, steps.NETWORK_REQUIRED):
            return messages.network_response(req, RC.FORMAT_ERROR)
        tid = req.get(F.TERMINAL_ID)
        if tid is not None and self.ctx.registry.terminal(tid) is None:
            return messages.network_response(req, RC.INVALID_MERCHANT)
        code = req[F.NETWORK_MGMT_CODE]
        if code in (NetMgmt.SIGN_ON, NetMgmt.SIGN_OFF, NetMgmt.ECHO):
            return messages.network_response(req, RC.APPROVED)
        if code == NetMgmt.KEY_CHANGE and tid and self.security is not None:
            return await self.key_change(req, tid)
        return messages.network_response(req, RC.INVALID_TRANSACTION)

    async def key_change(self, req: Message, tid: str) -> Message:
        """0800/101: a new TPK and TAK under the terminal's TMK in field 48 (wire.md 7).

        The new keys are journaled (under the LMK only) before the answer
        leaves, and used from then on.
        """
        try:
            field48, new = await self.security.key_change(tid)
        except SecurityError as e:
            log.warning("terminal %s: key change failed: %s", tid, e)
            return messages.network_response(req, e.rc)
        value = self.security.adopt(tid, new)
        await self.journal.set_state(STATE_PREFIX + tid, value, self._loop)
        resp = messages.network_response(req, RC.APPROVED)
        resp[F.ADDITIONAL_DATA] = field48
        log.info("terminal %s: new TPK and TAK issued", tid)
        return resp

    # -- helpers -------------------------------------------------------------------

    def _count(self, t: Txn, rc: str) -> None:
        if self.stats is not None:
            self.stats.count(t, rc)

    async def drain(self, timeout: float | None = None) -> bool:
        """Wait (bounded) for the advices owed to banks that are online to be
        delivered; what is left stays queued in the journal."""
        return await self.saf.drain(self.issuer_timeout_s * 3 if timeout is None else timeout)

    async def stop(self) -> None:
        """Stop the store-and-forward workers (the journal keeps what is queued)."""
        await self.saf.stop()


def _field90(o: TxnRecord, switch_inst: str, acquirer_inst: str) -> str:
    from cardswitch.iso8583.fields import format_field90

    return format_field90(issuer_original_mti(o), o.issuer_stan, o.issuer_transmitted, acquirer_inst,
                          switch_inst)


def _upload_row(req: Message):
    from cardswitch.switch.journal import UploadRow

    pan = req.get(F.PAN, "")
    return UploadRow(
        rrn=req.get(F.RRN, ""), stan=req.get(F.STAN, ""), proc=req.get(F.PROC, ""),
        amount=int(req.get(F.AMOUNT, "0") or 0), auth_code=req.get(F.AUTH_CODE, ""),
        pan_masked=mask_pan(pan) if pan else "",
    )
