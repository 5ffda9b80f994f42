"""Field helpers: 90 original data, 54 additional amounts, 55 BER-TLV."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cardswitch.iso8583.fields import (
    AdditionalAmount,
    OriginalData,
    build_tlv,
    format_field54,
    format_field90,
    parse_field54,
    parse_field90,
    parse_tlv,
    tlv_dict,
)

SETTINGS = settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])

digits = lambda n: st.text("0123456789", min_size=n, max_size=n)  # noqa: E731
garbage = st.one_of(
    st.text(max_size=60),
    st.text("0123456789CDcd=ABEFabef ", max_size=60),
    st.none(), st.integers(), st.binary(max_size=10),
)


# ----------------------------------------------------------------- field 90

def test_field90_layout():
    s = format_field90("0200", "123456", "1128134501", "123456", "99")
    assert s == "0200" + "123456" + "1128134501" + "00000123456" + "00000000099"
    assert len(s) == 42
    od = parse_field90(s)
    assert od == OriginalData("0200", "123456", "1128134501", "00000123456", "00000000099")
    assert od.format() == s == format_field90(od)
    assert format_field90("0200", "000001", "0101000000") == "0200000001" + "0101000000" + "0" * 22


@pytest.mark.parametrize(
    "bad, problem",
    [
        ("0" * 41, "42 digits"),
        ("0" * 43, "42 digits"),
        ("0200" + "X" * 38, "digits"),
        ("٠" * 42, "digits"),
        (None, "42 digits"),
    ],
)
def test_field90_parse_errors_name_the_problem(bad, problem):
    with pytest.raises(ValueError, match="field 90.*" + problem):
        parse_field90(bad)


@pytest.mark.parametrize(
    "args",
    [
        ("200", "123456", "1128134501"),
        ("0200", "12345", "1128134501"),
        ("0200", "123456", "112813450"),
        ("0200", "123456", "1128134501", "123456789012"),
        ("0200", "123456", "1128134501", "", "12a"),
        ("0200", 123456, "1128134501"),
    ],
)
def test_field90_format_errors(args):
    with pytest.raises(ValueError, match="field 90"):
        format_field90(*args)


@SETTINGS
@given(mti=digits(4), stan=digits(6), f7=digits(10),
       acq=st.text("0123456789", max_size=11), fwd=st.text("0123456789", max_size=11))
def test_field90_round_trip(mti, stan, f7, acq, fwd):
    s = format_field90(mti, stan, f7, acq, fwd)
    assert len(s) == 42 and s.isdigit()
    od = parse_field90(s)
    assert (od.mti, od.stan, od.transmitted) == (mti, stan, f7)
    assert od.acquirer_id == acq.zfill(11) and od.forwarder_id == fwd.zfill(11)
    assert int(od.acquirer_id) == int(acq or "0")
    assert format_field90(od) == s


@SETTINGS
@given(s=garbage)
def test_field90_garbage_only_value_error(s):
    try:
        od = parse_field90(s)
    except ValueError:
        return
    assert format_field90(od) == s


# ----------------------------------------------------------------- field 54

def test_field54_layout():
    entries = [
        AdditionalAmount("00", "01", "840", 150000),
        AdditionalAmount("00", "02", "840", -2500),
    ]
    s = format_field54(entries)
    assert s == "0001840C000000150000" + "0002840D000000002500"
    assert parse_field54(s) == entries
    assert format_field54([]) == "" and parse_field54("") == []


@pytest.mark.parametrize(
    "bad",
    [
        "0001840C00000015000",              # 19 characters
        "0001840X000000150000",             # sign
        "0001840C00000015000A",             # amount
        "00A1840C000000150000",             # account type
        "0001840C-00000150000",
        None,
    ],
)
def test_field54_parse_errors(bad):
    with pytest.raises(ValueError, match="field 54"):
        parse_field54(bad)


@pytest.mark.parametrize(
    "entry",
    [
        AdditionalAmount("0", "01", "840", 1),
        AdditionalAmount("00", "1", "840", 1),
        AdditionalAmount("00", "01", "84", 1),
        AdditionalAmount("00", "01", "840", 10**12),
        AdditionalAmount("00", "01", "840", -(10**12)),
        AdditionalAmount("00", "01", "840", 1.5),   # type: ignore[arg-type]
        AdditionalAmount("00", "01", "840", True),
    ],
)
def test_field54_format_errors(entry):
    with pytest.raises(ValueError, match="field 54"):
        format_field54([entry])


amounts = st.builds(
    AdditionalAmount,
    account_type=digits(2), amount_type=st.sampled_from(["01", "02"]), currency=digits(3),
    amount=st.integers(-(10**12) + 1, 10**12 - 1),
)


@SETTINGS
@given(entries=st.lists(amounts, max_size=6))
def test_field54_round_trip(entries):
    s = format_field54(entries)
    assert len(s) == 20 * len(entries)
    assert parse_field54(s) == entries


@SETTINGS
@given(s=st.one_of(garbage, st.text("0123456789CD", min_size=20, max_size=20)))
def test_field54_garbage_only_value_error(s):
    try:
        entries = parse_field54(s)
    except ValueError:
        return
    assert len(entries) == len(s) // 20
    assert parse_field54(format_field54(entries)) == entries


# ----------------------------------------------------------------- field 55

EMV = (
    "9F2608C2C12B098F3DA6E3"   # ARQC
    "9F2701" "80"
    "9F1012" "0110A0000F040000000000000000000000FF"
    "5F2A020840"
    "82025C00"
    "9F3704A3F1B2C4"
)


def test_tlv_emv_sample():
    items = parse_tlv(EMV.lower())
    assert items[0] == ("9F26", "C2C12B098F3DA6E3")
    assert dict(items)["5F2A"] == "0840" and dict(items)["82"] == "5C00"
    assert [t for t, _ in items] == ["9F26", "9F27", "9F10", "5F2A", "82", "9F37"]
    assert build_tlv(items) == EMV
    assert tlv_dict(EMV)["9F37"] == "A3F1B2C4"
    assert build_tlv(dict(items)) == EMV


def test_tlv_long_lengths_and_constructed():
    v200 = "AB" * 200
    s = build_tlv([("70", v200), ("9F10", "00" * 128), ("DF8101", "01")])
    assert s.startswith("7081C8" + v200)
    assert "9F108180" in s
    assert parse_tlv(s) == [("70", v200), ("9F10", "00" * 128), ("DF8101", "01")]
    big = build_tlv([("71", "00" * 300)])
    assert big.startswith("7182012C")
    inner = build_tlv([("9F36", "0001"), ("86", "8424000008")])
    outer = build_tlv([("72", inner)])
    (tag, value), = parse_tlv(outer)
    assert tag == "72" and parse_tlv(value) == [("9F36", "0001"), ("86", "8424000008")]


def test_tlv_padding_and_empty():
    assert parse_tlv("") == []
    assert parse_tlv("00009F0100" "00") == [("9F01", "")]


@pytest.mark.parametrize(
    "bad",
    ["9F", "9F2608C2C1", "9F26", "9F2688", "9F2680", "9F2685" + "00" * 5, "9F26820100",
     "ABC", "ZZ", "9F2608C2C12B098F3DA6E", None, "9F" + "FF" * 3],
)
def test_tlv_parse_errors(bad):
    with pytest.raises(ValueError, match="field 55"):
        parse_tlv(bad)


@pytest.mark.parametrize(
    "items",
    [[("9F", "01")], [("9F80", "01")], [("8A8B", "00")], [("", "00")], [("00", "")],
     [("9F26", "ABC")], [("9F26", "XY")], [("9F26",)], ["9F26"], [(1, "00")]],
)
def test_tlv_build_errors(items):
    with pytest.raises(ValueError, match="field 55"):
        build_tlv(items)


@st.composite
def tag(draw):
    if draw(st.booleans()):
        first = draw(st.integers(1, 255).filter(lambda b: b & 0x1F != 0x1F))
        return bytes([first]).hex().upper()
    first = draw(st.integers(0, 255).map(lambda b: b | 0x1F))
    middle = draw(st.lists(st.integers(0x80, 0xFF), max_size=2))
    last = draw(st.integers(0, 0x7F))
    return bytes([first, *middle, last]).hex().upper()


@SETTINGS
@given(items=st.lists(st.tuples(tag(), st.binary(max_size=300).map(lambda b: b.hex())), max_size=8))
def test_tlv_round_trip(items):
    s = build_tlv(items)
    assert s == s.upper() and len(s) % 2 == 0
    assert parse_tlv(s) == [(t, v.upper()) for t, v in items]
    assert build_tlv(parse_tlv(s.lower())) == s


@SETTINGS
@given(s=st.one_of(garbage, st.binary(max_size=60).map(lambda b: b.hex())))
def test_tlv_garbage_only_value_error(s):
    try:
        items = parse_tlv(s)
    except ValueError:
        return
    for t, v in items:
        assert len(t) % 2 == 0 and len(v) % 2 == 0
