"""Fees, merchant settlement and interbank positions of counted entries (pure).

Each ``Entry`` (see counting.py) is priced on its own (fees rounded half-up
per transaction by ``cardswitch.merchants.fees``) and turned into money
flows between participants; the books below only add those up, so totals
are sums of per-transaction figures and every flow lands once as someone's
receivable and once as someone else's payable (the nets of a currency sum
to zero by construction).

Flows of one counted transaction (A = the merchant's acquirer, which is the
terminal's; I = the card's issuer; I2 = a transfer's receiving issuer; S =
the switch), nothing between a bank and itself:

    purchase, completion, bill payment   I -> A amount;  A -> I interchange
    withdrawal                           I -> A amount + atm_fee
    refund, deposit                      A -> I amount
    transfer                             I -> I2 amount
    every counted transaction            A -> S switch_fee, I -> S switch_fee (once when A == I)

An entry with sign -1 (a transaction taken back on a later date) moves the
same amounts the other way.
"""

from __future__ import annotations

import hashlib
import json
from typing import NamedTuple

from cardswitch.config import Bank, Merchant, Network
from cardswitch.merchants.fees import CREDIT, DEBIT, FeePlan, interchange_fee, merchant_fee
from cardswitch.routing.bintable import BinTable
from cardswitch.settlement.counting import SALE_KINDS, Entry
from cardswitch.switch.records import Kind, TxnRecord

ZERO_PLAN = FeePlan()


