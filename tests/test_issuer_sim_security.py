"""A simulated bank's security checks, pure: PIN (PVV and IBM offset), CVV on
track 2, ARQC/ARPC on chip data, an unavailable HSM, with a fake verifier;
and card issuance (cards.py) against the crypto and the HSM's layouts."""

from __future__ import annotations

import asyncio
import logging

import pytest

from cardswitch.config import Card
from cardswitch.crypto import cvv as cvv_mod
from cardswitch.crypto import emv, ibm3624
from cardswitch.crypto import pvv as pvv_mod
from cardswitch.iso8583.constants import RC, F
from cardswitch.iso8583.fields import build_tlv, parse_tlv, tlv_dict
from cardswitch.issuer_sim.cards import (
    ARQC_DATA_TAGS,
    DECIMALISATION,
    PinRef,
    arpc_for,
    arqc_check_from,
    ibm_validation_data,
    ibm_validation_template,
    icc_data_for,
    parse_track2,
    pin_matches,
    pin_ref_for,
    track2_for,
)
from cardswitch.issuer_sim.checks import CAN_PIN
from cardswitch.issuer_sim.ledger import IssuerLogic
from test_issuer_sim_support import (
    CARD,
    IBM,
    LOST,
    MK_AC,
    NOW,
    POOR,
    PVK,
    RICH,
    SECRET,
    FakeVerifier,
    accounts,
    make_bank,
    make_logic,
    next_day,
    request,
    reversal,
    run,
)

BANK = make_bank()


@pytest.fixture
def fake() -> FakeVerifier:
    return FakeVerifier()


@pytest.fixture
def logic(fake) -> IssuerLogic:
    return make_logic(fake)


def answer(logic: IssuerLogic, msg: dict, now=NOW) -> dict:
    out = run(logic.process(msg, now))
    assert out.response is not None
    return out.response


def rc_of(logic: IssuerLogic, msg: dict, now=NOW) -> str:
    return answer(logic, msg, now)[F.RESPONSE_CODE]


def balance(logic: IssuerLogic, pan: str) -> int:
    return logic.account_for(pan).balance


def chip(card: str = RICH, amount: int = 1_000, **kw) -> dict:
    return request("0200", "000000", card, amount,
                   **{F.ICC_DATA: icc_data_for(CARD[card], BANK, amount=amount, **kw)})


def swipe(card: str = RICH, amount: int = 1_000, **kw) -> dict:
    return request("0200", "000000", None, amount, **{F.TRACK2: track2_for(CARD[card], BANK, **kw)})


# -- issuance: what the bank keeps ---------------------------------------------

def test_issuance_keeps_the_pvv_or_offset_never_the_pin():
    rich = pin_ref_for(CARD[RICH], PVK)
    assert rich == PinRef("pvv", pvv=pvv_mod.pvv(PVK, "1", "1234", RICH))
    ibm = pin_ref_for(CARD[IBM], PVK)
    assert ibm.method == "ibm" and ibm.pvv == "" and len(ibm.pin_offset) == 6
    assert ibm.pin_offset == ibm3624.pin_offset(PVK, ibm_validation_data(IBM), DECIMALISATION, "246810")
    # the validation data is the 12-digit account, F-padded; the template is how EA takes it
    assert ibm_validation_data(IBM) == IBM[:-1][-12:] + "FFFF"
    assert len(ibm_validation_template(IBM)) == 12 and ibm_validation_template(IBM).count("N") == 1
    # given values are kept as they are; no PVK and no value: nothing usable
    assert pin_ref_for(Card(RICH, "2812", None, 0, pvv="0042"), None) == PinRef("pvv", pvv="0042")
    assert pin_ref_for(Card(RICH, "2812", "1234", 0), None) == PinRef("pvv")
    assert not PinRef("ibm").usable and PinRef("ibm", pin_offset="1234").usable
    assert all(not hasattr(a, "pin") for a in accounts())


