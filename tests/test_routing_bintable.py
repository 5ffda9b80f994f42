"""BIN table: longest match, priority, ambiguity refused, agrees with a brute-force oracle."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cardswitch.config import Bank, BinRange, Endpoint, HsmConfig, Network, SwitchConfig
from cardswitch.routing.bintable import BinTable, BinTableError, Route


def rng(text: str, card_type: str = "debit", priority: int = 0, line: int = 0) -> BinRange:
    low, _, high = text.partition("-")
    return BinRange(low, high or low, card_type, priority, line)


def table(*entries: tuple[str, str] | tuple[str, str, int]) -> BinTable:
    pairs = []
    for e in entries:
        bank, text, *prio = e
        pairs.append((bank, rng(text, priority=prio[0] if prio else 0)))
    return BinTable.from_entries(pairs)


def bank_of(t: BinTable, pan: str) -> str | None:
    r = t.lookup(pan)
    return r.bank_id if r else None


# -- rules ---------------------------------------------------------------------


def test_prefix_matches_pans_starting_with_it():
    t = table(("A", "622126"))
    assert bank_of(t, "6221260000000017") == "A"
    assert bank_of(t, "6221270000000016") is None
    assert bank_of(t, "6221250000000019") is None


def test_range_matches_inclusive_bounds_only():
    t = table(("A", "62212600-62212699"))
    assert bank_of(t, "6221260000000017") == "A"   # 62212600: low bound
    assert bank_of(t, "6221269900000000") == "A"   # 62212699: high bound
    assert bank_of(t, "6221270000000016") is None  # 62212700: just above
    assert bank_of(t, "6221259900000000") is None  # 62212599: just below


def test_route_carries_the_winning_entry():
    t = BinTable.from_entries([("A", BinRange("40000000", "40009999", "credit", 3))])
    assert t.lookup("4000123412341234") == Route("A", "credit", "40000000", "40009999", 3)


def test_longest_match_wins_over_priority():
    t = table(("SHORT", "4", 99), ("LONG", "411111", 0), ("MID", "4111", 50))
    assert bank_of(t, "4111111111111111") == "LONG"
    assert bank_of(t, "4111221111111111") == "MID"
    assert bank_of(t, "4999999999999999") == "SHORT"


def test_higher_priority_wins_among_equally_long_matches():
    t = table(("WIDE", "40000000-49999999", 1), ("NARROW", "41000000-41999999", 2),
              ("LOWP", "45000000-45999999", 0))
    assert bank_of(t, "4100000000000000") == "NARROW"
    assert bank_of(t, "4200000000000000") == "WIDE"
    # a lower-priority entry nested inside a higher one never wins
    assert bank_of(t, "4500000000000000") == "WIDE"
    assert bank_of(t, "4999999900000000") == "WIDE"


def test_nested_higher_priority_splits_the_outer_range():
    t = table(("OUT", "100-199", 0), ("IN", "150-150", 1))
    assert [bank_of(t, p + "0000000000000") for p in ("149", "150", "151", "199")] == \
        ["OUT", "IN", "OUT", "OUT"]
    assert t.lookup("1510000000000000").low == "100"   # the outer entry, not a segment


def test_pan_shorter_than_entry_does_not_match():
    t = table(("A", "622126"), ("B", "62"))
    assert bank_of(t, "62212") == "B"
    assert bank_of(t, "6") is None
    assert bank_of(t, "") is None


@pytest.mark.parametrize("pan", ["62212600000000a7", "６２２１２６0000000017", "622126 000000017", "-622126"])
def test_non_digit_pan_never_matches(pan):
    t = table(("A", "6"), ("B", "622126"))
    assert t.lookup(pan) is None


def test_adjacent_ranges_same_priority_are_fine():
    t = table(("A", "400-449"), ("B", "450-499"), ("C", "500"))
    assert bank_of(t, "4490") == "A"
    assert bank_of(t, "4500") == "B"
    assert bank_of(t, "5000") == "C"
    assert len(t) == 3


def test_equal_length_equal_priority_overlap_refused_naming_both():
    pairs = [("BANKA", rng("62212600-62212699", line=12)), ("BANKB", rng("62212650-62212659", line=40))]
    with pytest.raises(BinTableError) as e:
        BinTable.from_entries(pairs)
    msg = str(e.value)
    assert "62212600-62212699" in msg and "BANKA" in msg and "line 12" in msg
    assert "62212650-62212659" in msg and "BANKB" in msg and "line 40" in msg


def test_same_prefix_twice_refused_even_in_one_bank():
    with pytest.raises(BinTableError, match="622126 .*622126 "):
        table(("A", "622126"), ("A", "622126"))


def test_overlap_found_past_a_long_range():
    # an entry of another priority in between does not hide the conflict
    with pytest.raises(BinTableError, match="100-900 .*800-850 "):
        table(("A", "100-900"), ("B", "200-300", 1), ("C", "800-850"))


def test_equal_priority_different_lengths_is_not_a_conflict():
    t = table(("A", "622126"), ("B", "62212600-62212649"))
    assert bank_of(t, "6221260000000017") == "B"
    assert bank_of(t, "6221265000000017") == "A"


@pytest.mark.parametrize("bad", [
    BinRange("62a126", "62a126"),
    BinRange("622126", "62212"),
    BinRange("622199", "622100"),
    BinRange("", ""),
    BinRange("1" * 20, "1" * 20),
])
def test_malformed_entries_refused(bad):
    with pytest.raises(BinTableError, match="BANKX"):
        BinTable.from_entries([("BANKX", bad)])


def test_empty_table():
    t = BinTable.from_entries([])
    assert t.lookup("4111111111111111") is None
    assert len(t) == 0


def test_from_network():
    def bank(bid, *bins):
        return Bank(bid, bid + "01", bid, (Endpoint("127.0.0.1", 9100),), bins=bins)

    net = Network(SwitchConfig(), HsmConfig(),
                  (bank("BANKA", rng("622126")), bank("BANKB", rng("622126000-622126499", "credit"), rng("4"))),
                  ())
    t = BinTable.from_network(net)
    assert t.lookup("6221260000000017") == Route("BANKB", "credit", "622126000", "622126499", 0)
    assert bank_of(t, "6221265000000017") == "BANKA"
    assert bank_of(t, "4111111111111111") == "BANKB"
    assert len(t) == 3


# -- property: agrees with a brute-force oracle -------------------------------


def oracle(entries: list[tuple[str, BinRange]], pan: str) -> Route | None:
    best = None
    if not pan.isdigit():
        return None
    for bank, r in entries:
        n = len(r.low)
        if len(pan) >= n and int(r.low) <= int(pan[:n]) <= int(r.high):
            key = (n, r.priority)
            if best is None or key > best[0]:
                best = (key, Route(bank, r.card_type, r.low, r.high, r.priority))
    return best[1] if best else None


def ambiguous(entries: list[tuple[str, BinRange]]) -> bool:
    for i, (_, a) in enumerate(entries):
        for _, b in entries[:i]:
            if (len(a.low) == len(b.low) and a.priority == b.priority
                    and int(a.low) <= int(b.high) and int(b.low) <= int(a.high)):
                return True
    return False


@st.composite
def bin_entry(draw):
    n = draw(st.integers(1, 4))
    a = draw(st.integers(0, 10**n - 1))
    # mostly narrow ranges so that tables mix prefixes, ranges and nesting
    b = draw(st.one_of(st.just(a), st.integers(a, min(10**n - 1, a + 10 ** (n - 1))), st.integers(a, 10**n - 1)))
    return (draw(st.sampled_from("ABCD")),
            BinRange(str(a).zfill(n), str(b).zfill(n), draw(st.sampled_from(["debit", "credit"])),
                     draw(st.integers(0, 3))))


@st.composite
def valid_table(draw):
    kept: list[tuple[str, BinRange]] = []
    for e in draw(st.lists(bin_entry(), max_size=30)):
        if not ambiguous(kept + [e]):
            kept.append(e)
    return kept


@st.composite
def pans_near(draw, entries):
    """PANs at and just around every entry's bounds, plus random ones."""
    pans = draw(st.lists(st.text("0123456789", max_size=6), max_size=20))
    for _, r in entries:
        n = len(r.low)
        for v in (int(r.low) - 1, int(r.low), int(r.high), int(r.high) + 1):
            if 0 <= v < 10**n:
                pans.append(str(v).zfill(n) + draw(st.text("0123456789", max_size=3)))
    return pans


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_lookup_agrees_with_oracle(data):
    entries = data.draw(valid_table())
    t = BinTable.from_entries(entries)
    for pan in data.draw(pans_near(entries)):
        assert t.lookup(pan) == oracle(entries, pan), pan


