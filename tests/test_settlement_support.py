"""Shared helpers for the settlement tests (no tests here): a small network
with three banks and three merchants, hand-made journal rows, a journal on
tmp_path, and an in-memory row source for the pure counting tests."""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from pathlib import Path

from cardswitch.config import Bank, BinRange, Endpoint, HsmConfig, Merchant, Network, SwitchConfig, Terminal
from cardswitch.pan import luhn_check_digit, mask_pan
from cardswitch.switch.cutover import STATE_BUSINESS_DATE
from cardswitch.switch.journal import Journal
from cardswitch.switch.records import Cancel, Kind, Status, TxnRecord

D1, D2, D3 = "2026-03-01", "2026-03-02", "2026-03-03"


def card(body: str) -> str:
    return body + luhn_check_digit(body)


# BANKA: 622126 debit, 62212800-62212899 credit; BANKB: 622848 debit, 622849 credit; BANKC: 625000 credit
A_DEBIT = card("622126000000001")
A_CREDIT = card("622128000000001")
B_DEBIT = card("622848000000001")
B_CREDIT = card("622849000000001")
C_CREDIT = card("625000000000001")

SWITCH_ID = "99900001"
M_COFFEE = "898440154110001"   # acquired by BANKA: mdr 60 bps, debit cap 2000, no floor
M_SHOP = "898440154110002"     # acquired by BANKB: mdr 80 bps, debit cap 500, min fee 5
M_ATM = "898440154110003"      # BANKB's ATMs: mdr 0


def make_network(data_dir: str | Path = "var", switch_fee: int = 10) -> Network:
    def bank(bid, inst, ic, cap, atm, bins):
        return Bank(id=bid, institution_id=inst, name=f"Bank {bid[-1]}",
                    hosts=(Endpoint("127.0.0.1", 1),), interchange_bps=ic, debit_cap=cap, atm_fee=atm,
                    bins=tuple(BinRange(lo, hi, ct) for lo, hi, ct in bins))

    banks = (
        bank("BANKA", "10000001", 35, 1300, 300, [("622126", "622126", "debit"),
                                                  ("62212800", "62212899", "credit")]),
        bank("BANKB", "10000002", 40, 900, 250, [("622848", "622848", "debit"),
                                                 ("622849", "622849", "credit")]),
        bank("BANKC", "10000003", 50, 0, 200, [("625000", "625000", "credit")]),
    )
    merchants = (
        Merchant(M_COFFEE, "BANKA", "Shanghai Coffee", mdr_bps=60, debit_cap=2000, min_fee=0,
                 terminals=(Terminal("POS00001", "pos", M_COFFEE),)),
        Merchant(M_SHOP, "BANKB", "Beijing Shop, Ltd", mdr_bps=80, debit_cap=500, min_fee=5,
                 terminals=(Terminal("POS00002", "pos", M_SHOP),)),
        Merchant(M_ATM, "BANKB", "Bank B ATMs", mcc="6011",
                 terminals=(Terminal("ATM00001", "atm", M_ATM),)),
    )
    sw = SwitchConfig(institution_id=SWITCH_ID, data_dir=str(data_dir),
                      journal=f"sqlite:///{data_dir}/journal.db", switch_fee=switch_fee)
    return Network(switch=sw, hsm=HsmConfig(), banks=banks, merchants=merchants, source="test-network")


MERCHANT_ACQUIRER = {M_COFFEE: "BANKA", M_SHOP: "BANKB", M_ATM: "BANKB"}
MERCHANT_TERMINAL = {M_COFFEE: "POS00001", M_SHOP: "POS00002", M_ATM: "ATM00001"}
ISSUER_OF = {A_DEBIT: "BANKA", A_CREDIT: "BANKA", B_DEBIT: "BANKB", B_CREDIT: "BANKB", C_CREDIT: "BANKC"}

_PROC = {Kind.PURCHASE: "000000", Kind.COMPLETION: "000000", Kind.PREAUTH: "000000",
         Kind.WITHDRAWAL: "011000", Kind.VOID: "020000", Kind.REFUND: "200000", Kind.DEPOSIT: "210000",
         Kind.BALANCE: "301000", Kind.TRANSFER: "401010", Kind.BILL_PAYMENT: "500000"}
