"""End to end: the security path (wire.md 7) through the HSM, over TCP.

Three networks, each started once for its part of this module:

- ``run``: the default network plus cards of its own: PIN blocks made with
  psec under each terminal's clear TPK from the network file (right PIN 00,
  wrong 55, three wrong then 75); MAC'd terminals (MAC right, missing, wrong,
  in field 128 when field 90 is present), the response MACs checked over the
  bytes as received; chip (ARQC in field 55) and track 2 (CVV) cards.
- ``kc``: key change (0800 70=101): field 48 opened with the terminal's clear
  TMK; then only the new TPK and TAK work, also after a restart of `up`.
- ``split``: the HSM as its own `cardswitch up --only hsm` and the rest as
  `--only banks,switch`; the HSM killed, hung (``python -m cardswitch.hsm_sim
  --fail '*=down'`` on its port), and started again.

Money checks are differences between balance inquiries from a terminal
without a TAK (``POS00002``); "the issuer saw nothing" means its balance did
not move.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import iso8583
import pytest

from cardswitch.config import Card

from e2e_support import (
    PURCHASE, SPEC, WITHDRAWAL, Conn, Driver, Stans, add_mac, batch_close, default_test_network, encode,
    established_to, frame, kcv, make_pan, network_mgmt, open_issued_keys, open_key_change, part_pids,
    pin_block, response_mac_problem, reversal, start_up, utc_field7, with_cards, with_keys,
)

pytestmark = [
    pytest.mark.e2e,
    # psec and pyemv (the test oracles) use two-key TDES through `cryptography`'s deprecated path.
    pytest.mark.filterwarnings("ignore:.*TripleDES.*"),
]

B_DEBIT = "6228480000000015"     # BANKB (no ZAK), PIN 1234

A_PIN = make_pan("622126", 7101)       # BANKA: its link carries MACs under the ZAK
B_PIN = make_pan("622848", 7102)
C_PIN = make_pan("621700", 7103)
B_TRIES = make_pan("622848", 7104)     # locked by three wrong PINs
C_MAC = make_pan("621700", 7105)       # the MAC'd terminals' card
B_KC = make_pan("622848", 7106)        # the key change network's card
C_CHIP = make_pan("621700", 7107)      # chip card: ARQC in field 55 (BANKC has an MK-AC)
B_TRACK = make_pan("622848", 7108)     # magnetic stripe: track 2 with a CVV (BANKB has a CVK)
A_CHIP = make_pan("622126", 7109)      # chip card at the bank whose link is MAC'd
OWN_PINS = {A_PIN: "2468", B_PIN: "135790", C_PIN: "8642", B_TRIES: "9753", C_MAC: "1234", B_KC: "4321",
            C_CHIP: "1111", B_TRACK: "2222", A_CHIP: "3333"}
BALANCE_START = 5_000_000


def _cards(net):
    for pan, pin in OWN_PINS.items():
        bank = {"622126": "BANKA", "622848": "BANKB", "621700": "BANKC"}[pan[:6]]
        net = with_cards(net, bank, Card(pan=pan, expiry="3012", pin=pin, balance=BALANCE_START))
    return net


def wrong(pin: str) -> str:
    return "".join(str((int(c) + 1) % 10) for c in pin)


def check_mac(conn: Conn, resp: dict, tak: bytes) -> None:
    problem = response_mac_problem(resp, conn.payload_of(resp), tak)
    assert problem is None, f"response {resp['t']} 39={resp.get('39')}: {problem}"


# ==========================================================================
# Network 1: PINs and MACs


@pytest.fixture(scope="module")
def run(launch, workdir):
    r = launch(_cards(default_test_network(workdir / "var")), workdir)
    yield r
    assert r.stop() == 0, "`cardswitch up` did not exit 0 on SIGTERM"
    assert "Traceback" not in r.logs()


@pytest.fixture(scope="module")
def d(run):
    drv = Driver(run)
    yield drv
    drv.close()


# -- PIN blocks (wire.md 7: ISO 9564 format 0 under the terminal's TPK) ------------------


@pytest.mark.parametrize("tid, tt, pan", [
    ("POS00002", PURCHASE, A_PIN),        # BANKA merchant, BANKA card: on-us, ZAK link
    ("POS00012", PURCHASE, A_PIN),        # BANKB merchant, BANKA card
    ("POS00022", PURCHASE, B_PIN),        # a 6-digit PIN
    ("POS00013", PURCHASE, C_PIN),
    ("ATM00002", WITHDRAWAL, B_PIN),
    ("ATM00011", WITHDRAWAL, C_PIN),
    ("POS00011", PURCHASE, C_PIN),        # a terminal with a TAK: PIN and MAC together
])
def test_right_pin_under_the_terminals_tpk_is_approved(d, tid, tt, pan):
    before = d.balance(pan)
    resp = d.ask(d.fin(tid, tt, pan, 1_234, pin=OWN_PINS[pan]), "00")
    assert d.balance(pan) == (before[0] - 1_234, before[1] - 1_234)
    if d.T[tid].tak is not None:
        check_mac(d.conn, resp, d.T[tid].tak)


@pytest.mark.parametrize("tid, pan", [("POS00002", A_PIN), ("POS00012", B_PIN), ("ATM00011", C_PIN)])
def test_wrong_pin_gets_55_and_moves_nothing(d, tid, pan):
    before = d.balance(pan)
    tt = WITHDRAWAL if d.T[tid].kind == "atm" else PURCHASE
    d.ask(d.fin(tid, tt, pan, 1_000, pin=wrong(OWN_PINS[pan])), "55")
    assert d.balance(pan) == before
    d.ask(d.fin(tid, tt, pan, 1_000, pin=OWN_PINS[pan]), "00")     # not locked by one wrong PIN


def test_pin_block_under_another_terminals_tpk_is_a_wrong_pin(d):
    """The switch decrypts with the sending terminal's TPK: a block made under
    another terminal's key does not carry the right PIN."""
    before = d.balance(B_PIN)
    d.ask(d.fin("POS00012", PURCHASE, B_PIN, 1_000, pin=OWN_PINS[B_PIN], pin_key=d.T["POS00013"].tpk), "55")
    assert d.balance(B_PIN) == before