def test_pin_matches_as_the_hsm_checks():
    assert pin_matches(Card(RICH, "2812", "1234", 0, pvv=pin_ref_for(CARD[RICH], PVK).pvv), PVK)
    assert not pin_matches(Card(RICH, "2812", "1235", 0, pvv=pin_ref_for(CARD[RICH], PVK).pvv), PVK)
    off = pin_ref_for(CARD[IBM], PVK).pin_offset
    assert pin_matches(Card(IBM, "2812", "246810", 0, pin_method="ibm", pin_offset=off), PVK)
    assert not pin_matches(Card(IBM, "2812", "146810", 0, pin_method="ibm", pin_offset=off), PVK)


def test_track2_layout_and_cvv():
    t2 = track2_for(CARD[RICH], BANK)
    pvv = pin_ref_for(CARD[RICH], PVK).pvv
    cvv = cvv_mod.cvv(bytes.fromhex(BANK.cvk.text[6:]), RICH, "2812", "101")
    assert t2 == f"{RICH}=2812101" + "1" + pvv + cvv
    t = parse_track2(t2)
    assert (t.pan, t.expiry, t.service_code, t.cvv) == (RICH, "2812", "101", cvv)
    assert RICH not in repr(t) and cvv not in repr(t)
    assert parse_track2(f";{RICH}D28121011234567890?").cvv == "678"
    assert parse_track2(f"{RICH}=2812101123").cvv == ""        # too short for a CVV
    assert parse_track2(f"{RICH}=28121") is None
    assert parse_track2("no separator") is None
    # an IBM-method card has no PVV on its track
    assert track2_for(CARD[IBM], BANK)[len(IBM) + 8:len(IBM) + 13] == "10000"


def test_icc_data_round_trip():
    f55 = icc_data_for(CARD[RICH], BANK, amount=12_345, atc=7, psn="01")
    tags = tlv_dict(f55)
    assert tags["9F02"] == "000000012345" and tags["9F36"] == "0007" and tags["5F34"] == "01"
    assert tags["5A"] == RICH
    check = arqc_check_from(f55, RICH)
    assert check.pan_psn == bytes.fromhex((RICH + "01")[-16:])
    assert check.atc == b"\x00\x07" and check.un == bytes.fromhex(tags["9F37"])
    assert check.data == b"".join(bytes.fromhex(tags[t]) for t in ARQC_DATA_TAGS)
    # the ARQC is what the HSM's KQ scheme 1 recomputes from these inputs
    sk = emv.session_key_common(emv.icc_master_key_from_data(MK_AC, check.pan_psn), check.atc)
    assert emv.arqc(sk, check.data) == check.arqc
    assert arpc_for(CARD[RICH], BANK, f55, "00") == emv.arpc_method1(sk, check.arqc, b"00")
    # no ARQC: nothing to check; malformed: a reason
    assert arqc_check_from(build_tlv([("9F36", "0001")]), RICH) is None
    for bad, why in ((f55[:-3], "field 55"), (build_tlv([("9F26", "00" * 8)]), "9F36"),
                     (build_tlv([("9F26", "00" * 7), ("9F36", "0001"), ("9F37", "00" * 4)]), "9F26"),
                     (icc_data_for(CARD[POOR], BANK, amount=1), "5A")):
        with pytest.raises(ValueError, match=why):
            arqc_check_from(bad, RICH)


# -- PIN -------------------------------------------------------------------------

def test_right_and_wrong_pin(logic, fake):
    assert rc_of(logic, request("0200", "000000", RICH, 100, pin="1234")) == RC.APPROVED
    assert rc_of(logic, request("0200", "000000", RICH, 100, pin="4321")) == RC.INCORRECT_PIN
    assert balance(logic, RICH) == 1_000_000 - 100
    assert fake.calls == ["EC", "EC"]


def test_three_wrong_pins_75_without_asking_the_hsm(logic, fake):
    for _ in range(3):
        assert rc_of(logic, request("0200", "000000", RICH, 1, pin="9999")) == RC.INCORRECT_PIN
    assert logic.account_for(RICH).pin_fails == 3
    assert rc_of(logic, request("0200", "000000", RICH, 1, pin="1234")) == RC.PIN_TRIES_EXCEEDED
    assert fake.calls == ["EC"] * 3
    assert rc_of(logic, request("0200", "000000", RICH, 1, pin="1234", f15="0616"), next_day()) == RC.APPROVED


