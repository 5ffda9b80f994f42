"""The network file: the default network, every refusal (key and line named),
round trips and free ports."""

from __future__ import annotations

import dataclasses
import re
import socket

import pytest

from cardswitch.config import (
    Bank,
    BinRange,
    Card,
    Endpoint,
    Key,
    LinkOptions,
    Merchant,
    Network,
    StandIn,
    Terminal,
)
from cardswitch.netfile import (
    DEFAULT_SOURCE,
    NetworkFileError,
    describe,
    dump_network,
    free_ports,
    load_network,
    parse_network,
    with_ports,
)
from cardswitch.pan import luhn_ok

SRC = "net.toml"

# A small network in the style of operations.md section 1. Tests change one
# thing at a time and check the message names the right key and line.
BASE = """\
[switch]
institution_id = "99900001"
listen = "127.0.0.1:8583"
admin = "127.0.0.1:8580"
data_dir = "var"
issuer_timeout_ms = 3000
cutover = "23:00"
timezone = "Asia/Shanghai"
mode = "test"
switch_fee = 10

[hsm]
listen = "127.0.0.1:1500"
simulate = true

[[banks]]
id = "BANKA"
institution_id = "10000001"
name = "Bank A"
host = "127.0.0.1:9101"
simulate = true
zpk = "clear:0123456789ABCDEFFEDCBA9876543210"
zak = "clear:89ABCDEF0123456776543210FEDCBA98"
interchange_bps = 35
debit_cap = 1300
atm_fee = 300
stand_in = { max_amount = 0 }
  [[banks.bins]]
  range = "622126"
  card_type = "debit"
  [[banks.bins]]
  range = "62212800-62212899"
  card_type = "credit"
  [[banks.cards]]
  pan = "6221260000000018"
  expiry = "2812"
  pin = "1234"
  balance = 1000000
  currency = "156"
  status = "active"
  daily_withdrawal_limit = 500000
  delay_ms = 0
  [[banks.cards]]
  pan = "6221280000000016"
  expiry = "2812"
  pin = "1234"
  balance = 5000

[[banks]]
id = "BANKB"
institution_id = "10000002"
name = "Bank B"
host = "127.0.0.1:9102"
zpk = "clear:E0B5974020E6F283E64F97B08C13E0E0"
  [[banks.bins]]
  range = "622848"
  [[banks.cards]]
  pan = "6228480000000015"
  expiry = "3012"
  pin = "4321"
  balance = 700

[[merchants]]
id = "898440154110001"
acquirer = "BANKA"
name = "Shanghai Coffee"
city = "Shanghai"
mcc = "5812"
mdr_bps = 60
debit_cap = 2000
min_fee = 0
  [[merchants.terminals]]
  id = "POS00001"
  kind = "pos"
  tmk = "clear:434F3416452338A2D9985767F10D6BA2"
  tpk = "clear:F84A25A2491A40516EC40410343B619B"
  tak = "clear:6B79AE8932EF5116DC6DECCE3B89AB3E"

[[merchants]]
id = "898110060110001"
acquirer = "BANKB"
name = "Bank B ATMs"
mcc = "6011"
  [[merchants.terminals]]
  id = "ATM00011"
  kind = "atm"
  tpk = "clear:3D8A544C2FF2ECCD73E6C2AEF85E643B"
"""

# every PAN that appears in BASE: no error message may contain one in full
BASE_PANS = re.findall(r'pan = "(\d+)"', BASE)


def line_of(text: str, needle: str, nth: int = 0) -> int:
    """1-based line of the nth line containing needle."""
    hits = [i + 1 for i, ln in enumerate(text.splitlines()) if needle in ln]
    assert len(hits) > nth, f"{needle!r} not in text"
    return hits[nth]


def sub(text: str, old: str, new: str, nth: int = 0) -> str:
    """Replace the nth occurrence of old."""
    parts = text.split(old)
    assert len(parts) > nth + 1, f"{old!r} occurs {len(parts) - 1} times"
    return old.join(parts[: nth + 1]) + new + old.join(parts[nth + 1:])


def refused(text: str) -> str:
    with pytest.raises(NetworkFileError) as ei:
        parse_network(text, SRC)
    msg = str(ei.value)
    assert "\n" not in msg
    for pan in BASE_PANS:
        assert pan not in msg, "a full PAN in an error message"
    return msg


def expect(text: str, line: int, key: str, *words: str) -> str:
    msg = refused(text)
    assert msg.startswith(f"{SRC}:{line}: {key}: "), msg
    for w in words:
        assert w in msg, (w, msg)
    return msg


# ---------------------------------------------------------------------------
# the base and the default network


def test_base_parses_into_the_model():
    n = parse_network(BASE, SRC)
    assert n.source == SRC
    assert n.switch.institution_id == "99900001"
    assert n.switch.listen == Endpoint("127.0.0.1", 8583)
    assert n.switch.journal == "sqlite:///var/journal.db"  # derived from data_dir
    assert n.switch.timezone == "Asia/Shanghai"
    assert [b.id for b in n.banks] == ["BANKA", "BANKB"]
    a = n.bank("BANKA")
    assert a.hosts == (Endpoint("127.0.0.1", 9101),)
    assert a.zpk == Key("clear:0123456789ABCDEFFEDCBA9876543210")
    assert a.stand_in == StandIn(max_amount=0)
    assert a.bins[0] == BinRange("622126", "622126", "debit", 0)
    assert a.bins[0].line == line_of(BASE, 'range = "622126"')
    assert a.bins[1] == BinRange("62212800", "62212899", "credit", 0)
    assert a.bins[1].line == line_of(BASE, 'range = "62212800-62212899"')
    assert a.cards[0] == Card("6221260000000018", "2812", "1234", 1000000, "156", "active", 500000, 0)
    assert a.cards[1].status == "active" and a.cards[1].daily_withdrawal_limit == 0
    b = n.bank("BANKB")
    assert b.simulate is True and b.zak is None and b.bins[0].card_type == "debit"
    assert b.link == n.switch.link == LinkOptions()
    t = n.terminals()
    assert [x.id for x in t] == ["POS00001", "ATM00011"]
    assert t[0].merchant_id == "898440154110001" and t[1].merchant_id == "898110060110001"
    assert t[1].tmk is None and t[1].tak is None and t[1].kind == "atm"
    m = n.merchants[1]
    assert m.city == "" and m.currency == "156" and m.enabled and m.mdr_bps == 0


