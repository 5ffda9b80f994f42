"""PIN block formats ISO 0/1/2/3/4 and Diebold/IBM: behaviour, validation and
differential tests against psec and pyemv (test oracles only)."""

from __future__ import annotations

import warnings

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cardswitch.crypto import pinblock
from cardswitch.crypto.des import tdes_ecb_decrypt, tdes_ecb_encrypt, xor
from cardswitch.crypto.pinblock import (
    HSM_FORMATS,
    decipher_iso4,
    decrypt_pin_block,
    encipher_iso4,
    encrypt_pin_block,
    make_pin_block,
    pin_from_block,
    translate_pin,
    translate_pin_block,
)

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import psec.pinblock
    import pyemv.sm


def oracle(fn, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args)


H = bytes.fromhex
K16 = H("0123456789ABCDEFFEDCBA9876543210")
K16B = H("89ABCDEF0123456776543210FEDCBA98")
PAN = "43219876543210987"
pins = st.text("0123456789", min_size=4, max_size=12)
pans = st.text("0123456789", min_size=13, max_size=19)
aes_keys = st.sampled_from([16, 24, 32]).flatmap(lambda n: st.binary(min_size=n, max_size=n))


def fixed(byte: int):
    return lambda n: bytes([byte]) * n


# -- construction ----------------------------------------------------------------

def test_hsm_format_codes():
    assert HSM_FORMATS == {"01": "ISO0", "03": "IBM3624", "05": "ISO1", "47": "ISO3"}
    assert pinblock.HSM_FORMAT_CODES["ISO3"] == "47"


def test_iso1_with_given_and_random_fill():
    assert make_pin_block("ISO1", "1234", fill="0123456789").hex().upper() == "1412340123456789"
    assert make_pin_block("ISO1", "1234", rand=fixed(0x3C)).hex().upper() == "141234CCCCCCCCCC"
    blocks = {make_pin_block("ISO1", "1234") for _ in range(8)}
    assert len(blocks) > 1  # random fill


def test_iso3_fill_is_a_to_f_and_xored_with_pan():
    block = make_pin_block("ISO3", "1234", "5544332211009966", fill="ABCDEFABCD")
    clear = xor(block, H("0000433221100996"))
    assert clear.hex().upper() == "341234ABCDEFABCD"
    # byte 0x06 -> alphabet index 0 -> A; bytes >= 252 are rejected (uniform fill)
    seq = iter([bytes([255] * 10), bytes([6] * 10)])
    block = make_pin_block("ISO3", "1234", "5544332211009966", rand=lambda n: next(seq))
    assert pin_from_block("ISO3", block, "5544332211009966") == "1234"
    assert xor(block, H("0000433221100996")).hex().upper() == "341234AAAAAAAAAA"


def test_random_source_that_never_helps_is_an_error():
    with pytest.raises(ValueError, match="random source"):
        make_pin_block("ISO3", "1234", PAN, rand=fixed(0xFF))


def test_ibm3624_format():
    assert make_pin_block("IBM3624", "1234").hex().upper() == "1234FFFFFFFFFFFF"
    assert make_pin_block("IBM3624", "123456789012").hex().upper() == "123456789012FFFF"
    assert pin_from_block("IBM3624", H("123456FFFFFFFFFF")) == "123456"


@pytest.mark.parametrize("fmt", ["ISO0", "ISO1", "ISO2", "ISO3", "IBM3624"])
def test_round_trip_every_format(fmt):
    for pin in ("1234", "98765", "123456789012"):
        assert pin_from_block(fmt, make_pin_block(fmt, pin, PAN), PAN) == pin


@pytest.mark.parametrize("fill", ["ABC", "0123456789", "GGGGGGGGGG"])
def test_bad_fill_for_iso3(fill):
    with pytest.raises(ValueError):
        make_pin_block("ISO3", "1234", PAN, fill=fill)