_MTI = {Kind.PREAUTH: "0100", Kind.REVERSAL: "0400"}


class Rows:
    """Hand-made journal rows with ids, STANs and RRNs in arrival order."""

    def __init__(self, start: int = 1) -> None:
        self._ids = itertools.count(start)
        self.all: list[TxnRecord] = []

    def add(self, kind: str, amount: int = 10000, *, date: str = D1, pan: str = A_DEBIT,
            merchant: str = M_COFFEE, status: str = Status.APPROVED, to_pan: str = "",
            orig: TxnRecord | None = None, rrn: str | None = None, **kw) -> TxnRecord:
        i = next(self._ids)
        issuer = ISSUER_OF.get(pan, "")
        rec = TxnRecord(
            id=i, business_date=date, received_at=f"{date}T10:00:00.{i:06d}Z",
            mti=_MTI.get(kind, "0200"), proc=(orig.proc if orig is not None and kind == Kind.REVERSAL
                                             else _PROC.get(kind, "000000")),
            kind=kind, amount=amount if orig is None or kind != Kind.REVERSAL else orig.amount,
            currency="156", terminal_id=MERCHANT_TERMINAL[merchant], merchant_id=merchant,
            stan=f"{i:06d}", transmitted=f"{date[5:7]}{date[8:10]}10{i % 60:02d}00", batch="000001",
            pan_masked=mask_pan(pan), pan_token=f"tok-{pan[-6:]}", acquirer_id=MERCHANT_ACQUIRER[merchant],
            issuer_id=issuer, rrn=rrn if rrn is not None else f"6060{i:08d}",
            orig_id=orig.id if orig is not None else None, status=status,
            response_code="00" if status == Status.APPROVED else ("91" if status == Status.TIMEOUT else "05"),
            auth_code=f"A{i:05d}" if status == Status.APPROVED and kind != Kind.REVERSAL else "",
            issuer_stan=f"{i:06d}" if kind != Kind.REVERSAL else "",
            issuer_transmitted="0301100000" if kind != Kind.REVERSAL else "",
        )
        if to_pan:
            rec.to_pan_masked = mask_pan(to_pan)
            rec.to_pan_token = f"tok-{to_pan[-6:]}"
            rec.to_issuer_id = ISSUER_OF[to_pan]
            if rec.to_issuer_id != issuer and status == Status.APPROVED:
                rec.to_auth_code = f"T{i:05d}"
        for k, v in kw.items():
            setattr(rec, k, v)
        if orig is not None and status == Status.APPROVED:
            _mark(orig, rec, self.all)
        self.all.append(rec)
        return rec

    def undo(self, kind: str, orig: TxnRecord, date: str = D1, **kw) -> TxnRecord:
        return self.add(kind, orig.amount, date=date, pan=_pan_of(orig), merchant=orig.merchant_id,
                        orig=orig, **kw)


def _pan_of(rec: TxnRecord) -> str:
    for p in ISSUER_OF:
        if mask_pan(p) == rec.pan_masked:
            return p
    return A_DEBIT


def _mark(orig: TxnRecord, by: TxnRecord, rows: list[TxnRecord]) -> None:
    """What the switch writes on the original (the marks counting must not trust)."""
    if by.kind == Kind.VOID:
        orig.cancelled, orig.cancelled_by = Cancel.VOIDED, by.id
    elif by.kind == Kind.COMPLETION:
        orig.cancelled, orig.cancelled_by = Cancel.COMPLETED, by.id
    elif by.kind == Kind.REVERSAL and orig.cancelled == Cancel.NONE and orig.status == Status.APPROVED:
        orig.cancelled, orig.cancelled_by = Cancel.REVERSED, by.id
        if orig.kind == Kind.VOID:
            for r in rows:
                if r.id == orig.orig_id and r.cancelled == Cancel.VOIDED:
                    r.cancelled, r.cancelled_by = Cancel.NONE, None