def test_lower_case_pin_block_is_accepted(d):
    """wire.md 1: binary fields are hex, either case on input."""
    req = d.fin("POS00012", PURCHASE, B_PIN, 700, pin=OWN_PINS[B_PIN])
    req["52"] = req["52"].lower()
    before = d.balance(B_PIN)
    d.ask(req, "00")
    assert d.balance(B_PIN) == (before[0] - 700, before[1] - 700)


def test_three_wrong_pins_then_75_even_for_the_right_pin(d):
    before = d.balance(B_TRIES)
    bad = wrong(OWN_PINS[B_TRIES])
    got = [d.ask(d.fin("POS00012", PURCHASE, B_TRIES, 1_000, pin=bad))["39"] for _ in range(3)]
    assert got == ["55", "55", "55"]
    d.ask(d.fin("POS00012", PURCHASE, B_TRIES, 1_000, pin=OWN_PINS[B_TRIES]), "75")
    d.ask(d.fin("ATM00011", WITHDRAWAL, B_TRIES, 1_000, pin=OWN_PINS[B_TRIES]), "75")
    assert d.balance(B_TRIES) == before


# -- MACs (wire.md 7: field 64 or 128, ISO 9797-1 alg 3, padding 1, under the TAK) --------

MAC_TERMINALS = ("POS00001", "POS00011", "POS00021", "POS00031")


@pytest.mark.parametrize("tid", MAC_TERMINALS)
def test_right_mac_is_approved_and_the_response_carries_a_right_mac(d, tid):
    before = d.balance(C_MAC)
    req = d.fin(tid, PURCHASE, C_MAC, 2_500)
    resp = d.ask(req, "00")                  # Conn MACs the request under the terminal's TAK
    check_mac(d.conn, resp, d.T[tid].tak)
    assert d.balance(C_MAC) == (before[0] - 2_500, before[1] - 2_500)


def test_mac_and_pin_at_an_atm_with_a_tak(d):
    before = d.balance(C_MAC)
    resp = d.ask(d.fin("ATM00001", WITHDRAWAL, C_MAC, 10_000, pin=OWN_PINS[C_MAC]), "00")
    check_mac(d.conn, resp, d.T["ATM00001"].tak)
    assert d.balance(C_MAC) == (before[0] - 10_000, before[1] - 10_000)


def test_lower_case_mac_is_accepted(d):
    """wire.md 1: either case on input (the MAC field is not covered by the MAC)."""
    term = d.T["POS00001"]
    req = add_mac(d.fin("POS00001", PURCHASE, C_MAC, 300), term.tak)
    req["64"] = req["64"].lower()
    before = d.balance(C_MAC)
    d.ask(req, "00")
    assert d.balance(C_MAC) == (before[0] - 300, before[1] - 300)