def test_default_network_loads():
    n = load_network(None)
    assert n.source == DEFAULT_SOURCE
    sw = n.switch
    assert (sw.institution_id, str(sw.listen), str(sw.admin)) == ("99900001", "127.0.0.1:8583", "127.0.0.1:8580")
    assert (sw.data_dir, sw.timezone, sw.cutover, sw.mode) == ("var", "Asia/Shanghai", "23:00", "test")
    assert (sw.issuer_timeout_ms, sw.switch_fee) == (2000, 10)
    assert str(n.hsm.listen) == "127.0.0.1:1500" and n.hsm.simulate
    assert [(b.id, b.institution_id, b.host.port) for b in n.banks] == [
        ("BANKA", "10000001", 9101), ("BANKB", "10000002", 9102), ("BANKC", "10000003", 9103)]
    for b in n.banks:
        assert b.simulate and b.zpk is not None and b.zpk.is_clear
        assert any(r.low == r.high for r in b.bins) and any(r.low != r.high for r in b.bins)
        assert {r.card_type for r in b.bins} == {"debit", "credit"}
        assert b.interchange_bps > 0 and b.atm_fee > 0
        assert any(c.balance >= 10_000_000 and c.status == "active" and c.expiry > "2600"
                   for c in b.cards), f"{b.id} has no rich card"
    assert n.bank("BANKA").zak is not None
    cards = [c for b in n.banks for c in b.cards]
    assert all(luhn_ok(c.pan) and c.pin and c.currency == "156" for c in cards)
    statuses = {c.status for c in cards}
    assert {"active", "lost", "stolen", "blocked"} <= statuses
    assert any(c.expiry == "2201" for c in cards)                       # 54
    assert any(0 < c.balance <= 10000 and c.status == "active" for c in cards)  # 51
    assert any(0 < c.daily_withdrawal_limit <= 100000 for c in cards)   # 61
    assert any(c.delay_ms > sw.issuer_timeout_ms for c in cards)        # 91
    assert len(n.merchants) >= 5
    assert {m.acquirer for m in n.merchants} == {"BANKA", "BANKB", "BANKC"}
    atm_owners = [m for m in n.merchants if m.mcc == "6011"]
    assert atm_owners and all(t.kind == "atm" for m in atm_owners for t in m.terminals)
    assert all(t.kind == "pos" for m in n.merchants if m.mcc != "6011" for t in m.terminals)
    terms = n.terminals()
    assert all(1 <= len(m.terminals) <= 3 for m in n.merchants)
    keys = [k.text for t in terms for k in (t.tmk, t.tpk, t.tak) if k is not None]
    assert all(t.tmk and t.tpk for t in terms)
    assert any(t.tak for t in terms) and not all(t.tak for t in terms)
    assert len(keys) == len(set(keys)), "terminal keys must all differ"


def test_describe_default_network():
    n = load_network(None)
    text = describe(n)
    for s in ("99900001", "127.0.0.1:8583", "127.0.0.1:8580", "var", "sqlite:///var/journal.db",
              "mode test", "23:00 Asia/Shanghai", "127.0.0.1:1500", "BANKA", "10000001",
              "127.0.0.1:9101", "ZPK yes", "ZAK yes", "ZAK no", "POS00001", "ATM00001",
              "TAK yes", "TAK no", "Shanghai Coffee"):
        assert s in text, s
    cards = sum(len(b.cards) for b in n.banks)
    bins = sum(len(b.bins) for b in n.banks)
    assert text.splitlines()[-1] == (
        f"ok: 3 banks, {len(n.merchants)} merchants, {len(n.terminals())} terminals, "
        f"{cards} cards, {bins} BIN ranges")
    # never key material, PINs or full PANs
    for b in n.banks:
        for k in (b.zpk, b.zak):
            if k is not None:
                assert k.text[6:] not in text
        for c in b.cards:
            assert c.pan not in text
    for t in n.terminals():
        for k in (t.tmk, t.tpk, t.tak):
            if k is not None:
                assert k.text[6:] not in text
    assert "clear:" not in text


def test_load_network_file_and_missing_file(tmp_path):
    p = tmp_path / "network.toml"
    p.write_text(BASE, encoding="utf-8")
    n = load_network(str(p))
    assert n.source == str(p) and n == parse_network(BASE, str(p))
    with pytest.raises(NetworkFileError, match=r"nope\.toml: cannot read"):
        load_network(str(tmp_path / "nope.toml"))
    bad = tmp_path / "bad.toml"
    bad.write_text(BASE.replace('id = "BANKB"', 'idx = "BANKB"'), encoding="utf-8")
    with pytest.raises(NetworkFileError) as ei:
        load_network(str(bad))
    bad_line = line_of(BASE, 'id = "BANKB"')
    assert str(ei.value).startswith(f"{bad}:{bad_line}: banks[1].idx: unknown key")
    latin = tmp_path / "latin.toml"
    latin.write_bytes(b'[switch]\n# caf\xe9\n')
    with pytest.raises(NetworkFileError, match=r"latin\.toml:2: not UTF-8"):
        load_network(str(latin))


