"""cardswitch.crypto: published vectors, then differential tests against psec.

psec is a test oracle only (it calls cryptography's deprecated TripleDES
path); the product never imports it.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cardswitch.crypto import (
    check_odd_parity,
    decrypt_pin_block,
    encrypt_pin_block,
    fix_parity,
    kcv,
    mac_alg1,
    mac_alg3,
    make_pin_block_iso0,
    pad,
    pin_from_block_iso0,
    tdes_ecb_decrypt,
    tdes_ecb_encrypt,
    translate_pin_block,
)

VECTORS = json.loads((Path(__file__).parent / "vectors" / "crypto.json").read_text())

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import psec.des
    import psec.mac
    import psec.pinblock


def oracle(fn, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args)


# -- published vectors -------------------------------------------------------

@pytest.mark.parametrize("case", VECTORS["kcv"]["cases"], ids=lambda c: c["key"][:8] + f"/{len(c['key'])}")
def test_kcv_vectors(case):
    assert kcv(bytes.fromhex(case["key"])) == case["kcv"]


ISO0 = [c for c in VECTORS["pin_block"]["cases"] if c["format"] == "ISO0"]


def test_there_are_iso0_vectors():
    assert len(ISO0) >= 3


@pytest.mark.parametrize("case", ISO0, ids=lambda c: c["pan"])
def test_pin_block_iso0_vectors(case):
    block = make_pin_block_iso0(case["pin"], case["pan"])
    assert block.hex().upper() == case["block"]
    assert pin_from_block_iso0(bytes.fromhex(case["block"]), case["pan"]) == case["pin"]


@pytest.mark.parametrize("case", VECTORS["mac"]["cases"], ids=lambda c: f"alg{c['algorithm']}-pad{c['padding']}-{c['mac']}")
def test_mac_vectors(case):
    key = bytes.fromhex(case["key"])
    data = case["data_ascii"].encode("ascii") if "data_ascii" in case else bytes.fromhex(case["data_hex"])
    fn = {1: mac_alg1, 3: mac_alg3}[case["algorithm"]]
    assert fn(key, data, padding=case["padding"]).hex().upper() == case["mac"]


# -- behaviour -----------------------------------------------------------------

K16 = bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")
K16B = bytes.fromhex("89ABCDEF0123456776543210FEDCBA98")


def test_single_des_and_double_length_expansion():
    k8 = K16[:8]
    assert tdes_ecb_encrypt(k8, bytes(8)).hex().upper().startswith("D5D44F")
    # K1K2 is K1K2K1: same result as the explicit 24-byte key
    data = bytes(range(16))
    assert tdes_ecb_encrypt(K16, data) == tdes_ecb_encrypt(K16 + K16[:8], data)
    assert tdes_ecb_decrypt(K16, tdes_ecb_encrypt(K16, data)) == data


def test_bad_key_and_data_lengths():
    with pytest.raises(ValueError):
        tdes_ecb_encrypt(bytes(10), bytes(8))
    with pytest.raises(ValueError):
        tdes_ecb_encrypt(K16, bytes(7))
    with pytest.raises(ValueError):
        mac_alg3(K16[:8], b"abc")
    with pytest.raises(ValueError):
        pad(b"abc", 3)


def test_parity():
    assert check_odd_parity(K16)  # the classic test key already has odd parity
    even = bytes.fromhex("0022446688AACCEE1032547698BADCFE")
    assert not check_odd_parity(even)
    fixed = fix_parity(even)
    assert check_odd_parity(fixed)
    assert fix_parity(fixed) == fixed
    assert bytes(a & 0xFE for a in fixed) == bytes(a & 0xFE for a in even)
    assert fixed.hex().upper() == "0123456789ABCDEF1032547698BADCFE"


def test_padding_methods():
    assert pad(b"", 1) == bytes(8)
    assert pad(b"12345678", 1) == b"12345678"
    assert pad(b"12345678", 2) == b"12345678\x80" + bytes(7)
    assert pad(b"123", 2) == b"123\x80" + bytes(4)


def test_encrypted_pin_block_round_trip_and_translation():
    pan = "6221260000000017"
    block = encrypt_pin_block("1234", pan, K16)
    assert len(block) == 16 and block == block.upper()
    assert decrypt_pin_block(block, K16, pan) == "1234"
    assert decrypt_pin_block(block.lower(), K16, pan) == "1234"
    out = translate_pin_block(block, K16, K16B, pan)
    assert out != block
    assert decrypt_pin_block(out, K16B, pan) == "1234"
    assert out == encrypt_pin_block("1234", pan, K16B)


@pytest.mark.parametrize("block_hex", ["", "ZZ" * 8, "00" * 7, "00" * 9])
def test_translate_rejects_malformed_hex(block_hex):
    with pytest.raises(ValueError):
        translate_pin_block(block_hex, K16, K16B, "6221260000000017")


def test_translate_rejects_block_under_another_key():
    pan = "6221260000000017"
    wrong = encrypt_pin_block("1234", pan, K16B)
    # decrypting under the wrong key gives garbage, which is not a format 0 block
    with pytest.raises(ValueError):
        translate_pin_block(wrong, K16, K16B, pan)


@pytest.mark.parametrize("clear_hex", [
    "1412AC89ABCDEF67",  # control field 1
    "0312AC89ABCDEF67",  # PIN length 3
    "04FFAC89ABCDEF67",  # PIN digits not decimal (after XOR)
    "0412AC89ABCDEF68",  # fill not F
])
def test_pin_from_block_rejects_non_format0(clear_hex):
    with pytest.raises(ValueError):
        pin_from_block_iso0(bytes.fromhex(clear_hex), "43219876543210987")


@pytest.mark.parametrize("pin,pan", [("123", "4012345678909"), ("1234567890123", "4012345678909"),
                                     ("12a4", "4012345678909"), ("1234", "40123x5678909"), ("1234", "")])
def test_make_pin_block_rejects_bad_input(pin, pan):
    with pytest.raises(ValueError):
        make_pin_block_iso0(pin, pan)


# -- differential tests against psec -------------------------------------------

keys16 = st.binary(min_size=16, max_size=16)
keys = st.sampled_from([8, 16, 24]).flatmap(lambda n: st.binary(min_size=n, max_size=n))
pins = st.text("0123456789", min_size=4, max_size=12)
pans = st.text("0123456789", min_size=13, max_size=19)


@settings(max_examples=200, deadline=None)
@given(key=st.sampled_from([16, 24]).flatmap(lambda n: st.binary(min_size=n, max_size=n)),
       data=st.binary(min_size=8, max_size=64).map(lambda b: b[: len(b) // 8 * 8]))
def test_ecb_matches_psec(key, data):
    assert tdes_ecb_encrypt(key, data) == oracle(psec.des.encrypt_tdes_ecb, key, data)
    assert tdes_ecb_decrypt(key, data) == oracle(psec.des.decrypt_tdes_ecb, key, data)


@settings(max_examples=100, deadline=None)
@given(key=st.sampled_from([16, 24]).flatmap(lambda n: st.binary(min_size=n, max_size=n)))
def test_kcv_matches_psec(key):
    assert kcv(key) == oracle(psec.des.generate_kcv, key, 3).hex().upper()


@settings(max_examples=100, deadline=None)
@given(key=st.binary(min_size=16, max_size=16))
def test_parity_matches_psec(key):
    assert fix_parity(key) == oracle(psec.des.adjust_key_parity, key)


@settings(max_examples=200, deadline=None)
@given(pin=pins, pan=pans)
def test_pin_block_matches_psec(pin, pan):
    block = make_pin_block_iso0(pin, pan)
    assert block == oracle(psec.pinblock.encode_pinblock_iso_0, pin, pan)
    assert pin_from_block_iso0(block, pan) == pin
    assert oracle(psec.pinblock.decode_pinblock_iso_0, block, pan) == pin


@settings(max_examples=200, deadline=None)
@given(block=st.binary(min_size=8, max_size=8), pan=pans)
def test_pin_decode_agrees_with_psec_on_any_block(block, pan):
    try:
        expected = oracle(psec.pinblock.decode_pinblock_iso_0, block, pan)
    except ValueError:
        expected = None
    try:
        got = pin_from_block_iso0(block, pan)
    except ValueError:
        got = None
    assert got == expected


@settings(max_examples=200, deadline=None)
@given(key=keys16, data=st.binary(max_size=80), padding=st.sampled_from([1, 2]))
def test_retail_mac_matches_psec(key, data, padding):
    expected = oracle(psec.mac.generate_retail_mac, key[:8], key[8:], data, padding)
    assert mac_alg3(key, data, padding=padding) == expected


@settings(max_examples=200, deadline=None)
@given(key=keys, data=st.binary(max_size=80), padding=st.sampled_from([1, 2]))
def test_cbc_mac_matches_psec(key, data, padding):
    assert mac_alg1(key, data, padding=padding) == oracle(psec.mac.generate_cbc_mac, key, data, padding)


@settings(max_examples=100, deadline=None)
@given(pin=pins, pan=pans, k1=keys16, k2=keys16)
def test_translation_matches_psec(pin, pan, k1, k2):
    under_k1 = oracle(psec.des.encrypt_tdes_ecb, k1, oracle(psec.pinblock.encode_pinblock_iso_0, pin, pan))
    out = translate_pin_block(under_k1.hex(), k1, k2, pan)
    clear = oracle(psec.des.decrypt_tdes_ecb, k2, bytes.fromhex(out))
    assert oracle(psec.pinblock.decode_pinblock_iso_0, clear, pan) == pin
