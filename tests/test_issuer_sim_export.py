"""The simulated issuer's day export over several business dates.

Each test drives the bank's own logic (IssuerLogic with the fake HSM), writes
every outcome to the bank's database on a tmp data_dir exactly as the host
does (store.statements through the group-commit writer), and reads back
``export_day`` for each date. What is checked is the switch's counting
(settlement.md 2, docs/settlement.md "What counts on date D"): an original
undone on its own date is not listed; one undone on a later date stays on
its date and the later date lists a ``reversal`` row (negative, or positive
for a purchase whose void was reversed), named by the reversed request or by
the void.
"""

from __future__ import annotations

import csv
import sqlite3
from datetime import date, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cardswitch.iso8583.constants import RC, F
from cardswitch.issuer_sim.export import HEADER, Rec, day_rows, export_day, replay
from cardswitch.issuer_sim.store import db_path, open_writer, statements
from cardswitch.pan import mask_pan
from test_issuer_sim_support import (
    FRIEND,
    NOW,
    OTHER_BANK,
    POOR,
    RICH,
    UNKNOWN_OWN,
    field90,
    make_logic,
    request,
    reversal,
    run,
)

D1, D2, D3 = "2025-06-15", "2025-06-16", "2025-06-17"


def mmdd(day: str) -> str:
    return day[5:7] + day[8:10]


class BankDays:
    """One bank: its logic, its database, and requests on chosen business dates."""

    def __init__(self, tmp_path) -> None:
        self.dir = tmp_path
        self.logic = make_logic()
        self.writer = open_writer(tmp_path, "BANKA")
        self._rrn = 0

    def close(self) -> None:
        self.writer.close()

    def rrn(self) -> str:
        self._rrn += 1
        return f"{self._rrn:012d}"

    def send(self, msg: dict, day: str) -> dict:
        now = NOW + timedelta(days=(date.fromisoformat(day) - date.fromisoformat(D1)).days)
        outcome = run(self.logic.process(msg, now))
        stmts = statements(outcome)
        if stmts:
            self.writer.write_many(stmts)
        return outcome.response

    def ok(self, msg: dict, day: str) -> dict:
        resp = self.send(msg, day)
        assert resp[F.RESPONSE_CODE] == RC.APPROVED, (msg[F.MTI], msg[F.PROC], resp[F.RESPONSE_CODE])
        return resp

    # requests as the switch sends them -------------------------------------------

    def fin(self, proc: str, card: str, amount: int, day: str, *, mti: str = "0200", **kw) -> dict:
        return request(mti, proc, card, amount, rrn=self.rrn(), f15=mmdd(day), **kw)

    def purchase(self, day: str, amount: int = 1_000, card: str = RICH, proc: str = "000000", **kw):
        """(request, response) of an approved 0200."""
        m = self.fin(proc, card, amount, day, **kw)
        return m, self.ok(m, day)

    def void(self, orig: dict, day: str):
        m = self.fin("020000", orig[F.PAN], int(orig[F.AMOUNT]), day, **{F.ORIGINAL_DATA: field90(orig)})
        return m, self.ok(m, day)

    def reverse(self, orig: dict, day: str) -> dict:
        """The switch's 0420: the original's RRN, the reversal's business date."""
        m = reversal(orig, rrn=orig[F.RRN], f15=mmdd(day))
        self.ok(m, day)
        return m

    def export(self, day: str) -> list[list[str]]:
        self.writer.flush()
        out = self.dir / "out" / f"BANKA-{day}.csv"
        n = export_day(self.dir, "BANKA", day, out)
        with open(out, newline="") as f:
            rows = list(csv.reader(f))
        assert rows[0] == list(HEADER)
        assert len(rows) - 1 == n
        return rows[1:]


def row(msg: dict, resp: dict | None, amount: int, day: str, kind: str, auth: str | None = None) -> list[str]:
    """The expected export row naming request ``msg`` (answered ``resp``)."""
    return [msg[F.RRN], str(amount), auth if auth is not None else resp[F.AUTH_CODE], msg[F.STAN],
            mask_pan(msg[F.PAN]), msg[F.PROC], day, kind]


@pytest.fixture
def bank(tmp_path):
    b = BankDays(tmp_path)
    yield b
    b.close()


# -- reversals ------------------------------------------------------------------------------


def test_same_day_reversal_lists_neither(bank):
    p, _ = bank.purchase(D1, 3_000)
    bank.reverse(p, D1)
    kept, kept_r = bank.purchase(D1, 500)
    assert bank.export(D1) == [row(kept, kept_r, 500, D1, "purchase")]
    assert bank.export(D2) == []