def test_toml_syntax_error_is_passed_on_with_its_line():
    text = sub(BASE, 'name = "Bank B"', 'name = "Bank B')
    msg = refused(text)
    bad_line = line_of(BASE, 'name = "Bank B"')
    assert msg.startswith(f"{SRC}:{bad_line}: invalid TOML: ")
    assert "column" in msg
    msg = refused(BASE + "\n[switch]\nmode = \"test\"\n")  # table defined twice
    assert msg.startswith(f"{SRC}:{len(BASE.splitlines()) + 2}: invalid TOML")


# ---------------------------------------------------------------------------
# unknown, missing and wrongly typed keys


@pytest.mark.parametrize("old,new,needle,key", [
    ('switch_fee = 10', 'switch_fee = 10\nswitchfee = 1', "switchfee", "switch.switchfee"),
    ('simulate = true\n\n[[banks]]', 'simulate = true\nport = 1\n\n[[banks]]', "port = 1", "hsm.port"),
    ('atm_fee = 300', 'atm_fee = 300\natmfee = 3', "atmfee", "banks[0].atmfee"),
    ('stand_in = { max_amount = 0 }', 'stand_in = { max_amount = 0, max_count = 2 }', "max_count",
     "banks[0].stand_in.max_count"),
    ('  card_type = "credit"', '  card_type = "credit"\n  kind = "x"', 'kind = "x"', "banks[0].bins[1].kind"),
    ('  delay_ms = 0', '  delay_ms = 0\n  cvv = "123"', "cvv", "banks[0].cards[0].cvv"),
    ('min_fee = 0', 'min_fee = 0\nfees = 1', "fees = 1", "merchants[0].fees"),
    ('  kind = "atm"', '  kind = "atm"\n  zpk = "x"', 'zpk = "x"', "merchants[1].terminals[0].zpk"),
])
def test_unknown_keys_are_named(old, new, needle, key):
    text = sub(BASE, old, new)
    expect(text, line_of(text, needle), key, "unknown key")


def test_unknown_key_suggests_the_close_one_and_top_level():
    text = sub(BASE, "  balance = 5000", "  balence = 5000")
    expect(text, line_of(text, "balence"), "banks[0].cards[1].balence", "unknown key", "did you mean 'balance'")
    text = BASE + '\n[swich]\nmode = "test"\n'
    expect(text, line_of(text, "[swich]"), "swich", "unknown key", "'switch'")
    text = BASE + '\n[[merchant]]\nid = "x"\n'
    expect(text, line_of(text, "[[merchant]]"), "merchant", "unknown key")


@pytest.mark.parametrize("remove,key,table_line", [
    ('id = "BANKB"\n', "banks[1].id", ('[[banks]]', 1)),
    ('institution_id = "10000001"\n', "banks[0].institution_id", ('[[banks]]', 0)),
    ('name = "Bank A"\n', "banks[0].name", ('[[banks]]', 0)),
    ('  pan = "6221280000000016"\n', "banks[0].cards[1].pan", ('[[banks.cards]]', 1)),
    ('  expiry = "3012"\n', "banks[1].cards[0].expiry", ('[[banks.cards]]', 2)),
    ('  pin = "4321"\n', "banks[1].cards[0].pin", ('[[banks.cards]]', 2)),
    ('  balance = 5000\n', "banks[0].cards[1].balance", ('[[banks.cards]]', 1)),
    ('  range = "622848"\n', "banks[1].bins[0].range", ('[[banks.bins]]', 2)),
    ('acquirer = "BANKB"\n', "merchants[1].acquirer", ('[[merchants]]', 1)),
    ('name = "Shanghai Coffee"\n', "merchants[0].name", ('[[merchants]]', 0)),
    ('  kind = "pos"\n', "merchants[0].terminals[0].kind", ('[[merchants.terminals]]', 0)),
    ('  id = "ATM00011"\n', "merchants[1].terminals[0].id", ('[[merchants.terminals]]', 1)),
])
def test_missing_required_keys_point_at_their_table(remove, key, table_line):
    text = sub(BASE, remove, "")
    expect(text, line_of(text, *table_line), key, "missing required key")


def test_bank_needs_host_or_hosts_not_both():
    text = sub(BASE, 'host = "127.0.0.1:9102"\n', "")
    expect(text, line_of(text, "[[banks]]", 1), "banks[1].host", "missing required key", "hosts")
    text = sub(BASE, 'host = "127.0.0.1:9102"', 'host = "127.0.0.1:9102"\nhosts = ["127.0.0.1:9104"]')
    expect(text, line_of(text, "hosts = "), "banks[1].hosts", "not both")


