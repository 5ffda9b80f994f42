"""The transaction pipeline: every terminal request, top to bottom.

``Pipeline.handle`` is what the acceptor calls for each decoded request. Each
flow below is a short list of named steps (``cardswitch.switch.steps`` holds
the pure ones); the only waiting is on the issuer and on the journal.
"""

from __future__ import annotations

import asyncio
import logging
import time
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
from cardswitch.iso8583 import macfield
from cardswitch.iso8583.dialect import Message, get_dialect
from cardswitch.iso8583.validate import format_errors, missing_fields
from cardswitch.pan import mask_pan
from cardswitch.switch import messages, steps
from cardswitch.switch.banklink import LinkDown, LinkTimeout
from cardswitch.switch.clock import field7, iso_utc, utc_now
from cardswitch.switch.records import Cancel, Kind, Status, TxnRecord
from cardswitch.switch.security import STATE_PREFIX, SecurityError
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


class Pipeline:
    wants_raw = True   # the acceptor hands us the bytes as received: MACs are checked over them

    def __init__(self, ctx: Context, journal, links: Mapping[str, object], *,
                 rrn: Callable[[], str], translate_pin, issuer_timeout_s: float,
                 stats=None, security=None) -> None:
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

    # -- entry point -----------------------------------------------------------

    async def handle(self, req: Message, conn=None, raw: bytes = b"") -> Message | None:
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
            return await self.respond(t, RC.SYSTEM_MALFUNCTION)

    async def ask_issuer(self, t: Txn) -> str:
        """Translate the PIN, write ahead, send to the issuer, wait for its answer."""
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
        await self.journal.insert(rec, self._loop)      # write ahead: durable before the issuer sees it
        resp = await self._send(link, out, rec)
        if resp is None:
            if rec.status == Status.TIMEOUT and t.kind != Kind.BALANCE:
                # The issuer may have approved what the terminal will never see:
                # undo it there (wire.md 8), once.
                rec.cancelled = Cancel.REVERSED
                self.journal.mark_cancelled(rec.id, Cancel.REVERSED, None)
                self._background(self._deliver_reversal(rec))
            return rec.response_code
        rc = resp.get(F.RESPONSE_CODE, RC.SYSTEM_MALFUNCTION)
        rec.auth_code = resp.get(F.AUTH_CODE, "") if rc == RC.APPROVED else ""
        for k in messages.ISSUER_RESULT_FIELDS:
            if k in resp:
                t.extra[k] = resp[k]
        if rc == RC.APPROVED and t.to_route is not None and t.to_route.bank_id != bank.id:
            rc = await self.transfer_credit(t, out)
        return rc

    async def _send(self, link, out: Message, rec: TxnRecord, credit_leg: bool = False) -> Message | None:
        try:
            resp = await link.request(out, self.issuer_timeout_s)
        except LinkDown:
            rec.response_code = RC.ISSUER_INOPERATIVE
            return None
        except LinkTimeout:
            rec.response_code = RC.ISSUER_INOPERATIVE
            rec.status = Status.TIMEOUT
            return None
        finally:
            if credit_leg:
                rec.to_issuer_stan = out.get(F.STAN, "")
            else:
                rec.issuer_stan = out.get(F.STAN, "")
        return resp

    async def transfer_credit(self, t: Txn, debit_out: Message) -> str:
        """Second leg of an interbank transfer; a failed credit reverses the debit (wire.md 8)."""
        rec = t.record
        assert rec is not None and t.to_route is not None
        bank = self._banks[t.to_route.bank_id]
        link = self.links.get(bank.id)
        rec.to_issuer_transmitted = field7(utc_now())
        out = messages.transfer_credit_request(debit_out, to_pan=t.to_pan,
                                               transmitted=rec.to_issuer_transmitted,
                                               issuer_inst=bank.institution_id)
        resp = None if link is None else await self._send(link, out, rec, credit_leg=True)
        rc = RC.ISSUER_INOPERATIVE if resp is None else resp.get(F.RESPONSE_CODE, RC.SYSTEM_MALFUNCTION)
        if rc == RC.APPROVED:
            rec.to_auth_code = resp.get(F.AUTH_CODE, "") if resp else ""
            return rc
        credit_unknown = rec.status == Status.TIMEOUT   # the credit may have happened
        rec.status = Status.PENDING
        t.extra.pop(F.ADDITIONAL_AMOUNTS, None)          # the debit leg's balances no longer hold
        self._background(self._reverse_at_issuer(rec, credit_leg=credit_unknown))
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
        # The terminal's answer does not wait for the issuer: the advice is
        # delivered behind it (store-and-forward).
        self._background(self._deliver_reversal(orig))
        return RC.APPROVED

    async def _deliver_reversal(self, orig: TxnRecord) -> None:
        if not await self._reverse_at_issuer(orig, credit_leg=bool(orig.to_issuer_stan)):
            log.warning("reversal of txn %s not yet delivered to %s", orig.id, orig.issuer_id)

    async def _reverse_at_issuer(self, orig: TxnRecord, *, debit_leg: bool = True,
                                 credit_leg: bool = False) -> bool:
        """0420 for what ``orig`` did at its issuer, and at a transfer's receiving issuer."""
        ok = True
        if debit_leg:
            ok = await self._advice(orig, orig.issuer_id, orig.issuer_stan, orig.issuer_transmitted,
                                    orig.mti[:3] + "0", orig.proc)
        if credit_leg and orig.to_issuer_id and orig.to_issuer_id != orig.issuer_id:
            ok = await self._advice(orig, orig.to_issuer_id, orig.to_issuer_stan,
                                    orig.to_issuer_transmitted, MTI.FIN_REQUEST,
                                    TxnType.TRANSFER_CREDIT.value + orig.proc[2:]) and ok
        return ok

    async def _advice(self, orig: TxnRecord, bank_id: str, stan: str, transmitted: str,
                      orig_mti: str, proc: str) -> bool:
        """Deliver one 0420 (then 0421 repeats). The reliability issue makes this a
        persistent store-and-forward queue; for now a few tries in memory."""
        bank = self._banks.get(bank_id)
        link = self.links.get(bank_id)
        if bank is None or link is None or not stan:
            return False
        acq = self._banks.get(orig.acquirer_id)
        advice = messages.reversal_advice(
            proc=proc, amount=orig.amount, currency=orig.currency, orig_mti=orig_mti,
            orig_stan=stan, orig_transmitted=transmitted, transmitted=field7(utc_now()),
            rrn=orig.rrn, terminal_id=orig.terminal_id, merchant_id=orig.merchant_id,
            business_date=self.ctx.business_date,
            acquirer_inst=acq.institution_id if acq else "", switch_inst=self.switch_inst,
            issuer_inst=bank.institution_id)
        for attempt in range(3):
            if attempt:
                advice[F.MTI] = MTI.REVERSAL_ADVICE_REPEAT
            try:
                resp = await link.request(advice, self.issuer_timeout_s)
            except (LinkDown, LinkTimeout):
                await asyncio.sleep(0.5 * (attempt + 1))
                continue
            if resp.get(F.RESPONSE_CODE) == RC.APPROVED:
                return True
        return False

    async def replay(self, t: Txn) -> Message:
        """A repeat of a request already received: the same answer, nothing changes."""
        seen = t.replay_of
        assert seen is not None
        done = self._done.get(seen.id)
        if done is not None and not done.done():
            await asyncio.shield(done)
        stored = self.ctx.index.response_for(seen.id)
        if stored is not None:
            return dict(stored)
        extra: Message = {}
        if seen.auth_code:
            extra[F.AUTH_CODE] = seen.auth_code
        if seen.balances:
            extra[F.ADDITIONAL_AMOUNTS] = seen.balances
        return messages.terminal_response(t.req, seen.response_code or RC.SYSTEM_MALFUNCTION,
                                          business_date=seen.business_date, rrn=seen.rrn, extra=extra)

    async def respond(self, t: Txn, rc: str) -> Message:
        """Finish the record, make it durable if approved, mark what it cancels, answer."""
        rec = t.record
        assert rec is not None
        rec.response_code = rc
        if rec.status != Status.TIMEOUT:
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
        fut = self.journal.finish(rec, self._loop) if rec.issuer_stan or rec.issuer_transmitted \
            else self.journal.insert(rec, self._loop)
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

    def _background(self, coro) -> None:
        task = self._loop.create_task(coro)
        _BACKGROUND.add(task)
        task.add_done_callback(_BACKGROUND.discard)

    def _count(self, t: Txn, rc: str) -> None:
        if self.stats is not None:
            self.stats.count(t, rc)

    async def drain(self) -> None:
        """Wait for background work (reversal deliveries) to finish."""
        if _BACKGROUND:
            await asyncio.wait(list(_BACKGROUND), timeout=self.issuer_timeout_s * 3)


_BACKGROUND: set[asyncio.Task] = set()


def _field90(o: TxnRecord, switch_inst: str, acquirer_inst: str) -> str:
    from cardswitch.iso8583.fields import format_field90

    return format_field90(o.mti[:3] + "0", o.issuer_stan, o.issuer_transmitted, acquirer_inst, switch_inst)


def _upload_row(req: Message):
    from cardswitch.switch.journal import UploadRow

    pan = req.get(F.PAN, "")
    return UploadRow(
        rrn=req.get(F.RRN, ""), stan=req.get(F.STAN, ""), proc=req.get(F.PROC, ""),
        amount=int(req.get(F.AMOUNT, "0") or 0), auth_code=req.get(F.AUTH_CODE, ""),
        pan_masked=mask_pan(pan) if pan else "",
    )