def test_ibm_offset_method(logic, fake):
    assert rc_of(logic, request("0200", "000000", IBM, 100, pin="246810")) == RC.APPROVED
    assert rc_of(logic, request("0200", "000000", IBM, 100, pin="146810")) == RC.INCORRECT_PIN
    # check length 4: as the IBM 3624 method (and EA) does, the first 4 digits are checked
    assert rc_of(logic, request("0200", "000000", IBM, 100, pin="246899")) == RC.APPROVED
    assert fake.calls == ["EA"] * 3


def test_invalid_pin_block_is_a_wrong_pin(logic):
    msg = request("0200", "000000", RICH, 1, **{F.PIN_BLOCK: "0000000000000000"})
    assert rc_of(logic, msg) == RC.INCORRECT_PIN
    assert logic.account_for(RICH).pin_fails == 1


def test_hsm_unavailable_is_96_and_not_a_try(logic, fake):
    fake.up = False
    for m in (request("0200", "000000", RICH, 1, pin="1234"), request("0200", "000000", RICH, 1, pin="9999"),
              swipe(), chip()):
        assert rc_of(logic, m) == RC.SYSTEM_MALFUNCTION
    assert logic.account_for(RICH).pin_fails == 0
    assert balance(logic, RICH) == 1_000_000
    # requests without anything to verify go on; declines before any check too
    assert rc_of(logic, request("0200", "000000", RICH, 1)) == RC.APPROVED
    assert rc_of(logic, request("0200", "000000", LOST, 1, pin="1234")) == RC.LOST_CARD
    fake.up = True
    assert rc_of(logic, request("0200", "000000", RICH, 1, pin="1234")) == RC.APPROVED


def test_no_verifier_or_no_pin_key_is_96():
    bank = make_bank()
    none = IssuerLogic(bank.id, bank.bins, SECRET, accounts(bank))
    assert rc_of(none, request("0200", "000000", RICH, 1, pin="1234")) == RC.SYSTEM_MALFUNCTION
    # without a verifier CVVs and ARQCs are not checked, and no field 55 comes back
    r = answer(none, chip())
    assert r[F.RESPONSE_CODE] == RC.APPROVED and F.ICC_DATA not in r
    assert rc_of(none, swipe(cvv="000")) == RC.APPROVED
    # a bank whose cards have no PVV (no PVK at issuance) cannot verify PINs either
    nokeys = make_bank(keys=False)
    logic = IssuerLogic(nokeys.id, nokeys.bins, SECRET, accounts(nokeys), verifier=FakeVerifier())
    assert rc_of(logic, request("0200", "000000", RICH, 1, pin="1234")) == RC.SYSTEM_MALFUNCTION
    assert logic.account_for(RICH).pin_fails == 0


def test_handle_without_results_cannot_verify(logic):
    # the pure step alone: a PIN nobody verified is never taken as right
    out = logic.handle(request("0200", "000000", RICH, 1, pin="1234"), NOW)
    assert out.response[F.RESPONSE_CODE] == RC.SYSTEM_MALFUNCTION


# -- CVV on track 2 ------------------------------------------------------------------

def test_track2_cvv_good_and_bad(logic, fake):
    assert rc_of(logic, swipe()) == RC.APPROVED
    good = track2_for(CARD[RICH], BANK).rsplit("=", 1)[1][-3:]
    wrong = f"{(int(good) + 1) % 1000:03d}"
    assert rc_of(logic, swipe(cvv=wrong)) == RC.DO_NOT_HONOUR
    # another service code changes the CVV: a track altered after issuance fails
    t2 = track2_for(CARD[RICH], BANK).replace("=2812101", "=2812201")
    assert rc_of(logic, request("0200", "000000", None, 1, **{F.TRACK2: t2})) == RC.DO_NOT_HONOUR
    # a track with no CVV at its place: 05 without asking the HSM
    calls = len(fake.calls)
    assert rc_of(logic, request("0200", "000000", None, 1, **{F.TRACK2: f"{RICH}=2812101"})) == RC.DO_NOT_HONOUR
    assert len(fake.calls) == calls
    assert balance(logic, RICH) == 1_000_000 - 1_000
    assert fake.calls.count("CY") == 3


