"""What a frame that does not decode still tells us (DecodeError.partial)."""

from __future__ import annotations

import iso8583
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from cardswitch.iso8583.dialect import ASCII, BINARY, DecodeError

SETTINGS = settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])

REQUEST = {
    "t": "0200",
    "2": "4761739001010010",
    "3": "000000",
    "4": "000000012345",
    "7": "1128134501",
    "11": "123456",
    "12": "134501",
    "13": "1128",
    "22": "051",
    "25": "00",
    "35": "4761739001010010=27122011143804400000",
    "41": "TERM0001",
    "42": "MERCHANT0000001",
    "49": "840",
    "52": "0123456789ABCDEF",
    "55": "9F2608C2C12B098F3DA6E39F2701809F3704A3F1B2C4",
    "60": "000001",
    "90": "020012345611281345010000000000100000000002",
    "128": "FEDCBA9876543210",
}


def _field_ends(d, msg) -> tuple[int, list[tuple[str, int]]]:
    """Offset where the bitmaps end, and (field, end offset) in wire order."""
    i = 4 + (16 if d is ASCII else 8) * (2 if any(int(k) > 64 for k in msg if k != "t") else 1)
    bitmaps_end = i
    ends = []
    for k in sorted((k for k in msg if k != "t"), key=int):
        fs = d.spec[k]
        size = len(msg[k]) // 2 if fs["data_enc"] == "b" else len(msg[k])
        i += fs["len_type"] + size
        ends.append((k, i))
    return bitmaps_end, ends


@pytest.mark.parametrize("d", [ASCII, BINARY], ids=lambda d: d.name)
def test_truncated_frame_partial_holds_every_whole_field(d):
    raw = d.encode(REQUEST)
    bitmaps_end, ends = _field_ends(d, REQUEST)
    assert ends[-1][1] == len(raw)
    for cut in range(len(raw)):
        with pytest.raises(DecodeError) as e:
            d.decode(raw[:cut])
        partial = e.value.partial
        if cut < 4:
            assert partial == {}
            continue
        want = {"t": "0200"}
        if cut >= bitmaps_end:
            want.update((k, REQUEST[k]) for k, end in ends if end <= cut)
        assert partial == want, cut
        if cut >= dict(ends)["41"]:
            assert partial["11"] == "123456" and partial["41"] == "TERM0001"


@pytest.mark.parametrize("d", [ASCII, BINARY], ids=lambda d: d.name)
def test_broken_field_after_41_keeps_mti_11_41(d):
    raw = d.encode(REQUEST)
    pos = raw.index(b"006000001")           # field 60: LLL prefix "006" and its value
    bad = raw[:pos] + b"9X9" + raw[pos + 3:]
    with pytest.raises(DecodeError) as e:
        d.decode(bad)
    p = e.value.partial
    assert p["t"] == "0200" and p["11"] == "123456" and p["41"] == "TERM0001"
    assert "60" not in p and "90" not in p
    assert "field 60" in e.value.reason


def test_broken_track2_length_loses_41_but_keeps_11():
    raw = ASCII.encode(REQUEST)
    pos = raw.index(b"4761739001010010=")
    bad = raw[:pos - 2] + b"99" + raw[pos:]    # 99 > 37, the maximum of field 35
    with pytest.raises(DecodeError) as e:
        ASCII.decode(bad)
    assert e.value.partial["11"] == "123456"
    assert "41" not in e.value.partial and "35" not in e.value.partial


def test_extra_data_keeps_everything_read():
    raw = ASCII.encode(REQUEST) + b"JUNK"
    with pytest.raises(DecodeError) as e:
        ASCII.decode(raw)
    assert e.value.partial == REQUEST
    assert "Extra data" in e.value.reason


def test_bad_bitmap_keeps_only_mti():
    raw = b"0200" + b"XYZ0000000000000" + b"123456"
    with pytest.raises(DecodeError) as e:
        ASCII.decode(raw)
    assert e.value.partial == {"t": "0200"}


@pytest.mark.parametrize("mti", [b"02A0", b"020", b"+200", b" 200", b"\xff200", b"\xd9\xa0200"])
def test_mti_not_four_digits_gives_empty_partial(mti):
    raw = ASCII.encode(REQUEST)[4:]
    with pytest.raises(DecodeError) as e:
        ASCII.decode(mti + raw + b"X")
    assert e.value.partial == {}


def test_lower_case_hex_in_partial_is_upper_cased():
    msg = {"t": "0200", "11": "000001", "52": "0123456789abcdef"}
    raw = bytes(iso8583.encode(dict(msg), ASCII.spec)[0]) + b"!"
    with pytest.raises(DecodeError) as e:
        ASCII.decode(raw)
    assert e.value.partial["52"] == "0123456789ABCDEF"


@pytest.mark.parametrize("d", [ASCII, BINARY], ids=lambda d: d.name)
@SETTINGS
@given(data=st.binary(max_size=200), head=st.sampled_from([b"", b"0200", b"0800", b"0200F23A", b"0200\xf2\x3a"]))
@example(data=b"", head=b"")
def test_garbage_raises_only_decode_error_with_sane_partial(d, data, head):
    raw = head + data
    try:
        msg = d.decode(raw)
    except DecodeError as e:
        p = e.partial
        assert isinstance(p, dict)
        if p:
            assert len(p["t"]) == 4 and p["t"].isdigit()
            assert all(isinstance(k, str) and isinstance(v, str) for k, v in p.items())
        with pytest.raises(DecodeError):
            d.reference_decode(raw)
    else:
        assert d.reference_decode(raw) == msg


@pytest.mark.parametrize("d", [ASCII, BINARY], ids=lambda d: d.name)
@SETTINGS
@given(cut=st.integers(0, 400), flip=st.integers(0, 400), byte=st.integers(0, 255))
def test_damaged_request_partial_matches_reference(d, cut, flip, byte):
    raw = bytearray(d.encode(REQUEST))
    if flip < len(raw):
        raw[flip] = byte
    raw = bytes(raw[: max(cut, 1)])
    try:
        d.decode(raw)
    except DecodeError as e:
        fast = e.partial
    else:
        return
    try:
        iso8583.decode(raw, d.spec)
    except iso8583.DecodeError:
        with pytest.raises(DecodeError) as ref:
            d.reference_decode(raw)
        assert fast == ref.value.partial
    except KeyError:   # pyiso8583 has no spec for fields 129..192: it names nothing
        pass
