"""Format validation of decoded messages (wire.md 4)."""

from __future__ import annotations

import datetime as dt
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cardswitch.iso8583.constants import F
from cardswitch.iso8583.validate import NUMERIC_FIELDS, format_errors, invalid_fields, missing_fields

SETTINGS = settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])

GOOD = {
    "t": "0200",
    "2": "4761739001010010",
    "3": "000000",
    "4": "000000012345",
    "7": "0229235959",
    "11": "123456",
    "12": "000000",
    "13": "1231",
    "14": "2712",
    "15": "0101",
    "18": "5411",
    "22": "051",
    "25": "00",
    "32": "123456",
    "33": "99",
    "35": "4761739001010010D27122011143804400000",
    "37": "ABC123 xyz!",      # alphanumeric: not judged
    "41": "TERM0001",
    "42": "MERCHANT0000001",
    "43": "anything at all",
    "49": "840",
    "52": "0123456789abcdef",
    "55": "9F2608C2C12B098F3DA6E3",
    "60": "000001",
    "64": "FEDCBA9876543210",
    "70": "301",
    "74": "0000000001",
    "76": "0000000002",
    "86": "000000000000000100",
    "88": "000000000000000200",
    "90": "0" * 42,
    "100": "12345",
    "128": "FEDCBA9876543210",
}


def test_well_formed_message_has_no_errors():
    assert format_errors(GOOD) == [] and invalid_fields(GOOD) == []
    assert format_errors({}) == []


def test_numeric_list_is_the_wire_one():
    assert set(NUMERIC_FIELDS) == {
        "2", "3", "4", "7", "11", "12", "13", "14", "15", "18", "22", "25", "32", "33",
        "49", "60", "70", "74", "76", "86", "88", "90", "100"}
    assert "37" not in NUMERIC_FIELDS


@pytest.mark.parametrize("key", NUMERIC_FIELDS)
@pytest.mark.parametrize("junk", ["X", " ", "-", "٣", "", "1.0"])
def test_non_digits_in_numeric_field(key, junk):
    msg = dict(GOOD)
    msg[key] = GOOD[key][:-1] + junk if junk else ""
    errors = format_errors(msg)
    assert len(errors) == 1 and errors[0].startswith(f"field {key}: ")
    assert invalid_fields(msg) == [key]


@pytest.mark.parametrize(
    "key, value",
    [
        (F.TRANSMISSION_DT, "1301120000"),   # month 13
        (F.TRANSMISSION_DT, "0001120000"),   # month 0
        (F.TRANSMISSION_DT, "0230120000"),   # 30 February
        (F.TRANSMISSION_DT, "0431120000"),   # 31 April
        (F.TRANSMISSION_DT, "0100120000"),   # day 0
        (F.TRANSMISSION_DT, "0101240000"),   # 24 h
        (F.TRANSMISSION_DT, "0101236000"),   # minute 60
        (F.TRANSMISSION_DT, "0101235960"),   # second 60
        (F.TRANSMISSION_DT, "010123595"),    # short
        (F.LOCAL_TIME, "240000"),
        (F.LOCAL_TIME, "126000"),
        (F.LOCAL_TIME, "12000"),
        (F.LOCAL_DATE, "0230"),
        (F.LOCAL_DATE, "1232"),
        (F.LOCAL_DATE, "123"),
        (F.SETTLEMENT_DATE, "0000"),
        (F.EXPIRY, "2713"),
        (F.EXPIRY, "2700"),
        (F.EXPIRY, "27012"),
        (F.PIN_BLOCK, "0123456789ABCDEG"),
        (F.PIN_BLOCK, "0123456789ABCDE"),
        (F.MAC, "0123456789ABCDEF0"),
        (F.MAC_SECONDARY, "０123456789ABCDEF"),
        (F.ICC_DATA, "9F2"),
        (F.ICC_DATA, "9F 6"),
        (F.ICC_DATA, "XY"),
        (F.TRACK2, "4761739001010010"),
        (F.TRACK2, "4761739001010010d2712"),
        (F.MTI, "020"),
        (F.MTI, "02A0"),
        (F.MTI, "٠٢٠٠"),
    ],
)
def test_bad_formats_are_named(key, value):
    msg = dict(GOOD, **{key: value})
    assert invalid_fields(msg) == [key]
    (err,) = format_errors(msg)
    assert err.startswith("MTI: " if key == "t" else f"field {key}: ")