def test_later_day_reversal_stays_on_its_date_and_is_negative_on_the_reversal_date(bank):
    p, r = bank.purchase(D1, 3_000)
    before = bank.export(D1)
    assert before == [row(p, r, 3_000, D1, "purchase")]
    bank.reverse(p, D2)
    # the earlier date is not changed by a later date's reversal
    assert bank.export(D1) == before
    # the reversal date: a negative row named by the reversed request (the 0420 carries its RRN)
    assert bank.export(D2) == [row(p, r, -3_000, D2, "reversal")]
    assert bank.export(D3) == []


def test_second_reversal_and_reversal_of_a_decline_change_nothing(bank):
    p, r = bank.purchase(D1, 3_000)
    bank.reverse(p, D2)
    bank.reverse(p, D2)                 # another 0420 for the same original
    bank.reverse(p, D3)
    declined = bank.fin("000000", POOR, 999_999, D1)
    assert bank.send(declined, D1)[F.RESPONSE_CODE] == RC.INSUFFICIENT_FUNDS
    bank.reverse(declined, D2)
    assert bank.export(D1) == [row(p, r, 3_000, D1, "purchase")]
    assert bank.export(D2) == [row(p, r, -3_000, D2, "reversal")]
    assert bank.export(D3) == []


def test_reversal_two_days_later_skips_the_day_between(bank):
    p, r = bank.purchase(D1, 1_200)
    bank.reverse(p, D3)
    assert bank.export(D1) == [row(p, r, 1_200, D1, "purchase")]
    assert bank.export(D2) == []
    assert bank.export(D3) == [row(p, r, -1_200, D3, "reversal")]


# -- voids ------------------------------------------------------------------------------------


def test_same_day_void_lists_neither(bank):
    p, _ = bank.purchase(D1, 2_000)
    bank.void(p, D1)
    assert bank.export(D1) == []
    assert bank.export(D2) == []


def test_later_day_void_is_a_negative_row_under_the_voids_own_rrn(bank):
    p, r = bank.purchase(D1, 2_000)
    v, vr = bank.void(p, D2)
    assert bank.export(D1) == [row(p, r, 2_000, D1, "purchase")]
    assert bank.export(D2) == [row(v, vr, -2_000, D2, "reversal")]
    assert row(v, vr, 0, D2, "")[5] == "020000"


def test_void_then_its_reversal_on_a_later_date_makes_the_purchase_stand_again(bank):
    p, _ = bank.purchase(D1, 2_500)
    v, vr = bank.void(p, D1)
    bank.reverse(v, D2)
    assert bank.export(D1) == []
    # positive, named by the void (the 0420 names the void and carries its RRN)
    assert bank.export(D2) == [row(v, vr, 2_500, D2, "reversal")]


def test_void_and_its_reversal_on_the_same_later_date_change_nothing(bank):
    p, r = bank.purchase(D1, 2_500)
    v, _ = bank.void(p, D2)
    bank.reverse(v, D2)
    assert bank.export(D1) == [row(p, r, 2_500, D1, "purchase")]
    assert bank.export(D2) == []


def test_void_and_its_reversal_on_three_dates(bank):
    p, r = bank.purchase(D1, 2_500)
    v, vr = bank.void(p, D2)
    bank.reverse(v, D3)
    assert bank.export(D1) == [row(p, r, 2_500, D1, "purchase")]
    assert bank.export(D2) == [row(v, vr, -2_500, D2, "reversal")]
    assert bank.export(D3) == [row(v, vr, 2_500, D3, "reversal")]


def test_reversal_of_a_voided_purchase_changes_nothing(bank):
    p, r = bank.purchase(D1, 700)
    v, vr = bank.void(p, D2)
    bank.reverse(p, D2)                 # its void gave the money back already
    bank.reverse(p, D3)
    assert bank.export(D2) == [row(v, vr, -700, D2, "reversal")]
    assert bank.export(D3) == []


def test_same_day_void_and_same_day_purchase_of_the_reinstated_card(bank):
    """A purchase reversed on D1 and a void reversed on D1: D1 lists what stands at its end."""
    p, r = bank.purchase(D1, 900)
    v, _ = bank.void(p, D1)
    bank.reverse(v, D1)
    assert bank.export(D1) == [row(p, r, 900, D1, "purchase")]
    assert bank.export(D2) == []


# -- other kinds ---------------------------------------------------------------------------------


