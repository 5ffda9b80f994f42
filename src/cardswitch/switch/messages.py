"""Building the messages the switch sends: to issuers, and back to terminals.

Pure functions of the request and what the switch decided.
"""

from __future__ import annotations

from cardswitch.iso8583.constants import (
    ECHOED_FIELDS,
    MTI,
    RC,
    F,
    TxnType,
    response_mti,
)
from cardswitch.iso8583.dialect import Message
from cardswitch.iso8583.fields import format_field90
from cardswitch.switch.clock import mmdd

# Terminal fields passed on to the issuer as they came.
FORWARDED_FIELDS = (
    F.PROC, F.AMOUNT, F.LOCAL_TIME, F.LOCAL_DATE, F.EXPIRY, F.MCC, F.ENTRY_MODE,
    F.CONDITION_CODE, F.TRACK2, F.TERMINAL_ID, F.MERCHANT_ID, F.CARD_ACCEPTOR_NAME,
    F.CURRENCY, F.ICC_DATA, F.BATCH_NUMBER, F.BILL_DATA, F.ACCOUNT_2,
)

# Fields of an issuer's response that reach the terminal.
ISSUER_RESULT_FIELDS = (F.AUTH_CODE, F.ADDITIONAL_AMOUNTS, F.ICC_DATA)   # 55: the issuer's tag 91 (ARPC)


def issuer_request(req: Message, *, mti: str, pan: str, expiry: str, transmitted: str,
                   business_date: str, rrn: str, acquirer_inst: str, switch_inst: str,
                   issuer_inst: str, pin_block: str = "", original: str = "",
                   mcc: str = "", acceptor: str = "") -> Message:
    """The request towards the issuer; the bank link fills field 11."""
    out: Message = {F.MTI: mti, F.PAN: pan}
    for k in FORWARDED_FIELDS:
        v = req.get(k)
        if v is not None:
            out[k] = v
    if expiry and F.EXPIRY not in out:
        out[F.EXPIRY] = expiry
    if mcc and F.MCC not in out:
        out[F.MCC] = mcc
    if acceptor and F.CARD_ACCEPTOR_NAME not in out:
        out[F.CARD_ACCEPTOR_NAME] = acceptor
    out[F.TRANSMISSION_DT] = transmitted
    out[F.SETTLEMENT_DATE] = mmdd(business_date)
    out[F.ACQUIRER_ID] = acquirer_inst
    out[F.FORWARDER_ID] = switch_inst
    out[F.RRN] = rrn
    out[F.RECEIVING_ID] = issuer_inst
    if pin_block:
        out[F.PIN_BLOCK] = pin_block
    if original:
        out[F.ORIGINAL_DATA] = original
    return out


def transfer_credit_request(debit_req: Message, *, to_pan: str, transmitted: str,
                            issuer_inst: str) -> Message:
    """The credit leg of an interbank transfer (0200 28xxxx, field 2 = receiving card)."""
    out = {k: v for k, v in debit_req.items()
           if k not in (F.PIN_BLOCK, F.TRACK2, F.EXPIRY, F.ICC_DATA, F.ACCOUNT_2, F.STAN)}
    out[F.MTI] = MTI.FIN_REQUEST
    out[F.PAN] = to_pan
    out[F.PROC] = TxnType.TRANSFER_CREDIT.value + debit_req[F.PROC][2:]
    out[F.TRANSMISSION_DT] = transmitted
    out[F.RECEIVING_ID] = issuer_inst
    return out


def _advice(mti: str, *, proc: str, amount: int, currency: str, transmitted: str, rrn: str,
            terminal_id: str, merchant_id: str, business_date: str, acquirer_inst: str,
            switch_inst: str, issuer_inst: str) -> Message:
    """The fields every advice to an issuer carries."""
    return {
        F.MTI: mti,
        F.PROC: proc,
        F.AMOUNT: f"{amount:012d}",
        F.TRANSMISSION_DT: transmitted,
        F.SETTLEMENT_DATE: mmdd(business_date),
        F.ACQUIRER_ID: acquirer_inst,
        F.FORWARDER_ID: switch_inst,
        F.RRN: rrn,
        F.TERMINAL_ID: terminal_id,
        F.MERCHANT_ID: merchant_id,
        F.CURRENCY: currency,
        F.RECEIVING_ID: issuer_inst,
    }


def reversal_advice(*, orig_mti: str, orig_stan: str, orig_transmitted: str, **common) -> Message:
    """0420 to an issuer, naming the switch-to-issuer original in field 90.

    No PAN: field 90 identifies the original, and a queued advice must be
    rebuildable from the journal, which never holds a full PAN."""
    out = _advice(MTI.REVERSAL_ADVICE, **common)
    out[F.ORIGINAL_DATA] = format_field90(orig_mti, orig_stan, orig_transmitted,
                                          common["acquirer_inst"], common["switch_inst"])
    return out


def stand_in_advice(*, pan: str, auth_code: str, **common) -> Message:
    """0220 telling an issuer what the switch approved on its behalf (wire.md 8).

    Carries the PAN (the issuer posts it to the card) and the switch's
    authorization code; field 11 is the advice's own, kept for its repeats."""
    out = _advice(MTI.FIN_ADVICE, **common)
    out[F.PAN] = pan
    out[F.AUTH_CODE] = auth_code
    return out


def terminal_response(req: Message, rc: str, *, business_date: str = "", rrn: str = "",
                      extra: Message | None = None) -> Message:
    """MTI + 10, the echoed fields, and what the switch adds (wire.md 4)."""
    resp: Message = {F.MTI: response_mti(req[F.MTI])}
    for k in ECHOED_FIELDS:
        v = req.get(k)
        if v is not None:
            resp[k] = v
    if business_date:
        resp[F.SETTLEMENT_DATE] = mmdd(business_date)
    if rrn:
        resp[F.RRN] = rrn
    if extra:
        for k, v in extra.items():
            if k == F.AUTH_CODE and rc != RC.APPROVED:
                continue
            resp[k] = v
    resp[F.RESPONSE_CODE] = rc
    return resp


def format_error_response(partial: Message) -> Message | None:
    """30 for a frame that does not decode, when its MTI and field 11 are readable."""
    mti = partial.get(F.MTI, "")
    if len(mti) != 4 or not mti.isdigit() or F.STAN not in partial or mti[2] not in "0246":
        return None
    return terminal_response(partial, RC.FORMAT_ERROR)


def network_response(req: Message, rc: str = RC.APPROVED) -> Message:
    resp: Message = {F.MTI: response_mti(req[F.MTI])}
    for k in (F.TRANSMISSION_DT, F.STAN, F.TERMINAL_ID, F.MERCHANT_ID, F.NETWORK_MGMT_CODE):
        v = req.get(k)
        if v is not None:
            resp[k] = v
    resp[F.RESPONSE_CODE] = rc
    return resp
