"""Messages the switch builds: terminal responses, issuer requests, advices (pure)."""

from __future__ import annotations

import iso8583
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from iso8583.specs import default_ascii

from cardswitch.iso8583.constants import ECHOED_FIELDS, RC, F
from cardswitch.iso8583.fields import format_field90, parse_field90
from cardswitch.switch import messages

PAN = "6221260000000018"
TO_PAN = "6228480000000015"
F90 = format_field90("0200", "000100", "0314100000", "10000001", "0")

REQ = {
    F.MTI: "0200", F.PAN: PAN, F.PROC: "000000", F.AMOUNT: "000000001000", F.TRANSMISSION_DT: "0314101500",
    F.STAN: "000123", F.LOCAL_TIME: "181500", F.LOCAL_DATE: "0314", F.EXPIRY: "3012", F.MCC: "5812",
    F.ENTRY_MODE: "051", F.CONDITION_CODE: "00", F.TRACK2: PAN + "=30121010000000000000",
    F.TERMINAL_ID: "POS00001", F.MERCHANT_ID: "898440158120001", F.CURRENCY: "156",
    F.PIN_BLOCK: "0123456789ABCDEF", F.ICC_DATA: "9F2701809F360200AB", F.BATCH_NUMBER: "000001",
    F.BILL_DATA: "UTILITY-0000000001", F.MAC: "1122334455667788", F.ORIGINAL_DATA: F90,
}

# Fields a terminal request carries that must never come back in its response.
NOT_ECHOED = (F.EXPIRY, F.MCC, F.ENTRY_MODE, F.CONDITION_CODE, F.TRACK2, F.PIN_BLOCK, F.ICC_DATA,
              F.BILL_DATA, F.MAC)


# -- terminal responses (wire.md 4) --------------------------------------------------


@pytest.mark.parametrize("mti, resp", [("0100", "0110"), ("0101", "0110"), ("0200", "0210"),
                                       ("0201", "0210"), ("0400", "0410"), ("0401", "0410"),
                                       ("0500", "0510"), ("0320", "0330"), ("0800", "0810")])
def test_response_mti_is_request_plus_10(mti, resp):
    assert messages.terminal_response(dict(REQ, t=mti), RC.APPROVED)[F.MTI] == resp


def test_response_echoes_exactly_the_wire_md_4_fields():
    assert set(ECHOED_FIELDS) == {"2", "3", "4", "7", "11", "12", "13", "41", "42", "49", "60", "90"}
    resp = messages.terminal_response(REQ, RC.APPROVED, business_date="2026-11-28", rrn="633200000001",
                                      extra={F.AUTH_CODE: "A1B2C3"})
    for k in ECHOED_FIELDS:
        assert resp[k] == REQ[k], k
    for k in NOT_ECHOED:
        assert k not in resp, k
    assert set(resp) == set(ECHOED_FIELDS) | {F.MTI, F.SETTLEMENT_DATE, F.RRN, F.AUTH_CODE, F.RESPONSE_CODE}


def test_response_echoes_only_what_the_request_had():
    req = {F.MTI: "0200", F.STAN: "000001", F.TERMINAL_ID: "POS00001"}
    assert messages.terminal_response(req, RC.FORMAT_ERROR) == {
        F.MTI: "0210", F.STAN: "000001", F.TERMINAL_ID: "POS00001", F.RESPONSE_CODE: "30"}


@pytest.mark.parametrize("business_date, field15", [("2026-11-28", "1128"), ("2027-01-01", "0101"),
                                                     ("2028-02-29", "0229")])
def test_field_15_is_the_business_date_mmdd(business_date, field15):
    resp = messages.terminal_response(REQ, RC.APPROVED, business_date=business_date, rrn="1")
    assert resp[F.SETTLEMENT_DATE] == field15


def test_field_37_is_the_given_rrn():
    assert messages.terminal_response(REQ, RC.APPROVED, rrn="633200000001")[F.RRN] == "633200000001"
    assert F.RRN not in messages.terminal_response(REQ, RC.FORMAT_ERROR)


@pytest.mark.parametrize("rc", [RC.APPROVED, RC.DO_NOT_HONOUR, RC.INSUFFICIENT_FUNDS, RC.ISSUER_INOPERATIVE])
def test_auth_code_only_on_approval(rc):
    balance = "0002156C000000100000"
    resp = messages.terminal_response(REQ, rc, rrn="1", extra={F.AUTH_CODE: "A1B2C3",
                                                               F.ADDITIONAL_AMOUNTS: balance})
    assert resp[F.RESPONSE_CODE] == rc
    assert (F.AUTH_CODE in resp) == (rc == RC.APPROVED)
    assert resp[F.ADDITIONAL_AMOUNTS] == balance