def _tampered(d, how: str) -> dict:
    term = d.T["POS00021"]
    req = d.fin("POS00021", PURCHASE, C_MAC, 4_000)
    if how == "missing":
        return req                                        # sent on a connection that adds no MAC
    if how == "flipped":
        req = add_mac(req, term.tak)
        req["64"] = req["64"][:-1] + ("0" if req["64"][-1] != "0" else "1")
    elif how == "amount changed after the MAC":
        req = add_mac(dict(req, **{"4": f"{400:012d}"}), term.tak)
        req["4"] = f"{4_000:012d}"
    elif how == "another terminal's TAK":
        req = add_mac(req, d.T["POS00031"].tak)
    elif how == "zeros":
        req["64"] = "0" * 16
    return req


@pytest.mark.parametrize("how", ["missing", "flipped", "amount changed after the MAC",
                                 "another terminal's TAK", "zeros"])
def test_missing_or_wrong_mac_gets_63_and_the_issuer_sees_nothing(run, d, how):
    before = d.balance(C_MAC)
    req = _tampered(d, how)
    with run.conn(mac=False) as plain:
        resp = d.ask(req, "63", conn=plain)
        check_mac(plain, resp, d.T["POS00021"].tak)       # the decline itself is MAC'd
    assert d.balance(C_MAC) == before, "a request with a bad MAC reached the issuer"


def test_mac_on_a_pin_transaction_is_checked_before_the_pin(run, d):
    """A wrong MAC is 63 whatever the PIN: the issuer sees nothing, no PIN try counts."""
    before = d.balance(C_MAC)
    term = d.T["POS00011"]
    req = add_mac(d.fin("POS00011", PURCHASE, C_MAC, 1_000, pin=wrong(OWN_PINS[C_MAC])), term.tak)
    req["64"] = req["64"][::-1] if req["64"] != req["64"][::-1] else "F" * 16
    with run.conn(mac=False) as plain:
        d.ask(req, "63", conn=plain)
    assert d.balance(C_MAC) == before


def test_mac_in_128_on_a_reversal_and_in_its_response(d):
    tid = "POS00031"
    term = d.T[tid]
    before = d.balance(C_MAC)
    orig = d.fin(tid, PURCHASE, C_MAC, 6_000)
    check_mac(d.conn, d.ask(orig, "00"), term.tak)
    rev = reversal(term, d.stan(), orig)
    sent = add_mac(rev, term.tak)
    assert "128" in sent and "64" not in sent           # field 90: a secondary bitmap
    resp = d.ask(sent, "00")
    assert resp["t"] == "0410"
    assert "128" in resp and "64" not in resp, f"reversal answer MAC'd in the wrong field: {resp}"
    check_mac(d.conn, resp, term.tak)
    assert d.wait_balance(C_MAC, before) == before


def test_reversal_without_mac_gets_63_and_reverses_nothing(run, d):
    tid = "POS00031"
    term = d.T[tid]
    before = d.balance(C_MAC)
    orig = d.fin(tid, PURCHASE, C_MAC, 7_000)
    d.ask(orig, "00")
    after = (before[0] - 7_000, before[1] - 7_000)
    with run.conn(mac=False) as plain:
        resp = d.ask(reversal(term, d.stan(), orig), "63", conn=plain)
        check_mac(plain, resp, term.tak)                  # 0410 with field 90: MAC in 128
    assert d.balance(C_MAC) == after
    d.ask(reversal(term, d.stan(), orig), "00")          # a MAC'd one still works
    assert d.wait_balance(C_MAC, before) == before


def test_batch_close_needs_a_mac(run, d):
    tid = "POS00031"
    term = d.T[tid]
    batch = 7
    d.ask(d.fin(tid, PURCHASE, C_MAC, 900, batch=batch), "00")
    close = batch_close(term, d.stan(), batch, (0, 0), (1, 900))
    with run.conn(mac=False) as plain:
        resp = plain.request(close)
        assert resp["t"] == "0510" and resp["39"] == "63", resp
    close = batch_close(term, d.stan(), batch, (0, 0), (1, 900))
    resp = d.conn.request(close)
    assert resp["t"] == "0510" and resp["39"] == "00", resp
    check_mac(d.conn, resp, term.tak)


def test_network_management_needs_no_mac_and_gets_none(run, d):
    with run.conn(mac=False) as plain:
        resp = plain.request(network_mgmt(d.T["POS00001"], d.stan(), "301"))
    assert resp["t"] == "0810" and resp["39"] == "00"
    assert "64" not in resp and "128" not in resp


