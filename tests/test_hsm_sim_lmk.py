"""The variant LMK key model of the HSM simulator (hsm.md 2)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cardswitch.crypto.des import fix_parity, tdes_ecb_decrypt, tdes_ecb_encrypt
from cardswitch.hsm_sim.lmk import (
    KEY_TYPES, TEST_LMK_PAIRS, VARIANTS, HsmError, Lmk, LmkError, decrypt_under_kek,
    decrypt_under_lmk, encrypt_under_kek, encrypt_under_lmk, split_key_text,
)

# The "Check" lines of hsm.md 2 (verified there with the test LMK).
CHECKS = [
    ("0406FBB23A5214DF", "002", "0B681FC20E62C734"),                      # TPK
    ("U1EF828AA8F6B80EB83E19FBC373F3A85", "001", "C7152C20BC2C830EA7EC9E8334ABE3FE"),  # ZPK
    ("U9B4934384B19946B040CD702B4D58145", "402", "0123456789ABCDEFFEDCBA9876543210"),  # CVK
]


@pytest.mark.parametrize("text,key_type,clear", CHECKS)
def test_spec_check_values_decrypt(text, key_type, clear):
    assert decrypt_under_lmk(text, key_type).hex().upper() == clear


@pytest.mark.parametrize("text,key_type,clear", CHECKS)
def test_spec_check_values_encrypt(text, key_type, clear):
    assert encrypt_under_lmk(bytes.fromhex(clear), key_type) == text


def test_key_type_table():
    expect = {"000": (2, 0), "001": (3, 0), "002": (7, 0), "003": (8, 0), "008": (13, 0),
              "009": (14, 0), "109": (14, 1), "402": (7, 4)}
    assert {c: (kt.pair, kt.variant) for c, kt in KEY_TYPES.items()} == expect
    assert VARIANTS[1:] == (0xA6, 0x5A, 0x6A, 0xDE, 0x2B, 0x50, 0x74, 0x9C, 0xFA)


def test_variant_and_scheme_bytes_by_hand():
    """A CVK (402, pair 14-15, variant 4 = DE) as U: byte 0 ^ DE, byte 8 ^ A6 / 5A."""
    clear = bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")
    pair = bytearray(bytes.fromhex(TEST_LMK_PAIRS[7]))
    pair[0] ^= 0xDE
    left, right = bytearray(pair), bytearray(pair)
    left[8] ^= 0xA6
    right[8] ^= 0x5A
    enc = tdes_ecb_encrypt(bytes(left), clear[:8]) + tdes_ecb_encrypt(bytes(right), clear[8:])
    assert encrypt_under_lmk(clear, "402") == "U" + enc.hex().upper()


def test_triple_length_uses_6a_de_2b():
    clear = fix_parity(bytes(range(24)))
    text = encrypt_under_lmk(clear, "001")
    assert text[0] == "T" and len(text) == 49
    pair = bytes.fromhex(TEST_LMK_PAIRS[3])
    enc = bytes.fromhex(text[1:])
    for i, v in enumerate((0x6A, 0xDE, 0x2B)):
        k = bytearray(pair)
        k[8] ^= v
        assert tdes_ecb_decrypt(bytes(k), enc[8 * i:8 * i + 8]) == clear[8 * i:8 * i + 8]
    assert decrypt_under_lmk(text, "001") == clear


def test_key_types_give_different_encryptions():
    clear = fix_parity(bytes.fromhex("00112233445566778899AABBCCDDEEFF"))
    texts = {encrypt_under_lmk(clear, code) for code in KEY_TYPES}
    assert len(texts) == len(KEY_TYPES)
    # A CVK (402) is not readable as a TPK (002, same pair, variant 0).
    try:
        wrong = decrypt_under_lmk(encrypt_under_lmk(clear, "402"), "002")
    except HsmError as e:
        assert e.code == "10"
    else:
        assert wrong != clear


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(sorted(KEY_TYPES)), st.sampled_from([8, 16, 24]), st.binary(min_size=24, max_size=24))
def test_round_trip_every_key_type(code, n, raw):
    clear = fix_parity(raw[:n])
    text = encrypt_under_lmk(clear, code)
    assert len(text) == {8: 16, 16: 33, 24: 49}[n]
    assert text[0] in {8: "0123456789ABCDEF", 16: "U", 24: "T"}[n]
    assert decrypt_under_lmk(text, code) == clear
    assert decrypt_under_lmk(text.lower(), code) == clear


def test_bad_parity_source_and_destination():
    bad = bytes.fromhex("0123456789ABCDEFFEDCBA9876543211")      # last byte even parity
    text = encrypt_under_lmk(bad, "001")
    with pytest.raises(HsmError) as e:
        decrypt_under_lmk(text, "001")
    assert e.value.code == "10"
    with pytest.raises(HsmError) as e:
        decrypt_under_lmk(text, "001", dest=True)
    assert e.value.code == "11"


@pytest.mark.parametrize("text,code", [
    ("", "15"), ("0406FBB23A5214D", "15"), ("0406FBB23A5214DFAA", "15"), ("U1EF8", "15"),
    ("U1EF828AA8F6B80EB83E19FBC373F3AGG", "15"), ("S1EF828AA8F6B80EB83E19FBC373F3A85", "26"),
    ("X1EF828AA8F6B80EB83E19FBC373F3A85", "26"),   # X9.17 is for keys under a ZMK
    ("!406FBB23A5214DF", "15"),
])
def test_malformed_key_text(text, code):
    with pytest.raises(HsmError) as e:
        decrypt_under_lmk(text, "002")
    assert e.value.code == code


def test_unknown_key_type_is_04():
    with pytest.raises(HsmError) as e:
        decrypt_under_lmk("0406FBB23A5214DF", "777")
    assert e.value.code == "04"
    with pytest.raises(HsmError) as e:
        encrypt_under_lmk(bytes(8), "F02")
    assert e.value.code == "04"


def test_z_prefix_is_single_length():
    assert decrypt_under_lmk("Z0406FBB23A5214DF", "002").hex().upper() == "0B681FC20E62C734"
    assert split_key_text(b"U" + b"0" * 32)[0] == "U"


@pytest.mark.parametrize("scheme", ["Z", "U", "X", "T", "Y"])
def test_kek_round_trip(scheme):
    kek = fix_parity(bytes.fromhex("0123456789ABCDEFFEDCBA9876543210"))
    n = {"Z": 8, "U": 16, "X": 16, "T": 24, "Y": 24}[scheme]
    clear = fix_parity(bytes(range(7, 7 + n)))
    text = encrypt_under_kek(kek, clear, scheme)
    s, enc = split_key_text(text)
    assert decrypt_under_kek(kek, s, enc) == clear
    if scheme in ("X", "Y"):     # ANSI X9.17: plain TDES ECB under the KEK
        assert enc == tdes_ecb_encrypt(kek, clear)
    if scheme == "U":            # variant: differs from X9.17
        assert enc != tdes_ecb_encrypt(kek, clear)


# -- LMK sets from a file ------------------------------------------------------

def _lmk_text(pairs) -> str:
    return "\n".join(f"{i:02d} {p}" for i, p in enumerate(pairs)) + "\n"


def test_lmk_file_loads(tmp_path):
    other = [fix_parity(bytes([i + 1]) * 8 + bytes([i + 0x40]) * 8).hex().upper() for i in range(20)]
    path = tmp_path / "lmk.txt"
    path.write_text("# a test set\n\n" + _lmk_text(other).replace("\n", "   # comment\n", 1))
    lmk = Lmk.from_file(path)
    assert lmk.pairs[7].hex().upper() == other[7]
    clear = bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")
    text = lmk.encrypt(clear, "402")
    assert text != encrypt_under_lmk(clear, "402")
    assert lmk.decrypt(text, "402") == clear
    assert lmk.check_value() != Lmk.test().check_value()


def test_lmk_file_order_free(tmp_path):
    lines = [f"{i:02d} {p}" for i, p in enumerate(TEST_LMK_PAIRS)]
    path = tmp_path / "lmk.txt"
    path.write_text("\n".join(reversed(lines)))
    assert Lmk.from_file(path).pairs == Lmk.test().pairs


@pytest.mark.parametrize("mutate,message", [
    (lambda ls: ls[:-1], "missing: 19"),
    (lambda ls: ls + [ls[0]], "given twice"),
    (lambda ls: ls[:3] + ["03 0101"] + ls[4:], "expected 'NN HEX32'"),
    (lambda ls: ls + ["20 " + "01" * 16], "not 00-19"),
    (lambda ls: ["00 " + "00" * 16] + ls[1:], "odd parity"),
])
def test_lmk_file_errors(tmp_path, mutate, message):
    lines = [f"{i:02d} {p}" for i, p in enumerate(TEST_LMK_PAIRS)]
    path = tmp_path / "lmk.txt"
    path.write_text("\n".join(mutate(lines)))
    with pytest.raises(LmkError, match=message):
        Lmk.from_file(path)


def test_lmk_file_missing(tmp_path):
    with pytest.raises(LmkError, match="cannot read"):
        Lmk.from_file(tmp_path / "nope.txt")
