"""Framing: length prefixes, fixed header, keep-alives, limits; fed in any chunking."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cardswitch.iso8583.framing import Framing, FrameReader, FrameTooLarge, FramingError, swap_tpdu

SETTINGS = settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])

framings = st.builds(
    Framing,
    kind=st.sampled_from(["2byte", "4ascii"]),
    header_len=st.sampled_from([0, 0, 5, 1]),
    max_frame=st.sampled_from([64, 300, 4096]),
)


@st.composite
def stream(draw):
    """A framing, the frames it should yield, and the bytes on the wire (with keep-alives)."""
    f = draw(framings)
    frames, wire = [], b""
    for _ in range(draw(st.integers(0, 6))):
        if draw(st.integers(0, 4)) == 0:
            wire += f.keepalive()
            continue
        header = draw(st.binary(min_size=f.header_len, max_size=f.header_len))
        payload = draw(st.binary(min_size=1, max_size=f.max_frame - f.header_len))
        frames.append((header, payload))
        wire += f.encode(payload, header)
    return f, frames, wire


def test_2byte_encoding():
    f = Framing()
    assert f.encode(b"0800abc") == b"\x00\x070800abc"
    assert f.keepalive() == b"\x00\x00"
    assert FrameReader(f).feed(b"\x00\x070800abc") == [(b"", b"0800abc")]


def test_4ascii_encoding_with_tpdu():
    f = Framing("4ascii", header_len=5)
    tpdu = bytes.fromhex("6000010002")
    wire = f.encode(b"0200xyz", tpdu)
    assert wire == b"0012" + tpdu + b"0200xyz"
    assert FrameReader(f).feed(wire) == [(tpdu, b"0200xyz")]


def test_swap_tpdu():
    assert swap_tpdu(bytes.fromhex("6000010002")) == bytes.fromhex("6000020001")
    assert swap_tpdu(swap_tpdu(b"\x60abcd")) == b"\x60abcd"
    assert swap_tpdu(b"") == b"" and swap_tpdu(b"HDR") == b"HDR"


def test_keepalive_yields_nothing():
    for kind in ("2byte", "4ascii"):
        f = Framing(kind)
        r = FrameReader(f)
        assert r.feed(f.keepalive() * 3) == []
        assert r.pending == 0


def test_pending_counts_partial_frame():
    r = FrameReader(Framing())
    assert r.feed(b"\x00\x05ab") == []
    assert r.pending == 4
    assert r.feed(b"cde\x00") == [(b"", b"abcde")]
    assert r.pending == 1


def test_too_large_and_exactly_max():
    f = Framing(max_frame=10)
    assert FrameReader(f).feed(b"\x00\x0a" + b"x" * 10) == [(b"", b"x" * 10)]
    with pytest.raises(FrameTooLarge):
        FrameReader(f).feed(b"\x00\x0b")       # refused at the prefix, before the body arrives
    with pytest.raises(FrameTooLarge):
        FrameReader(Framing("4ascii", max_frame=10)).feed(b"0011")


@pytest.mark.parametrize("prefix", [b"00a1", b" 012", b"+012", b"-012", b"\xd9\xa1\xd9\xa2", b"1_00"])
def test_4ascii_non_digit_length(prefix):
    with pytest.raises(FramingError):
        FrameReader(Framing("4ascii")).feed(prefix + b"0000")


def test_frame_shorter_than_header():
    with pytest.raises(FramingError):
        FrameReader(Framing(header_len=5)).feed(b"\x00\x03")


def test_error_keeps_earlier_frames_and_is_sticky():
    f = Framing(max_frame=10)
    r = FrameReader(f)
    with pytest.raises(FrameTooLarge) as e:
        r.feed(f.encode(b"one") + f.encode(b"two") + b"\xff\xff")
    assert e.value.frames == [(b"", b"one"), (b"", b"two")]
    with pytest.raises(FrameTooLarge) as e:
        r.feed(b"")
    assert e.value.frames == []


def test_encode_checks():
    with pytest.raises(FramingError):
        Framing(header_len=5).encode(b"0800", b"")
    with pytest.raises(FrameTooLarge):
        Framing().encode(b"x" * 65536)
    with pytest.raises(FrameTooLarge):
        Framing("4ascii").encode(b"x" * 10000)
    assert Framing("4ascii").encode(b"x" * 9999)[:4] == b"9999"
    with pytest.raises(ValueError):
        Framing("3byte")


@SETTINGS
@given(s=stream())
def test_split_at_every_byte_boundary(s):
    f, frames, wire = s
    assert FrameReader(f).feed(wire) == frames
    for cut in range(len(wire) + 1):
        r = FrameReader(f)
        assert r.feed(wire[:cut]) + r.feed(wire[cut:]) == frames
        assert r.pending == 0


@SETTINGS
@given(s=stream(), data=st.data())
def test_random_chunkings(s, data):
    f, frames, wire = s
    r = FrameReader(f)
    got, i = [], 0
    while i < len(wire):
        k = data.draw(st.integers(1, 20))
        got += r.feed(memoryview(wire)[i:i + k])
        i += k
    assert got == frames and r.pending == 0
    r = FrameReader(f)   # one byte at a time
    assert [fr for b in wire for fr in r.feed(bytes([b]))] == frames


@SETTINGS
@given(f=framings, chunks=st.lists(st.binary(max_size=40), max_size=12))
def test_garbage_raises_only_framing_errors(f, chunks):
    r = FrameReader(f)
    for c in chunks:
        try:
            frames = r.feed(c)
        except (FrameTooLarge, FramingError):
            return
        for header, payload in frames:
            assert len(header) == f.header_len and 0 < len(header) + len(payload) <= f.max_frame
