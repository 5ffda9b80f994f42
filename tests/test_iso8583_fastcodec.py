"""The compiled codec against pyiso8583 (differential tests).

For valid input the fast codec must give the very bytes and dicts pyiso8583
gives; whatever pyiso8583 rejects must raise our DecodeError/EncodeError.
"""

from __future__ import annotations

import copy

import iso8583
import iso8583.specs
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from cardswitch.iso8583.constants import BINARY_FIELDS
from cardswitch.iso8583.dialect import ASCII, BINARY, DIALECTS, DecodeError, Dialect, EncodeError, get_dialect
from cardswitch.iso8583.fastcodec import FastCodec, UnsupportedSpec

SETTINGS = settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])

TYPICAL_0200 = {
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
    "64": "FEDCBA9876543210",
}


def _exotic_spec() -> dict:
    """default_ascii with other encodings mixed in: EBCDIC text, binary and BCD lengths, a hole."""
    spec = copy.deepcopy(iso8583.specs.default_ascii)
    spec["t"]["data_enc"] = "cp500"
    spec["p"]["data_enc"] = "cp500"
    spec["1"]["data_enc"] = "cp500"
    spec["2"].update(len_enc="bcd", len_type=1)
    spec["35"].update(len_enc="b", len_type=1)
    spec["43"].update(data_enc="cp500")
    spec["48"].update(data_enc="latin-1", len_enc="b", len_type=2)
    spec["52"].update(data_enc="b", max_len=8)
    spec["62"].update(len_enc="cp500")
    spec["103"].update(data_enc="b", len_enc="bcd", len_type=2, max_len=14)
    del spec["44"]
    return spec


EXOTIC = Dialect("exotic", _exotic_spec())
SPECS = [ASCII, BINARY, EXOTIC]


def _ref_decode(d: Dialect, raw: bytes):
    """pyiso8583 straight, normalised like Dialect: ('ok', doc) or ('error', None)."""
    try:
        doc, _ = iso8583.decode(raw, d.spec)
    except Exception:
        return "error", None
    for k in ("p", "1", "h"):
        doc.pop(k, None)
    for k in BINARY_FIELDS:
        if k in doc:
            doc[k] = doc[k].upper()
    return "ok", doc


def _fast_decode(d: Dialect, raw: bytes):
    try:
        return "ok", d.decode(raw)
    except DecodeError:
        return "error", None


def _ref_encode(d: Dialect, msg: dict):
    doc = dict(msg)
    for k in BINARY_FIELDS:
        if isinstance(doc.get(k), str) and doc[k].isascii():
            doc[k] = doc[k].upper()
    try:
        raw, _ = iso8583.encode(doc, d.spec)
    except Exception:
        return "error", None
    return "ok", bytes(raw)


def _fast_encode(d: Dialect, msg: dict):
    try:
        return "ok", d.encode(msg)
    except EncodeError:
        return "error", None


# ---------------------------------------------------------------- strategies

ASCII_TEXT = st.characters(min_codepoint=0, max_codepoint=127)
HEX = "0123456789abcdefABCDEF"


@st.composite
def field_value(draw, fs: dict) -> str:
    size = fs["max_len"]
    if fs["len_type"]:
        size = draw(st.integers(0, min(size, 40 if draw(st.booleans()) else size)))
    if fs["data_enc"] == "b":
        return draw(st.text(HEX, min_size=2 * size, max_size=2 * size))
    if fs["data_enc"] == "cp500":
        return draw(st.text(st.sampled_from("ABCXYZ abc0123456789.,-/"), min_size=size, max_size=size))
    if fs["data_enc"] == "latin-1":
        return draw(st.text(st.characters(min_codepoint=0, max_codepoint=255), min_size=size, max_size=size))
    return draw(st.text(ASCII_TEXT, min_size=size, max_size=size))


def _data_fields(spec: dict) -> list[int]:
    return [n for n in range(2, 129) if n != 65 and str(n) in spec]


@st.composite
def valid_message(draw, d: Dialect) -> dict:
    spec = d.spec
    nums = draw(st.sets(st.sampled_from(_data_fields(spec)), max_size=24))
    if draw(st.booleans()):
        nums |= {2, 3, 4, 7, 11, 41}
    msg = {"t": draw(field_value(spec["t"]) if spec["t"]["data_enc"] != "b" else st.just("0200"))}
    for n in sorted(nums, key=lambda _: draw(st.integers(0, 3))):   # any insertion order
        msg[str(n)] = draw(field_value(spec[str(n)]))
    return msg