@settings(max_examples=300, deadline=None)
@given(st.lists(bin_entry(), max_size=12))
def test_refused_exactly_when_ambiguous(entries):
    if ambiguous(entries):
        with pytest.raises(BinTableError):
            BinTable.from_entries(entries)
    else:
        BinTable.from_entries(entries)


@settings(max_examples=50, deadline=None)
@given(st.data())
def test_segments_are_disjoint_and_sorted(data):
    entries = data.draw(valid_table())
    t = BinTable.from_entries(entries)
    for level in t._levels:
        assert all(0 <= x < 10**level.length for x in level.lows + level.highs)
        for i in range(len(level.lows)):
            assert level.lows[i] <= level.highs[i]
            if i:
                assert level.highs[i - 1] < level.lows[i]


def test_sweep_merges_stretches_of_one_winner():
    t = table(("A", "100-199", 2), ("B", "120-129", 1), ("C", "150-159", 0))
    assert t.segments == 1
    assert {bank_of(t, p) for p in ("100", "125", "155", "199")} == {"A"}
    t = table(("A", "100-199", 0), ("B", "120-129", 1), ("C", "125-159", 2))
    assert [bank_of(t, p) for p in ("119", "120", "124", "125", "159", "160")] == ["A", "B", "B", "C", "C", "A"]
    assert t.segments == 4


def test_build_restores_the_garbage_collector_state():
    import gc

    assert gc.isenabled()
    table(("A", "4"))
    assert gc.isenabled()
    with pytest.raises(BinTableError):
        table(("A", "4"), ("B", "4"))
    assert gc.isenabled()
    gc.disable()
    try:
        table(("A", "4"))
        assert not gc.isenabled()
    finally:
        gc.enable()
