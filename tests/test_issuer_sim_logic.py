"""IssuerLogic: every answer code and every ledger movement, without sockets or files.

PINs are verified by the fake verifier of the support module (the HSM's
commands done in-process); test_issuer_sim_security.py covers the checks
themselves."""

from __future__ import annotations

import orjson
import pytest

from cardswitch.crypto import encrypt_pin_block
from cardswitch.iso8583.constants import RC, F
from cardswitch.issuer_sim.ledger import (
    Account,
    Hold,
    IssuerLogic,
    business_date,
    format_balances,
)
from cardswitch.issuer_sim.cards import track2_for
from test_issuer_sim_support import (
    BLOCKED,
    CARD,
    CARDS,
    EXPIRED,
    FRIEND,
    LIMITED,
    LOST,
    NOW,
    OTHER_BANK,
    POOR,
    RICH,
    SLOW,
    STOLEN,
    UNKNOWN_OWN,
    field90,
    make_bank,
    make_logic,
    next_day,
    request,
    reversal,
    run,
)


@pytest.fixture
def logic() -> IssuerLogic:
    return make_logic()


def acct(logic: IssuerLogic, pan: str) -> Account:
    a = logic.account_for(pan)
    assert a is not None
    return a


def answer(logic: IssuerLogic, msg: dict, now=NOW) -> dict:
    out = run(logic.process(msg, now))
    assert out.response is not None
    return out.response


def rc_of(logic: IssuerLogic, msg: dict, now=NOW) -> str:
    return answer(logic, msg, now)[F.RESPONSE_CODE]


# -- approvals and the response ---------------------------------------------------

def test_purchase_approved_debits_and_echoes(logic):
    msg = request("0200", "000000", RICH, 12_345, pin="1234")
    out = run(logic.process(msg, NOW))
    r = out.response
    assert r[F.MTI] == "0210"
    assert r[F.RESPONSE_CODE] == RC.APPROVED
    assert len(r[F.AUTH_CODE]) == 6 and r[F.AUTH_CODE].isdigit()
    for k in (F.PAN, F.PROC, F.AMOUNT, F.TRANSMISSION_DT, F.STAN, F.LOCAL_TIME, F.LOCAL_DATE,
              F.SETTLEMENT_DATE, F.ACQUIRER_ID, F.FORWARDER_ID, F.RRN, F.TERMINAL_ID,
              F.MERCHANT_ID, F.CURRENCY, F.RECEIVING_ID):
        assert r[k] == msg[k], k
    assert F.PIN_BLOCK not in r and F.ADDITIONAL_AMOUNTS not in r
    assert acct(logic, RICH).balance == 1_000_000 - 12_345
    # the record keeps no PAN, and the stored response neither
    assert out.new.pan_masked == RICH[:6] + "******" + RICH[-4:]
    assert RICH not in repr(out.new)
    assert RICH.encode() not in out.new.response


def test_auth_codes_differ(logic):
    codes = {answer(logic, request("0200", "000000", RICH, 1))[F.AUTH_CODE] for _ in range(20)}
    assert len(codes) == 20


def test_refund_deposit_credit(logic):
    assert rc_of(logic, request("0200", "200000", RICH, 500)) == RC.APPROVED
    assert rc_of(logic, request("0200", "210000", RICH, 700, pin="1234")) == RC.APPROVED
    assert acct(logic, RICH).balance == 1_000_000 + 1_200


def test_bill_payment_debits(logic):
    assert rc_of(logic, request("0200", "500000", RICH, 9_000, **{F.BILL_DATA: "ELEC123456"})) == RC.APPROVED
    assert acct(logic, RICH).balance == 1_000_000 - 9_000


def test_balance_inquiry_moves_nothing_and_reports_field54(logic):
    answer(logic, request("0100", "000000", RICH, 100_000))  # a hold makes available differ
    r = answer(logic, request("0200", "301000", RICH, None, pin="1234"))
    assert r[F.RESPONSE_CODE] == RC.APPROVED
    assert r[F.ADDITIONAL_AMOUNTS] == "1001156C000001000000" + "1002156C000000900000"
    assert acct(logic, RICH).balance == 1_000_000


def test_withdrawal_reports_balances_after_debit(logic):
    r = answer(logic, request("0200", "010000", RICH, 20_000, pin="1234"))
    assert r[F.RESPONSE_CODE] == RC.APPROVED
    assert r[F.ADDITIONAL_AMOUNTS] == format_balances("00", "156", 980_000, 980_000)


