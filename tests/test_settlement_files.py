"""`settle` on a journal written through the Journal API: the CSV files exactly
(against figures worked out by hand here, not by the settlement code), the
next date's reversal entries, byte-identical reruns, the date lock, the
cutover and pending refusals, the report, and the command line."""

from __future__ import annotations

import hashlib
import io
import json
import threading
from pathlib import Path

import pytest

from cardswitch.cli import main
from cardswitch.netfile import dump_network
from cardswitch.settlement import files as F
from cardswitch.settlement.run import SettleError, settle
from cardswitch.switch.cutover import STATE_BUSINESS_DATE
from cardswitch.switch.index import BatchTotals
from cardswitch.switch.journal import Journal, UploadRow
from cardswitch.switch.records import Kind, Status
from test_settlement_support import (
    A_CREDIT,
    A_DEBIT,
    B_CREDIT,
    B_DEBIT,
    C_CREDIT,
    D1,
    D2,
    D3,
    M_COFFEE,
    M_SHOP,
    SWITCH_ID,
    Day,
    Rows,
    make_network,
    write_journal,
)

HEADER_CLEARING = ("rrn,stan,terminal_id,merchant_id,pan_masked,processing_code,amount,currency,auth_code,"
                   "transmitted_at,business_date,kind")


@pytest.fixture
def setup(tmp_path):
    data = tmp_path / "var"
    day = Day()
    write_journal(data, day.rows.all, business_date=D3)
    return make_network(data), day, data


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def crow(rec, amount, kind, *, issuer_pan=None, proc=None, auth=None, date=D1) -> str:
    pm = rec.to_pan_masked if issuer_pan == "to" else rec.pan_masked
    return ",".join([rec.rrn, rec.stan, rec.terminal_id, rec.merchant_id, pm, proc or rec.proc, str(amount),
                     "156", rec.auth_code if auth is None else auth, rec.transmitted, date, kind])


def test_d1_files_exactly(setup):
    net, d, data = setup
    res = settle(net, D1)
    folder = data / "settlement" / D1
    assert res.folder == folder

    assert read(folder / "merchant_settlement.csv") == (
        "merchant_id,merchant_name,currency,purchase_count,purchase_amount,refund_count,refund_amount,"
        "fee_amount,net_amount\n"
        # coffee: fees 74 (12345 x 60bp = 74.07), 8 (7.5 up), 2000 (6000 capped, debit), -12 (refund), 24
        f"{M_COFFEE},Shanghai Coffee,156,4,{12345 + 1250 + 1_000_000 + 4000},1,2000,{74 + 8 + 2000 - 12 + 24},"
        f"{12345 + 1250 + 1_000_000 + 4000 - 2000 - (74 + 8 + 2000 - 12 + 24)}\n"
        # shop: fees 5 (0.8 -> 1, floor 5), 67 (67.2), 120; the voided 5000 is not there
        f'{M_SHOP},"Beijing Shop, Ltd",156,3,{100 + 8400 + 15000},0,0,{5 + 67 + 120},'
        f"{100 + 8400 + 15000 - (5 + 67 + 120)}\n")

    # Flows, by hand (switch fee 10 to each side, once on us):
    a_recv = 1250 + 1_000_000 + 29                     # p2, p3 from B; B pays A 29 interchange (bill 8400 x 35bp)
    a_pay = 10 * 9 + (5 + 900 + 50300 + 7000 + 8400) + 2000   # switch; to B: interchange 5, 900, w7+atm, t10, bill; refund to C
    b_recv = 5 + 900 + 50300 + 7000 + 8400 + 15000
    b_pay = (1250 + 1_000_000 + 29) + (9000 + 75) + 10 * 10
    c_recv = 2000 + 9000 + 75
    c_pay = 15000 + 10 * 3
    s_recv = 10 * 9 + 10 * 10 + 10 * 3
    assert read(folder / "interbank_positions.csv") == (
        "participant_id,currency,receivable,payable,net\n"
        f"{SWITCH_ID},156,{s_recv},0,{s_recv}\n"
        f"BANKA,156,{a_recv},{a_pay},{a_recv - a_pay}\n"
        f"BANKB,156,{b_recv},{b_pay},{b_recv - b_pay}\n"
        f"BANKC,156,{c_recv},{c_pay},{c_recv - c_pay}\n")
    assert a_recv - a_pay + b_recv - b_pay + c_recv - c_pay + s_recv == 0

    assert read(folder / "clearing_BANKA.csv") == "\n".join([
        HEADER_CLEARING,
        crow(d.p1, 12345, "purchase"),
        crow(d.w7, 50000, "withdrawal"),
        crow(d.t10, 7000, "transfer_out"),
        crow(d.t11, 3000, "transfer_out"),
        crow(d.t11, 3000, "transfer_in", issuer_pan="to"),
        crow(d.b12, 8400, "bill_payment"),
        crow(d.p15, 4000, "purchase"),
    ]) + "\n"
    assert read(folder / "clearing_BANKB.csv") == "\n".join([
        HEADER_CLEARING,
        crow(d.p2, 1250, "purchase"),
        crow(d.p3, 1_000_000, "purchase"),
        crow(d.p5, 100, "purchase"),
        crow(d.w8, 20000, "withdrawal"),
        crow(d.t10, 7000, "transfer_in", issuer_pan="to", proc="281010", auth=d.t10.to_auth_code),
    ]) + "\n"
    assert read(folder / "clearing_BANKC.csv") == "\n".join([
        HEADER_CLEARING,
        crow(d.rf, 2000, "refund"),
        crow(d.d9, 9000, "deposit"),
        crow(d.c13, 15000, "completion"),
    ]) + "\n"

    summary = json.loads(read(folder / "summary.json"))
    assert summary["business_date"] == D1
    assert summary["counts"]["counted"] == 13
    assert summary["counts"]["clearing_rows"] == 15
    assert summary["counts"]["requests"] == 21
    assert summary["counts"]["requests_by_status"] == {"approved": 19, "declined": 1, "timeout": 1}
    assert summary["files"]["clearing_BANKC.csv"]["totals"] == {"156": {"amount": 2000 + 9000 + 15000}}
    assert summary["files"]["interbank_positions.csv"]["totals"]["156"]["net"] == 0
    assert summary["fingerprint"].startswith("sha256:") and res.fingerprint == summary["fingerprint"]
    assert list(summary) == sorted(summary)
    for name in ("merchant_settlement.csv", "interbank_positions.csv", "clearing_BANKA.csv"):
        assert summary["files"][name]["sha256"] == hashlib.sha256((folder / name).read_bytes()).hexdigest()
    assert res.first_run