def test_terminal_without_a_tak_gets_no_mac(d):
    resp = d.ask(d.fin("POS00012", PURCHASE, C_MAC, 100), "00")
    assert "64" not in resp and "128" not in resp


# -- chip (field 55, ARQC) and magnetic stripe (track 2, CVV) ------------------------------
#
# Field 55 and track 2 of a genuine (or forged) test card come from the
# simulated banks' own helpers (cardswitch.issuer_sim.cards); each is checked
# here against pyemv / psec first, so the helpers cannot agree with the bank
# on something non-standard.


def _card(net, pan):
    bank = next(b for b in net.banks if any(c.pan == pan for c in b.cards))
    return next(c for c in bank.cards if c.pan == pan), bank


def _icc_master_key(bank, pan: str, psn: str = "00") -> bytes:
    import pyemv.kd

    return pyemv.kd.derive_icc_mk_a(bank.mk_ac.clear_bytes(), pan, psn)


def _session_key(bank, pan: str, atc: int) -> bytes:
    import pyemv.kd

    return pyemv.kd.derive_common_sk(_icc_master_key(bank, pan), atc.to_bytes(2, "big") + bytes(6))


def _tlv(field55: str) -> dict[str, str]:
    import pyemv.tlv

    return {k: v.hex().upper() for k, v in pyemv.tlv.decode(bytes.fromhex(field55), simple=True).items()}


def chip_field55(net, pan: str, amount: int, atc: int, *, forged: bool = False) -> str:
    from cardswitch.issuer_sim.cards import ARQC_DATA_TAGS, icc_data_for
    import pyemv.ac

    card, bank = _card(net, pan)
    f55 = icc_data_for(card, bank, amount=amount, atc=atc,
                       cryptogram=bytes.fromhex("1122334455667788") if forged else None)
    tags = _tlv(f55)
    data = b"".join(bytes.fromhex(tags[t]) for t in ARQC_DATA_TAGS if t in tags)
    arqc = pyemv.ac.generate_ac(_session_key(bank, pan, atc), data).hex().upper()
    assert (tags["9F26"] == arqc) != forged, "the helper's ARQC is not what pyemv computes"
    assert tags["9F02"] == f"{amount:012d}" and int(tags["9F36"], 16) == atc
    return f55


def track2(net, pan: str, *, cvv: str | None = None) -> str:
    from cardswitch.issuer_sim.cards import track2_for
    import psec.cvv

    card, bank = _card(net, pan)
    t2 = track2_for(card, bank, cvv=cvv)
    key = bank.cvk.clear_bytes()
    good = psec.cvv.generate_cvv(key, pan, card.expiry, "101")
    assert t2.startswith(f"{pan}={card.expiry}101") and len(t2) == len(pan) + 1 + 4 + 3 + 8
    assert (t2[-3:] == good) == (cvv is None or cvv == good), "the helper's CVV is not what psec computes"
    return t2


def chip_request(d, net, tid: str, pan: str, amount: int, atc: int, *, forged: bool = False, **kw) -> dict:
    f55 = chip_field55(net, pan, amount, atc, forged=forged)
    return d.fin(tid, PURCHASE, pan, amount, extra={"55": f55, "22": "051", "14": "3012"}, **kw)


def _check_arpc(net, pan: str, req: dict, resp: dict) -> None:
    import pyemv.ac

    assert "55" in resp, f"no field 55 in the answer to a chip request: {resp}"
    tags = _tlv(resp["55"])
    assert "91" in tags, f"field 55 of the answer has no tag 91: {tags}"
    sent = _tlv(req["55"])
    arc = resp["39"].encode()
    _, bank = _card(net, pan)
    arpc = pyemv.ac.generate_arpc_1(_session_key(bank, pan, int(sent["9F36"], 16)),
                                    bytes.fromhex(sent["9F26"]), arc)
    assert tags["91"] == (arpc + arc).hex().upper(), "tag 91 is not ARPC (method 1) || ARC"


@pytest.mark.parametrize("tid, pan", [("POS00012", C_CHIP), ("POS00001", C_CHIP), ("POS00013", A_CHIP)])
def test_chip_card_with_a_good_arqc_is_approved(run, d, tid, pan):
    atc = 1 + sum(1 for r, _ in d.log if r.get("2") == pan and "55" in r)
    before = d.balance(pan)
    req = chip_request(d, run.net, tid, pan, 3_300, atc)
    resp = d.ask(req, "00")
    assert d.balance(pan) == (before[0] - 3_300, before[1] - 3_300)
    _check_arpc(run.net, pan, req, resp)
    if d.T[tid].tak is not None:
        check_mac(d.conn, resp, d.T[tid].tak)          # over field 55 too


