"""Card and PIN verification values: Visa CVV, Visa PVV, IBM 3624 offset.
Behaviour, input validation, and differential tests against psec."""

from __future__ import annotations

import warnings

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cardswitch.crypto import ibm3624
from cardswitch.crypto.cvv import cvv
from cardswitch.crypto.pvv import pvv

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import psec.cvv
    import psec.pin


def oracle(fn, *args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kw)


H = bytes.fromhex
K16 = H("0123456789ABCDEFFEDCBA9876543210")
digits = "0123456789"
keys16 = st.binary(min_size=16, max_size=16)
des_keys = st.sampled_from([8, 16, 24]).flatmap(lambda n: st.binary(min_size=n, max_size=n))
pins = st.text(digits, min_size=4, max_size=12)
tables = st.text(digits, min_size=16, max_size=16)
hex16 = st.text("0123456789ABCDEF", min_size=16, max_size=16)


# -- CVV -----------------------------------------------------------------------

@pytest.mark.parametrize("args,match", [
    ((K16[:8], "4123456789012345", "8701", "101"), "CVK"),
    ((K16, "41234567890123456789", "8701", "101"), "PAN"),
    ((K16, "", "8701", "101"), "PAN"),
    ((K16, "4123456789012345", "871", "101"), "expiry"),
    ((K16, "4123456789012345", "87A1", "101"), "expiry"),
    ((K16, "4123456789012345", "8701", "10"), "service code"),
])
def test_cvv_rejects_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        cvv(*args)


def test_cvv_depends_on_service_code():
    # CVV1, CVV2 (000) and iCVV (999) differ only by the service code
    values = {cvv(K16, "4123456789012345", "8701", sc) for sc in ("101", "000", "999")}
    assert len(values) == 3


@settings(max_examples=300, deadline=None)
@given(key=keys16, pan=st.text(digits, min_size=12, max_size=19),
       expiry=st.text(digits, min_size=4, max_size=4), sc=st.text(digits, min_size=3, max_size=3))
def test_cvv_matches_psec(key, pan, expiry, sc):
    ours, theirs = cvv(key, pan, expiry, sc), oracle(psec.cvv.generate_cvv, key, pan, expiry, sc)
    if len(theirs) < 3:
        # psec stops when the digits of the result run out; the Visa method goes
        # on with the hex letters A-F as 0-5. Our digits must extend psec's.
        assert ours.startswith(theirs) and len(ours) == 3
    else:
        assert ours == theirs


def test_cvv_takes_letters_when_digits_run_out():
    """The case psec gets short (found by hypothesis): three digits, the last from a letter."""
    key = bytes.fromhex("28FE3CCCD670425406FAAC2EBCFAFA7C")
    assert cvv(key, "000000000000", "9956", "000") == "215"


# -- PVV -----------------------------------------------------------------------

@pytest.mark.parametrize("args,match", [
    ((bytes(10), "1", "1234", "4123456789012345"), "PVK"),
    ((K16, "12", "1234", "4123456789012345"), "PVKI"),
    ((K16, "1", "123", "4123456789012345"), "PIN"),
    ((K16, "1", "1234", "41234567890"), "PAN"),
])
def test_pvv_rejects_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        pvv(*args)


def test_pvv_uses_the_four_leftmost_pin_digits():
    assert pvv(K16, "3", "452499", "1122334455667788") == pvv(K16, "3", "4524", "1122334455667788")


@settings(max_examples=300, deadline=None)
@given(key=des_keys, pvki=st.sampled_from(digits), pin=st.text(digits, min_size=4, max_size=4),
       pan=st.text(digits, min_size=12, max_size=19))
def test_pvv_matches_psec(key, pvki, pin, pan):
    assert pvv(key, pvki, pin, pan) == oracle(psec.pin.generate_visa_pvv, key, pvki, pin, pan)


# -- IBM 3624 ----------------------------------------------------------------------

def test_validation_data_template():
    # N takes the last 5 digits of the 12N account: 11 + 5 = 16 characters
    assert ibm3624.validation_data("12345678901N", "550000025321") == "1234567890125321"
    assert ibm3624.validation_data("N12345678901", "550000025321") == "2532112345678901"
    # a full PAN gives the same account (the check digit is dropped)
    assert ibm3624.validation_data("12345678901N", "445500000253217") == "1234567890125321"
    # no N: right-padded
    assert ibm3624.validation_data("ABCDEF012345", "550000025321") == "ABCDEF012345FFFF"
    assert ibm3624.validation_data("abcdef012345", "550000025321", pad="0") == "ABCDEF0123450000"