@pytest.mark.parametrize("old,new,key,words", [
    ('institution_id = "99900001"', 'institution_id = 99900001', "switch.institution_id", ["expected a string", "integer"]),
    ('  balance = 5000', '  balance = 50.00', "banks[0].cards[1].balance", ["integer of minor units", "float"]),
    ('simulate = true\n\n[[banks]]', 'simulate = "yes"\n\n[[banks]]', "hsm.simulate", ["expected a boolean", "string"]),
    ('issuer_timeout_ms = 3000', 'issuer_timeout_ms = "3000"', "switch.issuer_timeout_ms", ["expected an integer"]),
    ('stand_in = { max_amount = 0 }', 'stand_in = 0', "banks[0].stand_in", ["expected a table"]),
    ('stand_in = { max_amount = 0 }', 'stand_in = { max_amount = true }', "banks[0].stand_in.max_amount", ["boolean"]),
    ('  delay_ms = 0', '  delay_ms = 1979-05-27', "banks[0].cards[0].delay_ms", ["date/time"]),
    ('mdr_bps = 60', 'mdr_bps = [60]', "merchants[0].mdr_bps", ["an array"]),
])
def test_wrong_types(old, new, key, words):
    text = sub(BASE, old, new)
    expect(text, line_of(text, new.splitlines()[0]), key, *words)


def test_wrong_structure_types():
    # a plain value where a table belongs
    msg = refused("switch = 1\n")
    assert msg == f"{SRC}:1: switch: expected a table, got an integer"
    msg = refused('banks = "BANKA"\n')
    assert msg == f"{SRC}:1: banks: expected an array of tables, got a string"
    msg = refused('banks = [1]\n')
    assert msg == f"{SRC}:1: banks[0]: expected a table, got an integer"
    text = sub(BASE, 'host = "127.0.0.1:9102"', 'hosts = ["127.0.0.1:9102",\n  9103]')
    expect(text, line_of(text, "  9103]"), "banks[1].hosts[1]", "expected a string")
    text = sub(BASE, 'host = "127.0.0.1:9102"', 'hosts = []')
    expect(text, line_of(text, "hosts = []"), "banks[1].hosts", "non-empty")


# ---------------------------------------------------------------------------
# duplicates and references


def test_duplicate_bank_id_names_both():
    text = sub(BASE, 'id = "BANKB"', 'id = "BANKA"')
    msg = expect(text, line_of(text, 'id = "BANKA"', 1), "banks[1].id", "duplicate bank id BANKA")
    first = line_of(BASE, 'id = "BANKA"')
    assert f"banks[0], line {first}" in msg


def test_duplicate_institution_id():
    text = sub(BASE, 'institution_id = "10000002"', 'institution_id = "10000001"')
    expect(text, line_of(text, 'institution_id = "10000001"', 1), "banks[1].institution_id",
           "duplicate institution_id 10000001")
    text = sub(BASE, 'institution_id = "10000002"', 'institution_id = "99900001"')
    expect(text, line_of(text, 'institution_id = "99900001"', 1), "banks[1].institution_id",
           "switch's own")


def test_duplicate_merchant_and_terminal_ids():
    text = sub(BASE, 'id = "898110060110001"', 'id = "898440154110001"')
    expect(text, line_of(text, 'id = "898440154110001"', 1), "merchants[1].id",
           "duplicate merchant id 898440154110001", "merchants[0]")
    text = sub(BASE, 'id = "ATM00011"', 'id = "POS00001"')
    expect(text, line_of(text, 'id = "POS00001"', 1), "merchants[1].terminals[0].id",
           "duplicate terminal id POS00001", "merchants[0].terminals[0]")


def test_duplicate_card_pan_is_masked():
    text = sub(BASE, '  pan = "6221280000000016"', '  pan = "6221260000000018"')
    msg = expect(text, line_of(text, 'pan = "6221260000000018"', 1), "banks[0].cards[1].pan",
                 "duplicate card PAN 622126******0018", "banks[0].cards[0]")
    assert "6221260000000018" not in msg


def test_merchant_acquirer_must_name_a_bank():
    text = sub(BASE, 'acquirer = "BANKB"', 'acquirer = "BANKZ"')
    expect(text, line_of(text, "BANKZ"), "merchants[1].acquirer", '"BANKZ" names no bank', "BANKA, BANKB")


# ---------------------------------------------------------------------------
# BIN ranges


def test_overlapping_bins_between_banks_name_both():
    text = sub(BASE, '  range = "622848"', '  range = "622126"')
    msg = expect(text, line_of(text, 'range = "622126"', 1), "banks[1].bins[0].range",
                 "overlaps", "banks[0].bins[0].range", "BANKA", "BANKB")
    first = line_of(BASE, 'range = "622126"')
    assert f"line {first}" in msg


def test_overlapping_ranges_within_one_bank():
    text = sub(BASE, '  range = "62212800-62212899"', '  range = "62212800-62212899"\n'
               '  [[banks.bins]]\n  range = "62212850-62212999"')
    msg = expect(text, line_of(text, "62212850-62212999"), "banks[0].bins[2].range", "overlaps",
                 "banks[0].bins[1].range 62212800-62212899")
    assert f"line {line_of(text, '62212800-62212899')}" in msg


def test_overlap_with_a_wider_earlier_range_is_found():
    # sorted by low end the direct neighbour does not overlap; the wide one does
    text = sub(BASE, '  range = "622848"', '  range = "62284700-62284710"\n  [[banks.bins]]\n'
               '  range = "62284720-62284730"\n  [[banks.bins]]\n  range = "62284000-62284999"\n'
               '  [[banks.bins]]\n  range = "62284800-62284899"')
    msg = expect(text, line_of(text, "62284000-62284999"), "banks[1].bins[2].range", "overlaps",
                 "banks[1].bins[0].range")
    assert msg


