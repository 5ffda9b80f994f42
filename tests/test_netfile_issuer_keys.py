"""The network file's issuer keys (pvk, cvk, mk_ac) and card PIN data
(pin_method, pvv, pin_offset): parity, length, the live-mode rule, describe,
round trips, and the default network's keys."""

from __future__ import annotations

import dataclasses
import re

import pytest

from cardswitch.config import Card, Key
from cardswitch.crypto.des import check_odd_parity
from cardswitch.issuer_sim.cards import pin_ref_for
from cardswitch.netfile import describe, dump_network, load_network, parse_network
from test_netfile import BASE, SRC, expect, line_of, refused, sub

PVK = "FD8AA2D632B0103476317543CE79D3F7"
CVK = "A40D7C3867076720EAE9D50704D6B5EF"
MK_AC = "F46B8A16D00D45B33729408576D55449"

KEYED = sub(BASE, 'zak = "clear:89ABCDEF0123456776543210FEDCBA98"\n',
            'zak = "clear:89ABCDEF0123456776543210FEDCBA98"\n'
            f'pvk = "clear:{PVK}"\ncvk = "clear:{CVK}"\nmk_ac = "clear:{MK_AC}"\n')


def live(text: str) -> str:
    return sub(text, 'mode = "test"', 'mode = "live"')


def under_lmk(text: str) -> str:
    """Every clear key replaced by a (made up) key under the LMK, double length."""
    return re.sub(r'"clear:[0-9A-F]{32}"', lambda m: '"U' + m.group()[7:], text)


def with_pvvs(text: str) -> str:
    return re.sub(r'(  pin = "\d+"\n)', r'\1  pvv = "0000"\n', text)


def test_issuer_keys_parse_and_describe():
    n = parse_network(KEYED, SRC)
    a, b = n.banks
    assert (a.pvk, a.cvk, a.mk_ac) == (Key("clear:" + PVK), Key("clear:" + CVK), Key("clear:" + MK_AC))
    assert (b.pvk, b.cvk, b.mk_ac) == (None, None, None)
    text = describe(n)
    assert "ZPK yes  ZAK yes  PVK yes  CVK yes  MK-AC yes" in text
    assert "ZPK yes  ZAK no  PVK no  CVK no  MK-AC no" in text
    for k in (PVK, CVK, MK_AC):
        assert k not in text
    assert "clear:" not in text and "***" not in repr(a.pvk)[:4]


@pytest.mark.parametrize("name", ["pvk", "cvk", "mk_ac"])
@pytest.mark.parametrize("value,words", [
    ("clear:0123456789ABCDEF", ['"clear:" then 32 hex digits (double length)']),
    ("clear:" + "01" * 24, ['"clear:" then 32 hex digits (double length)']),
    ("clear:FD8AA2D632B0103476317543CE79D3F6", ["odd parity", "byte 16 of 16"]),
    ("clear:FD8AA2D632B0103476317543CE79D3FG", ['"clear:" then 32 hex digits']),
    ("0406FBB23A5214DF", ["not a double-length key", '"U" + 32 hex']),
    ("T" + "A" * 48, ["not a double-length key"]),
    ("U" + "A" * 31, ["not a double-length key"]),
])
def test_bad_issuer_keys(name, value, words):
    key_line = {"pvk": f'pvk = "clear:{PVK}"', "cvk": f'cvk = "clear:{CVK}"', "mk_ac": f'mk_ac = "clear:{MK_AC}"'}
    text = sub(KEYED, key_line[name], f'{name} = "{value}"')
    msg = expect(text, line_of(text, f"{name} = "), f"banks[0].{name}", *words)
    assert value not in msg


