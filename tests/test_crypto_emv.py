"""EMV issuer cryptography: behaviour and differential tests against pyemv
(test oracle only). The published vector is in test_crypto_vectors.py."""

from __future__ import annotations

import warnings

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cardswitch.crypto import emv
from cardswitch.crypto.des import check_odd_parity

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from pyemv import ac as pyemv_ac
    from pyemv import kd as pyemv_kd


def oracle(fn, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args)


H = bytes.fromhex
IMK = H("0123456789ABCDEFFEDCBA9876543210")
keys16 = st.binary(min_size=16, max_size=16)
pans = st.text("0123456789", min_size=12, max_size=19)
psns = st.text("0123456789", min_size=2, max_size=2)


def test_session_key_from_atc_is_r_with_zeros():
    mk = emv.icc_master_key_option_a(IMK, "9901234567890123", "45")
    atc = H("0001")
    assert emv.session_r(atc) == H("0001000000000000")
    assert emv.session_r(atc, H("11223344")) == H("0001000011223344")
    assert emv.session_key_common(mk, atc) == emv.session_key_common(mk, H("0001000000000000"))
    assert check_odd_parity(emv.session_key_common(mk, atc))


def test_icc_master_key_data_is_the_kq_field():
    # KQ carries PAN/PSN as 8 bytes: the right-most 16 digits of PAN || PSN
    assert emv.icc_master_key_option_a(IMK, "9901234567890123", "45") == \
        emv.icc_master_key_from_data(IMK, H("0123456789012345"))
    assert emv.icc_master_key_option_a(IMK, "12345678901", "01") == \
        emv.icc_master_key_from_data(IMK, H("0001234567890101"))


@pytest.mark.parametrize("call,match", [
    (lambda: emv.icc_master_key_option_a(IMK[:8], "4761739001010010"), "issuer master key"),
    (lambda: emv.icc_master_key_option_a(IMK, "47617390010100A0"), "PAN"),
    (lambda: emv.icc_master_key_option_a(IMK, "4761739001010010", "1"), "sequence"),
    (lambda: emv.session_key_common(IMK, H("000102")), "ATC"),
    (lambda: emv.session_key_common(IMK[:8], H("0001")), "ICC master key"),
    (lambda: emv.session_r(H("0001"), H("112233")), "unpredictable"),
    (lambda: emv.arqc(IMK, b"abc", padding="iso"), "padding"),
    (lambda: emv.arqc(IMK[:8], b"abc"), "session key"),
    (lambda: emv.arpc_method1(IMK, bytes(7), bytes(2)), "ARQC"),
    (lambda: emv.arpc_method1(IMK, bytes(8), bytes(3)), "ARC"),
    (lambda: emv.arpc_method2(IMK, bytes(8), bytes(3)), "CSU"),
    (lambda: emv.arpc_method2(IMK, bytes(8), bytes(4), bytes(9)), "proprietary"),
])
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_verify_arqc_rejects_a_changed_byte():
    data = bytes(range(29))
    good = emv.arqc(IMK, data)
    assert emv.verify_arqc(IMK, data, good)
    assert not emv.verify_arqc(IMK, data, bytes([good[0] ^ 1]) + good[1:])
    assert not emv.verify_arqc(IMK, data, good, padding="visa")


@settings(max_examples=200, deadline=None)
@given(imk=keys16, pan=pans, psn=psns)
def test_icc_master_keys_match_pyemv(imk, pan, psn):
    assert emv.icc_master_key_option_a(imk, pan, psn) == oracle(pyemv_kd.derive_icc_mk_a, imk, pan, psn)
    assert emv.icc_master_key_option_b(imk, pan, psn) == oracle(pyemv_kd.derive_icc_mk_b, imk, pan, psn)


@settings(max_examples=200, deadline=None)
@given(mk=keys16, r=st.binary(min_size=8, max_size=8), atc=st.binary(min_size=2, max_size=2))
def test_session_keys_match_pyemv(mk, r, atc):
    assert emv.session_key_common(mk, r) == oracle(pyemv_kd.derive_common_sk, mk, r)
    assert emv.session_key_common(mk, atc) == oracle(pyemv_kd.derive_common_sk, mk, atc + bytes(6))


@settings(max_examples=200, deadline=None)
@given(sk=keys16, data=st.binary(max_size=64), padding=st.sampled_from(["emv", "visa"]))
def test_arqc_matches_pyemv(sk, data, padding):
    ptype = {"emv": pyemv_ac.PaddingType.EMV, "visa": pyemv_ac.PaddingType.VISA}[padding]
    assert emv.arqc(sk, data, padding) == oracle(pyemv_ac.generate_ac, sk, data, ptype)


@settings(max_examples=200, deadline=None)
@given(key=keys16, arqc=st.binary(min_size=8, max_size=8), arc=st.binary(min_size=2, max_size=2),
       csu=st.binary(min_size=4, max_size=4), prop=st.binary(max_size=8))
def test_arpc_matches_pyemv(key, arqc, arc, csu, prop):
    assert emv.arpc_method1(key, arqc, arc) == oracle(pyemv_ac.generate_arpc_1, key, arqc, arc)
    assert emv.arpc_method2(key, arqc, csu, prop) == oracle(pyemv_ac.generate_arpc_2, key, arqc, csu, prop)