@pytest.mark.parametrize("template,account", [
    ("12345678901G", "550000025321"),   # not hex
    ("1234567N901N", "550000025321"),   # two N
    ("1234567890123N", "550000025321"),  # 18 characters after N
    ("12345678901N", "5500000253"),     # account too short
    ("12345678901N", "55000002532A"),   # account not digits
])
def test_validation_data_rejects_bad_input(template, account):
    with pytest.raises(ValueError):
        ibm3624.validation_data(template, account)


def test_offset_round_trip_and_check_length():
    vd, dec = "1122334455667788", "0123456789012345"
    offset = ibm3624.pin_offset(K16, vd, dec, "123456")
    assert len(offset) == 6
    assert ibm3624.verify_offset(K16, vd, dec, "123456", offset)
    assert ibm3624.verify_offset(K16, vd, dec, "123456", offset + "FFFFFF")
    # only the left-most check_len digits are compared
    wrong_tail = offset[:4] + str((int(offset[4]) + 1) % 10) + offset[5]
    assert not ibm3624.verify_offset(K16, vd, dec, "123456", wrong_tail)
    assert ibm3624.verify_offset(K16, vd, dec, "123456", wrong_tail, check_len=4)
    # without a check length the offset fixes the PIN length
    assert not ibm3624.verify_offset(K16, vd, dec, "12345", offset)
    assert not ibm3624.verify_offset(K16, vd, dec, "1234567", offset)
    # with one, only that many left-most digits count, and the PIN needs them all
    assert ibm3624.verify_offset(K16, vd, dec, "12345", offset, check_len=5)
    assert ibm3624.verify_offset(K16, vd, dec, "1234", offset[:4] + "FFFFFFFF", check_len=4)
    assert not ibm3624.verify_offset(K16, vd, dec, "1234", offset, check_len=5)
    assert not ibm3624.verify_offset(K16, vd, dec, "9234", offset, check_len=4)


@pytest.mark.parametrize("args,match", [
    ((bytes(10), "1122334455667788", "0123456789012345", 4), "PVK"),
    ((K16, "112233445566778", "0123456789012345", 4), "validation data"),
    ((K16, "112233445566778G", "0123456789012345", 4), "validation data"),
    ((K16, "1122334455667788", "012345678901234A", 4), "decimalisation"),
    ((K16, "1122334455667788", "0123456789012345", 3), "PIN length"),
    ((K16, "1122334455667788", "0123456789012345", 13), "PIN length"),
])
def test_natural_pin_rejects_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        ibm3624.natural_pin(*args)


def test_verify_offset_rejects_malformed_offset():
    with pytest.raises(ValueError, match="offset"):
        ibm3624.verify_offset(K16, "1122334455667788", "0123456789012345", "1234", "12FF")
    with pytest.raises(ValueError, match="check length"):
        ibm3624.verify_offset(K16, "1122334455667788", "0123456789012345", "1234", "1234", check_len=5)


@settings(max_examples=300, deadline=None)
@given(key=des_keys, table=tables, vd=st.text(digits, min_size=16, max_size=16), pin=pins)
def test_ibm3624_matches_psec(key, table, vd, pin):
    # psec takes the validation data from a PAN, so decimal digits only
    kw = dict(pan_verify_offset=0, pan_verify_length=16, pan_pad="F")
    natural = oracle(psec.pin.generate_ibm3624_pin, key, table, "0" * len(pin), vd, **kw)
    assert ibm3624.natural_pin(key, vd, table, len(pin)) == natural
    expected = oracle(psec.pin.generate_ibm3624_offset, key, table, pin, vd, **kw)
    assert ibm3624.pin_offset(key, vd, table, pin) == expected


@settings(max_examples=200, deadline=None)
@given(key=des_keys, table=tables, vd=st.text(digits, min_size=8, max_size=16), pin=pins)
def test_ibm3624_padded_validation_data_matches_psec(key, table, vd, pin):
    kw = dict(pan_verify_offset=0, pan_verify_length=len(vd), pan_pad="F")
    data = ibm3624.validation_data(vd, "000000000000")
    expected = oracle(psec.pin.generate_ibm3624_offset, key, table, pin, vd, **kw)
    assert ibm3624.pin_offset(key, data, table, pin) == expected


@settings(max_examples=200, deadline=None)
@given(key=des_keys, table=tables, vd=hex16, pin=pins, other=pins)
def test_ibm3624_offset_verifies_its_pin_only(key, table, vd, pin, other):
    offset = ibm3624.pin_offset(key, vd, table, pin)
    assert ibm3624.verify_offset(key, vd, table, pin, offset)
    natural = ibm3624.natural_pin(key, vd, table, len(pin))
    assert "".join(str((int(n) + int(o)) % 10) for n, o in zip(natural, offset)) == pin
    assert ibm3624.verify_offset(key, vd, table, other, offset) == (other == pin)
