"""The merchant and terminal registry: who may send what, from where.

Everything a request needs about its terminal (the terminal, its merchant, the
acquiring bank, the field 43 text) is precomputed once per network into one
``TerminalInfo``, so identifying a terminal on each request is one dict lookup.
What each terminal kind may send (wire.md 3) and which transactions need a
particular MCC are data tables below, not code paths.
"""

from __future__ import annotations

from dataclasses import dataclass

from cardswitch.config import Bank, Merchant, Network, Terminal
from cardswitch.iso8583.constants import RC
from cardswitch.merchants.fees import FeePlan
from cardswitch.switch.records import Kind


class RegistryError(ValueError):
    """The network names something the registry cannot resolve."""


POS = "pos"
ATM = "atm"
ATM_MCC = "6011"  # financial institution, automated cash disbursement

# wire.md 3: what each terminal kind may send; anything else is 58.
ALLOWED_BY_KIND: dict[str, frozenset[str]] = {
    POS: frozenset({
        Kind.PREAUTH, Kind.PURCHASE, Kind.COMPLETION, Kind.VOID, Kind.REFUND,
        Kind.BALANCE, Kind.TRANSFER, Kind.BILL_PAYMENT, Kind.REVERSAL, Kind.BATCH_CLOSE,
    }),
    ATM: frozenset({
        Kind.WITHDRAWAL, Kind.DEPOSIT, Kind.BALANCE, Kind.TRANSFER, Kind.BILL_PAYMENT,
        Kind.REVERSAL, Kind.BATCH_CLOSE,
    }),
}

# Housekeeping every terminal may send whatever its kind.
ALWAYS_ALLOWED: frozenset[str] = frozenset({Kind.BATCH_UPLOAD, Kind.NETWORK})

# Transactions allowed only at merchants of these MCCs; others are 12.
MCC_RESTRICTED: dict[str, frozenset[str]] = {
    Kind.WITHDRAWAL: frozenset({ATM_MCC}),
    Kind.DEPOSIT: frozenset({ATM_MCC}),
}


def allowed(kind: str, txn: str) -> bool:
    """May a terminal of ``kind`` (pos|atm) send ``txn`` (a records.Kind)?"""
    return txn in ALWAYS_ALLOWED or txn in ALLOWED_BY_KIND.get(kind, ())


def mcc_allows(mcc: str, txn: str) -> bool:
    """Does the merchant category permit ``txn``?"""
    only = MCC_RESTRICTED.get(txn)
    return only is None or mcc in only


def acceptor_name_location(merchant: Merchant) -> str:
    """Field 43 (40 characters): name (25) + city (13) + country (2, blank: the
    network file has no country). Printable ASCII only, as the field is."""
    return _ascii(merchant.name, 25) + _ascii(merchant.city, 13) + "  "


def _ascii(text: str, width: int) -> str:
    clean = "".join(ch if " " <= ch <= "~" else "?" for ch in text)
    return clean[:width].ljust(width)


@dataclass(slots=True, frozen=True)
class TerminalInfo:
    """A terminal with everything about it a request needs."""

    terminal: Terminal
    merchant: Merchant
    acquirer: Bank
    fee_plan: FeePlan
    acceptor: str                   # field 43, 40 characters

    @property
    def terminal_id(self) -> str:
        return self.terminal.id

    @property
    def merchant_id(self) -> str:
        return self.merchant.id

    @property
    def kind(self) -> str:
        return self.terminal.kind

    @property
    def mcc(self) -> str:
        return self.merchant.mcc

    @property
    def usable(self) -> bool:
        return self.terminal.enabled and self.merchant.enabled

    def allows(self, txn: str) -> bool:
        return allowed(self.terminal.kind, txn)


def check_transaction(info: TerminalInfo, txn: str, mcc: str | None = None) -> str:
    """``00`` when this terminal may send ``txn``; ``58`` when its kind may not;
    ``12`` when its kind may but the MCC (the merchant's, unless ``mcc`` is
    given) may not."""
    if not allowed(info.terminal.kind, txn):
        return RC.NOT_PERMITTED_TERMINAL
    if not mcc_allows(info.merchant.mcc if mcc is None else mcc, txn):
        return RC.INVALID_TRANSACTION
    return RC.APPROVED


class Registry:
    """Terminals and merchants of one network, immutable once built."""

    __slots__ = ("_terminals", "_merchants")

    def __init__(self, terminals: dict[str, TerminalInfo], merchants: dict[str, Merchant]) -> None:
        self._terminals = terminals
        self._merchants = merchants

    @classmethod
    def from_network(cls, network: Network) -> Registry:
        banks = {b.id: b for b in network.banks}
        terminals: dict[str, TerminalInfo] = {}
        merchants: dict[str, Merchant] = {}
        for m in network.merchants:
            if m.id in merchants:
                raise RegistryError(f"duplicate merchant id {m.id!r}")
            acquirer = banks.get(m.acquirer)
            if acquirer is None:
                raise RegistryError(f"merchant {m.id!r}: acquirer {m.acquirer!r} is not a bank of the network")
            merchants[m.id] = m
            plan = FeePlan.from_merchant(m)
            acceptor = acceptor_name_location(m)
            for t in m.terminals:
                if t.id in terminals:
                    raise RegistryError(
                        f"duplicate terminal id {t.id!r} (merchants "
                        f"{terminals[t.id].merchant.id!r} and {m.id!r})"
                    )
                terminals[t.id] = TerminalInfo(t, m, acquirer, plan, acceptor)
        return cls(terminals, merchants)

    def terminal(self, tid: str) -> TerminalInfo | None:
        """The terminal by field 41 (trailing pad spaces ignored), or None."""
        info = self._terminals.get(tid)
        if info is None and tid and tid.endswith(" "):
            info = self._terminals.get(tid.rstrip(" "))
        return info

    def merchant(self, mid: str) -> Merchant | None:
        """The merchant by field 42 (trailing pad spaces ignored), or None."""
        m = self._merchants.get(mid)
        if m is None and mid and mid.endswith(" "):
            m = self._merchants.get(mid.rstrip(" "))
        return m

    def check_terminal(self, tid: str, mid: str) -> tuple[TerminalInfo | None, str]:
        """Identify the terminal of a request: (info, ``00``) or (info|None, ``03``).

        ``03`` (invalid merchant): unknown TID, TID not of that MID, disabled
        terminal, unknown or disabled MID. The info is returned whenever the
        TID is known, even with ``03``, so the response can still carry the
        terminal's MAC.
        """
        info = self.terminal(tid or "")
        if info is None:
            return None, RC.INVALID_MERCHANT
        m = info.merchant
        if mid != m.id and (mid or "").rstrip(" ") != m.id:
            return info, RC.INVALID_MERCHANT
        if not m.enabled or not info.terminal.enabled:
            return info, RC.INVALID_MERCHANT
        return info, RC.APPROVED

    def terminals(self) -> list[TerminalInfo]:
        return list(self._terminals.values())

    def __len__(self) -> int:
        return len(self._terminals)

    def __contains__(self, tid: object) -> bool:
        return isinstance(tid, str) and self.terminal(tid) is not None
