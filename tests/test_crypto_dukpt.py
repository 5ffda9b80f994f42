"""DUKPT (TDES X9.24-1:2009, AES X9.24-3-2017): behaviour beyond the published
vectors (those are in test_crypto_vectors.py). Neither psec nor pyemv has
DUKPT, so the properties here check the derivation's structure with
independent arithmetic (psec's TDES for the single steps)."""

from __future__ import annotations

import warnings

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cardswitch.crypto import dukpt

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import psec.aes
    import psec.des


def oracle(fn, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args)


H = bytes.fromhex
BDK = H("0123456789ABCDEFFEDCBA9876543210")
IPEK = H("6AC292FAA1315B4D858AB3A3D7D5933A")
KSN0 = "FFFF9876543210E00000"
keys16 = st.binary(min_size=16, max_size=16)
ksn_prefix = st.binary(min_size=10, max_size=10).map(lambda b: int.from_bytes(b, "big") & ~0x1FFFFF)


def ksn_with(prefix: int, counter: int) -> bytes:
    return (prefix | counter).to_bytes(10, "big")


def xor_int(key: bytes, mask: int) -> bytes:
    return (int.from_bytes(key, "big") ^ mask).to_bytes(len(key), "big")


def oracle_nrkgp(key: bytes, reg: bytes) -> bytes:
    """X9.24-1 non-reversible key generation, step by step with psec's single DES."""
    def half(k: bytes) -> bytes:
        kl, kr = k[:8], k[8:]
        msg = bytes(a ^ b for a, b in zip(reg, kr))
        enc = oracle(psec.des.encrypt_tdes_ecb, kl * 2, msg)
        return bytes(a ^ b for a, b in zip(enc, kr))
    return half(xor_int(key, 0xC0C0C0C000000000C0C0C0C000000000)) + half(key)


# -- TDES --------------------------------------------------------------------------

def test_counter_zero_is_the_ipek():
    assert dukpt.tdes_transaction_key(BDK, KSN0) == IPEK
    assert dukpt.ksn_counter("FFFF9876543210EFFC00") == 0x0FFC00
    assert dukpt.ksn_counter(H("FFFF9876543210F00000")) == 0x100000


def test_ipek_ignores_the_counter():
    assert dukpt.tdes_ipek(BDK, "FFFF9876543210E00001") == dukpt.tdes_ipek(BDK, "FFFF9876543210FFFFFF") == IPEK


@settings(max_examples=60, deadline=None)
@given(prefix=ksn_prefix, counter=st.integers(1, 0x1FFFFF), bdk=keys16)
def test_transaction_key_is_one_nrkgp_step_from_its_parent(prefix, counter, bdk):
    # the parent KSN is the counter without its lowest set bit
    low = counter & -counter
    parent = dukpt.tdes_transaction_key(bdk, ksn_with(prefix, counter - low))
    reg = (ksn_with(prefix, counter)[2:])
    assert dukpt.tdes_transaction_key(bdk, ksn_with(prefix, counter)) == oracle_nrkgp(parent, reg)


@settings(max_examples=60, deadline=None)
@given(prefix=ksn_prefix, bdk=keys16)
def test_ipek_matches_psec_tdes(prefix, bdk):
    reg = ksn_with(prefix, 0)[:8]
    left = oracle(psec.des.encrypt_tdes_ecb, bdk, reg)
    right = oracle(psec.des.encrypt_tdes_ecb, xor_int(bdk, 0xC0C0C0C000000000C0C0C0C000000000), reg)
    assert dukpt.tdes_ipek(bdk, ksn_with(prefix, 1)) == left + right


def test_working_key_variants():
    key = H("042666B49184CFA368DE9628D0397BC9")
    assert dukpt.tdes_mac_key(key, response=True) == xor_int(key, 0x00000000FF00000000000000FF000000)
    variant = xor_int(key, 0x0000000000FF00000000000000FF0000)
    assert dukpt.tdes_data_key(key) == oracle(psec.des.encrypt_tdes_ecb, variant, variant)
    resp = xor_int(key, 0x000000FF00000000000000FF00000000)
    assert dukpt.tdes_data_key(key, response=True) == oracle(psec.des.encrypt_tdes_ecb, resp, resp)


