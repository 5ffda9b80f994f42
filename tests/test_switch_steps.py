"""The pipeline's pure decision steps (cardswitch.switch.steps), one by one.

Each test builds a ``Context`` from the packaged default network with a real
``TxnIndex`` and hand-made ``TxnRecord``s, runs the steps the pipeline runs
before the one under test, and checks the code it stops with (or that it
goes on) and what it leaves on the ``Txn``.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime, timezone

import pytest

from cardswitch.iso8583.constants import RC, F
from cardswitch.iso8583.fields import format_field90
from cardswitch.merchants.registry import Registry
from cardswitch.netfile import load_network
from cardswitch.pan import mask_pan, pan_token
from cardswitch.routing.bintable import BinTable
from cardswitch.switch import steps
from cardswitch.switch.index import BatchTotals, TxnIndex
from cardswitch.switch.records import Cancel, Kind, Status, TxnRecord
from cardswitch.switch.steps import Context, Txn

SECRET = b"test-token-secret"
BUSINESS_DATE = "2026-03-14"
NOW = datetime(2026, 3, 14, 10, 15, 0, tzinfo=timezone.utc)

POS, POS_MID = "POS00001", "898440158120001"          # Shanghai Coffee, acquired by BANKA, MCC 5812
POS2, POS2_MID = "POS00011", "898110054110001"        # Beijing Fresh, acquired by BANKB
ATM, ATM_MID = "ATM00001", "898440160110001"          # Bank A ATM network, MCC 6011
CARD_A = "6221260000000018"                           # BANKA debit
CARD_A2 = "6221260000000026"                          # BANKA debit
CARD_A_CREDIT = "6221280000000016"                    # BANKA credit range 62212800-62212899
CARD_B = "6228480000000015"                           # BANKB debit
CARD_UNROUTED = "4111111111111111"                    # passes Luhn, no BIN range
BAD_LUHN = "6221260000000019"


@pytest.fixture(scope="module")
def network():
    return load_network(None)


def make_ctx(network, index: TxnIndex | None = None) -> Context:
    return Context(network=network, registry=Registry.from_network(network),
                   bins=BinTable.from_network(network), index=index if index is not None else TxnIndex(),
                   token_secret=SECRET, business_date=BUSINESS_DATE)


@pytest.fixture
def ctx(network):
    return make_ctx(network)


def request(mti: str = "0200", proc: str = "000000", *, tid: str = POS, mid: str = POS_MID,
            pan: str | None = CARD_A, amount: int | None = 1000, stan: str = "000123",
            transmitted: str = "0314101500", batch: str = "000001", **extra: str) -> dict[str, str]:
    msg = {
        F.MTI: mti, F.PROC: proc, F.TRANSMISSION_DT: transmitted, F.STAN: stan,
        F.LOCAL_TIME: "181500", F.LOCAL_DATE: "0314", F.ENTRY_MODE: "021", F.CONDITION_CODE: "00",
        F.TERMINAL_ID: tid, F.MERCHANT_ID: mid, F.CURRENCY: "156", F.BATCH_NUMBER: batch,
    }
    if pan is not None:
        msg[F.PAN] = pan
    if amount is not None:
        msg[F.AMOUNT] = f"{amount:012d}"
    msg.update(extra)
    return msg


def txn(req: dict[str, str]) -> Txn:
    return Txn(req=req, mti=req[F.MTI], received=NOW, t0=0.0)


_ids = iter(range(1, 10**9))


def record(kind: str = Kind.PURCHASE, *, mti: str = "0200", proc: str = "000000", tid: str = POS,
           mid: str = POS_MID, stan: str = "000100", transmitted: str = "0314100000",
           batch: str = "000001", amount: int = 1000, status: str = Status.APPROVED,
           cancelled: str = Cancel.NONE, pan: str = CARD_A, **kw) -> TxnRecord:
    """A journal row as the pipeline would have left it."""
    rec = TxnRecord(id=next(_ids), business_date=BUSINESS_DATE, received_at="2026-03-14T10:00:00.000000Z",
                    mti=mti, proc=proc, kind=kind, amount=amount, currency="156", terminal_id=tid,
                    merchant_id=mid, stan=stan, transmitted=transmitted, batch=batch,
                    pan_masked=mask_pan(pan), pan_token=pan_token(pan, SECRET), acquirer_id="BANKA",
                    issuer_id="BANKA", status=status, response_code="00" if status == Status.APPROVED else "05",
                    cancelled=cancelled, issuer_stan="000007", issuer_transmitted="0314100001", **kw)
    return rec


def f90(rec: TxnRecord) -> str:
    """Field 90 as a terminal writes it for ``rec`` (its own MTI, STAN, field 7)."""
    return format_field90(rec.mti, rec.stan, rec.transmitted, "10000001", "0")


def up_to_original(t: Txn, ctx: Context) -> str | None:
    """The steps the pipeline runs before ``find_original``, in its order."""
    rc = steps.classify(t) or steps.validate(t, ctx) or steps.detect_duplicate(t, ctx)
    steps.start_record(t, ctx, 999_999)
    return rc or (steps.identify_terminal(t, ctx) or steps.check_allowed(t, ctx)
                  or (None if t.kind == Kind.REVERSAL else
                      steps.read_card(t, ctx) or steps.check_amount(t, ctx) or steps.check_batch(t, ctx)))


# -- classify ------------------------------------------------------------------


@pytest.mark.parametrize("mti, proc, extra, kind", [
    ("0100", "000000", {}, Kind.PREAUTH),
    ("0101", "003000", {}, Kind.PREAUTH),
    ("0200", "000000", {}, Kind.PURCHASE),
    ("0201", "000000", {}, Kind.PURCHASE),
    ("0200", "000000", {F.CONDITION_CODE: "06", F.ORIGINAL_DATA: "0" * 42}, Kind.COMPLETION),
    ("0200", "000000", {F.CONDITION_CODE: "06"}, Kind.PURCHASE),           # 25=06 without 90
    ("0200", "000000", {F.ORIGINAL_DATA: "0" * 42}, Kind.PURCHASE),         # 90 without 25=06
    ("0200", "010000", {}, Kind.WITHDRAWAL),
    ("0200", "020000", {F.ORIGINAL_DATA: "0" * 42}, Kind.VOID),
    ("0200", "200000", {}, Kind.REFUND),
    ("0200", "210000", {}, Kind.DEPOSIT),
    ("0200", "300000", {}, Kind.BALANCE),
    ("0200", "310000", {}, Kind.BALANCE),
    ("0200", "401000", {}, Kind.TRANSFER),
    ("0200", "500000", {}, Kind.BILL_PAYMENT),
    ("0400", "000000", {}, Kind.REVERSAL),
    ("0401", "010000", {}, Kind.REVERSAL),
])
def test_classify_names_the_transaction(mti, proc, extra, kind):
    t = txn(request(mti, proc, **extra))
    assert steps.classify(t) is None
    assert t.kind == kind


@pytest.mark.parametrize("mti, proc", [
    ("0100", "010000"),   # only a purchase can be pre-authorized
    ("0100", "300000"),
    ("0200", "280000"),   # the transfer credit leg is switch-to-issuer only
    ("0200", "990000"),
    ("0300", "000000"),
])
def test_classify_unknown_is_12(mti, proc):
    t = txn(request(mti, proc))
    assert steps.classify(t) == RC.INVALID_TRANSACTION
    assert t.kind == ""


# -- validate ------------------------------------------------------------------


def classified(req) -> Txn:
    t = txn(req)
    assert steps.classify(t) is None
    return t


def test_validate_accepts_a_complete_purchase(ctx):
    assert steps.validate(classified(request()), ctx) is None


@pytest.mark.parametrize("missing", [f for f in steps.FINANCIAL_REQUIRED if f != F.PROC])
def test_validate_missing_mandatory_field_is_30(ctx, missing):
    req = request()
    del req[missing]
    assert steps.validate(classified(req), ctx) == RC.FORMAT_ERROR


@pytest.mark.parametrize("proc", [None, "", "A00000", "0 0000", "00A000", "00000", "0000000"])
def test_missing_or_non_numeric_processing_code_is_30_not_12(ctx, proc):
    # wire.md 4: non-digits in 3, or 3 missing, is a format error, whatever else is wrong.
    req = request()
    if proc is None:
        del req[F.PROC]
    else:
        req[F.PROC] = proc
    t = txn(req)
    assert (steps.classify(t) or steps.validate(t, ctx)) == RC.FORMAT_ERROR


def test_validate_balance_inquiry_needs_no_amount(ctx):
    assert steps.validate(classified(request(proc="300000", amount=None)), ctx) is None
    assert steps.validate(classified(request(amount=None)), ctx) == RC.FORMAT_ERROR


@pytest.mark.parametrize("field, value", [
    (F.AMOUNT, "00000000001A"),
    (F.STAN, "12345X"),
    (F.CURRENCY, "CNY"),
    (F.TRANSMISSION_DT, "1332101500"),   # month 13
    (F.TRANSMISSION_DT, "0230101500"),   # 30 February
    (F.LOCAL_TIME, "246000"),
    (F.LOCAL_DATE, "0431"),
    (F.EXPIRY, "3013"),
    (F.PAN, "62212600000000A8"),
    (F.PIN_BLOCK, "XYZ0000000000000"),
])
def test_validate_field_breaking_its_format_is_30(ctx, field, value):
    assert steps.validate(classified(request(**{field: value})), ctx) == RC.FORMAT_ERROR


def test_validate_needs_field_2_or_35(ctx):
    assert steps.validate(classified(request(pan=None)), ctx) == RC.FORMAT_ERROR
    track_only = request(pan=None, **{F.TRACK2: CARD_A + "=30121010000000000000"})
    assert steps.validate(classified(track_only), ctx) is None


def test_validate_void_and_transfer_need_their_fields(ctx):
    assert steps.validate(classified(request(proc="020000")), ctx) == RC.FORMAT_ERROR
    assert steps.validate(classified(request(proc="400000")), ctx) == RC.FORMAT_ERROR
    assert steps.validate(classified(request(proc="400000", **{F.ACCOUNT_2: ""})), ctx) == RC.FORMAT_ERROR
    assert steps.validate(classified(request(proc="400000", **{F.ACCOUNT_2: CARD_B})), ctx) is None


@pytest.mark.parametrize("bad90", ["0" * 41, "0" * 43, "0200000123031410150A" + "0" * 22])
def test_validate_bad_field_90_is_30(ctx, bad90):
    req = request(proc="020000", **{F.ORIGINAL_DATA: bad90})
    assert steps.validate(classified(req), ctx) == RC.FORMAT_ERROR


def test_validate_parses_field_90(ctx):
    f90_text = format_field90("0200", "000100", "0314100000", "10000001", "0")
    t = classified(request(proc="020000", **{F.ORIGINAL_DATA: f90_text}))
    assert steps.validate(t, ctx) is None
    assert (t.orig_data.mti, t.orig_data.stan, t.orig_data.transmitted) == ("0200", "000100", "0314100000")
    assert t.orig_data.acquirer_id == "00010000001"


def test_validate_reversal_needs_only_its_own_fields(ctx):
    f90_text = format_field90("0200", "000100", "0314100000", "10000001", "0")
    req = {F.MTI: "0400", F.PROC: "000000", F.TRANSMISSION_DT: "0314101600", F.STAN: "000124",
           F.TERMINAL_ID: POS, F.MERCHANT_ID: POS_MID, F.ORIGINAL_DATA: f90_text}
    assert steps.validate(classified(req), ctx) is None
    for missing in steps.REVERSAL_REQUIRED:
        bad = dict(req)
        del bad[missing]
        assert steps.validate(classified(bad), ctx) == RC.FORMAT_ERROR, missing


# -- identify_terminal, check_allowed ------------------------------------------


def test_identify_known_terminal(ctx):
    t = classified(request())
    assert steps.identify_terminal(t, ctx) is None
    assert t.info.terminal_id == POS and t.info.acquirer.id == "BANKA"


@pytest.mark.parametrize("tid, mid", [
    ("POS99999", POS_MID),       # unknown terminal
    (POS, "898110054110001"),    # terminal of another merchant
    (POS, "999999999999999"),    # unknown merchant
])
def test_identify_unknown_or_mismatched_is_03(ctx, tid, mid):
    t = classified(request(tid=tid, mid=mid))
    assert steps.identify_terminal(t, ctx) == RC.INVALID_MERCHANT
    assert t.info is None


def _disabled(network, *, terminal: bool):
    merchants = []
    for m in network.merchants:
        if m.id == POS_MID:
            if terminal:
                terms = tuple(dataclasses.replace(x, enabled=False) if x.id == POS else x for x in m.terminals)
                m = dataclasses.replace(m, terminals=terms)
            else:
                m = dataclasses.replace(m, enabled=False)
        merchants.append(m)
    return dataclasses.replace(network, merchants=tuple(merchants))


@pytest.mark.parametrize("terminal", [True, False])
def test_identify_disabled_terminal_or_merchant_is_03(network, terminal):
    ctx = make_ctx(_disabled(network, terminal=terminal))
    t = classified(request())
    assert steps.identify_terminal(t, ctx) == RC.INVALID_MERCHANT


@pytest.mark.parametrize("tid, mid, proc, extra, rc", [
    (POS, POS_MID, "000000", {}, None),
    (POS, POS_MID, "200000", {}, None),
    (POS, POS_MID, "010000", {}, RC.NOT_PERMITTED_TERMINAL),      # cash at a POS
    (POS, POS_MID, "210000", {}, RC.NOT_PERMITTED_TERMINAL),
    (ATM, ATM_MID, "010000", {}, None),
    (ATM, ATM_MID, "210000", {}, None),
    (ATM, ATM_MID, "300000", {}, None),
    (ATM, ATM_MID, "000000", {}, RC.NOT_PERMITTED_TERMINAL),      # a purchase at an ATM
    (ATM, ATM_MID, "200000", {}, RC.NOT_PERMITTED_TERMINAL),
    (ATM, ATM_MID, "020000", {F.ORIGINAL_DATA: "0" * 42}, RC.NOT_PERMITTED_TERMINAL),
])
def test_check_allowed_by_terminal_kind(ctx, tid, mid, proc, extra, rc):
    t = classified(request(proc=proc, tid=tid, mid=mid, **extra))
    assert steps.identify_terminal(t, ctx) is None
    assert steps.check_allowed(t, ctx) == rc


def test_check_allowed_preauth_only_at_pos(ctx):
    t = classified(request("0100", tid=ATM, mid=ATM_MID))
    steps.identify_terminal(t, ctx)
    assert steps.check_allowed(t, ctx) == RC.NOT_PERMITTED_TERMINAL


def test_cash_at_an_atm_of_a_non_atm_merchant_is_12(network):
    merchants = tuple(dataclasses.replace(m, mcc="5812") if m.id == ATM_MID else m for m in network.merchants)
    ctx = make_ctx(dataclasses.replace(network, merchants=merchants))
    t = classified(request(proc="010000", tid=ATM, mid=ATM_MID))
    steps.identify_terminal(t, ctx)
    assert steps.check_allowed(t, ctx) == RC.INVALID_TRANSACTION
    t = classified(request(proc="300000", tid=ATM, mid=ATM_MID))
    steps.identify_terminal(t, ctx)
    assert steps.check_allowed(t, ctx) is None


# -- read_card -------------------------------------------------------------------


def read(ctx, req) -> tuple[str | None, Txn]:
    t = classified(req)
    return steps.read_card(t, ctx), t


def test_read_card_from_field_2(ctx):
    rc, t = read(ctx, request(**{F.EXPIRY: "3012"}))
    assert rc is None and t.pan == CARD_A and t.expiry == "3012"


def test_read_card_bad_luhn_is_14(ctx):
    assert read(ctx, request(pan=BAD_LUHN))[0] == RC.INVALID_CARD
    assert read(ctx, request(pan="62212600018"))[0] == RC.INVALID_CARD   # too short for a PAN


@pytest.mark.parametrize("track2", [
    CARD_A + "=30121010000000000000",
    CARD_A + "D30121010000000000000",
    ";" + CARD_A + "=3012101?",
    CARD_A + "=3012",
])
def test_read_card_from_track2_only(ctx, track2):
    rc, t = read(ctx, request(pan=None, **{F.TRACK2: track2}))
    assert rc is None
    assert (t.pan, t.expiry) == (CARD_A, "3012")


def test_read_card_field_14_wins_over_track2_expiry(ctx):
    rc, t = read(ctx, request(pan=None, **{F.TRACK2: CARD_A + "=3012101", F.EXPIRY: "2906"}))
    assert rc is None and t.expiry == "2906"


def test_read_card_field_2_wins_over_track2(ctx):
    rc, t = read(ctx, request(pan=CARD_A, **{F.TRACK2: CARD_A2 + "=3012101"}))
    assert rc is None and t.pan == CARD_A


@pytest.mark.parametrize("track2, rc", [
    ("ABCDEF=3012", RC.FORMAT_ERROR),            # PAN part not digits
    (CARD_A + "=30", RC.FORMAT_ERROR),           # no expiry
    (BAD_LUHN + "=30121010", RC.INVALID_CARD),
])
def test_read_card_unusable_track2(ctx, track2, rc):
    assert read(ctx, request(pan=None, **{F.TRACK2: track2}))[0] == rc


def test_read_card_transfer_target(ctx):
    rc, t = read(ctx, request(proc="400000", **{F.ACCOUNT_2: CARD_B}))
    assert rc is None and t.to_pan == CARD_B
    rc, t = read(ctx, request(**{F.ACCOUNT_2: CARD_B}))   # 103 on a purchase means nothing
    assert rc is None and t.to_pan == ""


# -- check_amount ------------------------------------------------------------------


@pytest.mark.parametrize("proc, amount, rc, parsed", [
    ("000000", 1, None, 1),
    ("000000", 123456, None, 123456),
    ("000000", 0, RC.INVALID_AMOUNT, 0),
    ("200000", 0, RC.INVALID_AMOUNT, 0),
    ("010000", 0, RC.INVALID_AMOUNT, 0),
    ("300000", 0, None, 0),
    ("300000", None, None, 0),
])
def test_check_amount(ctx, proc, amount, rc, parsed):
    t = classified(request(proc=proc, amount=amount))
    assert steps.check_amount(t, ctx) == rc
    assert t.amount == parsed and type(t.amount) is int


# -- detect_duplicate ----------------------------------------------------------------


def test_first_request_is_not_a_duplicate(ctx):
    assert steps.detect_duplicate(classified(request()), ctx) is None


def test_same_terminal_stan_field7_and_class_is_94(ctx):
    seen = record(stan="000123", transmitted="0314101500")
    ctx.index.add(seen)
    t = classified(request(stan="000123", transmitted="0314101500"))
    assert steps.detect_duplicate(t, ctx) == RC.DUPLICATE
    assert t.replay_of is None


def test_repeat_of_a_received_request_is_replayed(ctx):
    seen = record(stan="000123", transmitted="0314101500")
    ctx.index.add(seen)
    t = classified(request("0201", stan="000123", transmitted="0314101500"))
    assert steps.detect_duplicate(t, ctx) is None
    assert t.replay_of is seen


def test_repeat_of_a_repeat_is_replayed(ctx):
    seen = record(mti="0201", stan="000123", transmitted="0314101500")   # the original arrived as 0201
    ctx.index.add(seen)
    t = classified(request("0201", stan="000123", transmitted="0314101500"))
    assert steps.detect_duplicate(t, ctx) is None and t.replay_of is seen
    t = classified(request("0200", stan="000123", transmitted="0314101500"))
    assert steps.detect_duplicate(t, ctx) == RC.DUPLICATE


def test_repeat_of_a_request_never_received_is_processed(ctx):
    t = classified(request("0201"))
    assert steps.detect_duplicate(t, ctx) is None and t.replay_of is None


@pytest.mark.parametrize("change", [
    {"stan": "000124"},
    {"transmitted": "0314101501"},
    {"tid": "POS00002", "mid": POS_MID},
    {"mti": "0400"},
    {"mti": "0100"},
])
def test_any_key_part_differs_is_not_a_duplicate(ctx, change):
    ctx.index.add(record(stan="000123", transmitted="0314101500"))
    args = {"stan": "000123", "transmitted": "0314101500"} | change
    t = txn(request(**args))
    assert steps.detect_duplicate(t, ctx) is None


def test_reversal_repeat_replays_the_reversal(ctx):
    rev = record(Kind.REVERSAL, mti="0400", stan="000200", transmitted="0314102000")
    ctx.index.add(rev)
    t = txn(request("0401", stan="000200", transmitted="0314102000"))
    assert steps.detect_duplicate(t, ctx) is None and t.replay_of is rev
    t = txn(request("0400", stan="000200", transmitted="0314102000"))
    assert steps.detect_duplicate(t, ctx) == RC.DUPLICATE


# -- check_batch -------------------------------------------------------------------------


def test_check_batch(ctx):
    t = classified(request(batch="000001"))
    assert steps.check_batch(t, ctx) is None
    ctx.index.close_batch(POS, "000001")
    assert steps.check_batch(t, ctx) == RC.INVALID_TRANSACTION
    assert steps.check_batch(classified(request(batch="000002")), ctx) is None
    other = classified(request(tid="POS00002", batch="000001"))
    assert steps.check_batch(other, ctx) is None


# -- find_original -------------------------------------------------------------------------


def test_plain_requests_need_no_original(ctx):
    t = txn(request())
    assert up_to_original(t, ctx) is None
    assert steps.find_original(t, ctx) is None and t.original is None


def void_of(orig: TxnRecord, ctx, **kw) -> tuple[str | None, Txn]:
    args = dict(amount=orig.amount, stan="000300", transmitted="0314103000") | kw
    t = txn(request(proc="020000", **{F.ORIGINAL_DATA: f90(orig)}, **args))
    rc = up_to_original(t, ctx)
    assert rc is None, rc
    return steps.find_original(t, ctx), t


def test_void_finds_its_purchase(ctx):
    orig = record()
    ctx.index.add(orig)
    rc, t = void_of(orig, ctx)
    assert rc is None and t.original is orig


def test_void_by_track2_finds_its_purchase(ctx):
    orig = record()
    ctx.index.add(orig)
    rc, t = void_of(orig, ctx, pan=None, **{F.TRACK2: CARD_A + "=3012101"})
    assert rc is None and t.original is orig


@pytest.mark.parametrize("change", [
    {"status": Status.DECLINED},
    {"status": Status.TIMEOUT},
    {"status": Status.PENDING},
    {"cancelled": Cancel.VOIDED},          # void of a voided purchase
    {"cancelled": Cancel.REVERSED},
    {"batch": "000000"},                   # not in the request's batch
    {"kind": Kind.REFUND, "proc": "200000"},
    {"kind": Kind.WITHDRAWAL, "proc": "010000"},
    {"pan": CARD_A2},                      # another card
    {"tid": "POS00002"},                   # another terminal's purchase
])
def test_void_without_a_voidable_original_is_25(ctx, change):
    orig = record(**change)
    ctx.index.add(orig)
    rc, t = void_of(orig, ctx)
    assert rc == RC.ORIGINAL_NOT_FOUND


def test_void_never_found_by_its_own_stan(ctx):
    orig = record(stan="000300", transmitted="0314103000")
    ctx.index.add(orig)
    other = record(stan="000111", transmitted="0314100500")   # what field 90 names: not in the index
    rc, _ = void_of(other, ctx, stan="000300", transmitted="0314103001")
    assert rc == RC.ORIGINAL_NOT_FOUND


@pytest.mark.parametrize("amount", [999, 1001])
def test_void_amount_must_equal_the_purchase(ctx, amount):
    orig = record(amount=1000)
    ctx.index.add(orig)
    rc, _ = void_of(orig, ctx, amount=amount)
    assert rc == RC.INVALID_AMOUNT


def completion_of(orig: TxnRecord, ctx, amount: int) -> tuple[str | None, Txn]:
    t = txn(request(amount=amount, stan="000301", transmitted="0314103100",
                    **{F.CONDITION_CODE: "06", F.ORIGINAL_DATA: f90(orig)}))
    assert up_to_original(t, ctx) is None
    assert t.kind == Kind.COMPLETION
    return steps.find_original(t, ctx), t


@pytest.mark.parametrize("amount", [1, 800, 1000])
def test_completion_up_to_the_hold(ctx, amount):
    orig = record(Kind.PREAUTH, mti="0100", amount=1000)
    ctx.index.add(orig)
    rc, t = completion_of(orig, ctx, amount)
    assert rc is None and t.original is orig


def test_completion_above_the_hold_is_13(ctx):
    orig = record(Kind.PREAUTH, mti="0100", amount=1000)
    ctx.index.add(orig)
    assert completion_of(orig, ctx, 1001)[0] == RC.INVALID_AMOUNT


@pytest.mark.parametrize("change", [
    {"status": Status.DECLINED},
    {"cancelled": Cancel.COMPLETED},       # completed twice
    {"cancelled": Cancel.REVERSED},
    {"pan": CARD_A2},
])
def test_completion_without_an_open_preauth_is_25(ctx, change):
    orig = record(Kind.PREAUTH, mti="0100", **change)
    ctx.index.add(orig)
    assert completion_of(orig, ctx, 500)[0] == RC.ORIGINAL_NOT_FOUND


def test_completion_of_a_purchase_is_25(ctx):
    orig = record(Kind.PURCHASE, mti="0200")
    ctx.index.add(orig)
    assert completion_of(orig, ctx, 500)[0] == RC.ORIGINAL_NOT_FOUND


def test_completion_may_close_a_preauth_of_an_earlier_batch(ctx):
    orig = record(Kind.PREAUTH, mti="0100", batch="000000")
    ctx.index.add(orig)
    assert completion_of(orig, ctx, 500)[0] is None


def reversal_of(f90_text: str, ctx, tid: str = POS, mid: str = POS_MID, stan: str = "000400") -> Txn:
    req = {F.MTI: "0400", F.PROC: "000000", F.TRANSMISSION_DT: "0314104000", F.STAN: stan,
           F.TERMINAL_ID: tid, F.MERCHANT_ID: mid, F.ORIGINAL_DATA: f90_text, F.AMOUNT: "000000001000"}
    t = txn(req)
    assert up_to_original(t, ctx) is None
    return t


@pytest.mark.parametrize("status", [Status.APPROVED, Status.DECLINED, Status.TIMEOUT])
def test_reversal_finds_its_original_whatever_its_outcome(ctx, status):
    orig = record(status=status)
    ctx.index.add(orig)
    t = reversal_of(f90(orig), ctx)
    assert steps.find_original(t, ctx) is None and t.original is orig


def test_reversal_of_a_preauth_is_found_by_its_mti_class(ctx):
    orig = record(Kind.PREAUTH, mti="0100")
    ctx.index.add(orig)
    t = reversal_of(f90(orig), ctx)
    assert steps.find_original(t, ctx) is None and t.original is orig
    wrong_class = format_field90("0200", orig.stan, orig.transmitted, "10000001", "0")
    assert steps.find_original(reversal_of(wrong_class, ctx, stan="000401"), ctx) == RC.ORIGINAL_NOT_FOUND


def test_reversal_unknown_original_is_25(ctx):
    orig = record()
    ctx.index.add(orig)
    t = reversal_of(format_field90("0200", "000101", orig.transmitted, "10000001", "0"), ctx)
    assert steps.find_original(t, ctx) == RC.ORIGINAL_NOT_FOUND and t.original is None


def test_reversal_by_field_90_and_41_never_its_own_stan(ctx):
    orig = record(stan="000400", transmitted="0314104000")   # same STAN and 7 as the reversal itself
    ctx.index.add(orig)
    t = reversal_of(format_field90("0200", "000999", "0314100000", "10000001", "0"), ctx, stan="000400")
    assert steps.find_original(t, ctx) == RC.ORIGINAL_NOT_FOUND
    # Another terminal's transaction with the same 90 data is not found either.
    ctx.index.add(record(tid="POS00002", stan="000555"))
    t = reversal_of(format_field90("0200", "000555", "0314100000", "10000001", "0"), ctx, stan="000402")
    assert steps.find_original(t, ctx) == RC.ORIGINAL_NOT_FOUND


# -- route ------------------------------------------------------------------------------------


def routed(ctx, req) -> tuple[str | None, Txn]:
    t = txn(req)
    assert up_to_original(t, ctx) is None
    return steps.route(t, ctx), t


@pytest.mark.parametrize("pan, bank, card_type", [
    (CARD_A, "BANKA", "debit"),
    (CARD_A_CREDIT, "BANKA", "credit"),
    (CARD_B, "BANKB", "debit"),
    ("5200480000000019", "BANKB", "credit"),
    ("6217000000000014", "BANKC", "debit"),
])
def test_route_by_bin(ctx, pan, bank, card_type):
    rc, t = routed(ctx, request(pan=pan))
    assert rc is None
    assert (t.route.bank_id, t.route.card_type) == (bank, card_type)
    assert t.record.issuer_id == bank


def test_route_unknown_bin_is_15(ctx):
    rc, t = routed(ctx, request(pan=CARD_UNROUTED))
    assert rc == RC.NO_SUCH_ISSUER and t.record.issuer_id == ""


@pytest.mark.parametrize("to_pan, bank", [(CARD_B, "BANKB"), (CARD_A2, "BANKA")])
def test_route_transfer_target(ctx, to_pan, bank):
    rc, t = routed(ctx, request(proc="400000", **{F.ACCOUNT_2: to_pan}))
    assert rc is None
    assert t.route.bank_id == "BANKA" and t.to_route.bank_id == bank
    assert t.record.to_issuer_id == bank


@pytest.mark.parametrize("to_pan", [CARD_UNROUTED, "6228480000000016", "12345", "ABCDEFGHIJKLM"])
def test_route_transfer_to_no_account_is_52(ctx, to_pan):
    rc, t = routed(ctx, request(proc="400000", **{F.ACCOUNT_2: to_pan}))
    assert rc == RC.NO_SUCH_ACCOUNT and t.to_route is None


def test_route_sender_without_issuer_is_15_before_target(ctx):
    rc, _ = routed(ctx, request(proc="400000", pan=CARD_UNROUTED, **{F.ACCOUNT_2: "1"}))
    assert rc == RC.NO_SUCH_ISSUER


# -- start_record ---------------------------------------------------------------------------


def test_start_record_keeps_no_clear_card_data(ctx):
    req = request(proc="400000", **{F.ACCOUNT_2: CARD_B, F.PIN_BLOCK: "0123456789ABCDEF",
                                    F.TRACK2: CARD_A + "=30121010000000000000"})
    t = txn(req)
    assert up_to_original(t, ctx) is None
    rec = t.record
    assert rec.pan_masked == "622126******0018" and rec.to_pan_masked == "622848******0015"
    assert rec.pan_token == pan_token(CARD_A, SECRET) and rec.to_pan_token == pan_token(CARD_B, SECRET)
    text = repr(rec)
    for secret in (CARD_A, CARD_B, "0123456789ABCDEF", "30121010000000000000"):
        assert secret not in text
    assert (rec.terminal_id, rec.stan, rec.transmitted, rec.batch, rec.amount, rec.business_date) == \
        (POS, "000123", "0314101500", "000001", 1000, BUSINESS_DATE)
    assert rec.acquirer_id == "BANKA" and rec.kind == Kind.TRANSFER and rec.status == Status.PENDING


# -- batch totals fields ----------------------------------------------------------------------


def test_terminal_totals_and_fields_round_trip():
    req = {F.CREDITS_NUMBER: "0000000002", F.CREDITS_AMOUNT: "0000000000001500",
           F.DEBITS_NUMBER: "0000000003", F.DEBITS_AMOUNT: "0000000000123456"}
    tot = steps.terminal_totals(req)
    assert tot == BatchTotals(2, 1500, 3, 123456)
    assert steps.totals_fields(tot) == req


def test_start_record_before_the_card_is_read(ctx):
    """The row of a request declined early still names its card (masked) and amount."""
    t = classified(request(pan=None, amount=4321, **{F.TRACK2: CARD_A + "=3012101"}))
    rec = steps.start_record(t, ctx, 7)
    assert rec.pan_masked == "622126******0018" and rec.amount == 4321
    assert rec.acquirer_id == ""                     # the terminal is not identified yet
    assert steps.identify_terminal(t, ctx) is None
    assert rec.acquirer_id == "BANKA"
    bad = classified(request(pan="62212600000000A8"))
    assert steps.start_record(bad, ctx, 8).pan_masked == ""