@pytest.mark.parametrize("tid, pan", [("POS00012", C_CHIP), ("POS00013", A_CHIP)])
def test_chip_card_with_a_forged_arqc_is_declined_05(run, d, tid, pan):
    atc = 100 + sum(1 for r, _ in d.log if r.get("2") == pan and "55" in r)
    before = d.balance(pan)
    req = chip_request(d, run.net, tid, pan, 3_300, atc, forged=True)
    resp = d.ask(req, "05")
    assert d.balance(pan) == before
    _check_arpc(run.net, pan, req, resp)                # the bank answers the card with ARC 05


def test_chip_and_pin(run, d):
    before = d.balance(C_CHIP)
    req = chip_request(d, run.net, "POS00012", C_CHIP, 1_100, 50, pin=OWN_PINS[C_CHIP])
    req["22"] = "051"
    d.ask(req, "00")
    req = chip_request(d, run.net, "POS00012", C_CHIP, 1_100, 51, pin=wrong(OWN_PINS[C_CHIP]))
    req["22"] = "051"
    d.ask(req, "55")
    assert d.balance(C_CHIP) == (before[0] - 1_100, before[1] - 1_100)


def test_issuer_returns_tag_91_to_the_switch(run):
    """The bank's own answer (asked directly, as the switch would) carries field
    55 with tag 91 = ARPC || ARC: what the next test expects the terminal to get."""
    bank = run.net.bank("BANKC")
    req = {"t": "0200", "2": C_CHIP, "3": "000000", "4": f"{200:012d}", "7": utc_field7(), "11": "900001",
           "12": "120000", "13": "0101", "22": "051", "25": "00", "32": "10000001", "33": "99900001",
           "37": "000000900001", "41": "POS00012", "42": "898110054110001", "49": "156",
           "55": chip_field55(run.net, C_CHIP, 200, 900), "100": bank.institution_id}
    with socket.create_connection((bank.host.host, bank.host.port), timeout=10) as s:
        s.sendall(frame(encode(req)))
        buf = b""
        while len(buf) < 2 or len(buf) < 2 + int.from_bytes(buf[:2], "big"):
            chunk = s.recv(65536)
            assert chunk, "the bank closed the connection"
            buf += chunk
    resp, _ = iso8583.decode(buf[2:2 + int.from_bytes(buf[:2], "big")], SPEC)
    assert resp["39"] == "00", resp
    _check_arpc(run.net, C_CHIP, req, resp)


def test_chip_answer_carries_the_issuers_tag_91(run, d):
    req = chip_request(d, run.net, "POS00012", C_CHIP, 700, 200)
    resp = d.ask(req, "00")
    _check_arpc(run.net, C_CHIP, req, resp)


def _track_request(d, tid: str, t2: str, amount: int, **kw) -> dict:
    return d.fin(tid, PURCHASE, None, amount, extra={"35": t2, "22": "901"}, **kw)


@pytest.mark.parametrize("tid", ["POS00012", "POS00011"])
def test_track2_with_the_right_cvv_is_approved(run, d, tid):
    before = d.balance(B_TRACK)
    resp = d.ask(_track_request(d, tid, track2(run.net, B_TRACK), 2_200), "00")
    assert d.balance(B_TRACK) == (before[0] - 2_200, before[1] - 2_200)
    assert "35" not in resp and resp.get("2") in (None, B_TRACK)
    if d.T[tid].tak is not None:
        check_mac(d.conn, resp, d.T[tid].tak)


def test_track2_with_a_wrong_cvv_is_declined_05(run, d):
    card, bank = _card(run.net, B_TRACK)
    good = track2(run.net, B_TRACK)[-3:]
    bad = f"{(int(good) + 1) % 1000:03d}"
    before = d.balance(B_TRACK)
    d.ask(_track_request(d, "POS00012", track2(run.net, B_TRACK, cvv=bad), 2_200), "05")
    assert d.balance(B_TRACK) == before


def test_track2_with_pin(run, d):
    before = d.balance(B_TRACK)
    t2 = track2(run.net, B_TRACK)
    req = _track_request(d, "POS00012", t2, 1_500)
    req["52"] = pin_block(OWN_PINS[B_TRACK], B_TRACK, d.T["POS00012"].tpk)     # PAN from the track
    d.ask(req, "00")
    req = _track_request(d, "POS00012", t2, 1_500)
    req["52"] = pin_block(wrong(OWN_PINS[B_TRACK]), B_TRACK, d.T["POS00012"].tpk)
    d.ask(req, "55")
    assert d.balance(B_TRACK) == (before[0] - 1_500, before[1] - 1_500)