def test_format_balances_debit_sign():
    assert format_balances("00", "156", -5, 0) == "0001156D000000000005" "0002156C000000000000"


def test_response_has_no_auth_code_on_decline(logic):
    r = answer(logic, request("0200", "000000", POOR, 5_000))
    assert r[F.RESPONSE_CODE] == RC.INSUFFICIENT_FUNDS
    assert F.AUTH_CODE not in r


# -- each decline code --------------------------------------------------------------

@pytest.mark.parametrize("card,code", [
    (UNKNOWN_OWN, RC.INVALID_CARD),
    (OTHER_BANK, RC.INVALID_CARD),
    (LOST, RC.LOST_CARD),
    (STOLEN, RC.STOLEN_CARD),
    (BLOCKED, RC.DO_NOT_HONOUR),
    (EXPIRED, RC.EXPIRED_CARD),
    (POOR, RC.INSUFFICIENT_FUNDS),
])
def test_card_declines(logic, card, code):
    before = {c.pan: (a.balance, a.held) for c in CARDS if (a := logic.account_for(c.pan))}
    assert rc_of(logic, request("0200", "000000", card, 5_000)) == code
    after = {c.pan: (a.balance, a.held) for c in CARDS if (a := logic.account_for(c.pan))}
    assert before == after


def test_checks_run_in_order(logic):
    # lost and expired and wrong PIN: status comes first
    assert rc_of(logic, request("0200", "000000", LOST, 1, pin="0000", **{F.EXPIRY: "2001"})) == RC.LOST_CARD
    # expired beats wrong PIN, and the PIN try is not counted
    assert rc_of(logic, request("0200", "000000", EXPIRED, 1, pin="0000")) == RC.EXPIRED_CARD
    assert acct(logic, EXPIRED).pin_fails == 0
    # wrong PIN beats funds
    assert rc_of(logic, request("0200", "000000", POOR, 5_000, pin="0000")) == RC.INCORRECT_PIN


def test_field14_must_match_card_expiry(logic):
    assert rc_of(logic, request("0200", "000000", RICH, 1, **{F.EXPIRY: "2811"})) == RC.EXPIRED_CARD
    assert rc_of(logic, request("0200", "000000", RICH, 1, **{F.EXPIRY: "2812"})) == RC.APPROVED


def test_expiry_month_itself_is_still_valid(logic):
    from datetime import datetime, timezone
    dec_2028 = datetime(2028, 12, 31, 23, 0, tzinfo=timezone.utc)
    assert rc_of(logic, request("0200", "000000", RICH, 1, f15="1231"), dec_2028) == RC.APPROVED
    jan_2029 = datetime(2029, 1, 1, 0, 1, tzinfo=timezone.utc)
    assert rc_of(logic, request("0200", "000000", RICH, 1, f15="0101"), jan_2029) == RC.EXPIRED_CARD


def test_track2_gives_pan_and_expiry(logic):
    bank = make_bank()
    msg = request("0200", "000000", None, 100, **{F.TRACK2: track2_for(CARD[RICH], bank)})
    assert rc_of(logic, msg) == RC.APPROVED
    msg = request("0200", "000000", None, 100, **{F.TRACK2: track2_for(CARD[RICH], bank, expiry="2712")})
    assert rc_of(logic, msg) == RC.EXPIRED_CARD


def test_wrong_pin_55_then_75_until_day_change(logic):
    for _ in range(3):
        assert rc_of(logic, request("0200", "000000", RICH, 1, pin="9999")) == RC.INCORRECT_PIN
    # locked: even the right PIN gets 75, and nothing moves
    assert rc_of(logic, request("0200", "000000", RICH, 1, pin="1234")) == RC.PIN_TRIES_EXCEEDED
    assert rc_of(logic, request("0200", "010000", RICH, 1, pin="1234")) == RC.PIN_TRIES_EXCEEDED
    assert acct(logic, RICH).balance == 1_000_000
    # a transaction without a PIN is not a PIN transaction
    assert rc_of(logic, request("0200", "000000", RICH, 1)) == RC.APPROVED
    # the next business day the count starts again
    assert rc_of(logic, request("0200", "000000", RICH, 1, pin="1234", f15="0616"), next_day()) == RC.APPROVED