@pytest.mark.parametrize("ksn", ["FFFF9876543210E0000", "FFFF9876543210E0000100", "ZZFF9876543210E00001"])
def test_bad_ksn(ksn):
    with pytest.raises(ValueError, match="KSN"):
        dukpt.tdes_transaction_key(BDK, ksn)


def test_bad_key_lengths():
    with pytest.raises(ValueError, match="BDK"):
        dukpt.tdes_ipek(BDK[:8], KSN0)
    with pytest.raises(ValueError, match="IPEK"):
        dukpt.tdes_transaction_key(IPEK + IPEK[:8], KSN0, from_ipek=True)
    with pytest.raises(ValueError):
        dukpt.tdes_pin_key(IPEK[:8])


# -- AES ---------------------------------------------------------------------------

ABDK = H("FEDCBA9876543210F1F1F1F1F1F1F1F1")
IKID = "1234567890123456"


def oracle_derive(key: bytes, usage: int, algorithm: int, bits: int, data8: bytes) -> bytes:
    out = b""
    for i in range(1, (bits + 127) // 128 + 1):
        block = bytes((1, i)) + usage.to_bytes(2, "big") + algorithm.to_bytes(2, "big") + \
            bits.to_bytes(2, "big") + data8
        out += oracle(psec.aes.encrypt_aes_ecb, key, block)
    return out[: bits // 8]


@settings(max_examples=40, deadline=None)
@given(bdk=st.sampled_from([16, 24, 32]).flatmap(lambda n: st.binary(min_size=n, max_size=n)),
       ikid=st.binary(min_size=8, max_size=8), counter=st.integers(1, 0xFFFFFFFF))
def test_aes_transaction_key_is_one_derivation_from_its_parent(bdk, ikid, counter):
    algorithm, bits = {16: (2, 128), 24: (3, 192), 32: (4, 256)}[len(bdk)]
    initial = dukpt.aes_initial_key(bdk, ikid)
    assert initial == oracle_derive(bdk, 0x8001, algorithm, bits, ikid)
    low = counter & -counter
    parent = dukpt.aes_transaction_key(bdk, dukpt.aes_ksn(ikid, counter - low))
    key = dukpt.aes_transaction_key(bdk, dukpt.aes_ksn(ikid, counter))
    assert len(key) == len(bdk)
    assert key == oracle_derive(parent, 0x8000, algorithm, bits, ikid[4:] + counter.to_bytes(4, "big"))


def test_aes_counter_zero_is_the_initial_key():
    ksn = dukpt.aes_ksn(IKID, 0)
    assert dukpt.aes_transaction_key(ABDK, ksn) == dukpt.aes_initial_key(ABDK, IKID)


@pytest.mark.parametrize("key_type,length", [("AES128", 16), ("AES192", 24), ("AES256", 32),
                                             ("TDES2", 16), ("TDES3", 24)])
def test_aes_working_key_types(key_type, length):
    ksn = dukpt.aes_ksn(IKID, 1)
    tk = dukpt.aes_transaction_key(ABDK, ksn)
    algorithm, bits = dukpt.KEY_TYPES[key_type]
    expected = oracle_derive(tk, dukpt.USAGE_PIN_ENCRYPTION, algorithm, bits, ksn[4:])
    pin_key = dukpt.aes_pin_key(tk, ksn, key_type)
    assert pin_key == expected and len(pin_key) == length
    usages = {dukpt.aes_pin_key(tk, ksn, key_type), dukpt.aes_mac_key(tk, ksn, key_type),
              dukpt.aes_data_key(tk, ksn, key_type)}
    assert len(usages) == 3


def test_aes_bad_inputs():
    with pytest.raises(ValueError, match="BDK"):
        dukpt.aes_initial_key(ABDK[:15], IKID)
    with pytest.raises(ValueError, match="initial key ID"):
        dukpt.aes_initial_key(ABDK, IKID[:14])
    with pytest.raises(ValueError, match="KSN"):
        dukpt.aes_transaction_key(ABDK, IKID + "0000")
    with pytest.raises(ValueError, match="counter"):
        dukpt.aes_ksn(IKID, 1 << 32)
    with pytest.raises(ValueError, match="key type"):
        dukpt.aes_pin_key(ABDK, dukpt.aes_ksn(IKID, 1), "AES512")
