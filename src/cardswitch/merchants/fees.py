"""Fee arithmetic (settlement.md 3): integers of minor units only, never floats.

Each transaction's fee is rounded half-up to the minor unit on its own; totals
are sums of those. A refund gives back the fee its amount would carry as a
purchase: pass the refund's amount and negate, or pass a negative amount
(rounding is symmetric, so ``fee(-a) == -fee(a)``).
"""

from __future__ import annotations

from dataclasses import dataclass

from cardswitch.config import Merchant

DEBIT = "debit"
CREDIT = "credit"
CARD_TYPES = (DEBIT, CREDIT)


@dataclass(slots=True, frozen=True)
class FeePlan:
    """A merchant's fee plan: discount rate, cap for debit cards, floor."""

    mdr_bps: int = 0        # basis points of the amount
    debit_cap: int = 0      # largest fee for one debit-card transaction, 0 = no cap
    min_fee: int = 0        # smallest fee for one transaction

    @classmethod
    def from_merchant(cls, merchant: Merchant) -> FeePlan:
        return cls(merchant.mdr_bps, merchant.debit_cap, merchant.min_fee)


def bps_fee(amount: int, bps: int) -> int:
    """``amount * bps / 10000`` rounded half-up (half away from zero for negatives)."""
    if not isinstance(amount, int) or not isinstance(bps, int):
        raise TypeError("fees are computed on int minor units and int basis points only")
    if amount < 0:
        return -bps_fee(-amount, bps)
    return (amount * bps * 2 + 10000) // 20000


def _capped(fee: int, cap: int, card_type: str) -> int:
    if card_type not in CARD_TYPES:
        raise ValueError(f"card type {card_type!r} is not debit or credit")
    if card_type == DEBIT and cap > 0 and fee > cap:
        return cap
    return fee


def merchant_fee(amount: int, plan: FeePlan, card_type: str) -> int:
    """The merchant discount on one transaction of ``amount`` minor units.

    ``mdr_bps`` of the amount, rounded half-up; at least ``min_fee``; for debit
    cards at most ``debit_cap`` (when non-zero). The cap is applied last: it is
    the largest fee a debit card may carry, even under a larger floor.
    """
    if amount < 0:
        return -merchant_fee(-amount, plan, card_type)
    fee = bps_fee(amount, plan.mdr_bps)
    if fee < plan.min_fee:
        fee = plan.min_fee
    return _capped(fee, plan.debit_cap, card_type)


def interchange_fee(amount: int, interchange_bps: int, debit_cap: int, card_type: str) -> int:
    """Interchange on one purchase: the issuer's ``interchange_bps`` of the
    amount, rounded half-up, capped at its ``debit_cap`` for debit cards."""
    if amount < 0:
        return -interchange_fee(-amount, interchange_bps, debit_cap, card_type)
    return _capped(bps_fee(amount, interchange_bps), debit_cap, card_type)