def test_right_pin_resets_the_count(logic):
    for _ in range(2):
        assert rc_of(logic, request("0200", "000000", RICH, 1, pin="9999")) == RC.INCORRECT_PIN
    assert rc_of(logic, request("0200", "000000", RICH, 1, pin="1234")) == RC.APPROVED
    assert acct(logic, RICH).pin_fails == 0
    for _ in range(2):
        assert rc_of(logic, request("0200", "000000", RICH, 1, pin="9999")) == RC.INCORRECT_PIN
    assert rc_of(logic, request("0200", "000000", RICH, 1, pin="1234")) == RC.APPROVED


@pytest.mark.parametrize("block", ["ZZZZZZZZZZZZZZZZ", "0123", "0000000000000000",
                                   encrypt_pin_block("1234", RICH, bytes.fromhex("11" * 16))])
def test_undecodable_pin_block_is_55(logic, block):
    msg = request("0200", "000000", RICH, 1, **{F.PIN_BLOCK: block})
    assert rc_of(logic, msg) == RC.INCORRECT_PIN
    assert acct(logic, RICH).pin_fails == 1


def test_withdrawal_requires_a_pin(logic):
    assert rc_of(logic, request("0200", "010000", RICH, 1_000)) == RC.INCORRECT_PIN
    assert acct(logic, RICH).balance == 1_000_000
    assert acct(logic, RICH).pin_fails == 0


def test_daily_withdrawal_limit(logic):
    assert rc_of(logic, request("0200", "010000", LIMITED, 30_000, pin="4321")) == RC.APPROVED
    assert rc_of(logic, request("0200", "010000", LIMITED, 20_001, pin="4321")) == RC.EXCEEDS_WITHDRAWAL_LIMIT
    assert rc_of(logic, request("0200", "010000", LIMITED, 20_000, pin="4321")) == RC.APPROVED
    assert rc_of(logic, request("0200", "010000", LIMITED, 1, pin="4321")) == RC.EXCEEDS_WITHDRAWAL_LIMIT
    # purchases do not count against it
    assert rc_of(logic, request("0200", "000000", LIMITED, 100_000)) == RC.APPROVED
    # a new day, a new allowance
    assert rc_of(logic, request("0200", "010000", LIMITED, 50_000, pin="4321", f15="0616"), next_day()) == RC.APPROVED
    assert acct(logic, LIMITED).balance == 1_000_000 - 30_000 - 20_000 - 100_000 - 50_000


def test_zero_limit_means_none(logic):
    assert rc_of(logic, request("0200", "010000", RICH, 900_000, pin="1234")) == RC.APPROVED


def test_funds_beyond_available_51(logic):
    assert rc_of(logic, request("0200", "000000", POOR, 1_000)) == RC.APPROVED
    assert rc_of(logic, request("0200", "000000", POOR, 1)) == RC.INSUFFICIENT_FUNDS


def test_unsupported_type_12(logic):
    assert rc_of(logic, request("0200", "990000", RICH, 1)) == RC.INVALID_TRANSACTION
    assert rc_of(logic, request("0100", "200000", RICH, 1)) == RC.INVALID_TRANSACTION
    assert rc_of(logic, request("0300", "000000", RICH, 1)) == RC.INVALID_TRANSACTION


# -- pre-authorization and completion ------------------------------------------------

def test_hold_then_completion(logic):
    pre = request("0100", "000000", RICH, 300_000)
    r = answer(logic, pre)
    assert r[F.MTI] == "0110" and r[F.RESPONSE_CODE] == RC.APPROVED
    a = acct(logic, RICH)
    assert (a.balance, a.available) == (1_000_000, 700_000)
    # a purchase cannot spend the held money
    assert rc_of(logic, request("0200", "000000", RICH, 700_001)) == RC.INSUFFICIENT_FUNDS
    comp = request("0200", "000000", RICH, 320_000, **{F.CONDITION_CODE: "06", F.ORIGINAL_DATA: field90(pre)})
    assert rc_of(logic, comp) == RC.APPROVED
    assert (a.balance, a.available) == (680_000, 680_000)
    # the same hold cannot complete twice
    comp2 = request("0200", "000000", RICH, 1, **{F.CONDITION_CODE: "06", F.ORIGINAL_DATA: field90(pre)})
    assert rc_of(logic, comp2) == RC.INVALID_TRANSACTION
    assert (a.balance, a.available) == (680_000, 680_000)


