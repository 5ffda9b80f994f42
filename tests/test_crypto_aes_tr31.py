"""AES primitives, TDES additions (CBC decrypt, CMAC) and TR-31 unwrap:
published vectors (NIST SP 800-38B / RFC 4493) and differential tests
against psec (test oracle only). The crypto.json TR-31 vectors are in
test_crypto_vectors.py."""

from __future__ import annotations

import warnings

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cardswitch.crypto import tr31
from cardswitch.crypto.aes import (
    aes_cbc_decrypt,
    aes_cbc_encrypt,
    aes_cmac,
    aes_ecb_decrypt,
    aes_ecb_encrypt,
    kcv_aes,
)
from cardswitch.crypto.des import tdes_cbc_decrypt, tdes_cbc_encrypt, tdes_cmac

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import psec.aes
    import psec.des
    import psec.mac
    import psec.tr31


def oracle(fn, *args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kw)


H = bytes.fromhex
aes_keys = st.sampled_from([16, 24, 32]).flatmap(lambda n: st.binary(min_size=n, max_size=n))
des_keys = st.sampled_from([16, 24]).flatmap(lambda n: st.binary(min_size=n, max_size=n))
blocks16 = st.integers(1, 4).flatmap(lambda n: st.binary(min_size=16 * n, max_size=16 * n))
blocks8 = st.integers(1, 6).flatmap(lambda n: st.binary(min_size=8 * n, max_size=8 * n))


# -- published CMAC vectors (RFC 4493 / NIST SP 800-38B) ------------------------

RFC4493_KEY = H("2B7E151628AED2A6ABF7158809CF4F3C")
RFC4493_MSG = H("6BC1BEE22E409F96E93D7E117393172AAE2D8A571E03AC9C9EB76FAC45AF8E51"
                "30C81C46A35CE411E5FBC1191A0A52EFF69F2445DF4F9B17AD2B417BE66C3710")


@pytest.mark.parametrize("length,mac", [
    (0, "BB1D6929E95937287FA37D129B756746"),
    (16, "070A16B46B4D4144F79BDD9DD04A287C"),
    (40, "DFA66747DE9AE63030CA32611497C827"),
    (64, "51F0BEBF7E3B9D92FC49741779363CFE"),
])
def test_aes_cmac_rfc4493_vectors(length, mac):
    assert aes_cmac(RFC4493_KEY, RFC4493_MSG[:length]).hex().upper() == mac


@pytest.mark.parametrize("length,mac", [
    (0, "B7A688E122FFAF95"),
    (8, "8E8F293136283797"),
    (20, "743DDBE0CE2DC2ED"),
    (32, "33E6B1092400EAE5"),
])
def test_tdes_cmac_sp800_38b_vectors(length, mac):
    # NIST SP 800-38B examples, three-key TDEA
    key = H("8AA83BF8CBDA10620BC1BF19FBB6CD58BC313D4A371CA8B5")
    assert tdes_cmac(key, RFC4493_MSG[:length]).hex().upper() == mac


def oracle_aes_cmac_block(key: bytes, block: bytes) -> bytes:
    """CMAC of one full block, by hand: CBC-MAC of (block xor K1), psec's AES."""
    s = int.from_bytes(oracle(psec.aes.encrypt_aes_ecb, key, bytes(16)), "big")
    k1 = (s << 1) & ((1 << 128) - 1)
    if s >> 127:
        k1 ^= 0x87
    msg = (int.from_bytes(block, "big") ^ k1).to_bytes(16, "big")
    return oracle(psec.aes.encrypt_aes_ecb, key, msg)


@settings(max_examples=100, deadline=None)
@given(key=aes_keys)
def test_kcv_aes_is_cmac_of_a_zero_block(key):
    assert kcv_aes(key) == oracle_aes_cmac_block(key, bytes(16))[:3].hex().upper()
    assert kcv_aes(key, 5) == oracle_aes_cmac_block(key, bytes(16))[:5].hex().upper()


# -- AES and TDES modes against psec ---------------------------------------------

@settings(max_examples=150, deadline=None)
@given(key=aes_keys, data=blocks16, iv=st.one_of(st.just(bytes(16)), st.binary(min_size=16, max_size=16)))
def test_aes_modes_match_psec(key, data, iv):
    assert aes_ecb_encrypt(key, data) == oracle(psec.aes.encrypt_aes_ecb, key, data)
    assert aes_ecb_decrypt(key, data) == oracle(psec.aes.decrypt_aes_ecb, key, data)
    assert aes_cbc_encrypt(key, data, iv) == oracle(psec.aes.encrypt_aes_cbc, key, iv, data)
    assert aes_cbc_decrypt(key, data, iv) == oracle(psec.aes.decrypt_aes_cbc, key, iv, data)