def test_live_mode_issuer_keys():
    text = live(KEYED)
    expect(text, line_of(text, "zpk = "), "banks[0].zpk", "refused in live mode")
    # zpk and zak under the LMK, the issuer keys still clear: the PVK is named
    text = sub(sub(text, 'zpk = "clear:0123456789ABCDEFFEDCBA9876543210"', 'zpk = "U' + "1" * 32 + '"'),
               'zak = "clear:89ABCDEF0123456776543210FEDCBA98"', 'zak = "U' + "2" * 32 + '"')
    expect(text, line_of(text, "pvk = "), "banks[0].pvk", "refused in live mode")
    n = parse_network(with_pvvs(under_lmk(live(KEYED))), SRC)
    a = n.banks[0]
    assert a.pvk == Key("U" + PVK) and not any(k.is_clear for k in (a.zpk, a.pvk, a.cvk, a.mk_ac))


def test_live_mode_cards_need_their_pvv_or_offset():
    text = under_lmk(live(KEYED))
    expect(text, line_of(text, "[[banks.cards]]"), "banks[0].cards[0].pvv",
           "in live mode the PVK is under the LMK", "give pvv")
    ibm = with_pvvs(text)
    ibm = sub(ibm, '  pin = "4321"\n  pvv = "0000"\n', '  pin = "4321"\n  pin_method = "ibm"\n')
    expect(ibm, line_of(ibm, "[[banks.cards]]", 2), "banks[1].cards[0].pin_offset",
           "IBM offset cannot be computed", "give pin_offset")
    ok = sub(ibm, '  pin_method = "ibm"\n', '  pin_method = "ibm"\n  pin_offset = "123456"\n')
    n = parse_network(ok, SRC)
    c = n.banks[1].cards[0]
    assert (c.pin_method, c.pin_offset, c.pvv, c.pin) == ("ibm", "123456", "", "4321")
    # the PIN is optional in live mode
    no_pins = re.sub(r'  pin = "\d+"\n', "", ok)
    assert all(c.pin is None for b in parse_network(no_pins, SRC).banks for c in b.cards)


def test_test_mode_card_needs_a_pin_or_its_pvv():
    text = sub(KEYED, '  pin = "4321"\n', "")
    expect(text, line_of(text, "[[banks.cards]]", 2), "banks[1].cards[0].pin",
           "missing required key", '"pvv"')
    n = parse_network(sub(KEYED, '  pin = "4321"\n', '  pvv = "5555"\n'), SRC)
    assert (n.banks[1].cards[0].pin, n.banks[1].cards[0].pvv) == (None, "5555")


def test_pin_method_values():
    text = sub(KEYED, '  pin = "4321"\n', '  pin = "4321"\n  pin_method = "natural"\n')
    expect(text, line_of(text, "pin_method"), "banks[1].cards[0].pin_method", '"natural" is not one of pvv, ibm')
    text = sub(KEYED, '  pin = "4321"\n', '  pin = "4321"\n  pin_offset = "1234"\n')
    expect(text, line_of(text, "pin_offset"), "banks[1].cards[0].pin_offset", 'is for pin_method = "ibm"')
    text = sub(KEYED, '  pin = "4321"\n', '  pin = "4321"\n  pin_method = "ibm"\n  pvv = "1234"\n')
    expect(text, line_of(text, "pvv = "), "banks[1].cards[0].pvv", 'is for pin_method = "pvv"')


@pytest.mark.parametrize("line,key,words", [
    ('  pvv = "12a4"\n', "pvv", ["a PVV must be 4 digits"]),
    ('  pvv = "12345"\n', "pvv", ["a PVV must be 4 digits"]),
    ('  pin_method = "ibm"\n  pin_offset = "123"\n', "pin_offset", ["an IBM PIN offset must be 4-12 digits"]),
    ('  pin_method = "ibm"\n  pin_offset = "1234567890123"\n', "pin_offset", ["4-12 digits"]),
])
def test_bad_pvv_and_offset(line, key, words):
    text = sub(KEYED, '  pin = "4321"\n', line)
    expect(text, line_of(text, f"{key} = "), f"banks[1].cards[0].{key}", *words)