def test_unknown_format_and_missing_pan():
    with pytest.raises(ValueError, match="unknown PIN block format"):
        make_pin_block("ISO9", "1234", PAN)
    with pytest.raises(ValueError, match="unknown PIN block format"):
        pin_from_block("ISO9", bytes(8), PAN)
    with pytest.raises(ValueError, match="PAN"):
        make_pin_block("ISO3", "1234", "")


# -- validation ------------------------------------------------------------------

@pytest.mark.parametrize("fmt,clear_hex", [
    ("ISO1", "0412341234123412"),  # control 0
    ("ISO1", "1312341234123412"),  # PIN length 3
    ("ISO1", "1D12341234123412"),  # PIN length 13
    ("ISO1", "14123A1234123412"),  # non-digit PIN
    ("ISO2", "241234FFFFFFFFFE"),  # fill not F
    ("ISO2", "141234FFFFFFFFFF"),  # control 1
    ("IBM3624", "123FFFFFFFFFFFFF"),  # 3 digits
    ("IBM3624", "12345678901234FF"),  # 14 digits
    ("IBM3624", "1234AFFFFFFFFFFF"),  # non-digit, non-F nibble
    ("IBM3624", "1234FFFF1FFFFFFF"),  # digit after the pad
])
def test_pin_from_block_rejects_invalid_blocks_without_pan(fmt, clear_hex):
    with pytest.raises(ValueError):
        pin_from_block(fmt, H(clear_hex))


@pytest.mark.parametrize("field_hex", [
    "241234ABCDEFABCD",  # control 2
    "331234ABCDEFABCD",  # length 3
    "341234ABCDEFAB1D",  # fill digit 1
    "34123AABCDEFABCD",  # non-digit PIN
])
def test_iso3_rejects_invalid_blocks(field_hex):
    block = xor(H(field_hex), H("0000433221100996"))
    with pytest.raises(ValueError):
        pin_from_block("ISO3", block, "5544332211009966")


def test_block_length_is_checked():
    for fmt in pinblock.FORMATS:
        with pytest.raises(ValueError, match="8 bytes"):
            pin_from_block(fmt, bytes(7), PAN)


# -- encrypted blocks and translation ---------------------------------------------

@pytest.mark.parametrize("src,dst", [("ISO0", "ISO3"), ("ISO3", "ISO0"), ("ISO1", "ISO0"),
                                     ("IBM3624", "ISO1"), ("ISO0", "IBM3624")])
def test_translation_between_formats(src, dst):
    block = encrypt_pin_block("987654", PAN, K16, fmt=src)
    assert decrypt_pin_block(block, K16, PAN, fmt=src) == "987654"
    n, out = translate_pin(block, K16, K16B, PAN, src, dst)
    assert n == 6
    assert decrypt_pin_block(out, K16B, PAN, fmt=dst) == "987654"
    out2 = translate_pin_block(block, K16, K16B, PAN, src, dst)
    assert decrypt_pin_block(out2, K16B, PAN, fmt=dst) == "987654"


def test_same_format_translation_keeps_the_clear_block():
    block = encrypt_pin_block("1234", PAN, K16, fmt="ISO3")
    out = translate_pin_block(block, K16, K16B, PAN, "ISO3", "ISO3")
    assert tdes_ecb_decrypt(K16B, H(out)) == tdes_ecb_decrypt(K16, H(block))


def test_translation_checks_the_source_format():
    block = encrypt_pin_block("1234", PAN, K16, fmt="ISO3")
    with pytest.raises(ValueError):
        translate_pin(block, K16, K16B, PAN, "ISO0", "ISO0")


# -- format 4 ----------------------------------------------------------------------

def test_iso4_fields():
    field = pinblock.make_pin_field_iso4("1234", fill="0123456789ABCDEF")
    assert field.hex().upper() == "441234AAAAAAAAAA0123456789ABCDEF"
    assert pinblock.pin_from_field_iso4(field) == "1234"
    assert pinblock.pan_field_iso4("432198765432109870").hex().upper() == "64321987654321098700000000000000"
    assert pinblock.pan_field_iso4("1234").hex().upper() == "00000000012340000000000000000000"


