"""Merchant fee and interchange arithmetic: half-up rounding, caps, floors, integers only."""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cardswitch.config import Merchant
from cardswitch.merchants.fees import FeePlan, bps_fee, interchange_fee, merchant_fee


@pytest.mark.parametrize("amount,bps,fee", [
    (0, 60, 0),
    (1, 5000, 1),         # 0.5 -> 1 (exact half rounds up)
    (3, 5000, 2),         # 1.5 -> 2
    (5, 1000, 1),         # 0.5 -> 1
    (4, 1000, 0),         # 0.4 -> 0
    (6, 1000, 1),         # 0.6 -> 1
    (2500, 2, 1),         # 0.5 -> 1
    (2499, 2, 0),         # 0.4998 -> 0
    (7500, 2, 2),         # 1.5 -> 2
    (12345, 60, 74),      # 74.07
    (12500, 60, 75),      # 75.0
    (10000, 35, 35),
    (1, 10000, 1),
    (999_999_999_999, 60, 6_000_000_000),  # 5999999999.994 -> 6000000000, no float error
    (10**20 + 5000, 1, 10**16 + 1),         # beyond float precision: still exact
])
def test_bps_fee_half_up(amount, bps, fee):
    assert bps_fee(amount, bps) == fee


@given(st.integers(0, 10**15), st.integers(0, 10000))
def test_bps_fee_is_exact_half_up(amount, bps):
    exact = Fraction(amount * bps, 10000)
    fee = bps_fee(amount, bps)
    assert isinstance(fee, int)
    assert fee - Fraction(1, 2) <= exact < fee + Fraction(1, 2)


@given(st.integers(1, 10**12), st.integers(0, 500), st.integers(0, 5000), st.integers(0, 500),
       st.sampled_from(["debit", "credit"]))
def test_refund_gives_back_the_purchase_fee(amount, bps, cap, floor, card_type):
    plan = FeePlan(bps, cap, floor)
    assert merchant_fee(-amount, plan, card_type) == -merchant_fee(amount, plan, card_type)


def test_floats_refused():
    with pytest.raises(TypeError):
        bps_fee(100.0, 60)
    with pytest.raises(TypeError):
        merchant_fee(100.5, FeePlan(60), "debit")


PLAN = FeePlan(mdr_bps=60, debit_cap=2000, min_fee=10)


@pytest.mark.parametrize("amount,card_type,fee", [
    (100_000, "debit", 600),        # 0.6 %
    (100_000, "credit", 600),
    (333_333, "debit", 2000),       # 1999.998 -> 2000: the cap exactly
    (500_000, "debit", 2000),       # 3000 capped
    (500_000, "credit", 3000),      # credit cards are not capped
    (1_000, "debit", 10),           # 6 -> the floor
    (1_000, "credit", 10),
    (1_750, "debit", 11),           # 10.5 -> 11, above the floor
    (1_667, "credit", 10),          # 10.002 -> 10
    (0, "debit", 10),
])
def test_merchant_fee(amount, card_type, fee):
    assert merchant_fee(amount, PLAN, card_type) == fee


def test_zero_cap_means_no_cap():
    assert merchant_fee(10**9, FeePlan(60, 0, 0), "debit") == 6_000_000


def test_cap_wins_over_a_larger_floor():
    plan = FeePlan(mdr_bps=10, debit_cap=50, min_fee=100)
    assert merchant_fee(1_000, plan, "debit") == 50
    assert merchant_fee(1_000, plan, "credit") == 100


def test_unknown_card_type_refused():
    with pytest.raises(ValueError, match="prepaid"):
        merchant_fee(100, PLAN, "prepaid")


def test_fee_plan_from_merchant():
    m = Merchant("898440154110001", "BANKA", "Shanghai Coffee", mdr_bps=60, debit_cap=2000, min_fee=3)
    assert FeePlan.from_merchant(m) == FeePlan(60, 2000, 3)


def test_interchange_fee():
    assert interchange_fee(100_000, 35, 1300, "debit") == 350
    assert interchange_fee(1_000_000, 35, 1300, "debit") == 1300
    assert interchange_fee(1_000_000, 35, 1300, "credit") == 3500
    assert interchange_fee(1_000_000, 35, 0, "debit") == 3500
    assert interchange_fee(1_000, 5, 0, "credit") == 1        # 0.5 -> 1
    assert interchange_fee(-1_000_000, 35, 1300, "debit") == -1300