def test_same_range_different_priority_or_nested_is_accepted():
    # same prefix at a lower priority: BANKA's cards still route to BANKA
    text = sub(BASE, '  range = "622848"', '  range = "622848"\n  [[banks.bins]]\n  range = "622126"\n'
               '  priority = -1')
    n = parse_network(text, SRC)
    assert n.bank("BANKB").bins[1] == BinRange("622126", "622126", "debit", -1)
    # at a higher priority it takes BANKA's cards away: refused at the card
    text = sub(text, "priority = -1", "priority = 1")
    expect(text, line_of(text, 'pan = "6221260000000018"'), "banks[0].cards[0].pan", "routes to BANKB")
    # a longer range inside another bank's prefix: the longest match wins; the
    # card of BANKB routes to BANKB
    text = sub(BASE, '  range = "622848"', '  range = "62212690-62212699"')
    text = sub(text, '  pan = "6228480000000015"', '  pan = "6221269000000019"')
    n = parse_network(text, SRC)
    assert n.bank("BANKB").bins[0] == BinRange("62212690", "62212699", "debit", 0)


def test_card_must_route_to_its_own_bank():
    text = sub(BASE, '  range = "622848"', '  range = "622848"\n  [[banks.bins]]\n  range = "62212600-62212609"')
    msg = expect(text, line_of(text, 'pan = "6221260000000018"'), "banks[0].cards[0].pan",
                 "routes to BANKB", "banks[1].bins[1].range 62212600-62212609", "not to its own bank BANKA")
    assert "622126******0018" in msg


@pytest.mark.parametrize("rng,words", [
    ("62A126", ["is not a BIN prefix"]),
    ("", ["is not a BIN prefix"]),
    ("622126-", ["is not a BIN prefix"]),
    ("6221260-62212699", ["same number of digits"]),
    ("62212699-62212600", ["low end is above the high end"]),
    ("62 2126", ["is not a BIN prefix"]),
    ("12345678901234567890", ["at most 19 digits"]),
])
def test_bad_bin_syntax(rng, words):
    text = sub(BASE, '  range = "622848"', f'  range = "{rng}"')
    expect(text, line_of(text, f'range = "{rng}"'), "banks[1].bins[0].range", *words)


def test_bad_card_type():
    text = sub(BASE, '  card_type = "credit"', '  card_type = "prepaid"')
    expect(text, line_of(text, "prepaid"), "banks[0].bins[1].card_type", '"prepaid" is not one of debit, credit')


# ---------------------------------------------------------------------------
# keys


@pytest.mark.parametrize("value,words", [
    ("clear:0123456789ABCDEFFEDCBA9876543211", ["odd parity", "byte 16 of 16"]),
    ("clear:0023456789ABCDEF", ["odd parity", "byte 1 of 8"]),
    ("clear:0123456789ABCDEFFEDCBA98765432", ['"clear:" then 16, 32 or 48 hex']),
    ("clear:0123456789ABCDEFFEDCBA987654321G", ['"clear:" then 16, 32 or 48 hex']),
    ("0123456789ABCDEFFEDCBA9876543210", ["not a key", '"U" + 32 hex']),
    ("U0123456789ABCDEF", ["not a key"]),
    ("T0123456789ABCDEFFEDCBA9876543210", ["not a key"]),
    ("X0123456789ABCDEFFEDCBA9876543210", ["not a key"]),
])
def test_bad_keys(value, words):
    text = sub(BASE, 'zpk = "clear:0123456789ABCDEFFEDCBA9876543210"', f'zpk = "{value}"')
    msg = expect(text, line_of(text, "zpk = "), "banks[0].zpk", *words)
    assert value not in msg  # never echo key material


def test_bad_terminal_key():
    text = sub(BASE, 'tpk = "clear:3D8A544C2FF2ECCD73E6C2AEF85E643B"', 'tpk = "clear:3D8A544C2FF2ECCD73E6C2AEF85E643A"')
    expect(text, line_of(text, "3D8A544C2FF2ECCD73E6C2AEF85E643A"), "merchants[1].terminals[0].tpk", "odd parity")


def _live(text: str) -> str:
    return sub(text, 'mode = "test"', 'mode = "live"')


def test_clear_keys_refused_in_live_mode():
    text = _live(BASE)
    expect(text, line_of(text, "zpk = "), "banks[0].zpk",
           "clear keys are refused in live mode: put keys under the LMK")


def test_keys_under_lmk_accepted_in_live_mode():
    # live cards carry their PVV (nothing can be computed from a PIN there)
    text = re.sub(r'(  pin = "\d+"\n)', r'\1  pvv = "0000"\n', _live(BASE))
    lmk = iter(["U" + "1" * 32, "T" + "A" * 48, "0406FBB23A5214DF", "U" + "b" * 32,
                "U" + "2" * 32, "U" + "3" * 32, "U" + "4" * 32, "U" + "5" * 32])
    text = re.sub(r'"clear:[0-9A-F]+"', lambda m: f'"{next(lmk)}"', text)
    n = parse_network(text, SRC)
    assert n.switch.mode == "live"
    assert n.bank("BANKA").zak == Key("T" + "A" * 48)
    assert not any(k.is_clear for t in n.terminals() for k in (t.tmk, t.tpk, t.tak) if k)
    # and a terminal key left clear is named
    text2 = sub(text, '  tak = "U', '  tak = "clear:6B79AE8932EF5116DC6DECCE3B89AB3E" #')
    expect(text2, line_of(text2, "  tak = "), "merchants[0].terminals[0].tak", "refused in live mode")


# ---------------------------------------------------------------------------
# cards


