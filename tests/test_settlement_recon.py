"""`reconcile` (settlement.md 5): an issuer's own record against the switch's
counted transactions of that issuer: all matched; a missing, an extra and a
changed row each in its status with exit 1; unreadable files exit 2 naming
the line."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from cardswitch.cli import main
from cardswitch.issuer_sim.export import HEADER as EXPORT_HEADER
from cardswitch.netfile import dump_network
from cardswitch.settlement.recon import Item, ReconInputError, read_issuer_file, reconcile_items
from cardswitch.settlement.run import SettleError, reconcile
from test_settlement_support import D1, D2, D3, Day, make_network, write_journal


@pytest.fixture
def setup(tmp_path):
    data = tmp_path / "var"
    day = Day()
    write_journal(data, day.rows.all, business_date=D3)
    net = make_network(data)
    cfg = tmp_path / "net.toml"
    cfg.write_text(dump_network(net))
    return net, day, data, cfg


def export_rows(day: Day, issuer: str) -> list[list[str]]:
    """What a bank would export for D1, worked out from the test day by hand:
    approved, standing money movements whose card it issued (one row per RRN;
    an on-us transfer is one row)."""
    d = day
    kinds = {"BANKA": [(d.p1, "purchase"), (d.w7, "withdrawal"), (d.t10, "transfer_out"),
                       (d.t11, "transfer_out"), (d.b12, "bill_payment"), (d.p15, "purchase")],
             "BANKB": [(d.p2, "purchase"), (d.p3, "purchase"), (d.p5, "purchase"), (d.w8, "withdrawal"),
                       (d.t10, "transfer_in")],
             "BANKC": [(d.rf, "refund"), (d.d9, "deposit"), (d.c13, "completion")]}[issuer]
    out = []
    for rec, kind in kinds:
        auth = rec.to_auth_code if kind == "transfer_in" else rec.auth_code
        out.append([rec.rrn, str(rec.amount), auth, rec.stan, rec.pan_masked, rec.proc, D1, kind])
    return out


def write_export(path: Path, rows: list[list[str]], header=EXPORT_HEADER) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)
    return path


def recon_lines(data: Path, issuer: str, date: str = D1) -> list[str]:
    return (data / "settlement" / date / f"recon_{issuer}.csv").read_text().splitlines()


@pytest.mark.parametrize("issuer", ["BANKA", "BANKB", "BANKC"])
def test_all_matched(setup, tmp_path, issuer, capsys):
    net, day, data, cfg = setup
    f = write_export(tmp_path / f"{issuer}.csv", export_rows(day, issuer))
    assert main(["reconcile", "--date", D1, "--issuer", issuer, "--file", str(f), "-c", str(cfg)]) == 0
    out = capsys.readouterr().out
    n = len(export_rows(day, issuer))
    assert f"matched            {n}" in out
    for status in ("missing_at_issuer", "missing_at_switch", "amount_mismatch"):
        assert f"{status.ljust(17)}  0" in out
    lines = recon_lines(data, issuer)
    assert lines[0] == "rrn,status,switch_amount,issuer_amount"
    assert len(lines) == n + 1
    assert all(line.split(",")[1] == "matched" for line in lines[1:])
    assert [line.split(",")[0] for line in lines[1:]] == sorted(r[0] for r in export_rows(day, issuer))


def test_missing_extra_and_changed_rows(setup, tmp_path, capsys):
    net, day, data, cfg = setup
    rows = export_rows(day, "BANKB")
    dropped = rows.pop(1)                                  # p3: the issuer lacks it
    rows[0][1] = str(int(rows[0][1]) + 1)                  # p2: another amount
    rows.append(["609999000001", "4242", "XYZ123", "000001", "", "000000", D1, "purchase"])  # unknown to us
    f = write_export(tmp_path / "b.csv", rows)
    assert main(["reconcile", "--date", D1, "--issuer", "BANKB", "--file", str(f), "-c", str(cfg)]) == 1
    out = capsys.readouterr().out
    for status, n in (("matched", 3), ("missing_at_issuer", 1), ("missing_at_switch", 1), ("amount_mismatch", 1)):
        assert f"{status.ljust(17)}  {n}" in out
    by_rrn = {line.split(",")[0]: line for line in recon_lines(data, "BANKB")[1:]}
    assert by_rrn[dropped[0]] == f"{dropped[0]},missing_at_issuer,1000000,"
    assert by_rrn[day.p2.rrn] == f"{day.p2.rrn},amount_mismatch,1250,1251"
    assert by_rrn["609999000001"] == "609999000001,missing_at_switch,,4242"
    assert by_rrn[day.p5.rrn] == f"{day.p5.rrn},matched,100,100"


def test_auth_code_difference_is_a_note_not_an_exception(setup, tmp_path, capsys):
    net, day, data, cfg = setup
    rows = export_rows(day, "BANKC")
    rows[0][2] = "ZZZZZZ"
    f = write_export(tmp_path / "c.csv", rows)
    assert main(["reconcile", "--date", D1, "--issuer", "BANKC", "--file", str(f), "-c", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "1 matched transaction(s) carry another auth_code" in out and "ZZZZZZ" in out


def test_later_reversal_is_a_negative_row_on_its_date(setup, tmp_path):
    net, day, data, cfg = setup
    f = write_export(tmp_path / "a.csv", [[day.p15.rrn, "-4000", day.p15.auth_code]],
                     header=("rrn", "amount", "auth_code"))
    res = reconcile(net, D2, "BANKA", str(f))
    assert res.counts == {"matched": 1, "missing_at_issuer": 0, "missing_at_switch": 0, "amount_mismatch": 0}
    assert res.exit_code == 0


def test_issuer_by_institution_id_and_unknown_issuer(setup, tmp_path):
    net, day, data, cfg = setup
    f = write_export(tmp_path / "c.csv", export_rows(day, "BANKC"))
    assert reconcile(net, D1, "10000003", str(f)).issuer == "BANKC"
    with pytest.raises(SettleError, match="--issuer: no bank 'NOPE'"):
        reconcile(net, D1, "NOPE", str(f))
    with pytest.raises(SettleError, match="still open"):
        reconcile(net, D3, "BANKC", str(f))


@pytest.mark.parametrize("text, message", [
    ("rrn,amount,auth_code\n1,10,A\n2,abc,B\n", "{f}:3: amount 'abc' is not an integer"),
    ("rrn,amount,auth_code\n1,10,A\n\n2,1.50,B\n", "{f}:4: amount '1.50' is not an integer"),
    ("rrn,amount\n1,10\n", "{f}:1: header lacks column(s) auth_code"),
    ("rrn,amount,auth_code\n1,10\n", "{f}:2: 2 fields, the header has 3"),
    ("rrn,amount,auth_code\n,10,A\n", "{f}:2: rrn is empty"),
    ("", "{f}:1: empty file"),
    ('rrn,amount,auth_code\n1,"10,A\n', "{f}:2: "),
])
def test_unreadable_issuer_file(setup, tmp_path, capsys, text, message):
    net, day, data, cfg = setup
    f = tmp_path / "bad.csv"
    f.write_text(text)
    with pytest.raises(ReconInputError) as e:
        read_issuer_file(f)
    assert str(e.value).startswith(message.format(f=f))
    assert main(["reconcile", "--date", D1, "--issuer", "BANKA", "--file", str(f), "-c", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"cardswitch: {message.format(f=f)}") and err.count("\n") == 1
    assert not (data / "settlement" / D1 / "recon_BANKA.csv").exists()


def test_not_utf8_and_missing_file(tmp_path):
    f = tmp_path / "bin.csv"
    f.write_bytes(b"rrn,amount,auth_code\n1,10,A\n2,\xff\xfe,B\n")
    with pytest.raises(ReconInputError, match=r"bin.csv:3: not UTF-8 text"):
        read_issuer_file(f)
    with pytest.raises(ReconInputError, match=r"nothere.csv: cannot read"):
        read_issuer_file(tmp_path / "nothere.csv")


def test_header_in_any_order_and_case_bom_and_extra_columns(tmp_path):
    f = tmp_path / "x.csv"
    f.write_bytes("\ufeffKind, Auth_Code ,AMOUNT,RRN\npurchase,A1,-5,r1\n".encode())
    assert read_issuer_file(f) == [Item("r1", -5, "A1", 2)]


def test_pairing_within_one_rrn():
    out = reconcile_items([Item("r", 10), Item("r", 20), Item("s", 5)],
                          [Item("r", 20), Item("r", 11), Item("r", 30), Item("t", 1)])
    assert [r.values() for r in out.rows] == [
        ("r", "matched", 20, 20),
        ("r", "missing_at_switch", "", 30),
        ("r", "amount_mismatch", 10, 11),
        ("s", "missing_at_issuer", 5, ""),
        ("t", "missing_at_switch", "", 1),
    ]
    assert not out.all_matched