@settings(max_examples=100, deadline=None)
@given(key=des_keys, data=blocks8, iv=st.one_of(st.just(bytes(8)), st.binary(min_size=8, max_size=8)))
def test_tdes_cbc_matches_psec(key, data, iv):
    assert tdes_cbc_decrypt(key, data, iv) == oracle(psec.des.decrypt_tdes_cbc, key, iv, data)
    assert tdes_cbc_decrypt(key, tdes_cbc_encrypt(key, data, iv), iv) == data


def test_aes_zero_iv_default():
    data = bytes(range(32))
    assert aes_cbc_encrypt(RFC4493_KEY, data) == aes_cbc_encrypt(RFC4493_KEY, data, bytes(16))


@pytest.mark.parametrize("call,match", [
    (lambda: aes_ecb_encrypt(bytes(15), bytes(16)), "AES key"),
    (lambda: aes_ecb_encrypt(bytes(16), bytes(15)), "multiple of 16"),
    (lambda: aes_cbc_encrypt(bytes(16), bytes(16), bytes(8)), "IV"),
    (lambda: aes_cmac(bytes(20), b""), "AES key"),
    (lambda: kcv_aes(bytes(16), 0), "KCV length"),
])
def test_aes_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# -- TR-31 --------------------------------------------------------------------------

def wrap(kbpk: bytes, version: str, key: bytes, blocks: dict[str, str] | None = None,
         usage: str = "P0", algorithm: str = "T") -> str:
    header = psec.tr31.Header(version, usage, algorithm, "E", "00", "N")
    for block_id, data in (blocks or {}).items():
        header.blocks[block_id] = data
    return oracle(psec.tr31.wrap, kbpk, header, key)


@settings(max_examples=60, deadline=None)
@given(version=st.sampled_from("ABC"), kbpk=des_keys,
       key=st.sampled_from([8, 16, 24]).flatmap(lambda n: st.binary(min_size=n, max_size=n)))
def test_tr31_tdes_versions_match_psec(version, kbpk, key):
    block = wrap(kbpk, version, key)
    header, got = tr31.unwrap(kbpk, block)
    assert got == key
    assert (header.version, header.key_usage, header.exportability) == (version, "P0", "N")


@settings(max_examples=60, deadline=None)
@given(kbpk=aes_keys, key=aes_keys)
def test_tr31_version_d_matches_psec(kbpk, key):
    block = wrap(kbpk, "D", key, algorithm="A")
    assert tr31.unwrap(kbpk, block)[1] == key


@settings(max_examples=40, deadline=None)
@given(version=st.sampled_from("BD"), ks=st.text("0123456789ABCDEF", min_size=2, max_size=40),
       big=st.booleans())
def test_tr31_optional_blocks(version, ks, big):
    kbpk = bytes(range(16))
    key = bytes(range(16, 32))
    blocks = {"KS": ks}
    if big:
        blocks["PB"] = "X" * 300  # needs the extended length form
    block = wrap(kbpk, version, key, blocks, algorithm="A" if version == "D" else "T")
    header, got = tr31.unwrap(kbpk, block)
    assert got == key
    assert header.optional_blocks[0] == ("KS", ks)
    if big:
        assert header.optional_blocks[1] == ("PB", "X" * 300)


KBPK = H("DD7515F2BFC17F85CE48F3CA25CB21F6")
GOOD_B = "B0080P0TE00E000094B420079CC80BA3461F86FE26EFC4A3B8E4FA4C5F5341176EED7B727B8A248E"


def flip(block: str, i: int) -> str:
    c = "0" if block[i] != "0" else "1"
    return block[:i] + c + block[i + 1:]


@pytest.mark.parametrize("block,match", [
    (flip(GOOD_B, 6), "MAC"),                # header tampered (usage P0 -> P1)
    (flip(GOOD_B, 30), "MAC"),               # key data tampered
    (flip(GOOD_B, 79), "MAC"),               # MAC tampered
    (GOOD_B[:-8], "length"),                 # truncated
    ("X" + GOOD_B[1:], "version"),
    (GOOD_B[:10], "shorter"),
    ("B0048P0TE00E0000" + "Z" * 32, "hex"),
    ("B0016P0TE00E0000", "no key data"),
    ("B0080P0TE00E0100" + GOOD_B[16:], "optional block"),
])
def test_tr31_rejects_bad_blocks(block, match):
    with pytest.raises(ValueError, match=match):
        tr31.unwrap(KBPK, block)


def test_tr31_kbpk_length_for_version():
    with pytest.raises(ValueError, match="KBPK"):
        tr31.unwrap(KBPK[:8], GOOD_B)
    with pytest.raises(ValueError, match="MAC"):
        tr31.unwrap(bytes(16), GOOD_B)