def test_completion_may_use_the_hold_plus_available(logic):
    pre = request("0100", "000000", POOR, 800)
    assert rc_of(logic, pre) == RC.APPROVED
    too_much = request("0200", "000000", POOR, 1_001, **{F.CONDITION_CODE: "06", F.ORIGINAL_DATA: field90(pre)})
    assert rc_of(logic, too_much) == RC.INSUFFICIENT_FUNDS
    assert acct(logic, POOR).available == 200
    exact = request("0200", "000000", POOR, 1_000, **{F.CONDITION_CODE: "06", F.ORIGINAL_DATA: field90(pre)})
    assert rc_of(logic, exact) == RC.APPROVED
    assert (acct(logic, POOR).balance, acct(logic, POOR).held) == (0, 0)


def test_completion_of_unknown_original_is_12(logic):
    ghost = request("0100", "000000", RICH, 5)
    comp = request("0200", "000000", RICH, 5, **{F.CONDITION_CODE: "06", F.ORIGINAL_DATA: field90(ghost)})
    assert rc_of(logic, comp) == RC.INVALID_TRANSACTION
    # nor of a declined hold, nor with another card
    declined = request("0100", "000000", POOR, 5_000)
    assert rc_of(logic, declined) == RC.INSUFFICIENT_FUNDS
    comp = request("0200", "000000", POOR, 5, **{F.CONDITION_CODE: "06", F.ORIGINAL_DATA: field90(declined)})
    assert rc_of(logic, comp) == RC.INVALID_TRANSACTION
    pre = request("0100", "000000", RICH, 5)
    assert rc_of(logic, pre) == RC.APPROVED
    comp = request("0200", "000000", FRIEND, 5, **{F.CONDITION_CODE: "06", F.ORIGINAL_DATA: field90(pre)})
    assert rc_of(logic, comp) == RC.INVALID_TRANSACTION


# -- void ---------------------------------------------------------------------------

def test_void_credits_back_once(logic):
    buy = request("0200", "000000", RICH, 40_000)
    assert rc_of(logic, buy) == RC.APPROVED
    void = request("0200", "020000", RICH, 40_000, **{F.ORIGINAL_DATA: field90(buy)})
    assert rc_of(logic, void) == RC.APPROVED
    assert acct(logic, RICH).balance == 1_000_000
    again = request("0200", "020000", RICH, 40_000, **{F.ORIGINAL_DATA: field90(buy)})
    assert rc_of(logic, again) == RC.INVALID_TRANSACTION
    assert acct(logic, RICH).balance == 1_000_000


def test_void_of_unknown_or_declined_is_12(logic):
    ghost = request("0200", "000000", RICH, 10)
    assert rc_of(logic, request("0200", "020000", RICH, 10, **{F.ORIGINAL_DATA: field90(ghost)})) == RC.INVALID_TRANSACTION
    declined = request("0200", "000000", POOR, 5_000)
    assert rc_of(logic, declined) == RC.INSUFFICIENT_FUNDS
    assert rc_of(logic, request("0200", "020000", POOR, 5_000, **{F.ORIGINAL_DATA: field90(declined)})) == RC.INVALID_TRANSACTION
    assert acct(logic, POOR).balance == 1_000


def test_reversal_of_void_debits_again_and_unvoids(logic):
    buy = request("0200", "000000", RICH, 40_000)
    answer(logic, buy)
    void = request("0200", "020000", RICH, 40_000, **{F.ORIGINAL_DATA: field90(buy)})
    answer(logic, void)
    assert answer(logic, reversal(void))[F.RESPONSE_CODE] == RC.APPROVED
    assert acct(logic, RICH).balance == 960_000
    # the purchase stands again, so it can be voided again
    void2 = request("0200", "020000", RICH, 40_000, **{F.ORIGINAL_DATA: field90(buy)})
    assert rc_of(logic, void2) == RC.APPROVED
    assert acct(logic, RICH).balance == 1_000_000


def test_reversal_of_voided_purchase_changes_nothing(logic):
    buy = request("0200", "000000", RICH, 40_000)
    answer(logic, buy)
    answer(logic, request("0200", "020000", RICH, 40_000, **{F.ORIGINAL_DATA: field90(buy)}))
    assert answer(logic, reversal(buy))[F.RESPONSE_CODE] == RC.APPROVED
    assert acct(logic, RICH).balance == 1_000_000


