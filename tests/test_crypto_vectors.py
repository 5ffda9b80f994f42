"""cardswitch.crypto against every published vector of tests/vectors/crypto.json.

Each test is named after its source group; ``test_every_vector_group_is_tested``
fails when a group is added to the file without a test here or in test_crypto.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cardswitch.crypto import dukpt, emv, ibm3624, kcv, pinblock, tr31
from cardswitch.crypto.cvv import cvv, verify_cvv
from cardswitch.crypto.des import tdes_ecb_decrypt, tdes_ecb_encrypt
from cardswitch.crypto.pvv import pvv, verify_pvv

VECTORS = json.loads((Path(__file__).parent / "vectors" / "crypto.json").read_text())
H = bytes.fromhex

# groups tested in test_crypto.py (kcv, ISO0 pin blocks, mac) or here
TESTED_GROUPS = {"kcv", "pin_block", "cvv", "pvv", "ibm3624", "mac", "dukpt_tdes", "dukpt_aes",
                 "emv_arqc", "tr31"}


def test_every_vector_group_is_tested():
    assert {k for k in VECTORS if not k.startswith("_")} == TESTED_GROUPS


# -- pin_block (ISO 9564-1; EFTlab; psec documentation) --------------------------

PIN_BLOCK_CASES = VECTORS["pin_block"]["cases"]


def test_pin_block_formats_in_vectors_are_known():
    assert {c["format"] for c in PIN_BLOCK_CASES} <= set(pinblock.FORMATS)


@pytest.mark.parametrize("case", PIN_BLOCK_CASES, ids=lambda c: f"{c['format']}-{c.get('pan', '')}")
def test_pin_block_iso9564_vectors(case):
    pan = case.get("pan", "")
    block = pinblock.make_pin_block(case["format"], case["pin"], pan)
    assert block.hex().upper() == case["block"]
    assert pinblock.pin_from_block(case["format"], H(case["block"]), pan) == case["pin"]


@pytest.mark.parametrize("case", VECTORS["pin_block"]["iso4_aes"], ids=lambda c: c["pan"])
def test_pin_block_iso4_aes_ep2_vector(case):
    key = H(case["key"])
    assert pinblock.decipher_iso4(H(case["enciphered"]), case["pan"], key) == case["pin"]
    again = pinblock.encipher_iso4(case["pin"], case["pan"], key)
    assert again != H(case["enciphered"])  # fresh random field
    assert pinblock.decipher_iso4(again, case["pan"], key) == case["pin"]


# -- cvv (Visa CVV method) -----------------------------------------------------

@pytest.mark.parametrize("case", VECTORS["cvv"]["cases"], ids=lambda c: c["cvv"])
def test_cvv_visa_vectors(case):
    args = (H(case["cvk"]), case["pan"], case["expiry"], case["service_code"])
    assert cvv(*args) == case["cvv"]
    assert verify_cvv(*args, case["cvv"])
    assert not verify_cvv(*args, f"{(int(case['cvv']) + 1) % 1000:03d}")


# -- pvv (Visa PVV method) -----------------------------------------------------

@pytest.mark.parametrize("case", VECTORS["pvv"]["cases"], ids=lambda c: c["pvv"])
def test_pvv_visa_vectors(case):
    args = (H(case["pvk"]), case["pvki"], case["pin"], case["pan"])
    assert pvv(*args) == case["pvv"]
    assert verify_pvv(*args, case["pvv"])
    assert not verify_pvv(H(case["pvk"]), case["pvki"], "0000", case["pan"], case["pvv"])


# -- ibm3624 (IBM 3624 offset method) -------------------------------------------

@pytest.mark.parametrize("case", VECTORS["ibm3624"]["cases"], ids=lambda c: c["decimalisation"])
def test_ibm3624_vectors(case):
    args = (H(case["pvk"]), case["validation_data"], case["decimalisation"])
    if "natural_pin" in case:
        assert ibm3624.natural_pin(*args, len(case["natural_pin"])) == case["natural_pin"]
        assert ibm3624.pin_offset(*args, case["natural_pin"]) == "0" * len(case["natural_pin"])
    else:
        assert ibm3624.pin_offset(*args, case["pin"]) == case["offset"]
        assert ibm3624.verify_offset(*args, case["pin"], case["offset"])
        assert ibm3624.verify_offset(*args, case["pin"], case["offset"].ljust(12, "F"))
        assert not ibm3624.verify_offset(*args, "1235", case["offset"])


# -- dukpt_tdes (ANSI X9.24-1:2009 annex A) -------------------------------------

DT = VECTORS["dukpt_tdes"]


def test_dukpt_tdes_x924_1_ipek():
    assert dukpt.tdes_ipek(H(DT["bdk"]), H(DT["initial_ksn"])).hex().upper() == DT["ipek"]


def test_dukpt_tdes_x924_1_clear_block_is_the_iso0_block():
    assert pinblock.make_pin_block_iso0(DT["pin"], DT["pan"]).hex().upper() == DT["clear_pin_block"]


@pytest.mark.parametrize("case", DT["cases"], ids=lambda c: c["ksn"])
def test_dukpt_tdes_x924_1_vectors(case):
    key = dukpt.tdes_transaction_key(H(DT["bdk"]), H(case["ksn"]))
    assert key.hex().upper() == case["key"]
    assert dukpt.tdes_transaction_key(H(DT["ipek"]), case["ksn"], from_ipek=True) == key
    pin_key = dukpt.tdes_pin_key(key)
    assert pin_key.hex().upper() == case["pin_key"]
    encrypted = tdes_ecb_encrypt(pin_key, H(DT["clear_pin_block"]))
    assert encrypted.hex().upper() == case["encrypted_pin_block"]
    clear = tdes_ecb_decrypt(pin_key, H(case["encrypted_pin_block"]))
    assert pinblock.pin_from_block_iso0(clear, DT["pan"]) == DT["pin"]


def test_dukpt_tdes_x924_1_mac_variant():
    mv = DT["mac_variant"]
    key = dukpt.tdes_transaction_key(H(DT["bdk"]), mv["ksn"])
    assert dukpt.tdes_mac_key(key).hex().upper() == mv["mac_key"]


# -- dukpt_aes (ANSI X9.24-3-2017) ----------------------------------------------

DA = VECTORS["dukpt_aes"]


def test_dukpt_aes_x924_3_initial_key():
    assert dukpt.aes_initial_key(H(DA["bdk"]), DA["initial_key_id"]).hex().upper() == DA["initial_key"]


@pytest.mark.parametrize("case", DA["cases"], ids=lambda c: str(c["counter"]))
def test_dukpt_aes_x924_3_vectors(case):
    ksn = dukpt.aes_ksn(DA["initial_key_id"], case["counter"])
    key = dukpt.aes_transaction_key(H(DA["bdk"]), ksn)
    assert key.hex().upper() == case["transaction_key"]
    assert dukpt.aes_transaction_key(H(DA["initial_key"]), ksn, from_initial_key=True) == key
    assert dukpt.aes_pin_key(key, ksn).hex().upper() == case["pin_key"]


# -- emv_arqc (EMV Book 2; pyemv test vectors) -----------------------------------

E = VECTORS["emv_arqc"]


def test_emv_arqc_book2_vectors():
    icc_mk = emv.icc_master_key_option_a(H(E["imk_ac"]), E["pan"], E["psn"])
    assert icc_mk.hex().upper() == E["icc_mk_option_a"]
    # session_key_r is the 8-byte diversification value R itself
    session_key = emv.session_key_common(icc_mk, H(E["session_key_r"]))
    assert kcv(session_key).startswith(E["session_key_kcv"])
    assert E["padding"].startswith("EMV")
    cryptogram = emv.arqc(session_key, H(E["data"]), padding="emv")
    assert cryptogram.hex().upper() == E["arqc"]
    assert emv.verify_arqc(session_key, H(E["data"]), cryptogram)
    m1 = E["arpc_method_1"]
    assert m1["key"] == "icc master key"
    assert emv.arpc_method1(icc_mk, cryptogram, H(m1["arc"])).hex().upper() == m1["arpc"]


# -- tr31 (ANSI X9.143 / TR-31; psec test vectors) ------------------------------

@pytest.mark.parametrize("case", VECTORS["tr31"]["cases"], ids=lambda c: c["block"][0])
def test_tr31_psec_vectors(case):
    header, key = tr31.unwrap(H(case["kbpk"]), case["block"])
    assert key.hex().upper() == case["key"]
    assert header.version == case["block"][0]
    assert (header.key_usage, header.algorithm, header.mode_of_use) == ("P0", "T", "E")
    assert header.text == case["block"][:16]


# -- hsm.md section 5 golden vectors, the crypto part (keys already clear) -------
# Under the Thales test LMK: CVK U9B49..81 45 is 0123456789ABCDEFFEDCBA9876543210,
# TPK 0406FBB23A5214DF is 0B681FC20E62C734, ZPK BAB32D775A38E4AB is 13F10E5D868A529E.

def test_hsm_golden_cw():
    assert cvv(H("0123456789ABCDEFFEDCBA9876543210"), "4123456789012345", "8701", "101") == "561"


@pytest.mark.parametrize("dst_code,expected", [("03", "F7808F2CBEC63168"), ("01", "E98FFDA17099AF55")])
def test_hsm_golden_ca(dst_code, expected):
    tpk, zpk = H("0B681FC20E62C734"), H("13F10E5D868A529E")
    pan = pinblock.account_pan("550000025321")
    n, out = pinblock.translate_pin("DC80B186C30902B0", tpk, zpk, pan,
                                    pinblock.HSM_FORMATS["03"], pinblock.HSM_FORMATS[dst_code])
    assert (n, out) == (4, expected)