def test_response_code_cannot_be_overridden_by_extra():
    resp = messages.terminal_response(REQ, RC.DO_NOT_HONOUR, extra={F.RESPONSE_CODE: "00"})
    assert resp[F.RESPONSE_CODE] == RC.DO_NOT_HONOUR


def test_response_does_not_change_the_request():
    req = dict(REQ)
    messages.terminal_response(req, RC.APPROVED, business_date="2026-11-28", rrn="1", extra={"38": "X"})
    assert req == REQ


def test_response_encodes_with_pyiso8583_default_ascii():
    resp = messages.terminal_response(REQ, RC.APPROVED, business_date="2026-11-28", rrn="633200000001",
                                      extra={F.AUTH_CODE: "A1B2C3"})
    raw, _ = iso8583.encode(dict(resp), default_ascii)
    back, _ = iso8583.decode(bytes(raw), default_ascii)
    assert {k: v for k, v in back.items() if k not in ("p", "1")} == resp


# -- format errors ---------------------------------------------------------------------


@pytest.mark.parametrize("mti", ["0100", "0200", "0201", "0400", "0420", "0500", "0600", "0800"])
def test_format_error_response_for_requests_with_field_11(mti):
    partial = {F.MTI: mti, F.STAN: "000009", F.TERMINAL_ID: "POS00001", F.AMOUNT: "00000000ABCD"}
    resp = messages.format_error_response(partial)
    assert resp is not None
    assert resp[F.MTI] == mti[:2] + str(int(mti[2]) + 1) + "0"
    assert resp[F.RESPONSE_CODE] == RC.FORMAT_ERROR
    assert resp[F.STAN] == "000009" and resp[F.TERMINAL_ID] == "POS00001"


@pytest.mark.parametrize("partial", [
    {F.MTI: "0200"},                                   # no field 11
    {F.STAN: "000009"},                                # no MTI
    {F.MTI: "0210", F.STAN: "000009"},                 # a response
    {F.MTI: "0430", F.STAN: "000009"},
    {F.MTI: "02X0", F.STAN: "000009"},
    {F.MTI: "200", F.STAN: "000009"},
    {F.MTI: "02000", F.STAN: "000009"},
    {},
])
def test_no_format_error_response_without_mti_and_11_of_a_request(partial):
    assert messages.format_error_response(partial) is None


# -- towards the issuer (wire.md 8) --------------------------------------------------------


def issuer_req(**kw):
    args = dict(mti="0200", pan=PAN, expiry="", transmitted="0314101501", business_date="2026-03-14",
                rrn="607300000001", acquirer_inst="10000001", switch_inst="99900001",
                issuer_inst="10000002") | kw
    return messages.issuer_request(REQ, **args)


def test_issuer_request_fields():
    out = issuer_req(pin_block="FEDCBA9876543210")
    assert out[F.MTI] == "0200"
    assert out[F.PAN] == PAN
    assert out[F.TRANSMISSION_DT] == "0314101501"        # the switch's own field 7, not the terminal's
    assert out[F.SETTLEMENT_DATE] == "0314"
    assert out[F.ACQUIRER_ID] == "10000001"
    assert out[F.FORWARDER_ID] == "99900001"
    assert out[F.RECEIVING_ID] == "10000002"
    assert out[F.RRN] == "607300000001"
    assert out[F.PIN_BLOCK] == "FEDCBA9876543210"        # translated, never the terminal's
    assert F.STAN not in out                             # the bank link stamps its own
    for k in messages.FORWARDED_FIELDS:
        if k in REQ:
            assert out[k] == REQ[k], k
    assert F.MAC not in out                              # the terminal's MAC means nothing to the issuer


def test_issuer_request_no_pin_block_unless_translated():
    out = issuer_req()
    assert F.PIN_BLOCK not in out


def test_issuer_request_field_90_only_when_given():
    assert F.ORIGINAL_DATA not in issuer_req()           # the terminal's own 90 is never passed on
    issuer_f90 = format_field90("0200", "000007", "0314100001", "10000001", "99900001")
    assert issuer_req(original=issuer_f90)[F.ORIGINAL_DATA] == issuer_f90


def test_issuer_request_fills_14_18_43_only_when_absent():
    req = {k: v for k, v in REQ.items() if k not in (F.EXPIRY, F.MCC)}
    out = messages.issuer_request(req, mti="0200", pan=PAN, expiry="3012", transmitted="0314101501",
                                  business_date="2026-03-14", rrn="1", acquirer_inst="1", switch_inst="2",
                                  issuer_inst="3", mcc="5999", acceptor="X" * 40)
    assert (out[F.EXPIRY], out[F.MCC], out[F.CARD_ACCEPTOR_NAME]) == ("3012", "5999", "X" * 40)
    out = issuer_req(expiry="2501", mcc="5999")
    assert (out[F.EXPIRY], out[F.MCC]) == ("3012", "5812")