# ==========================================================================
# Network 2: key change (wire.md 7)

KC_TID = "POS00011"          # has a TMK, a TPK and a TAK


@pytest.fixture(scope="module")
def kc(launch, tmp_path_factory):
    wd = tmp_path_factory.mktemp("security_keychange")
    net = _cards(default_test_network(wd / "var"))
    st = SimpleNamespace(net=net, wd=wd, stans=Stans(), run=None, d=None)
    st.run = launch(net, wd, name="kc1")
    st.d = Driver(st.run, st.stans)
    yield st
    st.d.close()
    assert st.run.stop() == 0
    assert "Traceback" not in st.run.logs()


@pytest.fixture(scope="module")
def rekeyed(kc):
    """The key change answer and the keys it issued, opened with the clear TMK.

    As wire.md 7 has it (TDES ECB halves) when the check values match; else as
    the switch does it today (scheme U variants, a reported bug), so that the
    tests of what the new keys do still run."""
    d = kc.d
    old = d.T[KC_TID]
    assert old.tmk is not None and old.tpk is not None and old.tak is not None
    # Before the change the file's keys work (so "the old key gets 55 / 63" below means something).
    check_mac(d.conn, d.ask(d.fin(KC_TID, PURCHASE, B_KC, 100, pin=OWN_PINS[B_KC]), "00"), old.tak)
    req = network_mgmt(old, d.stan(), "101")
    resp = d.conn.request(req)
    keys = open_issued_keys(resp.get("48", ""), old.tmk) if resp.get("39") == "00" else None
    return SimpleNamespace(req=req, resp=resp, keys=keys, old=old,
                           new=with_keys(old, tpk=keys.tpk, tak=keys.tak) if keys else None)


def _odd_parity(key: bytes) -> bool:
    return all(bin(b).count("1") % 2 == 1 for b in key)


def test_key_change_answers_0810_00_with_76_hex_in_field_48(rekeyed):
    resp, keys = rekeyed.resp, rekeyed.keys
    assert resp["t"] == "0810" and resp.get("39") == "00", resp
    assert resp["11"] == rekeyed.req["11"] and resp["70"] == "101" and resp["41"] == KC_TID
    f48 = resp["48"]
    assert len(f48) == 76 and f48 == f48.upper() and all(c in "0123456789ABCDEF" for c in f48), f48
    assert keys is not None, "field 48 opens to keys matching its check values in no known way"
    assert len({keys.tpk, keys.tak, rekeyed.old.tpk, rekeyed.old.tak}) == 4, "a key was not new"
    assert keys.tpk[:8] != keys.tpk[8:] and keys.tak[:8] != keys.tak[8:], "single-length key in disguise"
    assert _odd_parity(keys.tpk) and _odd_parity(keys.tak)
    assert "64" not in resp and "128" not in resp            # 0810s are not MAC'd


def test_key_change_keys_are_tdes_ecb_halves_under_the_tmk_matching_their_check_values(rekeyed):
    resp = rekeyed.resp
    assert resp.get("39") == "00", resp
    keys = open_key_change(resp["48"], rekeyed.old.tmk)
    assert keys.tpk_kcv == kcv(keys.tpk), "the TPK's check value does not match the TPK under the TMK"
    assert keys.tak_kcv == kcv(keys.tak), "the TAK's check value does not match the TAK under the TMK"


def _use_keys(kc, term, *, pin_key: bytes, pin: str, rc: str, tak: bytes) -> dict:
    """A PIN purchase from ``term`` (MAC'd under ``tak``), PIN under ``pin_key``."""
    d = kc.d
    req = add_mac(d.fin(term.tid, PURCHASE, B_KC, 1_000, pin=pin, pin_key=pin_key), tak)
    return d.ask(req, rc)