@pytest.mark.parametrize("field_hex", [
    "341234AAAAAAAAAA0123456789ABCDEF",  # control 3
    "431234AAAAAAAAAA0123456789ABCDEF",  # length 3
    "441234AAAAAAAAAB0123456789ABCDEF",  # fill not A
    "44123AAAAAAAAAAA0123456789ABCDEF",  # non-digit PIN
])
def test_iso4_field_validation(field_hex):
    with pytest.raises(ValueError):
        pinblock.pin_from_field_iso4(H(field_hex))


def test_iso4_wrong_key_or_pan_is_rejected():
    key = H("C1D0F8FB4958670DBA40AB1F3752EF0D")
    block = encipher_iso4("1234", "432198765432109870", key)
    with pytest.raises(ValueError):
        decipher_iso4(block, "432198765432109871", key)
    with pytest.raises(ValueError):
        decipher_iso4(block, "432198765432109870", K16)
    with pytest.raises(ValueError, match="16 bytes"):
        decipher_iso4(block[:8], "432198765432109870", key)


# -- differential tests ------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(pin=pins, pan=pans)
def test_iso3_matches_psec(pin, pan):
    ours = make_pin_block("ISO3", pin, pan)
    assert oracle(psec.pinblock.decode_pinblock_iso_3, ours, pan) == pin
    theirs = oracle(psec.pinblock.encode_pinblock_iso_3, pin, pan)
    assert pin_from_block("ISO3", theirs, pan) == pin


@settings(max_examples=200, deadline=None)
@given(block=st.binary(min_size=8, max_size=8), pan=pans)
def test_iso3_decode_agrees_with_psec_on_any_block(block, pan):
    try:
        expected = oracle(psec.pinblock.decode_pinblock_iso_3, block, pan)
    except ValueError:
        expected = None
    try:
        got = pin_from_block("ISO3", block, pan)
    except ValueError:
        got = None
    assert got == expected


@settings(max_examples=100, deadline=None)
@given(pin=pins)
def test_iso2_matches_pyemv(pin):
    assert make_pin_block("ISO2", pin) == oracle(pyemv.sm.format_iso9564_2_pin_block, pin)


@settings(max_examples=100, deadline=None)
@given(pin=pins)
def test_iso2_matches_psec(pin):
    assert make_pin_block("ISO2", pin) == oracle(psec.pinblock.encode_pinblock_iso_2, pin)


@settings(max_examples=150, deadline=None)
@given(key=aes_keys, pin=pins, pan=st.text("0123456789", min_size=1, max_size=19))
def test_iso4_matches_psec(key, pin, pan):
    assert pinblock.pan_field_iso4(pan) == oracle(psec.pinblock.encode_pan_field_iso_4, pan)
    ours = encipher_iso4(pin, pan, key)
    assert oracle(psec.pinblock.decipher_pinblock_iso_4, key, ours, pan) == pin
    theirs = oracle(psec.pinblock.encipher_pinblock_iso_4, key, pin, pan)
    assert decipher_iso4(theirs, pan, key) == pin


@settings(max_examples=100, deadline=None)
@given(pin=pins, pan=pans, k1=st.binary(min_size=16, max_size=16), k2=st.binary(min_size=16, max_size=16))
def test_iso3_to_iso0_translation_matches_psec(pin, pan, k1, k2):
    src = oracle(psec.pinblock.encode_pinblock_iso_3, pin, pan)
    n, out = translate_pin(tdes_ecb_encrypt(k1, src).hex(), k1, k2, pan, "ISO3", "ISO0")
    assert n == len(pin)
    assert tdes_ecb_decrypt(k2, H(out)) == oracle(psec.pinblock.encode_pinblock_iso_0, pin, pan)