# -- reversal advices -------------------------------------------------------------------

def test_reversal_undoes_once(logic):
    buy = request("0200", "000000", RICH, 25_000)
    answer(logic, buy)
    rev = reversal(buy)
    r = answer(logic, rev)
    assert r[F.MTI] == "0430" and r[F.RESPONSE_CODE] == RC.APPROVED
    assert r[F.ORIGINAL_DATA] == rev[F.ORIGINAL_DATA]
    assert F.AUTH_CODE not in r
    assert acct(logic, RICH).balance == 1_000_000
    # a second, distinct advice for the same original: acknowledged, nothing moves
    assert rc_of(logic, reversal(buy)) == RC.APPROVED
    assert acct(logic, RICH).balance == 1_000_000
    # the repeat (0421) of the first advice: the same answer, nothing moves
    rep = dict(rev, **{F.MTI: "0421"})
    assert answer(logic, rep) == r
    assert acct(logic, RICH).balance == 1_000_000


def test_reversal_of_unknown_or_declined_original_is_acknowledged(logic):
    ghost = request("0200", "000000", RICH, 10)
    assert rc_of(logic, reversal(ghost)) == RC.APPROVED
    declined = request("0200", "000000", POOR, 5_000)
    answer(logic, declined)
    assert rc_of(logic, reversal(declined)) == RC.APPROVED
    assert acct(logic, RICH).balance == 1_000_000
    assert acct(logic, POOR).balance == 1_000


def test_reversal_before_its_original(logic):
    buy = request("0200", "000000", RICH, 25_000)
    assert rc_of(logic, reversal(buy)) == RC.APPROVED
    out = logic.handle(buy, NOW)
    assert out.response[F.RESPONSE_CODE] == RC.APPROVED  # answered, but nothing stays done
    assert out.new.reversed
    assert acct(logic, RICH).balance == 1_000_000
    assert not logic.orphans


def test_reversal_of_hold_releases_it(logic):
    pre = request("0100", "000000", RICH, 300_000)
    answer(logic, pre)
    assert acct(logic, RICH).available == 700_000
    answer(logic, reversal(pre))
    assert acct(logic, RICH).available == 1_000_000
    comp = request("0200", "000000", RICH, 300_000, **{F.CONDITION_CODE: "06", F.ORIGINAL_DATA: field90(pre)})
    assert rc_of(logic, comp) == RC.INVALID_TRANSACTION


def test_reversal_of_completion_credits_back_and_hold_stays_released(logic):
    pre = request("0100", "000000", RICH, 300_000)
    answer(logic, pre)
    comp = request("0200", "000000", RICH, 250_000, **{F.CONDITION_CODE: "06", F.ORIGINAL_DATA: field90(pre)})
    answer(logic, comp)
    answer(logic, reversal(comp))
    a = acct(logic, RICH)
    assert (a.balance, a.held, a.available) == (1_000_000, 0, 1_000_000)
    # and reversing the completed pre-authorization moves nothing more
    answer(logic, reversal(pre))
    assert (a.balance, a.held) == (1_000_000, 0)


def test_reversal_of_withdrawal_restores_the_daily_allowance(logic):
    wd = request("0200", "010000", LIMITED, 50_000, pin="4321")
    assert rc_of(logic, wd) == RC.APPROVED
    assert rc_of(logic, request("0200", "010000", LIMITED, 1, pin="4321")) == RC.EXCEEDS_WITHDRAWAL_LIMIT
    answer(logic, reversal(wd))
    assert acct(logic, LIMITED).balance == 1_000_000
    assert rc_of(logic, request("0200", "010000", LIMITED, 50_000, pin="4321")) == RC.APPROVED


def test_reversal_of_credit_debits_back(logic):
    refund = request("0200", "200000", POOR, 5_000)
    answer(logic, refund)
    answer(logic, reversal(refund))
    assert acct(logic, POOR).balance == 1_000


# -- transfers ------------------------------------------------------------------------

def test_transfer_on_us_moves_both_legs(logic):
    t = request("0200", "400000", RICH, 7_000, pin="1234", **{F.ACCOUNT_2: FRIEND})
    assert rc_of(logic, t) == RC.APPROVED
    assert acct(logic, RICH).balance == 993_000
    assert acct(logic, FRIEND).balance == 17_000
    answer(logic, reversal(t))
    assert acct(logic, RICH).balance == 1_000_000
    assert acct(logic, FRIEND).balance == 10_000