def _check_new_keys_in_use(kc, rk) -> None:
    d = kc.d
    pin = OWN_PINS[B_KC]
    before = d.balance(B_KC)
    resp = _use_keys(kc, rk.new, pin_key=rk.keys.tpk, pin=pin, rc="00", tak=rk.keys.tak)
    check_mac(d.conn, resp, rk.keys.tak)                    # answers are MAC'd under the new TAK too
    assert d.balance(B_KC) == (before[0] - 1_000, before[1] - 1_000)
    # PIN under the old TPK (MAC right): the switch translates with the new TPK -> wrong PIN.
    _use_keys(kc, rk.new, pin_key=rk.old.tpk, pin=pin, rc="55", tak=rk.keys.tak)
    # MAC under the old TAK: 63, nothing reaches the issuer (no PIN try counted either).
    resp = _use_keys(kc, rk.new, pin_key=rk.keys.tpk, pin=pin, rc="63", tak=rk.old.tak)
    check_mac(d.conn, resp, rk.keys.tak)
    _use_keys(kc, rk.new, pin_key=rk.keys.tpk, pin=pin, rc="00", tak=rk.keys.tak)   # resets the tries
    assert d.balance(B_KC) == (before[0] - 2_000, before[1] - 2_000)


def test_after_key_change_only_the_new_tpk_and_tak_work(kc, rekeyed):
    assert rekeyed.keys is not None, rekeyed.resp
    _check_new_keys_in_use(kc, rekeyed)


def test_other_terminals_keep_their_keys(kc, rekeyed):
    d = kc.d
    resp = d.ask(d.fin("POS00001", PURCHASE, B_KC, 100, pin=OWN_PINS[B_KC]), "00")
    check_mac(d.conn, resp, d.T["POS00001"].tak)


def test_new_keys_still_in_use_after_a_restart(kc, rekeyed):
    assert rekeyed.keys is not None, rekeyed.resp
    kc.d.close()
    assert kc.run.stop() == 0
    kc.run = start_up(kc.net, kc.wd, name="kc2")
    kc.d = Driver(kc.run, kc.stans)
    _check_new_keys_in_use(kc, rekeyed)


# ==========================================================================
# Network 3: the HSM as its own process, stopped and started again