def test_d2_negative_entry_for_the_reversal_of_a_d1_purchase(setup):
    net, d, data = setup
    settle(net, D1)
    settle(net, D2)
    folder = data / "settlement" / D2
    # p15 (4000, credit, on us at BANKA, fee 24) taken back; p16 600 at the shop (fee 4.8 -> 5)
    assert read(folder / "merchant_settlement.csv").splitlines()[1:] == [
        f"{M_COFFEE},Shanghai Coffee,156,-1,-4000,0,0,-24,{-4000 + 24}",
        f'{M_SHOP},"Beijing Shop, Ltd",156,1,600,0,0,5,595',
    ]
    assert read(folder / "clearing_BANKA.csv").splitlines()[1:] == [
        crow(d.p15, -4000, "reversal", date=D2)]
    assert read(folder / "interbank_positions.csv").splitlines()[1:] == [
        f"{SWITCH_ID},156,10,10,0",     # p16's fee in, p15's fee given back
        "BANKA,156,10,0,10",
        "BANKB,156,0,10,-10",
    ]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != F.LOCK_FILE}


def test_rerun_is_byte_identical_even_after_a_later_reversal(setup, tmp_path):
    net, d, data = setup
    first = settle(net, D1)
    before = snapshot(first.folder)
    again = settle(net, D1)
    assert snapshot(first.folder) == before
    assert not again.first_run and not again.replaced
    # a later date reverses and voids D1 transactions: D1 does not change
    j = Journal.open(net.switch.journal, net.switch.data_dir)
    try:
        r = Rows(start=1000)
        for orig in (d.p1, d.w7, d.t10):
            rev = r.undo(Kind.REVERSAL, orig, date=D3)
            j.insert(rev)
            j.mark_cancelled(orig.id, "reversed", rev.id)
        j.set_state(STATE_BUSINESS_DATE, "2026-03-04")
        j.flush()
    finally:
        j.close()
    settle(net, D1)
    assert snapshot(first.folder) == before
    third = settle(net, D3)
    assert [line.split(",")[-1] for line in read(third.folder / "clearing_BANKA.csv").splitlines()[1:]] == \
        ["reversal", "reversal", "reversal"]


