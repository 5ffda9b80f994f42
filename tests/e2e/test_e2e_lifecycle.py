"""End to end: a day of traffic, SIGTERM with requests in flight, the journal
and the files left behind, then a restart on the same data directory.

The tests of this module run in order and share one story:

1. day 1: `cardswitch up` on the default network plus a card whose issuer
   answers after 1 s (inside the 2 s issuer timeout); traffic of every kind;
2. SIGTERM while three requests for that card are in flight: they are
   answered, then `up` exits 0;
3. the journal (opened read-only) holds what each terminal was answered, and
   no file under data_dir, nor any log, holds a full PAN or a PIN block;
4. day 2: `up` again with the same data_dir: a resent request is still a
   duplicate, a closed batch stays closed, the banks' balances persisted.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from types import SimpleNamespace

import pytest

from cardswitch.config import Card

from e2e_support import (
    PURCHASE, TRANSFER, VOID, WITHDRAWAL, Driver, Stans, batch_close, break_luhn, default_test_network,
    make_pan, network_mgmt, reversal, with_cards,
)

pytestmark = pytest.mark.e2e

A_DEBIT = "6221260000000018"
A_LOST = "6221260000000042"
B_DEBIT = "6228480000000015"
C_DEBIT = "6217000000000014"
C_LATE = "6217000000000022"        # the default network's issuer-answers-after-5-s card: 91
B_SLOW = make_pan("622848", 7001)  # answered after 1 s: still in time
B_SLOW_BALANCE = 1_000_000

CLOSED_TID, CLOSED_BATCH = "POS00022", 1


@pytest.fixture(scope="module")
def net(workdir):
    net = default_test_network(workdir / "var")
    return with_cards(net, "BANKB", Card(pan=B_SLOW, expiry="3012", pin="1234", balance=B_SLOW_BALANCE,
                                         delay_ms=1_000))


@pytest.fixture(scope="module")
def story():
    """What the tests of this module learn and pass on."""
    return SimpleNamespace(stans=Stans(), day1=None, d1=None, first=None, balance_a=None,
                           slow_answers=[], b_slow_spent=0, day2=None, d2=None,
                           to_repeat=None, to_reverse=None, to_void=None, inquiry=None)


@pytest.fixture(scope="module")
def day1(launch, workdir, net, story):
    run = launch(net, workdir, name="day1")
    story.day1 = run
    story.d1 = Driver(run, story.stans)
    yield run
    story.d1.close()
    run.stop()


@pytest.fixture(scope="module")
def day2(launch, workdir, net, story, day1):
    day1.stop()
    run = launch(net, workdir, name="day2")
    story.day2 = run
    story.d2 = Driver(run, story.stans)
    yield run
    story.d2.close()
    run.stop()


def test_day1_traffic(day1, story):
    d = story.d1
    first = d.fin("POS00002", PURCHASE, A_DEBIT, 10_000)
    d.ask(first, "00")
    story.first = first
    d.ask(d.fin("POS00001", PURCHASE, C_DEBIT, 2_000, pin="1234"), "00")
    d.ask(d.fin("ATM00002", WITHDRAWAL, A_DEBIT, 30_000, pin="1234"), "00")
    d.ask(d.fin("POS00013", PURCHASE, C_DEBIT, 1_000, pin="0000"), "55")
    d.ask(d.fin("POS00002", PURCHASE, A_LOST, 1_000), "41")
    d.ask(d.fin("POS00002", PURCHASE, break_luhn(B_DEBIT), 1_000), "14")
    d.ask(d.fin("POS00012", TRANSFER, A_DEBIT, 5_000, to_pan=C_DEBIT), "00")
    d.ask(dict(first), "94")
    d.ask(d.fin("POS00012", PURCHASE, C_LATE, 1_500), "91")
    cancelled = d.fin("POS00012", PURCHASE, B_DEBIT, 4_400)
    d.ask(cancelled, "00")
    d.ask(reversal(d.T["POS00012"], d.stan(), cancelled), "00")
    d.ask(d.fin(CLOSED_TID, PURCHASE, C_DEBIT, 900, batch=CLOSED_BATCH), "00")
    close = d.conn.request(batch_close(d.T[CLOSED_TID], d.stan(), CLOSED_BATCH, (0, 0), (1, 900)))
    assert close["39"] == "00", close
    # Originals that day 2 repeats, reverses and voids.
    rep = d.fin("POS00011", PURCHASE, A_DEBIT, 1_200, batch=5)
    story.to_repeat = (rep, d.ask(rep, "00"))
    story.to_reverse = d.fin("POS00011", PURCHASE, A_DEBIT, 2_300, batch=5)
    d.ask(story.to_reverse, "00")
    story.to_void = d.fin("POS00011", PURCHASE, A_DEBIT, 3_400, batch=5)
    d.ask(story.to_void, "00")
    inquiry = d.fin("POS00011", "30", B_DEBIT, None, batch=5)
    story.inquiry = (inquiry, d.ask(inquiry, "00"))
    story.balance_a = d.balance(A_DEBIT)


def test_reversal_sent_before_the_original_is_answered_still_reverses_it(day1, story):
    """wire.md 6a: the terminal gave up waiting; once the issuer answers, the reversal applies."""
    d = story.d1
    left = B_SLOW_BALANCE - story.b_slow_spent      # each inquiry of this card takes a second
    sale = d.fin("POS00013", PURCHASE, B_SLOW, 2_500)
    with day1.conn() as c:
        c.send(sale)
        assert c.request(network_mgmt(d.T["POS00013"], d.stan(), "301"))["39"] == "00"   # sale is in flight
        rev = reversal(d.T["POS00013"], d.stan(), sale)
        d.ask(rev, "00")
        assert c.wait_for("POS00013", sale["11"])["39"] == "00"
    assert d.wait_balance(B_SLOW, (left, left)) == (left, left)


def test_repeat_while_the_original_is_in_flight_gets_its_answer(day1, story):
    d = story.d1
    left = B_SLOW_BALANCE - story.b_slow_spent
    sale = d.fin("POS00013", PURCHASE, B_SLOW, 1_000)
    with day1.conn() as c:
        c.send(sale)
        assert c.request(network_mgmt(d.T["POS00013"], d.stan(), "301"))["39"] == "00"   # sale is in flight
        c.send(dict(sale, t="0201"))
        first, second = c.wait_for("POS00013", sale["11"]), c.wait_for("POS00013", sale["11"])
    assert {first["t"], second["t"]} == {"0210"}
    assert (first["37"], first["38"], first["39"]) == (second["37"], second["38"], second["39"]) and \
        first["39"] == "00"
    assert d.balance(B_SLOW) == (left - 1_000, left - 1_000)
    story.b_slow_spent += 1_000


def test_sigterm_answers_requests_in_flight_then_exits_0(day1, story):
    d = story.d1
    slow = [d.fin("POS00012", PURCHASE, B_SLOW, 1_000) for _ in range(3)]
    with day1.conn() as c:
        c.send_many(slow)
        # The echo is answered at once, after the three were read: they are in flight.
        echo = network_mgmt(d.T["POS00012"], d.stan(), "301")
        assert c.request(echo)["39"] == "00"
        day1.signal()
        answers = [c.wait_for("POS00012", r["11"]) for r in slow]
        assert c.closed_by_switch(), "the switch did not close the connection when it stopped"
    for req, resp in zip(slow, answers):
        assert resp["39"] == "00", resp
        assert resp["11"] == req["11"] and len(resp["38"]) == 6
        d.log.append((req, resp))
        story.b_slow_spent += int(req["4"])
    story.slow_answers = answers
    assert day1.wait() == 0, f"`cardswitch up` exited {day1.returncode} on SIGTERM"
    assert "ready" in day1.stdout_lines
    assert "Traceback" not in day1.logs()


def _journal(run) -> sqlite3.Connection:
    path = Path(run.net.switch.data_dir) / "journal.db"
    assert path.exists(), path
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True)


STATUS_OF = {"00": {"approved"}, "91": {"timeout", "declined"}}
# Declined before the switch reads the card and the amount: their rows need not say them.
LOCAL_EARLY = {"94", "14"}


def test_journal_holds_what_each_terminal_was_answered(day1, story):
    assert day1.returncode == 0
    db = _journal(day1)
    db.row_factory = sqlite3.Row
    checked = 0
    for req, resp in story.d1.log:
        if req["t"][:2] not in ("01", "02", "04"):
            continue
        rows = db.execute(
            "SELECT * FROM txn WHERE terminal_id = ? AND stan = ? AND transmitted = ? AND mti = ?",
            (req["41"], req["11"], req["7"], req["t"])).fetchall()
        matching = [r for r in rows if r["response_code"] == resp["39"]]
        assert matching, f"no journal row answered {resp['39']} for {req['t']} {req['41']} {req['11']}: " \
                         f"{[dict(r) for r in rows]}"
        row = matching[0]
        assert row["status"] in STATUS_OF.get(resp["39"], {"declined"}), dict(row)
        assert row["rrn"] == resp["37"]
        assert row["batch"] == req["60"]
        if resp["39"] == "00" and req["t"][:2] != "04":
            assert row["auth_code"] == resp["38"]
        if resp["39"] not in LOCAL_EARLY:
            assert row["amount"] == int(req.get("4", "0")), dict(row)
            if "2" in req and req["t"][:2] != "04":    # a reversal names its original by 90
                pan = req["2"]
                assert row["pan_masked"] == pan[:6] + "*" * (len(pan) - 10) + pan[-4:], dict(row)
        checked += 1
    assert checked >= 15
    late = db.execute("SELECT status FROM txn WHERE response_code = '91'").fetchall()
    assert [r["status"] for r in late] == ["timeout"]
    closes = db.execute("SELECT result FROM batch_close WHERE terminal_id = ? AND batch = ?",
                        (CLOSED_TID, f"{CLOSED_BATCH:06d}")).fetchall()
    assert [r["result"] for r in closes] == ["00"]
    db.close()


def _secrets(drivers) -> dict[str, list[bytes]]:
    """Every full PAN and PIN block the terminals sent, as they could appear in a file."""
    pans, blocks = set(), set()
    for d in drivers:
        for req, _ in d.log:
            for k in ("2", "103"):
                if k in req:
                    pans.add(req[k])
            if "52" in req:
                blocks.add(req["52"])
    out = {p: [p.encode()] for p in pans}
    for b in blocks:
        out[b] = [b.upper().encode(), b.lower().encode(), bytes.fromhex(b)]
    return out


def _scan(run, drivers) -> list[str]:
    secrets = _secrets(drivers)
    assert len(secrets) >= 8
    files = [p for p in Path(run.net.switch.data_dir).rglob("*") if p.is_file()]
    files += sorted(run.workdir.glob("*.log"))
    assert any(p.name == "journal.db" for p in files) and any(p.suffix == ".log" for p in files)
    found = []
    for p in files:
        data = p.read_bytes()
        for name, forms in secrets.items():
            if any(f in data for f in forms):
                found.append(f"{p.name}: {name[:6]}...")
    stdout = "\n".join(run.stdout_lines).encode()
    found += [f"stdout: {name[:6]}..." for name, forms in secrets.items() if any(f in stdout for f in forms)]
    return found


def test_no_full_pan_or_pin_block_in_any_file_or_log(day1, story):
    assert day1.returncode == 0
    found = _scan(day1, [story.d1])
    assert not found, f"full PANs or PIN blocks on disk or in logs: {found}"


def test_restart_a_resent_request_is_still_a_duplicate(day2, story):
    story.d2.ask(dict(story.first), "94")


def test_restart_a_closed_batch_stays_closed(day2, story):
    d = story.d2
    d.ask(d.fin(CLOSED_TID, PURCHASE, C_DEBIT, 900, batch=CLOSED_BATCH), "12")
    d.ask(d.fin(CLOSED_TID, PURCHASE, C_DEBIT, 900, batch=CLOSED_BATCH + 1), "00")


def test_restart_bank_balances_persist(day2, story):
    d = story.d2
    assert d.balance(A_DEBIT) == story.balance_a
    assert len(story.slow_answers) == 3 and story.b_slow_spent == 4_000
    left = B_SLOW_BALANCE - story.b_slow_spent
    assert d.balance(B_SLOW) == (left, left)


def test_restart_a_repeat_of_a_day1_request_gets_the_same_answer(day2, story):
    d = story.d2
    before = d.balance(A_DEBIT)
    req, first = story.to_repeat
    again = d.ask(dict(req, t="0201"), "00")
    assert again == first
    assert d.balance(A_DEBIT) == before


def test_restart_a_repeat_of_a_day1_balance_inquiry_gets_the_same_answer(day2, story):
    req, first = story.inquiry
    again = story.d2.ask(dict(req, t="0201"), "00")
    assert again == first


def test_restart_day1_originals_can_still_be_reversed_and_voided(day2, story):
    d = story.d2
    before = d.balance(A_DEBIT)
    d.ask(reversal(d.T["POS00011"], d.stan(), story.to_reverse), "00")
    back = (before[0] + 2_300, before[1] + 2_300)
    assert d.wait_balance(A_DEBIT, back) == back
    d.ask(d.fin("POS00011", VOID, A_DEBIT, 3_400, original=story.to_void, batch=5), "00")
    back = (back[0] + 3_400, back[1] + 3_400)
    assert d.balance(A_DEBIT) == back


def test_restart_never_reuses_an_rrn(day2, story):
    def rrns(log):
        return {resp["37"] for req, resp in log if resp.get("39") != "30" and req["t"][3] != "1"}
    day1, day2_ = rrns(story.d1.log), rrns(story.d2.log)
    assert len(day1) > 15 and len(day2_) > 5
    assert not day1 & day2_, f"RRNs of day 1 given again after the restart: {sorted(day1 & day2_)}"


def test_restart_stops_cleanly_and_still_keeps_no_secrets(day2, story):
    assert day2.stop() == 0
    assert "Traceback" not in day2.logs()
    found = _scan(day2, [story.d1, story.d2])
    assert not found, f"full PANs or PIN blocks on disk or in logs: {found}"