def test_completion_reversed_later_and_its_preauth_never_listed(bank):
    pre = bank.fin("000000", RICH, 5_000, D1, mti="0100")
    bank.ok(pre, D1)
    comp, cr = bank.purchase(D1, 4_500, **{F.CONDITION_CODE: "06", F.ORIGINAL_DATA: field90(pre)})
    assert bank.export(D1) == [row(comp, cr, 4_500, D1, "completion")]
    bank.reverse(comp, D2)
    assert bank.export(D2) == [row(comp, cr, -4_500, D2, "reversal")]
    # a completion voided on the next day: under the void
    pre2 = bank.fin("000000", RICH, 800, D2, mti="0100")
    bank.ok(pre2, D2)
    comp2, _ = bank.purchase(D2, 800, **{F.CONDITION_CODE: "06", F.ORIGINAL_DATA: field90(pre2)})
    v, vr = bank.void(comp2, D3)
    assert bank.export(D3) == [row(v, vr, -800, D3, "reversal")]


@pytest.mark.parametrize("proc, kind, kw", [
    ("200000", "refund", {}),
    ("210000", "deposit", {"pin": "1234"}),
    ("010000", "withdrawal", {"pin": "1234"}),
    ("500000", "bill_payment", {}),
])
def test_each_kind_reversed_on_a_later_date(bank, proc, kind, kw):
    m, r = bank.purchase(D1, 600, proc=proc, **kw)
    same, _ = bank.purchase(D1, 100, proc=proc, **kw)
    bank.reverse(same, D1)
    assert bank.export(D1) == [row(m, r, 600, D1, kind)]
    bank.reverse(m, D2)
    # a credit taken back is negative too: the switch signs reversal rows the same way
    assert bank.export(D2) == [row(m, r, -600, D2, "reversal")]


def test_transfers_on_us_out_and_credit_leg(bank):
    on_us, on_us_r = bank.purchase(D1, 1_000, proc="400000", **{F.ACCOUNT_2: FRIEND})
    out, out_r = bank.purchase(D1, 2_000, proc="400000", **{F.ACCOUNT_2: OTHER_BANK})
    credit, credit_r = bank.purchase(D1, 3_000, proc="280000", card=FRIEND)
    gone, _ = bank.purchase(D1, 4_000, proc="400000", **{F.ACCOUNT_2: FRIEND})
    bank.reverse(gone, D1)
    # an on-us transfer is one row (the switch reconciles its transfer_out row)
    assert sorted(bank.export(D1)) == sorted([
        row(on_us, on_us_r, 1_000, D1, "transfer_out"),
        row(out, out_r, 2_000, D1, "transfer_out"),
        row(credit, credit_r, 3_000, D1, "transfer_in"),
    ])
    for m in (on_us, out, credit):
        bank.reverse(m, D2)
    assert sorted(bank.export(D2)) == sorted([
        row(on_us, on_us_r, -1_000, D2, "reversal"),
        row(out, out_r, -2_000, D2, "reversal"),
        row(credit, credit_r, -3_000, D2, "reversal"),     # 280000, the bank's own approval code
    ])


# -- stand-in advices ------------------------------------------------------------------------------


def test_stand_in_advice_and_its_later_reversal(bank):
    adv = bank.fin("000000", POOR, 9_000, D1, mti="0220", **{F.AUTH_CODE: "S00001"})
    bank.ok(adv, D1)
    lost = bank.fin("000000", UNKNOWN_OWN, 5_000, D1, mti="0220", **{F.AUTH_CODE: "S00002"})
    bank.ok(lost, D1)                   # acknowledged, but nothing posted: not in the record
    assert bank.export(D1) == [row(adv, None, 9_000, D1, "purchase", auth="S00001")]
    bank.reverse(adv, D2)
    assert bank.export(D2) == [row(adv, None, -9_000, D2, "reversal", auth="S00001")]


def test_reversal_before_its_original(bank):
    # same date: the original is undone as it comes, neither is listed
    p = bank.fin("000000", RICH, 1_500, D1)
    bank.reverse(p, D1)
    bank.ok(p, D1)
    assert bank.export(D1) == []
    # a stand-in advice of D1 delivered after its D2 reversal: D1 lists it, D2 takes it back
    adv = bank.fin("000000", RICH, 2_500, D1, mti="0220", **{F.AUTH_CODE: "S00003"})
    bank.reverse(adv, D2)
    bank.ok(adv, D2)
    assert bank.export(D1) == [row(adv, None, 2_500, D1, "purchase", auth="S00003")]
    assert bank.export(D2) == [row(adv, None, -2_500, D2, "reversal", auth="S00003")]


# -- the file -------------------------------------------------------------------------------------