def _expected(d: Dialect, msg: dict) -> dict:
    """What decoding the encoded msg gives: hex upper-cased (52/55/64/128 and binary fields)."""
    out = dict(msg)
    for k, v in msg.items():
        if k in BINARY_FIELDS or d.spec[k]["data_enc"] == "b":
            out[k] = v.upper()
    return out


# ---------------------------------------------------------------- basics


def test_public_api_stable():
    assert get_dialect("ascii") is ASCII and get_dialect("binary") is BINARY
    assert set(DIALECTS) == {"ascii", "binary"}
    assert ASCII.name == "ascii" and ASCII.spec is iso8583.specs.default_ascii
    assert BINARY.binary_fields == ("52", "55", "64", "128")
    assert ASCII.binary_fields == ()
    e = DecodeError("why", {"t": "0200"})
    assert e.reason == "why" and e.partial == {"t": "0200"} and isinstance(e, ValueError)
    assert DecodeError("x").partial == {}
    assert issubclass(EncodeError, ValueError)
    with pytest.raises(ValueError, match="unknown dialect"):
        get_dialect("bcd")


def test_pyiso8583_documented_example():
    raw = b"02004010100000000000161234567890123456123456111"
    assert ASCII.decode(raw) == {"t": "0200", "2": "1234567890123456", "12": "123456", "20": "111"}
    assert ASCII.encode({"t": "0210", "3": "111111", "39": "05"}) == b"0210200000000200000011111105"


@pytest.mark.parametrize("d", [ASCII, BINARY], ids=lambda d: d.name)
def test_typical_0200_round_trip(d):
    raw = d.encode(TYPICAL_0200)
    assert raw == bytes(iso8583.encode(dict(TYPICAL_0200), d.spec)[0])
    assert d.decode(raw) == TYPICAL_0200
    assert d.decode(bytearray(raw)) == TYPICAL_0200
    assert d.decode(memoryview(raw)) == TYPICAL_0200


def test_secondary_bitmap_fields():
    msg = dict(TYPICAL_0200, **{"70": "301", "90": "0" * 42, "100": "12345", "128": "00112233AABBCCDD"})
    del msg["64"]
    for d in (ASCII, BINARY):
        raw = d.encode(msg)
        assert raw == bytes(iso8583.encode(dict(msg), d.spec)[0])
        assert d.decode(raw) == msg


def test_ascii_hex_fields_upper_case_both_ways():
    msg = dict(TYPICAL_0200, **{"52": "0123456789abcdef", "55": "9f2608c2", "64": "fedcba9876543210"})
    raw = ASCII.encode(msg)
    assert b"0123456789ABCDEF" in raw and b"9F2608C2" in raw and b"fedcba" not in raw
    assert msg["52"] == "0123456789abcdef"   # the caller's dict is left alone
    lower = bytes(iso8583.encode(dict(msg), ASCII.spec)[0])
    assert ASCII.decode(lower)["52"] == "0123456789ABCDEF"
    assert ASCII.decode(lower)["55"] == "9F2608C2"
    assert BINARY.decode(BINARY.encode(msg))["52"] == "0123456789ABCDEF"


def test_encode_does_not_mutate_and_ignores_bitmap_keys():
    msg = dict(TYPICAL_0200, p="garbage", h="x")
    msg["1"] = "ignored"
    msg["65"] = "ignored"
    before = dict(msg)
    assert ASCII.encode(msg) == ASCII.encode(TYPICAL_0200)
    assert msg == before


@pytest.mark.parametrize(
    "msg",
    [
        {},                                             # no MTI
        {"t": "020"},                                   # MTI too short
        {"t": "02000"},
        {"t": "02é0"},
        {"t": 200},
        {"t": "0200", "3": "12345"},                    # fixed too short
        {"t": "0200", "3": "1234567"},                  # fixed too long
        {"t": "0200", "2": "1" * 20},                   # var above max
        {"t": "0200", "41": "TERMé001"},                # not ASCII
        {"t": "0200", "41": 12345678},                  # not text
        {"t": "0200", "41": b"TERM0001"},
        {"t": "0200", "52": "ß123456789ABCDE"},         # upper() would make it ASCII: still refused
        {"t": "0200", "52": "ﬀ0123456789ABCD"},
        {"t": "0200", "129": "x"},                      # no spec for 129
        {"t": "0200", "193": "x"},
        {"t": "0200", "0": "x"},
        {"t": "0200", 3: "000000"},
        {"t": "0200", "02": "4761739001010010"},        # a number, but not a key of "2"
        {"t": "0200", "²": "1"},
    ],
)
def test_encode_rejects_what_pyiso8583_rejects(msg):
    for d in (ASCII, BINARY):
        assert _ref_encode(d, msg)[0] == "error"
        with pytest.raises(EncodeError):
            d.encode(msg)
        with pytest.raises(EncodeError):
            d.reference_encode(msg)