def test_transfer_to_other_bank_is_debit_only(logic):
    t = request("0200", "400000", RICH, 7_000, **{F.ACCOUNT_2: OTHER_BANK})
    out = logic.handle(t, NOW)
    assert out.response[F.RESPONSE_CODE] == RC.APPROVED
    assert acct(logic, RICH).balance == 993_000
    assert [a.token for a in out.accounts] == [acct(logic, RICH).token]
    assert out.new.to_pan_masked.endswith(OTHER_BANK[-4:])


def test_transfer_to_unknown_own_card_is_52_and_moves_nothing(logic):
    t = request("0200", "400000", RICH, 7_000, **{F.ACCOUNT_2: UNKNOWN_OWN})
    assert rc_of(logic, t) == RC.NO_SUCH_ACCOUNT
    assert acct(logic, RICH).balance == 1_000_000


def test_transfer_beyond_funds_is_51(logic):
    t = request("0200", "400000", POOR, 7_000, **{F.ACCOUNT_2: FRIEND})
    assert rc_of(logic, t) == RC.INSUFFICIENT_FUNDS
    assert acct(logic, FRIEND).balance == 10_000


def test_transfer_credit_leg(logic):
    assert rc_of(logic, request("0200", "280000", FRIEND, 3_000)) == RC.APPROVED
    assert acct(logic, FRIEND).balance == 13_000
    assert rc_of(logic, request("0200", "280000", UNKNOWN_OWN, 3_000)) == RC.NO_SUCH_ACCOUNT


# -- idempotency ------------------------------------------------------------------------

def test_repeat_gets_the_same_answer_and_changes_nothing(logic):
    buy = request("0200", "000000", RICH, 25_000)
    first = logic.handle(buy, NOW)
    rep = dict(buy, **{F.MTI: "0201"})
    again = logic.handle(rep, NOW)
    assert again.replay and again.new is None and not again.accounts
    assert again.response == first.response
    assert acct(logic, RICH).balance == 975_000
    # the same request sent again as 0200 too
    assert logic.handle(buy, NOW).response == first.response
    assert acct(logic, RICH).balance == 975_000


def test_repeat_of_a_decline_is_the_same_decline(logic):
    msg = request("0200", "000000", RICH, 1, pin="9999")
    first = answer(logic, msg)
    assert first[F.RESPONSE_CODE] == RC.INCORRECT_PIN
    assert answer(logic, dict(msg, **{F.MTI: "0201"})) == first
    assert acct(logic, RICH).pin_fails == 1  # the repeat is not another try


def test_repeat_without_original_is_processed(logic):
    rep = request("0201", "000000", RICH, 25_000)
    r = answer(logic, rep)
    assert r[F.MTI] == "0210" and r[F.RESPONSE_CODE] == RC.APPROVED
    assert acct(logic, RICH).balance == 975_000
    assert answer(logic, rep) == r
    assert acct(logic, RICH).balance == 975_000


def test_same_stan_and_rrn_in_another_class_is_not_a_repeat(logic):
    buy = request("0200", "000000", RICH, 1_000)
    answer(logic, buy)
    pre = dict(buy, **{F.MTI: "0100"})
    assert rc_of(logic, pre) == RC.APPROVED
    assert acct(logic, RICH).held == 1_000


# -- advices, network management, format errors ------------------------------------------

def test_stand_in_advice_is_posted_without_checks(logic):
    adv = request("0220", "000000", POOR, 5_000, **{F.AUTH_CODE: "S12345"})
    r = answer(logic, adv)
    assert r[F.MTI] == "0230" and r[F.RESPONSE_CODE] == RC.APPROVED and F.AUTH_CODE not in r
    assert acct(logic, POOR).balance == -4_000
    assert answer(logic, dict(adv, **{F.MTI: "0221"})) == r
    assert acct(logic, POOR).balance == -4_000
    answer(logic, reversal(adv))
    assert acct(logic, POOR).balance == 1_000
    # an advice for a card we do not know is acknowledged; nothing moves
    assert rc_of(logic, request("0220", "000000", UNKNOWN_OWN, 5)) == RC.APPROVED