def test_track2_and_pin_both_checked(logic, fake):
    m = swipe(amount=5)
    m[F.PIN_BLOCK] = request("0200", "000000", RICH, 5, pin="9999")[F.PIN_BLOCK]
    assert rc_of(logic, m) == RC.INCORRECT_PIN
    # a bad CVV comes first: the PIN try is not counted
    m = swipe(amount=5, cvv="000")
    m[F.PIN_BLOCK] = request("0200", "000000", RICH, 5, pin="9999")[F.PIN_BLOCK]
    assert rc_of(logic, m) == RC.DO_NOT_HONOUR
    assert logic.account_for(RICH).pin_fails == 1


def test_bank_without_cvk_does_not_check_cvvs(fake):
    fake.capabilities = frozenset({CAN_PIN})
    logic = make_logic(fake)
    assert rc_of(logic, swipe(cvv="000")) == RC.APPROVED
    assert "CY" not in fake.calls


# -- ARQC / ARPC ------------------------------------------------------------------------

def test_good_arqc_approves_with_tag_91(logic, fake):
    m = chip(amount=2_500)
    r = answer(logic, m)
    assert r[F.RESPONSE_CODE] == RC.APPROVED
    arpc = arpc_for(CARD[RICH], BANK, m[F.ICC_DATA], "00")
    assert parse_tlv(r[F.ICC_DATA]) == [("91", (arpc + b"00").hex().upper())]
    assert balance(logic, RICH) == 1_000_000 - 2_500
    assert fake.calls == ["KQ1"]
    # the repeat gets the same field 55 without asking again
    assert answer(logic, dict(m, **{F.MTI: "0201"})) == r
    assert fake.calls == ["KQ1"]


def test_bad_arqc_declines_05_with_arpc_for_arc_05(logic, fake):
    m = chip(cryptogram=bytes(8))
    r = answer(logic, m)
    assert r[F.RESPONSE_CODE] == RC.DO_NOT_HONOUR
    arpc = arpc_for(CARD[RICH], BANK, m[F.ICC_DATA], "05")
    assert tlv_dict(r[F.ICC_DATA])["91"] == (arpc + b"05").hex().upper()
    assert tlv_dict(r[F.ICC_DATA])["91"].endswith("3035")
    assert balance(logic, RICH) == 1_000_000
    assert fake.calls == ["KQ1", "KQ2"]
    # the stored answer (for repeats) has the same field 55
    assert answer(logic, dict(m, **{F.MTI: "0201"})) == r


def test_good_arqc_declined_for_funds_carries_the_arpc_of_51(logic, fake):
    m = chip(POOR, 5_000)
    r = answer(logic, m)
    assert r[F.RESPONSE_CODE] == RC.INSUFFICIENT_FUNDS
    arpc = arpc_for(CARD[POOR], BANK, m[F.ICC_DATA], "51")
    assert tlv_dict(r[F.ICC_DATA])["91"] == (arpc + b"51").hex().upper()


def test_arpc_unavailable_after_the_decision_leaves_field_55_out(logic, fake):
    class Flaky(FakeVerifier):
        async def arpc(self, check, arc):
            return None

    logic = make_logic(Flaky())
    r = answer(logic, chip(cryptogram=bytes(8)))
    assert r[F.RESPONSE_CODE] == RC.DO_NOT_HONOUR and F.ICC_DATA not in r


def test_chip_declines_before_the_check_carry_no_55(logic, fake):
    r = answer(logic, request("0200", "000000", LOST, 1, **{F.ICC_DATA: icc_data_for(CARD[LOST], BANK, amount=1)}))
    assert r[F.RESPONSE_CODE] == RC.LOST_CARD and F.ICC_DATA not in r
    assert fake.calls == []