def test_changed_fees_rewrite_and_record_the_replaced_settlement(setup):
    net, d, data = setup
    first = settle(net, D1)
    other = make_network(data, switch_fee=11)
    second = settle(other, D1)
    assert second.replaced == first.fingerprint and second.fingerprint != first.fingerprint
    settled = json.loads(read(second.folder / "settled.json"))
    assert settled["fingerprint"] == second.fingerprint
    assert [h["fingerprint"] for h in settled["replaced"]] == [first.fingerprint]


def test_a_run_waits_for_the_lock_or_fails_cleanly(setup):
    net, d, data = setup
    folder = data / "settlement" / D1
    with F.DateLock(folder, timeout=0):
        with pytest.raises(SettleError, match="another run for this date holds .*\\.lock"):
            settle(net, D1, lock_timeout_s=0.2)
        assert sorted(p.name for p in folder.iterdir()) == [".lock"]    # nothing written
    # two runs at once: both finish, one after the other, with the same files
    results, errors = [], []

    def run():
        try:
            results.append(snapshot(settle(net, D1).folder))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 2 and results[0] == results[1]
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_not_before_cutover(tmp_path):
    data = tmp_path / "var"
    r = Rows()
    r.add(Kind.PURCHASE, date=D2)
    write_journal(data, r.all, business_date=D2)
    net = make_network(data)
    with pytest.raises(SettleError, match=f"^business date {D2} is still open: run cardswitch cutover first$"):
        settle(net, D2)
    with pytest.raises(SettleError, match="has not begun"):
        settle(net, D3)
    with pytest.raises(SettleError, match="is not a date"):
        settle(net, "2026-3-1")
    assert not (data / "settlement").exists()
    settle(net, D1)                        # an earlier date, even an empty one, settles


def test_no_business_date_or_no_journal(tmp_path):
    with pytest.raises(SettleError, match="no journal at"):
        settle(make_network(tmp_path / "none"), D1)
    data = tmp_path / "var"
    write_journal(data, [], business_date=None)
    with pytest.raises(SettleError, match="no business date yet"):
        settle(make_network(data), D1)


def test_pending_requests_hold_the_date(tmp_path):
    data = tmp_path / "var"
    r = Rows()
    r.add(Kind.PURCHASE)
    r.add(Kind.PURCHASE, status=Status.PENDING)
    write_journal(data, r.all, business_date=D2)
    with pytest.raises(SettleError, match="1 request\\(s\\) of 2026-03-01 still have no outcome"):
        settle(make_network(data), D1, pending_wait_s=0)


def test_no_full_pan_anywhere(setup):
    net, d, data = setup
    res = settle(net, D1)
    blob = b"".join(p.read_bytes() for p in res.folder.iterdir() if p.is_file())
    for pan in (A_DEBIT, A_CREDIT, B_DEBIT, B_CREDIT, C_CREDIT):
        assert pan.encode() not in blob
    for line in read(res.folder / "clearing_BANKA.csv").splitlines()[1:]:
        pm = line.split(",")[4]
        assert pm[:6].isdigit() and pm[-4:].isdigit() and set(pm[6:-4]) == {"*"}


def test_stale_clearing_file_removed(setup):
    net, d, data = setup
    folder = data / "settlement" / D1
    folder.mkdir(parents=True)
    (folder / "clearing_GONE.csv").write_text("old\n")
    settle(net, D1)
    assert not (folder / "clearing_GONE.csv").exists()
    assert (folder / "clearing_BANKC.csv").exists()


# -- the report ---------------------------------------------------------------------------------------