def test_given_pvv_must_match_the_pin_under_a_clear_pvk():
    pvk = bytes.fromhex(PVK)
    card = Card("6221260000000018", "2812", "1234", 0)
    right = pin_ref_for(card, pvk).pvv
    wrong = f"{(int(right) + 1) % 10000:04d}"
    ok = sub(KEYED, '  pin = "1234"\n', f'  pin = "1234"\n  pvv = "{right}"\n')
    assert parse_network(ok, SRC).banks[0].cards[0].pvv == right
    bad = sub(KEYED, '  pin = "1234"\n', f'  pin = "1234"\n  pvv = "{wrong}"\n')
    msg = expect(bad, line_of(bad, "pvv = "), "banks[0].cards[0].pvv", "does not match the card's pin")
    assert wrong not in msg and "1234" not in msg
    # the IBM offset likewise (its first 4 digits: check length 4)
    ibm = pin_ref_for(dataclasses.replace(card, pin_method="ibm"), pvk).pin_offset
    good = sub(KEYED, '  pin = "1234"\n', f'  pin = "1234"\n  pin_method = "ibm"\n  pin_offset = "{ibm}"\n')
    assert parse_network(good, SRC).banks[0].cards[0].pin_offset == ibm
    off = f"{(int(ibm[0]) + 1) % 10}{ibm[1:]}"
    bad = sub(KEYED, '  pin = "1234"\n', f'  pin = "1234"\n  pin_method = "ibm"\n  pin_offset = "{off}"\n')
    expect(bad, line_of(bad, "pin_offset = "), "banks[0].cards[0].pin_offset", "does not match")
    # without a clear PVK nothing can be compared: accepted (bank B has no PVK)
    text = sub(KEYED, '  pin = "4321"\n', '  pin = "4321"\n  pvv = "0000"\n')
    assert parse_network(text, SRC).banks[1].cards[0].pvv == "0000"


def test_round_trip_with_issuer_keys_and_pin_data():
    n = parse_network(KEYED, SRC)
    a, b = n.banks
    b = dataclasses.replace(b, pvk=Key("clear:" + MK_AC), cards=b.cards + (
        Card("6228480000000023", "2201", None, 0, pin_method="ibm", pin_offset="9876"),
        Card("6228480000000031", "2201", None, 0, pvv="0042"),
        Card("6228480000000049", "2201", "123456", 0, pin_method="ibm")))
    n2 = dataclasses.replace(n, banks=(a, b))
    text = dump_network(n2)
    assert parse_network(text, SRC) == n2
    assert 'pin_method = "pvv"' not in text        # the default is not written
    m = parse_network(with_pvvs(under_lmk(live(KEYED))), SRC)
    assert parse_network(dump_network(m), SRC) == m


def test_default_network_issuer_keys():
    n = load_network(None)
    seen = []
    for b in n.banks:
        for k in (b.pvk, b.cvk, b.mk_ac):
            assert k is not None and k.is_clear and len(k.clear_bytes()) == 16
            assert check_odd_parity(k.clear_bytes())
            seen.append(k.text)
        seen += [k.text for k in (b.zpk, b.zak) if k is not None]
    assert len(seen) == len(set(seen)), "every key of every bank differs"
    cards = [c for b in n.banks for c in b.cards]
    assert {c.pin_method for c in cards} == {"pvv", "ibm"}
    assert all(c.pin and not c.pvv and not c.pin_offset for c in cards)
    assert "PVK yes  CVK yes  MK-AC yes" in describe(n)


def test_error_messages_never_show_issuer_keys():
    for name, k in (("pvk", PVK), ("cvk", CVK), ("mk_ac", MK_AC)):
        bad = k[:-1] + f"{int(k[-1], 16) ^ 1:X}"      # one bit off: a parity error
        text = sub(KEYED, k, bad)
        msg = refused(text)
        assert bad not in msg and k not in msg