def test_encode_binary_dialect_rejects_bad_hex():
    for bad in ("0123456789ABCDEG", "0123456789ABCDE", "0123456789ABCDEF00", "é" * 16):
        with pytest.raises(EncodeError):
            BINARY.encode({"t": "0200", "52": bad})
    with pytest.raises(EncodeError):
        BINARY.encode({"t": "0200", "55": "ABC"})


def test_wrong_argument_types():
    with pytest.raises(TypeError):
        ASCII.decode("0200")   # type: ignore[arg-type]
    with pytest.raises(TypeError):
        ASCII.encode([("t", "0200")])   # type: ignore[arg-type]


@pytest.mark.parametrize(
    "raw",
    [
        b"0200",                                        # no bitmap
        b"02004000000000000000",                        # field 2 missing
        b"0200400000000000000016476173900101001",       # field 2 truncated
        b"020040000000000000002047617390010100100000",   # field 2 longer than 19
        b"0200400000000000000016476173900101001000",    # extra data
        b"0200G000000000000000",                        # non-hex bitmap
        b"0200\xc0000000000000000",                     # non-ASCII bitmap
        b"0200400000000000000016\xff761739001010010",   # non-ASCII field
        b"02004000000000000000-1",                      # negative length
        b"0200C000000000000000",                        # secondary announced, missing
        b"0200" + b"8000000000000000" * 3 + b"1",       # tertiary bitmap with field 129 (no spec)
    ],
)
def test_decode_rejects_what_pyiso8583_rejects(raw):
    assert _ref_decode(ASCII, raw)[0] == "error"
    with pytest.raises(DecodeError):
        ASCII.decode(raw)
    with pytest.raises(DecodeError):
        ASCII.reference_decode(raw)


@pytest.mark.parametrize(
    "raw",
    [
        b"02004000000000000000 51234500",               # int() leniency of pyiso8583: " 5"
        b"02004000000000000000+51234500",
        b"02004000000000000000-0",                      # "-0" is a zero length
        b"0200400000000000000000",                      # zero length
        b"020040 00 00 00 00 0000051234500",            # bytes.fromhex skips spaces
        b"ABCD2000000000000000123456",                  # the codec does not judge content
        b"020080000000000000000000000000000000",        # bit 1, empty secondary
        b"0200800000000000000080000000000000000000000000000000",
    ],
)
def test_decode_odd_but_valid_like_pyiso8583(raw):
    status, ref = _ref_decode(ASCII, raw)
    assert _fast_decode(ASCII, raw) == (status, ref)


def test_tertiary_bitmap_without_fields_is_consumed():
    raw = b"0200" + b"8000000000000000" + b"8000000000000000" + b"0000000000000000"
    assert ASCII.decode(raw) == {"t": "0200"} == ASCII.reference_decode(raw)
    with pytest.raises(DecodeError):
        ASCII.decode(raw[:-1])


def test_unsupported_specs_fall_back_to_pyiso8583():
    spec = copy.deepcopy(iso8583.specs.default_ascii)
    spec["h"]["max_len"] = 5
    with pytest.raises(UnsupportedSpec):
        FastCodec(spec)
    d = Dialect("with-header", spec)
    msg = {"h": "HEAD1", "t": "0200", "11": "000001"}
    raw = d.encode(msg)
    assert raw == b"HEAD10200" + b"0020000000000000" + b"000001"
    assert d.decode(raw) == {"t": "0200", "11": "000001"}   # the header is dropped like bitmaps
    spec2 = copy.deepcopy(iso8583.specs.default_ascii)
    spec2["2"]["len_count"] = "nibbles"
    with pytest.raises(UnsupportedSpec):
        FastCodec(spec2)
    spec3 = copy.deepcopy(iso8583.specs.default_ascii)
    spec3["2"]["data_enc"] = "no-such-codec"
    with pytest.raises(UnsupportedSpec):
        FastCodec(spec3)