class FeeBook:
    """The network's fee parameters and card types, looked up per entry."""

    def __init__(self, network: Network) -> None:
        self.network = network
        self.switch_id = network.switch.institution_id
        self.switch_fee = network.switch.switch_fee
        self.banks: dict[str, Bank] = {b.id: b for b in network.banks}
        self.merchants: dict[str, Merchant] = {m.id: m for m in network.merchants}
        self.plans: dict[str, FeePlan] = {m.id: FeePlan.from_merchant(m) for m in network.merchants}
        self.bins = BinTable.from_network(network)
        self._card_types: dict[tuple[str, int, str], str] = {}
        self.unknown: set[str] = set()      # merchants/banks named by rows but not in the network

    # -- card type -------------------------------------------------------------

    def card_type(self, rec: TxnRecord) -> str:
        """Debit or credit, from the BIN table.

        The journal keeps the PAN masked (first 6, last 4), so the range is
        looked up with the middle digits as zeros: exact for every range of
        up to 6 digits and for longer ranges that cover the whole 6-digit
        prefix. When the entry found belongs to another bank than the row's
        issuer, the issuer's own card type is used if all its ranges agree,
        else ``credit`` (no debit cap). See docs/settlement.md.
        """
        pm = rec.pan_masked
        key = (pm[:6], len(pm), rec.issuer_id)
        ct = self._card_types.get(key)
        if ct is None:
            ct = self._resolve_card_type(pm, rec.issuer_id)
            self._card_types[key] = ct
        return ct

    def _resolve_card_type(self, pan_masked: str, issuer_id: str) -> str:
        prefix = pan_masked[:6]
        if prefix.isdigit():
            route = self.bins.lookup(prefix + "0" * max(0, len(pan_masked) - 6))
            if route is not None and (not issuer_id or route.bank_id == issuer_id):
                return route.card_type
        bank = self.banks.get(issuer_id)
        types = {r.card_type for r in bank.bins} if bank is not None else set()
        if len(types) == 1:
            return types.pop()
        return CREDIT

    # -- parameters ------------------------------------------------------------

    def plan(self, merchant_id: str) -> FeePlan:
        plan = self.plans.get(merchant_id)
        if plan is None:
            self.unknown.add(f"merchant {merchant_id}")
            return ZERO_PLAN
        return plan

    def bank(self, bank_id: str) -> Bank | None:
        bank = self.banks.get(bank_id)
        if bank is None and bank_id:
            self.unknown.add(f"bank {bank_id}")
        return bank

    def acquirer(self, rec: TxnRecord) -> str:
        """The bank acquiring the row's merchant: as journaled, else per the network."""
        if rec.acquirer_id:
            return rec.acquirer_id
        m = self.merchants.get(rec.merchant_id)
        return m.acquirer if m is not None else ""

    def merchant_name(self, merchant_id: str) -> str:
        m = self.merchants.get(merchant_id)
        return m.name if m is not None else ""

    def parameters(self) -> dict:
        """Everything settlement reads from the network, canonical (for the fingerprint)."""
        return {
            "switch": {"institution_id": self.switch_id, "switch_fee": self.switch_fee},
            "banks": [{"id": b.id, "interchange_bps": b.interchange_bps, "debit_cap": b.debit_cap,
                       "atm_fee": b.atm_fee,
                       "bins": [[r.low, r.high, r.card_type, r.priority] for r in b.bins]}
                      for b in sorted(self.network.banks, key=lambda b: b.id)],
            "merchants": [{"id": m.id, "name": m.name, "acquirer": m.acquirer, "mdr_bps": m.mdr_bps,
                           "debit_cap": m.debit_cap, "min_fee": m.min_fee}
                          for m in sorted(self.network.merchants, key=lambda m: m.id)],
        }

    def parameters_digest(self) -> str:
        text = json.dumps(self.parameters(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


# -- pricing one entry -----------------------------------------------------------


class Priced(NamedTuple):
    """What one entry moves, signed by the entry (a taken-back entry is negative)."""

    acquirer: str
    issuer: str
    receiver: str            # transfers: the receiving card's issuer; else ""
    card_type: str
    merchant_fee: int        # merchant -> acquirer; negative for a refund (given back)
    interchange: int         # acquirer -> issuer
    atm_fee: int             # issuer -> acquirer
    switch_fee_acquirer: int
    switch_fee_issuer: int   # 0 when the acquirer is the issuer (charged once)


def price(e: Entry, book: FeeBook) -> Priced:
    o = e.orig
    s = e.sign
    kind = o.kind
    acq = o.acquirer_id or book.acquirer(o)
    iss = o.issuer_id
    on_us = acq == iss
    mfee = ic = atm = 0
    card_type = DEBIT
    if kind in SALE_KINDS or kind == Kind.REFUND:
        card_type = book.card_type(o)
        mfee = merchant_fee(o.amount, book.plan(o.merchant_id), card_type)
        if kind == Kind.REFUND:
            mfee = -mfee
        elif not on_us:
            bank = book.bank(iss)
            if bank is not None:
                ic = interchange_fee(o.amount, bank.interchange_bps, bank.debit_cap, card_type)
    elif kind == Kind.WITHDRAWAL and not on_us:
        bank = book.bank(iss)
        if bank is not None:
            atm = bank.atm_fee
    fee = book.switch_fee
    receiver = (o.to_issuer_id or iss) if kind == Kind.TRANSFER else ""
    return Priced(acq, iss, receiver, card_type, s * mfee, s * ic, s * atm,
                  s * fee if acq else 0, s * fee if iss and not on_us else 0)


class Flow(NamedTuple):
    payer: str
    payee: str
    currency: str
    amount: int              # > 0


def flow_list(kind: str, currency: str, acquirer: str, issuer: str, receiver: str, amount: int,
              interchange: int, atm_fee: int, switch_fee_acquirer: int, switch_fee_issuer: int,
              switch_id: str) -> list[Flow]:
    """The flows of one entry, or of a sum of entries of one kind, sign and set of
    participants (every figure is linear in them). Signed figures; a negative
    one flows the other way."""
    a, i = acquirer, issuer
    raw: list[tuple[str, str, int]]
    if kind in SALE_KINDS:
        raw = [(i, a, amount), (a, i, interchange)]
    elif kind == Kind.WITHDRAWAL:
        raw = [(i, a, amount + atm_fee)]
    elif kind in (Kind.REFUND, Kind.DEPOSIT):
        raw = [(a, i, amount)]
    elif kind == Kind.TRANSFER:
        raw = [(i, receiver, amount)]
    else:
        raw = []
    raw += [(a, switch_id, switch_fee_acquirer), (i, switch_id, switch_fee_issuer)]
    out = []
    for payer, payee, amt in raw:
        if not amt or payer == payee or not payer or not payee:
            continue
        if amt < 0:
            payer, payee, amt = payee, payer, -amt
        out.append(Flow(payer, payee, currency, amt))
    return out


def flows(e: Entry, p: Priced, switch_id: str) -> list[Flow]:
    """The money one entry moves between participants (see the module docstring)."""
    o = e.orig
    return flow_list(o.kind, o.currency, p.acquirer, p.issuer, p.receiver, e.sign * o.amount,
                     p.interchange, p.atm_fee, p.switch_fee_acquirer, p.switch_fee_issuer, switch_id)


def participants(e: Entry, p: Priced, switch_id: str) -> list[str]:
    """Who takes part in the entry (listed in the positions even when it nets to zero)."""
    out = [x for x in (p.acquirer, p.issuer, p.receiver) if x]
    if p.switch_fee_acquirer or p.switch_fee_issuer:
        out.append(switch_id)
    return out


# -- books -------------------------------------------------------------------------------

MERCHANT_COLUMNS = ("merchant_id", "merchant_name", "currency", "purchase_count", "purchase_amount",
                    "refund_count", "refund_amount", "fee_amount", "net_amount")
POSITION_COLUMNS = ("participant_id", "currency", "receivable", "payable", "net")


class MerchantBook:
    """Per merchant and currency: [purchase_count, purchase_amount, refund_count,
    refund_amount, fee_amount]. A taken-back sale lowers the purchase count
    and amount (and the fee) of the date it is taken back on; a taken-back
    refund lowers the refund count and amount and takes back the fee it gave."""

    def __init__(self) -> None:
        self.totals: dict[tuple[str, str], list[int]] = {}

    def add(self, e: Entry, p: Priced) -> None:
        o = e.orig
        if o.kind in SALE_KINDS:
            slot, n = 0, e.sign
        elif o.kind == Kind.REFUND:
            slot, n = 2, e.sign
        else:
            return
        t = self.totals.get((o.merchant_id, o.currency))
        if t is None:
            t = self.totals[(o.merchant_id, o.currency)] = [0, 0, 0, 0, 0]
        t[slot] += n
        t[slot + 1] += e.sign * o.amount
        t[4] += p.merchant_fee

    def rows(self, names: dict[str, str] | None = None, book: FeeBook | None = None) -> list[tuple]:
        out = []
        for (mid, cur) in sorted(self.totals):
            pc, pa, rc, ra, fee = self.totals[(mid, cur)]
            name = book.merchant_name(mid) if book is not None else (names or {}).get(mid, "")
            out.append((mid, name, cur, pc, pa, rc, ra, fee, pa - ra - fee))
        return out


class PositionBook:
    """Per participant and currency: receivable and payable.

    Entries are summed per (kind, sign, participants, currency) as they come
    and turned into flows once at the end (``flow_list`` is linear, and the
    sign is part of the key, so gross receivables and payables are the same
    as flow by flow).
    """

    def __init__(self, switch_id: str) -> None:
        self.switch_id = switch_id
        self._sums: dict[tuple, list[int]] = {}

    def add(self, e: Entry, p: Priced) -> None:
        o = e.orig
        key = (o.kind, e.sign, p.acquirer, p.issuer, p.receiver, o.currency)
        t = self._sums.get(key)
        if t is None:
            t = self._sums[key] = [0, 0, 0, 0, 0]
        t[0] += e.sign * o.amount
        t[1] += p.interchange
        t[2] += p.atm_fee
        t[3] += p.switch_fee_acquirer
        t[4] += p.switch_fee_issuer

    def totals(self) -> dict[tuple[str, str], list[int]]:
        out: dict[tuple[str, str], list[int]] = {}

        def touch(who: str, cur: str) -> list[int]:
            t = out.get((who, cur))
            if t is None:
                t = out[(who, cur)] = [0, 0]
            return t

        for (kind, _, acq, iss, recv, cur), (amount, ic, atm, sfa, sfi) in self._sums.items():
            for who in (acq, iss, recv):
                if who:
                    touch(who, cur)
            if sfa or sfi:
                touch(self.switch_id, cur)
            for f in flow_list(kind, cur, acq, iss, recv, amount, ic, atm, sfa, sfi, self.switch_id):
                touch(f.payee, cur)[0] += f.amount
                touch(f.payer, cur)[1] += f.amount
        return out

    def rows(self) -> list[tuple[str, str, int, int, int]]:
        return [(pid, cur, r, p, r - p) for (pid, cur), (r, p) in sorted(self.totals().items())]


def book_entry(e: Entry, book: FeeBook, merchants: MerchantBook, positions: PositionBook) -> Priced:
    """Price one entry and add it to both books."""
    p = price(e, book)
    merchants.add(e, p)
    positions.add(e, p)
    return p