def test_malformed_field_55_is_30(logic, fake):
    good = icc_data_for(CARD[RICH], BANK, amount=1)
    for f55 in (good[:-2], "9F2608" + "00" * 8, icc_data_for(CARD[POOR], BANK, amount=1)):
        assert rc_of(logic, request("0200", "000000", RICH, 1, **{F.ICC_DATA: f55})) == RC.FORMAT_ERROR
    assert fake.calls == []
    # field 55 without an ARQC (e.g. only a TVR) is nothing to verify
    assert rc_of(logic, request("0200", "000000", RICH, 1, **{F.ICC_DATA: "95050000000000"})) == RC.APPROVED


def test_chip_and_pin(logic, fake):
    m = chip(amount=10)
    m[F.PIN_BLOCK] = request("0200", "000000", RICH, 10, pin="1234")[F.PIN_BLOCK]
    r = answer(logic, m)
    assert r[F.RESPONSE_CODE] == RC.APPROVED and F.ICC_DATA in r
    assert sorted(fake.calls) == ["EC", "KQ1"]      # verified concurrently


def test_preauth_and_reversal_of_a_chip_purchase(logic):
    m = chip(amount=300)
    assert rc_of(logic, m) == RC.APPROVED
    assert rc_of(logic, reversal(m)) == RC.APPROVED
    assert balance(logic, RICH) == 1_000_000
    pre = request("0100", "000000", RICH, 700, **{F.ICC_DATA: icc_data_for(CARD[RICH], BANK, amount=700)})
    assert F.ICC_DATA in answer(logic, pre)


# -- concurrency and secrecy -----------------------------------------------------------------

def test_a_repeat_while_the_original_is_verified_waits_for_it(fake):
    gate = asyncio.Event()

    class Slow(FakeVerifier):
        async def verify_pin(self, check):
            await gate.wait()
            return await super().verify_pin(check)

    logic = make_logic(Slow())
    m = request("0200", "000000", RICH, 4_000, pin="1234")

    async def main():
        first = asyncio.ensure_future(logic.process(m, NOW))
        await asyncio.sleep(0)
        assert logic.must_wait(dict(m, **{F.MTI: "0201"}), NOW)
        second = asyncio.ensure_future(logic.process(dict(m, **{F.MTI: "0201"}), NOW))
        await asyncio.sleep(0)
        gate.set()
        return await first, await second

    a, b = run(main())
    assert not a.replay and b.replay and a.response == b.response
    assert balance(logic, RICH) == 1_000_000 - 4_000


def test_must_wait_only_for_checks(logic):
    assert not logic.must_wait(request("0200", "000000", RICH, 1), NOW)
    assert logic.must_wait(request("0200", "000000", RICH, 1, pin="1234"), NOW)
    assert logic.must_wait(swipe(), NOW) and logic.must_wait(chip(), NOW)
    assert not logic.must_wait(request("0200", "000000", LOST, 1, pin="1234"), NOW)
    assert not logic.must_wait(reversal(request("0200", "000000", RICH, 1, pin="1234")), NOW)
    assert not logic.must_wait(request("0220", "000000", RICH, 1, pin="1234"), NOW)


def test_nothing_secret_in_logs_or_records(logic, caplog):
    caplog.set_level(logging.DEBUG, logger="cardswitch")
    msgs = [request("0200", "000000", RICH, 1, pin="1234"), request("0200", "000000", RICH, 1, pin="9999"),
            swipe(), swipe(cvv="000"), chip(), chip(cryptogram=bytes(8))]
    outs = [run(logic.process(m, NOW)) for m in msgs]
    text = "\n".join(r.getMessage() for r in caplog.records)
    blobs = [o.new.response for o in outs] + [repr(o.new).encode() for o in outs]
    for m in msgs:
        for k in (F.PIN_BLOCK, F.TRACK2):
            if k in m:
                assert m[k] not in text and all(m[k].encode() not in b for b in blobs)
    assert RICH not in text