def test_issuer_request_does_not_change_the_terminal_request():
    req = dict(REQ)
    messages.issuer_request(req, mti="0200", pan=PAN, expiry="", transmitted="0314101501",
                            business_date="2026-03-14", rrn="1", acquirer_inst="1", switch_inst="2",
                            issuer_inst="3", pin_block="FEDCBA9876543210")
    assert req == REQ


def test_transfer_credit_request():
    debit = issuer_req(pin_block="FEDCBA9876543210") | {F.PROC: "401020", F.ACCOUNT_2: TO_PAN,
                                                        F.STAN: "000042"}
    before = dict(debit)
    out = messages.transfer_credit_request(debit, to_pan=TO_PAN, transmitted="0314101502",
                                           issuer_inst="10000003")
    assert debit == before
    assert out[F.MTI] == "0200"
    assert out[F.PROC] == "281020"
    assert out[F.PAN] == TO_PAN
    assert out[F.TRANSMISSION_DT] == "0314101502"
    assert out[F.RECEIVING_ID] == "10000003"
    for k in (F.PIN_BLOCK, F.TRACK2, F.EXPIRY, F.ICC_DATA, F.ACCOUNT_2, F.STAN):
        assert k not in out, k
    for k in (F.AMOUNT, F.CURRENCY, F.ACQUIRER_ID, F.FORWARDER_ID, F.RRN, F.TERMINAL_ID, F.MERCHANT_ID):
        assert out[k] == debit[k], k
    assert PAN not in repr(out)


def test_reversal_advice():
    adv = messages.reversal_advice(
        proc="000000", amount=1000, currency="156", orig_mti="0200", orig_stan="000042",
        orig_transmitted="0314101501", transmitted="0314101700", rrn="607300000001", terminal_id="POS00001",
        merchant_id="898440158120001", business_date="2026-03-14", acquirer_inst="10000001",
        switch_inst="99900001", issuer_inst="10000002")
    assert adv[F.MTI] == "0420"
    f90 = adv[F.ORIGINAL_DATA]
    assert len(f90) == 42 and f90.isdigit()
    assert f90[0:4] == "0200"
    assert f90[4:10] == "000042"
    assert f90[10:20] == "0314101501"
    assert f90[20:31] == "00010000001"
    assert f90[31:42] == "00099900001"
    assert parse_field90(f90).forwarder_id == "00099900001"
    assert adv[F.AMOUNT] == "000000001000"
    assert adv[F.TRANSMISSION_DT] == "0314101700"
    assert adv[F.SETTLEMENT_DATE] == "0314"
    assert (adv[F.ACQUIRER_ID], adv[F.FORWARDER_ID], adv[F.RECEIVING_ID]) == ("10000001", "99900001", "10000002")
    assert adv[F.RRN] == "607300000001" and adv[F.PROC] == "000000"
    assert F.PAN not in adv and F.STAN not in adv
    raw, _ = iso8583.encode(dict(adv, **{F.STAN: "000043"}), default_ascii)
    assert raw


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 10**12 - 1), st.from_regex(r"\A[0-9]{6}\Z"), st.from_regex(r"\A[0-9]{1,11}\Z"))
def test_reversal_advice_field_90_round_trips(amount, stan, inst):
    adv = messages.reversal_advice(
        proc="010000", amount=amount, currency="156", orig_mti="0100", orig_stan=stan,
        orig_transmitted="1231235959", transmitted="0101000000", rrn="1", terminal_id="T", merchant_id="M",
        business_date="2026-12-31", acquirer_inst=inst, switch_inst="99900001", issuer_inst="1")
    od = parse_field90(adv[F.ORIGINAL_DATA])
    assert (od.mti, od.stan, od.transmitted) == ("0100", stan, "1231235959")
    assert int(od.acquirer_id) == int(inst) and int(od.forwarder_id) == 99900001
    assert int(adv[F.AMOUNT]) == amount and len(adv[F.AMOUNT]) == 12


# -- network management ----------------------------------------------------------------


def test_network_response_echoes_7_11_41_70():
    req = {F.MTI: "0800", F.TRANSMISSION_DT: "0314101500", F.STAN: "000001", F.TERMINAL_ID: "POS00001",
           F.NETWORK_MGMT_CODE: "301", F.PAN: PAN}
    resp = messages.network_response(req)
    assert resp == {F.MTI: "0810", F.TRANSMISSION_DT: "0314101500", F.STAN: "000001",
                    F.TERMINAL_ID: "POS00001", F.NETWORK_MGMT_CODE: "301", F.RESPONSE_CODE: "00"}
    assert messages.network_response(req, RC.INVALID_TRANSACTION)[F.RESPONSE_CODE] == "12"