# ---------------------------------------------------------------- properties


@pytest.mark.parametrize("d", SPECS, ids=lambda d: d.name)
@SETTINGS
@given(data=st.data())
def test_valid_messages_match_pyiso8583(d, data):
    msg = data.draw(valid_message(d))
    status, ref_raw = _ref_encode(d, msg)
    assert status == "ok"
    raw = d.encode(msg)
    assert raw == ref_raw
    assert d.decode(raw) == _ref_decode(d, raw)[1] == _expected(d, msg)
    assert d.reference_decode(raw) == _expected(d, msg)
    assert d.reference_encode(msg) == raw


def _mutate(raw: bytes, data) -> bytes:
    op = data.draw(st.sampled_from(["cut", "set", "insert", "delete", "digit", "append"]))
    i = data.draw(st.integers(0, max(len(raw) - 1, 0)))
    if op == "cut":
        return raw[:i]
    if op == "set":
        return raw[:i] + bytes([data.draw(st.integers(0, 255))]) + raw[i + 1:]
    if op == "digit":   # plausible damage: a digit or a hex letter swapped in
        return raw[:i] + data.draw(st.sampled_from(list(b"0123456789ABCDEF -+_ \t"))).to_bytes(1, "big") + raw[i + 1:]
    if op == "insert":
        return raw[:i] + data.draw(st.binary(min_size=1, max_size=3)) + raw[i:]
    if op == "append":
        return raw + data.draw(st.binary(min_size=1, max_size=3))
    return raw[:i] + raw[i + 1:]


@pytest.mark.parametrize("d", SPECS, ids=lambda d: d.name)
@SETTINGS
@given(data=st.data())
def test_damaged_frames_match_pyiso8583(d, data):
    raw = d.encode(data.draw(valid_message(d)))
    for _ in range(data.draw(st.integers(1, 3))):
        raw = _mutate(raw, data)
    assert _fast_decode(d, raw) == _ref_decode(d, raw)


@pytest.mark.parametrize("d", SPECS, ids=lambda d: d.name)
@SETTINGS
@given(body=st.binary(max_size=80), head=st.sampled_from([b"", b"0200", b"0200F2", b"0200\xf2", b"\xf0\xf2\xf0\xf0"]))
@example(body=b"", head=b"")
def test_random_bytes_match_pyiso8583(d, body, head):
    raw = head + body
    assert _fast_decode(d, raw) == _ref_decode(d, raw)


@SETTINGS
@given(
    data=st.data(),
    junk=st.one_of(
        st.integers(), st.binary(max_size=20), st.none(),
        st.text(st.characters(min_codepoint=0, max_codepoint=0x2FF), max_size=30),
    ),
    key=st.sampled_from(["2", "3", "4", "35", "41", "52", "55", "64", "90", "100", "128", "129", "t", "p", "1", "65", "x", "02"]),
)
def test_bad_values_and_keys_match_pyiso8583(data, junk, key):
    for d in SPECS:
        msg = data.draw(valid_message(d))
        msg[key] = junk
        want = _ref_encode(d, msg)
        got = _fast_encode(d, msg)
        assert got == want
        if got[0] == "error":
            with pytest.raises(EncodeError):
                d.reference_encode(msg)


@SETTINGS
@given(prefix=st.binary(min_size=3, max_size=3), body=st.binary(max_size=12))
def test_length_prefixes_read_like_pyiso8583(prefix, body):
    # field 60: LLL; any 3 bytes as its length prefix
    raw = b"0200" + b"0000000000000010" + prefix + body
    assert _fast_decode(ASCII, raw) == _ref_decode(ASCII, raw)
    raw = b"0200" + bytes.fromhex("0000000000000010") + prefix + body
    assert _fast_decode(BINARY, raw) == _ref_decode(BINARY, raw)


def test_plan_caches_stay_bounded():
    codec = FastCodec(iso8583.specs.default_ascii)
    spec = iso8583.specs.default_ascii
    for n in range(1, 1 << 13):   # 8191 distinct field sets, hence bitmaps
        msg = {"t": "0800"}
        for k in range(2, 15):
            if n >> (k - 2) & 1:
                fs = spec[str(k)]
                msg[str(k)] = "1" if fs["len_type"] else "1" * fs["max_len"]
        raw = codec.encode(msg)
        assert codec.decode(raw) == msg
    assert 0 < len(codec._plans) <= 4096 and 0 < len(codec._enc_plans) <= 4096