@pytest.mark.parametrize("code", ["001", "002", "301"])
def test_network_management(logic, code):
    msg = {F.MTI: "0800", F.TRANSMISSION_DT: "0615100000", F.STAN: "000777",
           F.NETWORK_MGMT_CODE: code, F.FORWARDER_ID: "99900001"}
    out = logic.handle(msg, NOW)
    assert out.new is None
    assert out.response == {F.MTI: "0810", F.TRANSMISSION_DT: "0615100000", F.STAN: "000777",
                            F.NETWORK_MGMT_CODE: code, F.FORWARDER_ID: "99900001", F.RESPONSE_CODE: "00"}


@pytest.mark.parametrize("change", [
    {F.AMOUNT: "00000000001X"},
    {F.PROC: "00000"},
    {F.STAN: "12345A"},
    {F.TRANSMISSION_DT: "06151000"},
    {F.SETTLEMENT_DATE: "1340"},
    {F.PAN: "62212600000A0017"},
])
def test_format_errors_are_30_and_move_nothing(logic, change):
    msg = request("0200", "000000", RICH, 100)
    msg.update(change)
    out = logic.handle(msg, NOW)
    assert out.response[F.RESPONSE_CODE] == RC.FORMAT_ERROR
    assert out.response[F.MTI] == "0210"
    assert out.new is None
    assert acct(logic, RICH).balance == 1_000_000


def test_missing_mandatory_fields_are_30(logic):
    no_amount = request("0200", "000000", RICH, None)
    assert rc_of(logic, no_amount) == RC.FORMAT_ERROR
    no_target = request("0200", "400000", RICH, 5)
    assert rc_of(logic, no_target) == RC.FORMAT_ERROR
    bad90 = request("0420", "000000", RICH, 5, **{F.ORIGINAL_DATA: "02001234"})
    assert rc_of(logic, bad90) == RC.FORMAT_ERROR


def test_responses_are_dropped(logic):
    assert logic.handle({F.MTI: "0210", F.STAN: "000001"}, NOW).response is None


def test_delay_follows_the_card_but_not_for_advices(logic):
    buy = request("0200", "000000", SLOW, 1)
    assert logic.handle(buy, NOW).delay_ms == 300
    assert logic.handle(dict(buy, **{F.MTI: "0201"}), NOW).delay_ms == 300
    assert logic.handle(request("0100", "000000", SLOW, 1), NOW).delay_ms == 300
    assert logic.handle(request("0200", "000000", RICH, 1), NOW).delay_ms == 0
    # advices are acknowledged at once: the reversal of a timed-out request gets through
    rev = reversal(buy)
    del rev[F.PAN]  # the switch's 0420 carries no PAN
    assert logic.handle(rev, NOW).delay_ms == 0
    assert logic.handle(dict(rev, **{F.MTI: "0421"}), NOW).delay_ms == 0
    assert logic.handle(request("0220", "000000", SLOW, 1), NOW).delay_ms == 0
    # the purchase was reversed; the advice stands; the hold holds
    assert (acct(logic, SLOW).balance, acct(logic, SLOW).held) == (1_000_000 - 1, 1)


def test_business_date_year_inference():
    from datetime import date
    assert business_date("0615", date(2025, 6, 15)) == date(2025, 6, 15)
    assert business_date("1231", date(2026, 1, 1)) == date(2025, 12, 31)
    assert business_date("0101", date(2025, 12, 31)) == date(2026, 1, 1)
    assert business_date("1301", date(2025, 1, 1)) is None


def test_records_carry_business_date_and_effects(logic):
    out = logic.handle(request("0200", "000000", RICH, 5, f15="1231"), NOW.replace(month=1, day=1))
    assert out.new.business_date == "2024-12-31"
    out = logic.handle(request("0200", "000000", RICH, 5, f15=None), NOW)
    assert out.new.business_date == "2025-06-15"
    assert out.new.effects == (("debit", acct(logic, RICH).token, 5, ""),)
    assert orjson.loads(out.new.response)[F.RESPONSE_CODE] == "00"


def test_hold_state_recorded(logic):
    out = logic.handle(request("0100", "000000", RICH, 5), NOW)
    assert out.new.hold == Hold.ACTIVE


