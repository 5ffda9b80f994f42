"""The benchmark harness (bench/): its byte-level pieces against pyiso8583, and
short smoke runs of loadgen -> relay -> instant bank and of bench/run.py.

No timing assertions: timings belong to the bench itself.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import iso8583
import iso8583.specs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import instant_bank  # noqa: E402
import loadgen  # noqa: E402
import relay  # noqa: E402
import wirebytes  # noqa: E402

SPEC = iso8583.specs.default_ascii


def encode(msg: dict) -> bytes:
    raw, _ = iso8583.encode(dict(msg), SPEC)
    return bytes(raw)


def decode(raw: bytes) -> dict:
    doc, _ = iso8583.decode(bytearray(raw), SPEC)
    doc.pop("p", None)
    doc.pop("1", None)
    return doc


SWITCH_0200 = {
    "t": "0200", "2": "6221260000000018", "3": "000000", "4": "000000000100",
    "7": "1128101010", "11": "000042", "12": "101010", "13": "1128", "14": "3912",
    "15": "1128", "22": "012", "25": "00", "32": "10000001", "33": "99900001",
    "37": "000000000001", "41": "POS00001", "42": "898440154110001",
    "43": "Shanghai Coffee          Shanghai     CN", "49": "156", "52": "0123456789ABCDEF",
    "60": "000001", "100": "10000001",
}


# -- the instant bank ---------------------------------------------------------------------------


def test_instant_bank_approves_a_purchase_echoing_what_the_switch_matches_on():
    out = decode(instant_bank.InstantBank().answer(encode(SWITCH_0200)))
    assert out["t"] == "0210"
    for k in ("2", "3", "4", "7", "11", "12", "13", "15", "32", "33", "37", "41", "42", "49", "60", "100"):
        assert out[k] == SWITCH_0200[k], k
    assert out["38"] == "123456"
    assert out["39"] == "00"
    for k in ("14", "22", "25", "43", "52"):   # not echoed: card data and request-only fields
        assert k not in out


@pytest.mark.parametrize("mti, answer", [("0800", "0810"), ("0420", "0430"), ("0421", "0430"),
                                         ("0100", "0110"), ("0201", "0210"), ("0220", "0230")])
def test_instant_bank_answers_each_request_class(mti, answer):
    if mti.startswith("08"):
        req = {"t": mti, "7": "1128101010", "11": "000007", "33": "99900001", "70": "301"}
    else:
        req = dict(SWITCH_0200, t=mti)
        if mti.startswith("04"):
            req["90"] = "0200" + "000042" + "1128101010" + "0" * 22
    out = decode(instant_bank.InstantBank().answer(encode(req)))
    assert out["t"] == answer
    assert out["39"] == "00"
    assert out["11"] == req["11"]
    assert out["7"] == req["7"]
    if mti.startswith("08"):
        assert out["70"] == "301" and out["33"] == "99900001"
    assert ("38" in out) == (mti[1] in "12" and mti[2] == "0")
    if mti.startswith("04"):
        assert out["90"] == req["90"]


def test_instant_bank_drops_responses_and_garbage():
    bank = instant_bank.InstantBank()
    assert bank.answer(encode({"t": "0210", "11": "000001", "39": "00"})) is None
    assert bank.answer(b"0200") is None
    assert bank.answer(b"0200ZZZZZZZZZZZZZZZZ") is None
    assert bank.answer(encode(SWITCH_0200)[:-3]) is None
    assert bank.answer(encode(SWITCH_0200) + b"X") is None
    assert bank.dropped == 5 and bank.answered == 0


# -- the byte-level layout, against pyiso8583 ---------------------------------------------------

_FIELDS = [n for n in range(2, 129) if n not in (1, 65)]


@st.composite
def messages(draw):
    chosen = draw(st.sets(st.sampled_from(_FIELDS), min_size=1, max_size=20))
    msg = {"t": draw(st.sampled_from(["0200", "0210", "0800", "0420"]))}
    alphabet = st.characters(min_codepoint=0x20, max_codepoint=0x7E)
    for n in chosen:
        f = SPEC[str(n)]
        if f["len_type"]:
            size = draw(st.integers(0, min(f["max_len"], 40)))
        else:
            size = f["max_len"]
        msg[str(n)] = draw(st.text(alphabet, min_size=size, max_size=size))
    return msg


@settings(max_examples=150, deadline=None)
@given(messages())
def test_layout_finds_every_field_where_pyiso8583_decodes_it(msg):
    raw = encode(msg)
    layout = wirebytes.ASCII_LAYOUT
    spans = layout.spans(raw)
    assert {str(n) for n in spans} == set(msg) - {"t"}
    for n, (s, e) in spans.items():
        assert raw[s:e].decode("ascii") == msg[str(n)]
        assert layout.find(raw, n) == (s, e)
    for n in (11, 39, 128):
        if n not in spans:
            assert layout.find(raw, n) is None


@settings(max_examples=100, deadline=None)
@given(messages(), st.sets(st.sampled_from(_FIELDS), max_size=10))
def test_answerer_copies_kept_fields_and_adds_new_ones(msg, keep):
    layout = wirebytes.ASCII_LAYOUT
    add = {38: "654321", 39: "05"}
    out = decode(layout.answerer(frozenset(keep), wirebytes.encode_added(layout, add)).answer(encode(msg)))
    want = {k: v for k, v in msg.items() if k != "t" and int(k) in keep}
    want.update({str(k): v for k, v in add.items()})
    assert out.pop("t") == msg["t"][:2] + str(int(msg["t"][2]) + 1) + "0"
    assert out == want


def test_frames2_splits_joins_and_skips_keepalives():
    fr = wirebytes.Frames2(max_frame=100)
    data = b"\x00\x03abc" + b"\x00\x00" + b"\x00\x02de"
    out = []
    for i in range(len(data)):
        out += fr.feed(data[i:i + 1])
    assert out == [b"abc", b"de"]
    assert fr.feed(data) == [b"abc", b"de"]
    with pytest.raises(ValueError):
        fr.feed(b"\x01\x00")


# -- relay and load generator pieces ----------------------------------------------------------


def test_relay_restamps_field_11_and_routes_the_answer_back():
    stamps = relay.Restamper()
    a = encode(dict(SWITCH_0200, **{"11": "000001", "41": "TERMA001"}))
    b = encode(dict(SWITCH_0200, **{"11": "000001", "41": "TERMB001"}))
    out_a = stamps.outbound(a, "conn-a")
    out_b = stamps.outbound(b, "conn-b")
    assert decode(out_a)["11"] != decode(out_b)["11"]          # no collision upstream
    bank = instant_bank.InstantBank()
    origin, back = stamps.inbound(bank.answer(out_b))
    assert origin == "conn-b"
    got = decode(back)
    assert got["11"] == "000001" and got["41"] == "TERMB001" and got["39"] == "00"
    assert stamps.inbound(bank.answer(out_b)) is None           # answered once only
    assert stamps.unmatched == 1
    stamps.forget("conn-a")
    assert stamps.inbound(bank.answer(out_a)) is None
    assert stamps.outbound(b"junk", "conn-c") is None and stamps.malformed == 1


def test_loadgen_template_is_a_valid_purchase_with_patched_fields():
    ident = loadgen.Identity("POS00001", "898440154110001", "156", "6221260000000018", "3912")
    t = loadgen.Template(ident, 12345, "000007")
    frame = t.frame((b"1128235959", b"000777", b"235959", b"1128"))
    assert int.from_bytes(frame[:2], "big") == len(frame) - 2
    msg = decode(frame[2:])
    assert msg["t"] == "0200" and msg["3"] == "000000" and msg["4"] == "000000012345"
    assert (msg["7"], msg["11"], msg["12"], msg["13"]) == ("1128235959", "000777", "235959", "1128")
    assert (msg["2"], msg["14"], msg["41"], msg["42"], msg["49"], msg["60"]) == (
        "6221260000000018", "3912", "POS00001", "898440154110001", "156", "000007")


def _mac(tak: bytes, data: bytes) -> str:
    import warnings

    import psec.mac

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return psec.mac.generate_retail_mac(tak[:8], tak[8:], bytes(data), 1).hex().upper()


def _clear_pin(block_hex: str, tpk: bytes, pan: str) -> str:
    import warnings

    import psec.des
    import psec.pinblock

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return psec.pinblock.decode_pinblock_iso_0(psec.des.decrypt_tdes_ecb(tpk, bytes.fromhex(block_hex)), pan)


@settings(max_examples=30, deadline=None)
@given(st.from_regex(r"\A[0-9]{10}\Z"), st.integers(1, 999999), st.binary(min_size=16, max_size=16))
def test_loadgen_security_template_macs_each_request_over_its_patched_bytes(f7, stan, tak):
    """--security: field 52 as built, field 64 recomputed per request (checked with psec)."""
    ident = loadgen.Identity("POS00001", "898440158120001", "156", "6221260000000018", "3012",
                             "0123456789ABCDEF", tak)
    t = loadgen.Template(ident, 500, "000001")
    values = (f7.encode(), b"%06d" % stan, f7[4:].encode(), f7[:4].encode())
    frame = t.frame(values)
    assert int.from_bytes(frame[:2], "big") == len(frame) - 2
    msg = decode(frame[2:])
    assert (msg["7"], msg["11"], msg["12"], msg["13"]) == (f7, "%06d" % stan, f7[4:], f7[:4])
    assert msg["52"] == "0123456789ABCDEF" and msg["22"] == "011"
    assert msg["64"] == _mac(tak, frame[2:-16])
    assert frame.endswith(msg["64"].encode())


def test_loadgen_security_identities_carry_pin_blocks_under_their_terminals_tpk(tmp_path):
    import run
    from cardswitch.netfile import load_network

    path = tmp_path / "net.toml"
    path.write_text(run.builtin_network_text(data_dir=str(tmp_path / "data"), listen=18583, admin=18580,
                                             hsm=11500, bank=19101, simulate=False))
    net = load_network(str(path))
    keys = {t.id: (t.tpk.clear_bytes(), t.tak.clear_bytes()) for t in net.terminals() if t.tak is not None}
    pins = {c.pan: c.pin for b in net.banks for c in b.cards}
    idents = loadgen.network_identities(str(path), 20, 100, security=True)
    assert len({i.terminal_id for i in idents}) == run.BUILTIN_SECURE_TERMINALS == len(keys)
    for i in idents:
        tpk, tak = keys[i.terminal_id]
        assert i.tak == tak
        assert _clear_pin(i.pin_block, tpk, i.pan) == pins[i.pan]
    plain = loadgen.network_identities(str(path), 20, 100)
    assert all(not i.tak and not i.pin_block and i.terminal_id not in keys for i in plain)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40), st.integers(1, 12), st.integers(0, 999998), st.integers(1, 50))
def test_loadgen_stans_never_repeat_for_one_terminal_id(n_terminals, n_ids, base, per_terminal):
    distinct = min(n_ids, n_terminals)
    seen = set()
    for j in range(n_terminals):
        first, step = loadgen.stan_slot(j, distinct, n_terminals)
        for k in range(per_terminal):
            stan = loadgen.stan_at(base, first + k * step)
            assert 1 <= stan <= 999999
            key = (j % distinct, stan)
            assert key not in seen
            seen.add(key)


def test_loadgen_takes_pos_terminals_without_mac_key_and_rich_cards(tmp_path):
    net = tmp_path / "net.toml"
    net.write_text("\n".join([
        "[[banks]]", 'id = "B"',
        "  [[banks.cards]]", 'pan = "6221260000000018"', 'expiry = "3912"', "balance = 900000000",
        "  [[banks.cards]]", 'pan = "6221260000000026"', 'expiry = "3912"', "balance = 5",
        "  [[banks.cards]]", 'pan = "6221260000000034"', 'expiry = "3912"', "balance = 900000000",
        'status = "lost"',
        "[[merchants]]", 'id = "M1"',
        "  [[merchants.terminals]]", 'id = "POS1"', 'kind = "pos"',
        "  [[merchants.terminals]]", 'id = "ATM1"', 'kind = "atm"',
        "  [[merchants.terminals]]", 'id = "POS2"', 'kind = "pos"', 'tak = "clear:00"',
    ]) + "\n")
    terms, cards = loadgen._toml_lists(str(net))
    assert [t[0] for t in terms] == ["POS1"]
    assert sorted(c[1] for c in cards) == ["6221260000000018", "6221260000000026"]


def test_builtin_bench_network_loads_and_feeds_the_load_generator(tmp_path):
    import run

    net = tmp_path / "net.toml"
    net.write_text(run.builtin_network_text(data_dir=str(tmp_path / "data"), listen=18583, admin=18580,
                                            hsm=11500, bank=19101, simulate=False))
    idents = loadgen.network_identities(str(net), 40, 100)   # through cardswitch.netfile
    assert len({i.terminal_id for i in idents}) == 16
    assert {i.pan for i in idents} == set(run.BUILTIN_CARDS)
    assert all(i.merchant_id == "898440154110001" and i.currency == "156" for i in idents)


# -- smoke runs over TCP --------------------------------------------------------------------------


def _start(script: str, *args: str) -> tuple[subprocess.Popen, int]:
    p = subprocess.Popen([sys.executable, str(BENCH / script), *args, "--max-seconds", "120"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = p.stdout.readline()
    if not line.startswith("ready "):
        p.kill()
        raise AssertionError(f"{script} did not start: {line!r} {p.stderr.read()}")
    return p, int(line.split()[1])


def _stop(p: subprocess.Popen) -> None:
    p.terminate()
    try:
        p.wait(timeout=10)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


REPORT_FIELDS = {"target", "terminals", "procs", "rate", "duration_s", "warmup_s", "completed", "tps",
                 "p50_ms", "p90_ms", "p99_ms", "max_ms", "mean_ms", "responses", "approved", "errors",
                 "error_count", "sent", "stan_next", "loadgen_cpu_s"}


@pytest.mark.parametrize("procs", [1, 2])
def test_loadgen_through_relay_to_instant_bank(procs):
    bank, bank_port = _start("instant_bank.py", "--port", "0")
    try:
        rel, relay_port = _start("relay.py", "--listen", "0", "--upstream", f"127.0.0.1:{bank_port}")
        try:
            out = subprocess.run(
                [sys.executable, str(BENCH / "loadgen.py"), "--target", f"127.0.0.1:{relay_port}",
                 "--terminals", "4", "--procs", str(procs), "--duration", "0.6", "--warmup", "0.2"],
                capture_output=True, text=True, timeout=60)
        finally:
            _stop(rel)
    finally:
        _stop(bank)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[:2] == ["measure-start", "measure-end"]
    report = json.loads(lines[-1])
    assert REPORT_FIELDS <= report.keys()
    assert report["procs"] == procs
    assert report["completed"] > 0
    assert report["responses"] == {"00": report["completed"]}
    assert report["approved"] == report["completed"]
    assert report["error_count"] == 0, report["errors"]
    assert report["sent"] >= report["completed"]
    assert 0 < report["p50_ms"] <= report["p99_ms"] <= report["max_ms"]
    assert "TPS" in out.stderr   # the readable summary


def test_run_orchestrates_baseline_switch_and_half_rate(tmp_path):
    """bench/run.py end to end, with a second relay standing in for the switch."""
    out_file = tmp_path / "latest.json"
    out = subprocess.run(
        [sys.executable, str(BENCH / "run.py"), "--terminals", "4", "--duration", "0.5", "--warmup", "0.2",
         "--repeat", "1", "--bench-network", "builtin", "--out", str(out_file),
         "--switch-cmd", "{python} {bench}/relay.py --listen {listen_port} --upstream 127.0.0.1:{bank_port}"],
        capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "relay (baseline)" in out.stdout and "switch/relay" in out.stdout
    result = json.loads(out_file.read_text())
    for phase in ("relay", "switch", "switch_half_rate"):
        m = result[phase]["median"]
        assert m["completed"] > 0 and m["approved"] == m["completed"] and m["errors"] == 0, phase
        assert m["cpu_us_per_txn"] is not None and m["cpu_us_per_txn"] >= 0
        run = result[phase]["runs"][0]
        assert REPORT_FIELDS <= run.keys()
    assert result["switch_half_rate"]["rate"] == pytest.approx(result["switch"]["median"]["tps"] / 2)
    assert result["switch_half_rate"]["runs"][0]["rate"] == pytest.approx(result["switch_half_rate"]["rate"])
    assert set(result["ratios"]) == {"tps", "cpu_per_txn"}
    assert set(result["goal"]) >= {"tps_ratio_ok", "p99_ok"}
    assert "switch_security" not in result


def test_run_security_compares_pin_and_mac_load_with_plain(tmp_path):
    """--security: the same orchestration plus a PIN+MAC run (the relay stands in for the switch)."""
    out_file = tmp_path / "latest.json"
    out = subprocess.run(
        [sys.executable, str(BENCH / "run.py"), "--terminals", "4", "--duration", "0.5", "--warmup", "0.2",
         "--repeat", "1", "--bench-network", "builtin", "--out", str(out_file), "--security",
         "--switch-cmd", "{python} {bench}/relay.py --listen {listen_port} --upstream 127.0.0.1:{bank_port}"],
        capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "switch, PIN+MAC" in out.stdout and "TPS with/without" in out.stdout
    result = json.loads(out_file.read_text())
    assert result["config"]["security"] is True
    m = result["switch_security"]["median"]
    assert m["completed"] > 0 and m["approved"] == m["completed"] and m["errors"] == 0
    assert m["loadgen_cpu_pct"] is not None and m["loadgen_cpu_pct"] >= 0
    assert result["switch_security"]["runs"][0]["security"] is True
    assert result["switch"]["runs"][0]["security"] is False
    sec = result["security"]
    assert sec["tps_ratio"] == pytest.approx(m["tps"] / result["switch"]["median"]["tps"])
    assert sec["secure_tps_to_relay"] == pytest.approx(m["tps"] / result["relay"]["median"]["tps"])


def test_bench_outage_measures_baseline_outage_and_saf_drain(tmp_path):
    """bench/bench_outage.py end to end with tiny phases: the JSON has every figure (no timings checked)."""
    out_file = tmp_path / "outage.json"
    out = subprocess.run(
        [sys.executable, str(BENCH / "bench_outage.py"), "--terminals", "2", "--duration", "0.4",
         "--warmup", "0.1", "--repeat", "1", "--drain-timeout", "60", "--out", str(out_file)],
        capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    assert "switch, bank down" in out.stdout and "SAF queue empty" in out.stdout
    result = json.loads(out_file.read_text())
    assert result["relay"]["median"]["tps"] > 0
    rep = result["repeats"][0]
    assert REPORT_FIELDS <= rep["baseline"].keys() and REPORT_FIELDS <= rep["outage"].keys()
    assert rep["baseline"]["approved"] > 0
    # the bank is down: stand-in approves (00) or the switch answers 91, nothing else
    assert rep["outage"]["completed"] > 0
    assert set(rep["outage"]["responses"]) <= {"00", "91"}
    assert rep["outage"]["approved"] > 0                      # the stand-in profile is in force
    assert rep["outage"]["approved_share"] + rep["outage"]["unavailable_share"] == pytest.approx(1.0)
    rec = rep["recovery"]
    assert rec["queued_at_return"] >= rep["outage"]["approved"]  # a 0220 per stand-in approval, at least
    assert rec["advices_delivered"] == rec["queued_at_return"] and rec["left_in_queue"] is None
    assert rec["drain_s"] is not None and rec["drain_s"] >= 0
    m = result["median"]
    for phase, keys in (("baseline", ("tps", "p50_ms", "p99_ms", "tps_to_relay")),
                        ("outage", ("tps", "p99_ms", "approved_share", "unavailable_share", "tps_to_relay")),
                        ("recovery", ("drain_s", "advices_delivered"))):
        for k in keys:
            assert m[phase][k] is not None, (phase, k)
