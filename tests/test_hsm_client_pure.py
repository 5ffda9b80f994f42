"""HSM client, pure parts: header allocation and matching, framing, command
layouts and answer parsing. No sockets."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cardswitch.hsm_sim import client as hc
from cardswitch.hsm_sim.client import (
    ERROR_MEANINGS, HsmBusy, HsmError, HsmProtocolError, HsmRequestError, PendingTable,
    account12, parse_response, response_code_of,
)
from cardswitch.iso8583.framing import FrameReader, Framing

CVK = "U9B4934384B19946B040CD702B4D58145"
TPK = "0406FBB23A5214DF"
ZPK1 = "BAB32D775A38E4AB"
ZPK = "U1EF828AA8F6B80EB83E19FBC373F3A85"


# -- golden command layouts (hsm.md 5) ----------------------------------------

def test_golden_cw_bytes() -> None:
    assert hc.build_cw(CVK, "4123456789012345", "8701", "101") == \
        b"CWU9B4934384B19946B040CD702B4D581454123456789012345;8701101"


def test_golden_ca_bytes() -> None:
    want = b"CA0406FBB23A5214DFBAB32D775A38E4AB12DC80B186C30902B00303550000025321"
    got = hc.build_pin_translate("CA", TPK, ZPK1, "DC80B186C30902B0", "550000025321", "03", "03", 12)
    assert got == want
    got01 = hc.build_pin_translate("CA", TPK, ZPK1, "dc80b186c30902b0", "550000025321", "03", "01")
    assert got01 == want[:-14] + b"01" + want[-12:]


def test_golden_answers_parse() -> None:
    code, body = parse_response("CA", b"CB0004F7808F2CBEC6316803")
    assert code == "00" and hc.parse_pin_block("CA", body) == "F7808F2CBEC63168"
    assert parse_response("CW", b"CX00561") == ("00", b"561")


# -- other layouts --------------------------------------------------------------

def test_other_layouts() -> None:
    pb = "0123456789ABCDEF"
    assert hc.build_pin_translate_dukpt("U" + "1" * 32, ZPK, "FFFF9876543210E00001", pb, "400000123456") == \
        b"CIU" + b"1" * 32 + ZPK.encode() + b"605FFFF9876543210E00001" + pb.encode() + b"01400000123456"
    assert hc.build_verify_pvv("DC", TPK, "U" + "2" * 32, pb, "01", "400000123456", 1, "4412") == \
        b"DC" + TPK.encode() + b"U" + b"2" * 32 + pb.encode() + b"01400000123456" + b"14412"
    assert hc.build_verify_ibm("EA", ZPK, TPK, 12, pb, "01", 4, "400000123456", "0123456789012345",
                               "40000012345N", "1234") == \
        (b"EA" + ZPK.encode() + TPK.encode() + b"12" + pb.encode() + b"01" + b"04" + b"400000123456"
         + b"0123456789012345" + b"40000012345N" + b"1234FFFFFFFF")
    assert hc.build_cy(CVK, "561", "4123456789012345", "8701", "101") == \
        b"CY" + CVK.encode() + b"5614123456789012345;8701101"
    assert hc.build_mac("M6", "003", TPK, b"\x00\x01hello") == b"M600131003" + TPK.encode() + b"0007\x00\x01hello"
    assert hc.build_mac("M8", "008", ZPK, b"ab", algorithm=1, padding=2, mac="0011223344556677") == \
        b"M800112008" + ZPK.encode() + b"0002ab0011223344556677"
    assert hc.build_mac("M8", "008", ZPK, b"", mac="00112233") == b"M800031008" + ZPK.encode() + b"000000112233"
    assert hc.build_a0("001") == b"A00001U"
    assert hc.build_a0("001", export_under="U" + "3" * 32) == b"A01001U;0U" + b"3" * 32 + b"U"
    assert hc.build_a0("002", export_under="U" + "3" * 32, export_flag="1") == b"A01002U;1U" + b"3" * 32 + b"U"
    assert hc.build_bu("01", ZPK) == b"BU011" + ZPK.encode()
    assert hc.build_bu("02", TPK) == b"BU020" + TPK.encode()
    assert hc.build_fa("U" + "4" * 32, "5" * 16) == b"FAU" + b"4" * 32 + b"5" * 16
    assert hc.build_b2(b"\x00hi") == b"B20003\x00hi"
    pair = "0123456789ABCDEF" * 2           # CVK / PVK as two single-length keys
    assert hc.build_cw(pair, "4123456789012345", "8701", "101") == b"CW" + pair.encode() + b"4123456789012345;8701101"
    assert hc.build_verify_pvv("EC", ZPK, pair, pb, "01", "1" * 12, 1, "1234")[35:67] == pair.encode()
    with pytest.raises(HsmRequestError):
        hc.build_pin_translate("CA", TPK, pair, pb, "1" * 12)   # not a pair field


@given(pan_psn=st.binary(min_size=8, max_size=8), atc=st.binary(min_size=2, max_size=2),
       un=st.binary(min_size=4, max_size=4), data=st.binary(max_size=255),
       arqc=st.binary(min_size=8, max_size=8), arc=st.binary(min_size=2, max_size=2),
       mode=st.sampled_from([0, 1, 2]))
def test_kq_carries_raw_binary(pan_psn, atc, un, data, arqc, arc, mode) -> None:
    mk = "U" + "6" * 32
    cmd = hc.build_kq(mode, 0, mk, pan_psn, atc, un, data, arqc, arc)
    head = b"KQ%d0" % mode + mk.encode()
    assert cmd[:len(head)] == head
    rest = cmd[len(head):]
    assert rest[:8] == pan_psn and rest[8:10] == atc and rest[10:14] == un
    n = int(rest[14:16], 16)
    assert n == len(data) and rest[16:16 + n] == data
    assert rest[16 + n:] == b";" + arqc + arc


@given(data=st.binary(max_size=600))
def test_mac_length_field_counts_bytes(data: bytes) -> None:
    cmd = hc.build_mac("M6", "008", ZPK, data)
    off = 2 + 5 + 3 + len(ZPK)
    assert int(cmd[off:off + 4], 16) == len(data) and cmd[off + 4:] == data


# -- bad arguments: named, never echoed, nothing built -------------------------

@pytest.mark.parametrize("call", [
    lambda: hc.build_pin_translate("CA", "0406FBB23A5214D", ZPK, "0" * 16, "1" * 12),     # short key
    lambda: hc.build_pin_translate("CA", TPK, "V" + "1" * 32, "0" * 16, "1" * 12),        # bad scheme
    lambda: hc.build_pin_translate("CA", TPK, ZPK, "4111111111111111G", "1" * 12),        # not hex
    lambda: hc.build_pin_translate("CA", TPK, ZPK, "0" * 16, "41111111111"),              # account 11
    lambda: hc.build_pin_translate("CA", TPK, ZPK, "0" * 16, "1" * 12, src_fmt="1"),
    lambda: hc.build_pin_translate_dukpt("U" + "1" * 32, ZPK, "FFFF", "0" * 16, "1" * 12),
    lambda: hc.build_verify_pvv("DC", TPK, TPK, "0" * 16, "01", "1" * 12, 10, "1234"),
    lambda: hc.build_verify_ibm("DA", TPK, TPK, 12, "0" * 16, "01", 4, "1" * 12, "0" * 16, "4000001NNNN", "1"),
    lambda: hc.build_verify_ibm("DA", TPK, TPK, 12, "0" * 16, "01", 4, "1" * 12, "0" * 16, "40000012345N", ""),
    lambda: hc.build_cw(CVK, "41111111111111111111", "8701", "101"),
    lambda: hc.build_cw(CVK, "4111111111111111", "870", "101"),
    lambda: hc.build_cy(CVK, "56", "4111111111111111", "8701", "101"),
    lambda: hc.build_mac("M6", "001", TPK, b"x"),
    lambda: hc.build_mac("M6", "003", TPK, b"x", algorithm=2),
    lambda: hc.build_mac("M6", "003", TPK, b"x", padding=3),
    lambda: hc.build_mac("M6", "003", TPK, b"x", mac_len=12),
    lambda: hc.build_mac("M6", "003", TPK, "text"),
    lambda: hc.build_kq(0, 0, ZPK, b"1" * 7, b"12", b"1234", b"", b"1" * 8, b"12"),
    lambda: hc.build_kq(3, 0, ZPK, b"1" * 8, b"12", b"1234", b"", b"1" * 8, b"12"),
    lambda: hc.build_kq(0, 0, ZPK, b"1" * 8, b"12", b"1234", b"x" * 256, b"1" * 8, b"12"),
    lambda: hc.build_a0("01"),
    lambda: hc.build_a0("001", scheme="Q"),
    lambda: hc.build_a0("001", export_under=ZPK, export_flag="2"),
    lambda: account12("4111x"),
])
def test_bad_arguments_are_named_not_echoed(call) -> None:
    with pytest.raises(HsmRequestError) as e:
        call()
    assert isinstance(e.value, ValueError)
    msg = str(e.value)
    assert "4111111111" not in msg and "0406FBB" not in msg and ":" in msg


# -- helpers ---------------------------------------------------------------------

@given(st.text("0123456789", min_size=13, max_size=19))
def test_account12_is_the_12_digits_before_the_check_digit(pan: str) -> None:
    a = account12(pan)
    assert len(a) == 12 and a == pan[-13:-1]


def test_account12_examples() -> None:
    assert account12("4123456789012345") == "345678901234"
    assert account12("5500000000253215") == "000000025321"   # check digit dropped
    assert account12("412345678901") == "041234567890"       # short PAN: zero-padded


def test_response_codes() -> None:
    assert [response_code_of(c) for c in ("NC", "CA", "M6", "KQ", "B2", "A0")] == \
        ["ND", "CB", "M7", "KR", "B3", "A1"]


def test_error_meanings_and_odd_answers() -> None:
    e = HsmError("CA", "10")
    assert e.meaning == "source key parity error" and "CA" in str(e) and "10" in str(e)
    assert HsmError("CA", "99").meaning == "unknown error code"
    assert set(ERROR_MEANINGS) >= {"00", "01", "02", "04", "05", "10", "11", "12", "13", "15",
                                   "20", "23", "24", "26", "27", "41", "68", "80"}
    assert parse_response("CA", b"ZZ15") == ("15", b"")        # frame the HSM could not read
    assert parse_response("CA", b"CB68") == ("68", b"")        # command disabled
    with pytest.raises(HsmProtocolError):
        parse_response("CA", b"CD00xx")                        # the answer to another command
    with pytest.raises(HsmProtocolError):
        parse_response("CA", b"CB0")
    with pytest.raises(HsmProtocolError):
        parse_response("CA", b"CBxx")


@given(st.binary(max_size=40), st.sampled_from(["NC", "CA", "M6", "KQ"]))
def test_parse_response_never_misbehaves(payload: bytes, command: str) -> None:
    try:
        code, body = parse_response(command, payload)
    except HsmProtocolError:
        return
    assert len(code) == 2 and code.isdigit()
    assert body == (payload[4:] if payload[:2] == response_code_of(command).encode() else b"")


def test_take_key_reads_each_scheme() -> None:
    body = (b"U" + b"A" * 32) + (b"T" + b"B" * 48) + b"C" * 16 + b"123456"
    k1, p = hc.take_key(body)
    k2, p = hc.take_key(body, p)
    k3, p = hc.take_key(body, p)
    assert (len(k1), len(k2), len(k3), body[p:]) == (33, 49, 16, b"123456")
    with pytest.raises(ValueError):
        hc.take_key(b"U" + b"A" * 10)


# -- PendingTable ------------------------------------------------------------------

ops = st.lists(st.one_of(st.tuples(st.just("add"), st.integers()),
                         st.tuples(st.just("pop"), st.integers(0, 1000))), max_size=300)


@given(ops=ops, header_len=st.integers(1, 10), limit=st.integers(1, 40))
def test_pending_headers_unique_and_matched(ops, header_len: int, limit: int) -> None:
    t: PendingTable[int] = PendingTable(header_len, limit)
    model: dict[bytes, int] = {}
    for op, arg in ops:
        if op == "add":
            if len(model) >= t.limit:
                with pytest.raises(HsmBusy):
                    t.add(arg)
                continue
            h = t.add(arg)
            assert len(h) == header_len and all(c in b"0123456789ABCDEF" for c in h)
            assert h not in model                       # unique among those in flight
            model[h] = arg
        elif model:
            h = sorted(model)[arg % len(model)]
            assert t.pop(h) == model.pop(h)
            assert t.pop(h) is None                     # a second answer finds nothing
        assert len(t) == len(model)
    assert sorted(t.drain()) == sorted(model.values()) and len(t) == 0


def test_pending_wraps_around_and_skips_headers_in_flight() -> None:
    t: PendingTable[int] = PendingTable(1, 100)
    assert t.limit == 16                                # one hex digit: 16 headers
    held = t.add(-1)                                    # header 0 stays in flight
    for i in range(40):
        h = t.add(i)
        assert h != held
        assert t.pop(h) == i
    assert t.pop(held) == -1
    with pytest.raises(ValueError):
        PendingTable(0)


# -- framing and matching end to end, sans-I/O -----------------------------------

@settings(max_examples=60)
@given(bodies=st.lists(st.binary(max_size=70), min_size=1, max_size=16), data=st.data(),
       header_len=st.sampled_from([1, 2, 4, 6]))
def test_answers_in_any_order_and_any_chunking_match_their_requests(bodies, data, header_len) -> None:
    framing = Framing("2byte", header_len, 0xFFFF)
    table: PendingTable[bytes] = PendingTable(header_len, 4096)   # 1 hex digit: up to 16 in flight
    wire = b""
    for b in bodies:
        wire += framing.encode(b"B2" + b, table.add(b))
    # The HSM side: read the requests (in chunks), answer them in any order.
    server = FrameReader(framing)
    reqs = []
    for chunk in _chunks(wire, data):
        reqs += server.feed(chunk)
    assert len(reqs) == len(bodies)
    order = data.draw(st.permutations(range(len(reqs))))
    answers = b"".join(framing.encode(b"B300" + reqs[i][1][2:], reqs[i][0]) for i in order)
    answers += framing.encode(b"B300late", b"Z" * header_len)   # an answer nobody waits for
    client = FrameReader(framing)
    matched = []
    for chunk in _chunks(answers, data):
        for header, payload in client.feed(chunk):
            want = table.pop(header)
            if want is None:
                assert payload == b"B300late"
                continue
            code, body = parse_response("B2", payload)
            assert code == "00" and body == want
            matched.append(body)
    assert sorted(matched) == sorted(bodies) and len(table) == 0


def _chunks(blob: bytes, data) -> list[bytes]:
    cuts = sorted(data.draw(st.lists(st.integers(0, len(blob)), max_size=8)))
    out, prev = [], 0
    for c in cuts + [len(blob)]:
        out.append(blob[prev:c])
        prev = c
    return out