def test_report_is_one_self_contained_page(setup):
    net, d, data = setup
    j = Journal.open(net.switch.journal, net.switch.data_dir)
    try:
        theirs = BatchTotals(0, 0, 3, 12345 + 1250 + 999)
        ours = BatchTotals(1, 2000, 4, 12345 + 1250 + 1_000_000 + 4000)
        j.record_batch_close("POS00001", "000001", D1, "95", ours, theirs)
        j.record_upload("POS00001", "000001", UploadRow(d.p1.rrn, d.p1.stan, "000000", 12345, d.p1.auth_code,
                                                        d.p1.pan_masked))
        j.record_upload("POS00001", "000001", UploadRow(d.p2.rrn, d.p2.stan, "000000", 1300, d.p2.auth_code,
                                                        d.p2.pan_masked))
        j.record_upload("POS00001", "000001", UploadRow("609999999999", "999999", "000000", 999, "", ""))
        j.record_batch_close("POS00001", "000001", D1, "00", ours, theirs)
        j.flush()
    finally:
        j.close()
    res = settle(net, D1)
    html = read(res.folder / "report.html")
    assert html.startswith("<!DOCTYPE html>")
    low = html.lower()
    assert "<script" not in low and "http:" not in low and "https:" not in low and "src=" not in low
    assert "<svg" in html
    for text in ("Shanghai Coffee", "Beijing Shop, Ltd", "BANKA", SWITCH_ID, "Interbank positions",
                 "do not honour", "approved", "declined", "timeout", "Top merchants"):
        assert text in html, text
    # each difference of the upload is listed: p2 amount, an unknown row, the rows not uploaded
    assert html.count("amount differs") == 1
    assert html.count("not in journal") == 1
    not_uploaded = {x.rrn for x in (d.p3, d.rf, d.p15)}          # POS00001's other counted rows
    assert html.count("not uploaded") == len(not_uploaded)
    for rrn in not_uploaded:
        assert rrn in html
    summary = json.loads(read(res.folder / "summary.json"))
    assert summary["counts"]["batch_exceptions"] == 2 + len(not_uploaded)


# -- command line -------------------------------------------------------------------------------------


def test_cli_settle(setup, tmp_path, capsys):
    net, d, data = setup
    cfg = tmp_path / "net.toml"
    cfg.write_text(dump_network(net))
    assert main(["settle", "--date", D1, "-c", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert f"settled {D1}: 13 counted transactions of 21 requests" in out
    assert str(data / "settlement" / D1) in out
    assert "merchant_settlement.csv" in out and "report.html" in out
    assert "Shanghai Coffee" in out and "BANKB" in out
    assert main(["settle", "--date", D3, "-c", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err == f"cardswitch: business date {D3} is still open: run cardswitch cutover first\n"
    assert main(["settle", "--date", "yesterday", "-c", str(cfg)]) == 2
    assert "is not a date" in capsys.readouterr().err


def test_unknown_merchant_settled_without_fees_and_warned(tmp_path):
    data = tmp_path / "var"
    r = Rows()
    p = r.add(Kind.PURCHASE, 10000)
    p.merchant_id = "GONE00000000001"
    write_journal(data, r.all, business_date=D2)
    res = settle(make_network(data), D1)
    assert read(res.folder / "merchant_settlement.csv").splitlines()[1] == "GONE00000000001,,156,1,10000,0,0,0,10000"
    assert res.warnings == ["merchant GONE00000000001 is not in the network file: settled with no fees"]
    assert json.loads(read(res.folder / "summary.json"))["warnings"] == res.warnings
    assert "GONE00000000001 is not in the network file" in read(res.folder / "report.html")


class _Tty(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_progress_only_on_a_terminal():
    from cardswitch.settlement.commands import TerminalProgress

    quiet = _Tty(False)
    p = TerminalProgress("settle x", quiet)
    p(10, 100)
    p(100, 100)
    p.finish()
    assert quiet.getvalue() == ""
    tty = _Tty(True)
    p = TerminalProgress("settle x", tty)
    p(100, 100)
    p.finish()
    assert tty.getvalue() == "\rsettle x: 100 transactions counted (of 100 requests)\n"


def test_progress_is_reported_while_settling(setup):
    net, d, data = setup
    seen = []
    settle(net, D1, progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (13, 21)


@pytest.mark.services
def test_a_postgresql_journal_url_opens_the_postgresql_source(tmp_path):
    """``open_source`` picks the reader by the journal URL (a schema nobody wrote:
    no journal there, said in one line)."""
    import dataclasses
    import uuid

    from services import require_postgres

    from cardswitch.settlement.source import SourceError, open_source

    url = f"{require_postgres()}?schema=test_settle_empty_{uuid.uuid4().hex[:12]}"
    net = make_network(tmp_path / "var")
    net = dataclasses.replace(net, switch=dataclasses.replace(net.switch, journal=url))
    with pytest.raises(SourceError, match="no journal at"):
        open_source(net)
    with pytest.raises(SettleError, match="no journal at"):
        settle(net, D1)