def test_logs_never_hold_a_full_pan(logic, caplog):
    import logging
    caplog.set_level(logging.DEBUG, logger="cardswitch.issuer_sim")
    buy = request("0200", "000000", RICH, 5, pin="1234")
    for m in (buy, dict(buy, **{F.MTI: "0201"}), reversal(buy), reversal(request("0200", "000000", FRIEND, 1)),
              request("0200", "000000", UNKNOWN_OWN, 1), request("0220", "990000", RICH, 1),
              request("0200", "000000", RICH, 1, **{F.AMOUNT: "x"}),
              request("0200", "400000", RICH, 5, **{F.ACCOUNT_2: FRIEND})):
        run(logic.process(m, NOW))
    assert caplog.records
    text = "\n".join(r.getMessage() for r in caplog.records)
    for card in CARDS:
        assert card.pan not in text
    assert UNKNOWN_OWN not in text


# -- a property: the ledger always agrees with the records -----------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from cardswitch.issuer_sim.ledger import Op  # noqa: E402

_ACTIVE = (RICH, POOR, LIMITED, FRIEND)
_PINS = {c.pan: c.pin for c in CARDS}
_amounts = st.integers(min_value=0, max_value=400_000)
_card = st.sampled_from(_ACTIVE)
_idx = st.integers(min_value=0, max_value=1_000)
_ops = st.one_of(
    st.tuples(st.just("buy"), _card, _amounts),
    st.tuples(st.just("pre"), _card, _amounts),
    st.tuples(st.just("comp"), _idx, _amounts),
    st.tuples(st.just("void"), _idx),
    st.tuples(st.just("refund"), _card, _amounts),
    st.tuples(st.just("wd"), _card, _amounts),
    st.tuples(st.just("xfer"), _card, _card, _amounts),
    st.tuples(st.just("rev"), _idx),
    st.tuples(st.just("repeat"), _idx),
)


@settings(max_examples=150, deadline=None)
@given(ops=st.lists(_ops, max_size=40))
def test_balances_always_equal_the_standing_records(ops):
    logic = make_logic()
    opening = {a.token: a.balance for a in logic.accounts.values()}
    sent: list[dict] = []
    answers: dict[str, dict] = {}
    records = []

    def send(m):
        before = {t: (a.balance, a.held) for t, a in logic.accounts.items()}
        out = run(logic.process(m, NOW))
        if out.replay:
            assert out.response == answers[m[F.STAN]]
            assert before == {t: (a.balance, a.held) for t, a in logic.accounts.items()}
        else:
            answers[m[F.STAN]] = out.response
            records.append(out.new)
            if m[F.MTI] != "0420":
                sent.append(m)
        return out

    for op in ops:
        kind = op[0]
        if kind in ("buy", "refund"):
            send(request("0200", "000000" if kind == "buy" else "200000", op[1], op[2]))
        elif kind == "pre":
            send(request("0100", "000000", op[1], op[2]))
        elif kind == "wd":
            send(request("0200", "010000", op[1], op[2], pin=_PINS[op[1]]))
        elif kind == "xfer":
            send(request("0200", "400000", op[1], op[3], **{F.ACCOUNT_2: op[2]}))
        elif sent:
            orig = sent[op[1] % len(sent)]
            if kind == "comp":
                send(request("0200", "000000", orig[F.PAN], op[2],
                             **{F.CONDITION_CODE: "06", F.ORIGINAL_DATA: field90(orig)}))
            elif kind == "void":
                send(request("0200", "020000", orig[F.PAN], int(orig[F.AMOUNT]),
                             **{F.ORIGINAL_DATA: field90(orig)}))
            elif kind == "rev":
                send(reversal(orig))
            else:
                send(dict(orig, **{F.MTI: orig[F.MTI][:3] + "1"}))

    expected = dict(opening)
    held = dict.fromkeys(opening, 0)
    for t in records:
        if t.hold == Hold.ACTIVE:
            held[t.token] += t.amount
        if not t.approved or t.reversed:
            continue
        for op, tok, amount, _ in t.effects:
            if op == Op.DEBIT:
                expected[tok] -= amount
            elif op == Op.CREDIT:
                expected[tok] += amount
    for tok, a in logic.accounts.items():
        assert a.balance == expected[tok]
        assert a.held == held[tok]
        # Only a reversal (an advice: it must be accepted) may take a card below
        # zero, e.g. undoing a transfer credit the receiving card already spent.
        if a.available < 0:
            assert any(t.reversed and any(op == Op.CREDIT and tok == a.token for op, tok, _, _ in t.effects)
                       for t in records)