def test_sorted_by_rrn_and_reruns_are_byte_identical(bank, tmp_path):
    a, _ = bank.purchase(D1, 100)
    b, _ = bank.purchase(D1, 200)
    c, _ = bank.purchase(D2, 300)
    bank.reverse(b, D2)
    bank.void(a, D2)
    rows = bank.export(D2)
    assert [r[0] for r in rows] == sorted(r[0] for r in rows)
    out = tmp_path / "out" / f"BANKA-{D2}.csv"
    first = out.read_bytes()
    # a later date's activity changes nothing of D2
    bank.reverse(c, D3)
    bank.export(D2)
    assert out.read_bytes() == first
    assert first.startswith(b"rrn,amount,auth_code,stan,pan_masked,processing_code,business_date,kind\n")


def test_no_full_pan_in_the_export(bank):
    p, _ = bank.purchase(D1, 100)
    bank.reverse(p, D2)
    for day in (D1, D2):
        assert len(bank.export(day)) == 1
        text = (bank.dir / "out" / f"BANKA-{day}.csv").read_text()
        assert RICH not in text and mask_pan(RICH) in text


# -- the pure replay ------------------------------------------------------------------------------


def rec(id_: int, kind: str, day: str, amount: int = 100, orig: int | None = None, rc: str = RC.APPROVED,
        mti: str = "0200", rrn: str | None = None) -> Rec:
    return Rec(id_, mti, "000000", kind, "622126******0011", amount, rc, f"{id_:06d}",
               rrn or f"{id_:012d}", f"{id_:06d}", day, orig, True)


def test_replay_order_follows_when_an_orphan_reversal_took_effect():
    p = rec(2, "purchase", D1)
    r = rec(1, "reversal", D1, orig=2)          # came first, named the purchase once it came
    v = rec(3, "void", D1, orig=2)               # a void after: the purchase is reversed already
    rows = {2: p}
    got = replay(rows, [v, r])
    assert got.state == {2: "reversed"} and got.changed_by[2] is r


def test_day_rows_ignores_undos_of_later_dates():
    p = rec(1, "purchase", D1)
    r = rec(2, "reversal", D2, orig=1)
    assert day_rows(D1, [p], {1: p}, [r]) == [(p.rrn, 100, p.auth_code, p.stan, p.pan_masked, "000000",
                                                D1, "purchase")]


# -- a property: over all dates, the rows add up to what stands now -------------------------------

OPS = st.lists(st.tuples(st.sampled_from(["purchase", "refund", "void", "reverse", "reverse_void"]),
                         st.integers(0, 2), st.integers(0, 30)), min_size=1, max_size=25)


@settings(max_examples=25, deadline=None)
@given(OPS)
def test_rows_of_all_dates_sum_to_what_stands_now(tmp_path_factory, ops):
    """Whatever is reversed or voided when: per RRN, the rows of every date add up
    to the amount of what the bank's books say stands at the end (its marks)."""
    b = BankDays(tmp_path_factory.mktemp("prop"))
    try:
        days = [D1, D2, D3]
        day_i = 0
        originals: list[dict] = []
        voids: list[dict] = []
        named: dict[str, str] = {}          # a void's RRN -> its purchase's
        for op, step, pick in ops:
            day_i = min(2, day_i + (1 if step == 2 else 0))
            day = days[day_i]
            if op in ("purchase", "refund"):
                m = b.fin("000000" if op == "purchase" else "200000", RICH, 100 + pick, day)
                b.ok(m, day)
                originals.append(m)
            elif op == "void" and originals:
                o = originals[pick % len(originals)]
                if o[F.PROC] != "000000":
                    continue
                m = b.fin("020000", RICH, int(o[F.AMOUNT]), day, **{F.ORIGINAL_DATA: field90(o)})
                if b.send(m, day)[F.RESPONSE_CODE] == RC.APPROVED:
                    voids.append(m)
                    named[m[F.RRN]] = o[F.RRN]
            elif op == "reverse" and originals:
                b.reverse(originals[pick % len(originals)], day)
            elif op == "reverse_void" and voids:
                b.reverse(voids[pick % len(voids)], day)
        total: dict[str, int] = {}
        for day in days:
            for r in b.export(day):
                assert r[6] == day
                rrn = named.get(r[0], r[0])
                total[rrn] = total.get(rrn, 0) + int(r[1])
        con = sqlite3.connect(db_path(b.dir, "BANKA"))
        standing = dict(con.execute(
            "SELECT rrn, amount FROM txns WHERE kind IN ('purchase', 'refund') AND response_code = '00' "
            "AND reversed = 0 AND voided = 0"))
        con.close()
        assert {k: v for k, v in total.items() if v} == standing
    finally:
        b.close()