def test_pan_failing_luhn():
    text = sub(BASE, '  pan = "6221280000000016"', '  pan = "6221280000000017"')
    msg = expect(text, line_of(text, "6221280000000017"), "banks[0].cards[1].pan", "fails the Luhn check")
    assert msg == f"{SRC}:{line_of(text, '6221280000000017')}: banks[0].cards[1].pan: fails the Luhn check"
    text = sub(BASE, '  pan = "6221280000000016"', '  pan = "62212800000"')
    expect(text, line_of(text, "62212800000"), "banks[0].cards[1].pan", "12-19 digits")


def test_pan_outside_its_banks_bins():
    # 6228480000000015 belongs to BANKB's BIN; put it under BANKA
    text = sub(BASE, '  pan = "6221280000000016"', '  pan = "6228480000000023"')
    msg = expect(text, line_of(text, "6228480000000023"), "banks[0].cards[1].pan",
                 "622848******0023 is not inside a BIN range of its bank BANKA", "622126, 62212800-62212899")
    assert "6228480000000023" not in msg


@pytest.mark.parametrize("value", ["2813", "281", "12/28", "28120", "2800"])
def test_bad_expiry(value):
    text = sub(BASE, '  expiry = "3012"', f'  expiry = "{value}"')
    expect(text, line_of(text, f'expiry = "{value}"'), "banks[1].cards[0].expiry", "is not an expiry date YYMM")


@pytest.mark.parametrize("value", ["123", "1234567890123", "12a4", ""])
def test_bad_pin(value):
    text = sub(BASE, '  pin = "4321"', f'  pin = "{value}"')
    msg = expect(text, line_of(text, f'pin = "{value}"'), "banks[1].cards[0].pin", "4-12 digits")
    if value:
        assert value not in msg.split(": ", 2)[2]  # the PIN itself is not echoed


def test_bad_status_and_currency():
    text = sub(BASE, '  status = "active"', '  status = "frozen"')
    expect(text, line_of(text, "frozen"), "banks[0].cards[0].status",
           '"frozen" is not one of active, lost, stolen, blocked')
    text = sub(BASE, '  currency = "156"', '  currency = "CNY"')
    expect(text, line_of(text, '"CNY"'), "banks[0].cards[0].currency", "3 digits")


@pytest.mark.parametrize("old,new,key", [
    ("  balance = 5000", "  balance = -1", "banks[0].cards[1].balance"),
    ("  daily_withdrawal_limit = 500000", "  daily_withdrawal_limit = -5", "banks[0].cards[0].daily_withdrawal_limit"),
    ("  delay_ms = 0", "  delay_ms = -1", "banks[0].cards[0].delay_ms"),
    ("switch_fee = 10", "switch_fee = -10", "switch.switch_fee"),
    ("interchange_bps = 35", "interchange_bps = -35", "banks[0].interchange_bps"),
    ("debit_cap = 1300", "debit_cap = -1", "banks[0].debit_cap"),
    ("atm_fee = 300", "atm_fee = -300", "banks[0].atm_fee"),
    ("stand_in = { max_amount = 0 }", "stand_in = { max_amount = -1 }", "banks[0].stand_in.max_amount"),
    ("mdr_bps = 60", "mdr_bps = -60", "merchants[0].mdr_bps"),
    ("debit_cap = 2000", "debit_cap = -2000", "merchants[0].debit_cap"),
    ("min_fee = 0", "min_fee = -1", "merchants[0].min_fee"),
])
def test_negative_amounts(old, new, key):
    text = sub(BASE, old, new)
    expect(text, line_of(text, new.strip()), key, "must not be negative")


def test_bps_above_100_percent():
    text = sub(BASE, "mdr_bps = 60", "mdr_bps = 10001")
    expect(text, line_of(text, "mdr_bps = 10001"), "merchants[0].mdr_bps", "at most 10000")


# ---------------------------------------------------------------------------
# merchants and terminals


def test_bad_terminal_kind():
    text = sub(BASE, '  kind = "atm"', '  kind = "kiosk"')
    expect(text, line_of(text, "kiosk"), "merchants[1].terminals[0].kind", '"kiosk" is not one of pos, atm')


def test_ids_fit_their_fixed_length_fields():
    text = sub(BASE, '  id = "ATM00011"', '  id = "ATM11"')
    expect(text, line_of(text, "ATM11"), "merchants[1].terminals[0].id", "exactly 8", "field 41")
    text = sub(BASE, 'id = "898110060110001"', 'id = "8981100601"')
    expect(text, line_of(text, '"8981100601"'), "merchants[1].id", "exactly 15", "field 42")
    text = sub(BASE, 'mcc = "6011"', 'mcc = "601"')
    expect(text, line_of(text, 'mcc = "601"'), "merchants[1].mcc", "4 digits")
    text = sub(BASE, 'id = "BANKB"', 'id = "BANK B"')
    expect(text, line_of(text, 'id = "BANK B"'), "banks[1].id", "letters, digits")
    text = sub(BASE, 'institution_id = "10000002"', 'institution_id = "1000000A"')
    expect(text, line_of(text, '"1000000A"'), "banks[1].institution_id", "1-11 digits")


# ---------------------------------------------------------------------------
# [switch] values