class Day:
    """The test day: every kind on D1, a reversal and a purchase on D2."""

    def __init__(self) -> None:
        r = self.rows = Rows()
        self.p1 = r.add(Kind.PURCHASE, 12345, pan=A_DEBIT)                    # on us at BANKA
        self.p2 = r.add(Kind.PURCHASE, 1250, pan=B_CREDIT)                    # .5 rounding
        self.p3 = r.add(Kind.PURCHASE, 1_000_000, pan=B_DEBIT)                # both caps
        self.rf = r.add(Kind.REFUND, 2000, pan=C_CREDIT)
        self.p5 = r.add(Kind.PURCHASE, 100, pan=B_DEBIT, merchant=M_SHOP)     # floor, on us at BANKB
        p6 = r.add(Kind.PURCHASE, 5000, pan=A_DEBIT, merchant=M_SHOP)
        self.void6 = r.undo(Kind.VOID, p6)                                     # same day: neither counts
        self.w7 = r.add(Kind.WITHDRAWAL, 50000, pan=A_DEBIT, merchant=M_ATM)
        self.w8 = r.add(Kind.WITHDRAWAL, 20000, pan=B_DEBIT, merchant=M_ATM)  # on us
        self.d9 = r.add(Kind.DEPOSIT, 9000, pan=C_CREDIT, merchant=M_ATM)
        self.t10 = r.add(Kind.TRANSFER, 7000, pan=A_DEBIT, merchant=M_ATM, to_pan=B_CREDIT)
        self.t11 = r.add(Kind.TRANSFER, 3000, pan=A_DEBIT, merchant=M_ATM, to_pan=A_CREDIT)
        self.b12 = r.add(Kind.BILL_PAYMENT, 8400, pan=A_CREDIT, merchant=M_SHOP)
        pre = r.add(Kind.PREAUTH, 20000, pan=C_CREDIT, merchant=M_SHOP)
        self.c13 = r.add(Kind.COMPLETION, 15000, pan=C_CREDIT, merchant=M_SHOP, orig=pre)
        r.add(Kind.PURCHASE, 777, pan=A_DEBIT, status=Status.DECLINED)
        r.add(Kind.BALANCE, 0, pan=B_DEBIT, merchant=M_ATM)
        r.add(Kind.WITHDRAWAL, 1000, pan=C_CREDIT, merchant=M_ATM, status=Status.TIMEOUT)
        self.p15 = r.add(Kind.PURCHASE, 4000, pan=A_CREDIT)
        self.w7x = r.add(Kind.WITHDRAWAL, 900, pan=A_DEBIT, merchant=M_ATM)
        r.undo(Kind.REVERSAL, self.w7x)                                        # same day
        # D2
        self.rev15 = r.undo(Kind.REVERSAL, self.p15, date=D2)
        self.p16 = r.add(Kind.PURCHASE, 600, pan=B_DEBIT, merchant=M_SHOP, date=D2)


class MemoryRows:
    """``RowFetcher`` over a list of rows (what the SQLite source does, in memory)."""

    def __init__(self, rows: Iterable[TxnRecord]) -> None:
        self.rows = {r.id: r for r in rows}
        self.ranges: list[tuple[str, str]] = []     # date ranges of undo rows read

    def undo_rows_between(self, first: str, last: str) -> list[TxnRecord]:
        self.ranges.append((first, last))
        return [r for r in sorted(self.rows.values(), key=lambda r: r.id)
                if first <= r.business_date <= last and r.kind in (Kind.VOID, Kind.REVERSAL)
                and r.status == Status.APPROVED and r.orig_id is not None]

    def rows_by_ids(self, ids) -> list[TxnRecord]:
        return [self.rows[i] for i in sorted(set(ids)) if i in self.rows]

    def candidates(self, business_date: str) -> list[TxnRecord]:
        from cardswitch.settlement.counting import is_counted_kind

        return sorted((r for r in self.rows.values() if r.business_date == business_date and is_counted_kind(r)),
                      key=lambda r: (r.rrn, r.id))


def write_journal(data_dir: Path, rows: Iterable[TxnRecord], business_date: str | None = D2) -> Journal:
    """A journal at ``<data_dir>/journal.db`` holding ``rows`` (closed, returned for inspection)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    j = Journal.open(f"sqlite:///{data_dir}/journal.db", str(data_dir))
    try:
        for r in rows:
            j.insert(r)
        if business_date is not None:
            j.set_state(STATE_BUSINESS_DATE, business_date)
        j.flush()
    finally:
        j.close()
    return j