def _accepting(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def _wait_not_accepting(host: str, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while _accepting(host, port):
        assert time.monotonic() < deadline, f"{host}:{port} still accepts connections"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def split(launch, tmp_path_factory):
    wd = tmp_path_factory.mktemp("security_hsm")
    net = _cards(default_test_network(wd / "var"))
    st = SimpleNamespace(net=net, wd=wd, hsm=None, rest=None, d=None, hung=None, seen={}, a_balance=None)
    st.hsm = launch(net, wd, name="hsm1", args=("--only", "hsm"))
    st.rest = launch(net, wd, name="rest", args=("--only", "banks,switch"))
    st.d = Driver(st.rest)
    yield st
    st.d.close()
    if st.hung is not None and st.hung.poll() is None:
        st.hung.kill()
        st.hung.wait()
    assert st.rest.stop() == 0
    if st.hsm is not None:
        st.hsm.stop()


def _timed(d: Driver, req: dict, conn: Conn | None = None) -> tuple[dict, float]:
    t0 = time.monotonic()
    resp = d.ask(req, conn=conn)
    return resp, time.monotonic() - t0


def test_hsm_up_everything_works(split):
    d = split.d
    d.ask(d.fin("POS00012", PURCHASE, B_PIN, 500, pin=OWN_PINS[B_PIN]), "00")
    d.ask(d.fin("POS00001", PURCHASE, C_MAC, 500), "00")
    d.ask(d.fin("POS00012", PURCHASE, A_PIN, 500), "00")
    split.a_balance = d.balance(A_PIN)       # nothing may move it while the HSM is away


@pytest.fixture(scope="module")
def hsm_killed(split):
    split.hsm.kill()                      # SIGKILL to `up --only hsm`; its HSM part dies with it
    ep = split.net.hsm.listen
    _wait_not_accepting(ep.host, ep.port)
    _wait_switch_hsm_connections(split, lambda n: n == 0, "the switch still holds HSM connections")
    return split


def test_hsm_down_pin_transaction_gets_96_at_once(hsm_killed):
    d = hsm_killed.d
    before = d.balance(B_PIN)
    resp, took = _timed(d, d.fin("POS00012", PURCHASE, B_PIN, 500, pin=OWN_PINS[B_PIN]))
    hsm_killed.seen["pin, HSM killed"] = (resp["39"], took)
    assert resp["39"] == "96", resp
    assert d.balance(B_PIN) == before


def test_hsm_down_purchase_without_pin_from_a_terminal_without_tak_is_approved(hsm_killed):
    d = hsm_killed.d
    before = d.balance(B_DEBIT)
    d.ask(d.fin("POS00012", PURCHASE, B_DEBIT, 800), "00")     # BANKB: no ZAK on its link
    assert d.balance(B_DEBIT) == (before[0] - 800, before[1] - 800)


def test_hsm_down_mac_terminal_gets_96(hsm_killed):
    d = hsm_killed.d
    before = d.balance(C_MAC)
    resp, took = _timed(d, d.fin("POS00001", PURCHASE, C_MAC, 800))
    hsm_killed.seen["MAC'd terminal, HSM killed"] = (resp["39"], took, sorted(resp))
    assert resp["39"] == "96", resp
    assert d.balance(C_MAC) == before


def test_hsm_down_purchase_at_a_bank_with_a_zak_gets_96(hsm_killed):
    """BANKA's link is MAC'd under its ZAK, which needs the HSM: the request
    cannot be MAC'd, so it is not sent (checked once the HSM is back)."""
    d = hsm_killed.d
    resp, took = _timed(d, d.fin("POS00012", PURCHASE, A_PIN, 800))
    hsm_killed.seen["no PIN, BANKA (ZAK), HSM killed"] = (resp["39"], took)
    assert resp["39"] == "96", resp


@pytest.fixture(scope="module")
def hsm_hung(hsm_killed):
    """An HSM that accepts connections and answers nothing."""
    st = hsm_killed
    ep = st.net.hsm.listen
    st.hung = subprocess.Popen(
        [sys.executable, "-m", "cardswitch.hsm_sim", "--host", ep.host, "--port", str(ep.port),
         "--fail", "*=down", "--max-seconds", "120"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = st.hung.stdout.readline()
    assert line.startswith("ready"), f"hsm_sim did not start: {line!r}"
    _wait_switch_hsm_connections(st, lambda n: n > 0, "the switch did not connect to the hung HSM")
    return st


def _wait_switch_hsm_connections(st, ok, why: str, timeout: float = 20.0) -> None:
    """Until the number of the switch process's connections to the HSM port is ``ok``
    (the banks have HSM connections of their own: counted apart, by process)."""
    pid = part_pids(st.rest).get("switch")
    assert pid is not None, "no `cardswitch serve switch` process under `up --only banks,switch`"
    deadline = time.monotonic() + timeout
    while not ok(established_to(pid, st.net.hsm.listen.port)):
        assert time.monotonic() < deadline, why
        time.sleep(0.05)


def test_hsm_hung_pin_transaction_gets_96(hsm_hung):
    d = hsm_hung.d
    before = d.balance(B_PIN)
    resp, took = _timed(d, d.fin("POS00012", PURCHASE, B_PIN, 500, pin=OWN_PINS[B_PIN]))
    hsm_hung.seen["pin, HSM hung"] = (resp["39"], took)
    assert resp["39"] == "96", resp
    assert d.balance(B_PIN) == before
    d.ask(d.fin("POS00012", PURCHASE, B_DEBIT, 800), "00")


def test_hsm_hung_mac_terminal_gets_96(hsm_hung):
    d = hsm_hung.d
    resp, took = _timed(d, d.fin("POS00001", PURCHASE, C_MAC, 800))
    hsm_hung.seen["MAC'd terminal, HSM hung"] = (resp["39"], took, "64" in resp)
    assert resp["39"] == "96", resp


@pytest.fixture(scope="module")
def hsm_back(hsm_hung):
    """The hung HSM replaced by a working one (`cardswitch up --only hsm` again)."""
    st = hsm_hung
    st.hung.terminate()
    st.hung.wait(timeout=10)
    _wait_not_accepting(st.net.hsm.listen.host, st.net.hsm.listen.port)
    st.hsm = start_up(st.net, st.wd, name="hsm2", args=("--only", "hsm"))
    return st


def test_hsm_back_pin_transactions_work_again(hsm_back):
    d = hsm_back.d
    before = d.balance(B_PIN)
    deadline = time.monotonic() + 30
    codes = []
    while True:
        resp = d.ask(d.fin("POS00012", PURCHASE, B_PIN, 500, pin=OWN_PINS[B_PIN]))
        codes.append(resp["39"])
        if resp["39"] == "00" or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    hsm_back.seen["polls until approved again"] = codes
    assert codes[-1] == "00", f"PIN transactions still not approved after the HSM came back: {codes}"
    assert set(codes[:-1]) <= {"96"}, codes
    assert d.balance(B_PIN) == (before[0] - 500, before[1] - 500)
    resp = d.ask(d.fin("POS00001", PURCHASE, C_MAC, 500), "00")
    check_mac(d.conn, resp, d.T["POS00001"].tak)
    if getattr(hsm_back, "a_balance", None) is not None:
        assert d.balance(A_PIN) == hsm_back.a_balance, "a request reached BANKA while the HSM was away"
    print("\nHSM outage observations:", hsm_back.seen)