@pytest.mark.parametrize("old,new,key,words", [
    ('listen = "127.0.0.1:8583"', 'listen = "127.0.0.1"', "switch.listen", ['is not "host:port"']),
    ('admin = "127.0.0.1:8580"', 'admin = "127.0.0.1:99999"', "switch.admin", ["port 99999 is not in 1-65535"]),
    ('listen = "127.0.0.1:1500"', 'listen = "127.0.0.1:abc"', "hsm.listen", ['is not "host:port"']),
    ('listen = "127.0.0.1:1500"', 'listen = ":1500"', "hsm.listen", ['is not "host:port"']),
    ('host = "127.0.0.1:9101"', 'host = "::1:9101"', "banks[0].host", ["in brackets"]),
    ('timezone = "Asia/Shanghai"', 'timezone = "Mars/Olympus"', "switch.timezone", ["not a time zone"]),
    ('timezone = "Asia/Shanghai"', 'timezone = ""', "switch.timezone", ["not a time zone"]),
    ('timezone = "Asia/Shanghai"', 'timezone = "../../etc/passwd"', "switch.timezone", ["not a time zone"]),
    ('cutover = "23:00"', 'cutover = "24:00"', "switch.cutover", ["not a time HH:MM"]),
    ('cutover = "23:00"', 'cutover = "7:00"', "switch.cutover", ["not a time HH:MM"]),
    ('cutover = "23:00"', 'cutover = "23:60"', "switch.cutover", ["not a time HH:MM"]),
    ('mode = "test"', 'mode = "prod"', "switch.mode", ['"prod" is not one of test, live']),
    ('issuer_timeout_ms = 3000', 'issuer_timeout_ms = 0', "switch.issuer_timeout_ms", ["at least 1"]),
    ('data_dir = "var"', 'data_dir = ""', "switch.data_dir", ["must not be empty"]),
    ('data_dir = "var"', 'data_dir = "var"\njournal = "mysql://x"', "switch.journal", ["sqlite:///", "postgresql://"]),
    ('data_dir = "var"', 'data_dir = "var"\nredis = "127.0.0.1:6379"', "switch.redis", ["redis://"]),
    ('data_dir = "var"', 'data_dir = "var"\nmqtt = "tcp://x"', "switch.mqtt", ["mqtt://"]),
    ('data_dir = "var"', 'data_dir = "var"\ndialect = "bcd"', "switch.dialect", ['"bcd" is not one of ascii, binary']),
    ('data_dir = "var"', 'data_dir = "var"\nframing = "4byte"', "switch.framing", ["not one of 2byte, 4ascii"]),
    ('data_dir = "var"', 'data_dir = "var"\nheader = "60000"', "switch.header", ["header in hex"]),
    ('data_dir = "var"', 'data_dir = "var"\nmax_frame = 70000', "switch.max_frame", ["above 65535"]),
    ('data_dir = "var"', 'data_dir = "var"\nread_timeout_ms = 0', "switch.read_timeout_ms", ["at least 1"]),
])
def test_bad_switch_values(old, new, key, words):
    text = sub(BASE, old, new)
    expect(text, line_of(text, new.splitlines()[-1]), key, *words)


def test_bank_framing_against_inherited_max_frame():
    text = sub(BASE, 'data_dir = "var"', 'data_dir = "var"\nmax_frame = 20000')
    text = sub(text, 'atm_fee = 300', 'atm_fee = 300\nframing = "4ascii"')
    expect(text, line_of(text, 'framing = "4ascii"'), "banks[0].framing", "max_frame 20000 is above 9999")
    text = sub(text, 'framing = "4ascii"', 'framing = "4ascii"\nmax_frame = 10000')
    expect(text, line_of(text, "max_frame = 10000"), "banks[0].max_frame", "above 9999")


def test_link_options_and_failover_hosts():
    text = sub(BASE, 'data_dir = "var"', 'data_dir = "/srv/cs"\ndialect = "binary"\nheader = "6000010000"\n'
               'max_frame = 8192')
    text = sub(text, 'atm_fee = 300', 'atm_fee = 300\nframing = "4ascii"\nmax_frame = 9999\nread_timeout_ms = 500')
    text = sub(text, 'host = "127.0.0.1:9102"', 'hosts = ["127.0.0.1:9102", "[::1]:9202", "bankb.example:9302"]')
    n = parse_network(text, SRC)
    assert n.switch.journal == "sqlite:////srv/cs/journal.db"
    assert n.switch.link == LinkOptions("binary", "2byte", "6000010000", 8192, 10000)
    # a bank link takes the switch's options unless it sets its own
    assert n.bank("BANKA").link == LinkOptions("binary", "4ascii", "6000010000", 9999, 500)
    assert n.bank("BANKB").link == n.switch.link
    assert n.bank("BANKB").hosts == (Endpoint("127.0.0.1", 9102), Endpoint("::1", 9202),
                                      Endpoint("bankb.example", 9302))
    assert n.bank("BANKB").host == Endpoint("127.0.0.1", 9102)
    text2 = sub(text, '"[::1]:9202"', '"[::1]9202"')
    expect(text2, line_of(text2, "hosts = "), "banks[1].hosts[1]", 'is not "host:port"')


def test_switch_defaults_when_absent():
    n = parse_network("", SRC)
    assert n.banks == () and n.merchants == ()
    assert n.switch.journal == "sqlite:///var/journal.db"
    assert n.hsm.listen == Endpoint("127.0.0.1", 1500)
    assert describe(n).endswith("ok: 0 banks, 0 merchants, 0 terminals, 0 cards, 0 BIN ranges")


def test_explicit_journal_and_lmk_file():
    text = sub(BASE, 'data_dir = "var"', 'data_dir = "var"\njournal = "postgresql://cs@127.0.0.1/cs"\n'
               'redis = "redis://127.0.0.1:6379/0"\nmqtt = "mqtt://127.0.0.1:1883"\ntoken_key = "s3cret"\n'
               'echo_interval_ms = 5000')
    text = sub(text, "simulate = true\n\n[[banks]]", 'simulate = false\nlmk_file = "lmk.txt"\n\n[[banks]]')
    n = parse_network(text, SRC)
    assert n.switch.journal == "postgresql://cs@127.0.0.1/cs"
    assert (n.switch.redis, n.switch.mqtt, n.switch.echo_interval_ms) == (
        "redis://127.0.0.1:6379/0", "mqtt://127.0.0.1:1883", 5000)
    assert n.hsm.simulate is False and n.hsm.lmk_file == "lmk.txt"
    d = describe(n)
    assert "s3cret" not in d and "token key set" in d and "external" in d