def test_every_bad_field_is_named_in_message_order():
    msg = dict(GOOD, **{"3": "00000X", "49": "USD", "13": "1301", "52": "short"})
    assert invalid_fields(msg) == ["3", "13", "49", "52"]
    assert format_errors(msg) == [
        "field 3: must be digits",
        "field 13: must be a date MMDD",
        "field 49: must be digits",
        "field 52: must be 16 hex digits",
    ]


def test_non_text_values_are_errors_not_crashes():
    msg = dict(GOOD, **{"4": 12345, "7": None, "35": b"1=2", "55": b"9F26", "t": ["0200"]})
    assert set(invalid_fields(msg)) == {"4", "7", "35", "55", "t"}


def test_missing_fields():
    assert missing_fields(GOOD, ["2", "3", "4", "41"]) == []
    assert missing_fields({"t": "0200", "3": ""}, ("2", "3", "4", "11")) == ["2", "4", "11"]
    assert missing_fields({}, iter(["41", "42"])) == ["41", "42"]


# ---------------------------------------------------------------- against a slow reference

def _date_ok(mmdd: str) -> bool:
    try:
        dt.date(2000, int(mmdd[:2]), int(mmdd[2:]))   # a leap year: 29 February is possible
    except ValueError:
        return False
    return True


def _reference_ok(key: str, v: str) -> bool:
    d = r"[0-9]"
    if key == "7":
        return bool(re.fullmatch(d * 10, v)) and _date_ok(v[:4]) and int(v[4:6]) < 24 \
            and int(v[6:8]) < 60 and int(v[8:]) < 60
    if key == "12":
        return bool(re.fullmatch(d * 6, v)) and int(v[:2]) < 24 and int(v[2:4]) < 60 and int(v[4:]) < 60
    if key in ("13", "15"):
        return bool(re.fullmatch(d * 4, v)) and _date_ok(v)
    if key == "14":
        return bool(re.fullmatch(d * 4, v)) and 1 <= int(v[2:]) <= 12
    if key in ("52", "64", "128"):
        return bool(re.fullmatch(r"[0-9A-Fa-f]{16}", v))
    if key == "55":
        return bool(re.fullmatch(r"(?:[0-9A-Fa-f]{2})*", v))
    if key == "35":
        return "=" in v or "D" in v
    if key == "t":
        return bool(re.fullmatch(d * 4, v))
    if key in NUMERIC_FIELDS:
        return bool(re.fullmatch(d + "+", v))
    return True


KEYS = ["t", *NUMERIC_FIELDS, "35", "37", "41", "52", "55", "64", "128"]
values = st.one_of(
    st.text("0123456789", max_size=12),
    st.text("0123456789ABCDEFabcdef=D ", max_size=20),
    st.text(max_size=12),
)


@SETTINGS
@given(msg=st.dictionaries(st.sampled_from(KEYS), values, max_size=12))
def test_matches_slow_reference(msg):
    want = [k for k, v in msg.items() if not _reference_ok(k, v)]
    assert invalid_fields(msg) == want
    assert len(format_errors(msg)) == len(want)


@SETTINGS
@given(m=st.integers(1, 12), d=st.integers(1, 31), h=st.integers(0, 23), mi=st.integers(0, 59), s=st.integers(0, 59))
def test_possible_datetimes_pass(m, d, h, mi, s):
    v = f"{m:02d}{d:02d}{h:02d}{mi:02d}{s:02d}"
    assert (invalid_fields({"7": v}) == []) == _date_ok(v[:4])