def test_passwords_in_urls_are_not_shown():
    text = sub(BASE, 'data_dir = "var"', 'data_dir = "var"\njournal = "postgresql://cs:hunter2@db/cs"\n'
               'redis = "redis://:hunter3@127.0.0.1:6379/0"')
    d = describe(parse_network(text, SRC))
    assert "postgresql://cs:***@db/cs" in d and "redis://:***@127.0.0.1:6379/0" in d
    assert "hunter" not in d
    text = sub(BASE, 'data_dir = "var"', 'data_dir = "var"\njournal = "mysql://cs:hunter2@db/cs"')
    msg = expect(text, line_of(text, "mysql://"), "switch.journal", "mysql://cs:***@db/cs")
    assert "hunter2" not in msg


# ---------------------------------------------------------------------------
# dump, round trip and ports


def test_round_trip_default_network():
    n = load_network(None)
    text = dump_network(n)
    m = parse_network(text, n.source)
    assert m == n
    # the lines of the dumped file are right too
    for b, mb in zip(n.banks, m.banks):
        for x in mb.bins:
            assert f'range = "{x.low if x.low == x.high else x.low + "-" + x.high}"' in text.splitlines()[x.line - 1]


def test_round_trip_unusual_network():
    n = parse_network(BASE, SRC)
    a, b = n.banks
    a = dataclasses.replace(
        a, name='Bank "A" \\ \t Ünïcode 银行', simulate=False, stand_in=StandIn(max_amount=12345),
        link=LinkOptions("binary", "4ascii", "6000010000", 2048, 1500),
        bins=a.bins + (BinRange("62212800", "62212899", "debit", 5),),
        hosts=(Endpoint("127.0.0.1", 9101), Endpoint("::1", 9111)),
    )
    b = dataclasses.replace(b, cards=b.cards + (Card("6228480000000023", "2201", "123456789012", 0,
                                                     "840", "stolen", 7, 5000),))
    m0 = n.merchants[0]
    m0 = dataclasses.replace(m0, enabled=False, city="", terminals=m0.terminals + (
        Terminal("POS00002", "pos", m0.id, tpk=Key("U" + "1" * 32), enabled=False),))
    sw = dataclasses.replace(n.switch, journal="postgresql://x@h/db", token_key="k\n\"", redis="redis://r",
                             link=LinkOptions(max_frame=1024))
    hsm = dataclasses.replace(n.hsm, lmk_file="/etc/cs/lmk")
    n2 = dataclasses.replace(n, switch=sw, hsm=hsm, banks=(a, b), merchants=(m0,) + n.merchants[1:])
    assert parse_network(dump_network(n2), SRC) == n2


def test_with_ports_uses_given_and_free_ports(tmp_path):
    n = load_network(None)
    w = with_ports(n, {"listen": 40001, "BANKB": 40002}, data_dir=str(tmp_path / "data"))
    assert w.switch.listen == Endpoint("127.0.0.1", 40001)
    assert w.bank("BANKB").host == Endpoint("127.0.0.1", 40002)
    others = [w.switch.admin.port, w.hsm.listen.port, w.bank("BANKA").host.port, w.bank("BANKC").host.port]
    assert len(set(others)) == 4 and not set(others) & {40001, 40002, 8580, 1500, 9101, 9103}
    for p in others:  # free a moment ago: we can bind it
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", p))
    assert w.switch.data_dir == str(tmp_path / "data")
    assert w.switch.journal == f"sqlite:///{tmp_path}/data/journal.db"
    assert w.banks[0].cards == n.banks[0].cards and w.merchants == n.merchants
    # written to a file, it reads back equal
    p = tmp_path / "network.toml"
    p.write_text(dump_network(w), encoding="utf-8")
    assert load_network(str(p)) == dataclasses.replace(w, source=str(p))
    # an explicit non-default journal stays
    pg = dataclasses.replace(n, switch=dataclasses.replace(n.switch, journal="postgresql://x@h/db"))
    assert with_ports(pg, data_dir="/elsewhere").switch.journal == "postgresql://x@h/db"
    # failover hosts get their own names
    two = dataclasses.replace(n, banks=(dataclasses.replace(
        n.banks[0], hosts=(Endpoint("127.0.0.1", 1), Endpoint("127.0.0.1", 2))),) + n.banks[1:])
    w2 = with_ports(two, {"BANKA": 41001, "BANKA/1": 41002})
    assert [h.port for h in w2.banks[0].hosts] == [41001, 41002]
    with pytest.raises(ValueError, match="BANKQ"):
        with_ports(n, {"BANKQ": 1})


def test_free_ports_are_distinct():
    ports = free_ports(5)
    assert len(set(ports)) == 5 and all(1024 <= p <= 65535 for p in ports)


def test_model_network_helpers_still_work():
    # BinRange.line is metadata: equal ranges compare equal wherever declared
    assert BinRange("1", "1", line=3) == BinRange("1", "1", line=9)
    n = parse_network(BASE, SRC)
    assert isinstance(n, Network) and isinstance(n.bank("BANKA"), Bank)
    assert isinstance(n.merchants[0], Merchant)
