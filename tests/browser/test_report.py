"""The settlement report (report.html) in a real browser.

A small day of every kind (``test_settlement_support.Day``) is journalled
and settled with ``cardswitch.settlement.run.settle``; headless Chromium
(Debian's package) loads the report it wrote with ``--dump-dom``. The
rendered tables must hold the merchant settlement, the interbank positions
and the approval/decline mix of that day, and the response-code chart must
be drawn (an <svg> with one bar per code). A screenshot is kept as
test-artifacts/report.png.
"""

from __future__ import annotations

import html.parser
from collections import Counter
from pathlib import Path

import pytest
from test_dashboard import ARTIFACTS, chrome
from test_settlement_support import D1, ISSUER_OF, Day, make_network, write_journal

from cardswitch.settlement.run import settle


class Page(html.parser.HTMLParser):
    """The tables (header row, body rows, as text) and the SVG figures of a page."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tables: list[tuple[list[str], list[list[str]]]] = []
        self.svgs: list[dict] = []          # {"label": aria-label, "rects": [attrs...]}
        self._cell: list[str] | None = None
        self._row: list[str] | None = None
        self._in_svg = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self.tables.append(([], []))
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "svg":
            self._in_svg = True
            self.svgs.append({"label": a.get("aria-label", ""), "rects": []})
        elif tag == "rect" and self._in_svg:
            self.svgs[-1]["rects"].append(a)

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None and self.tables:
            headers, body = self.tables[-1]
            if not headers:
                headers.extend(self._row)
            else:
                body.append(self._row)
            self._row = None
        elif tag == "svg":
            self._in_svg = False

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)

    def table(self, *lead: str) -> list[list[str]]:
        """The body of the one table whose headers start with ``lead``."""
        found = [body for headers, body in self.tables if tuple(headers[:len(lead)]) == lead]
        assert len(found) == 1, f"expected one table headed {lead!r}, found {len(found)}"
        return found[0]


def _n(v: int) -> str:
    return f"{v:,}"


@pytest.fixture(scope="module")
def settled(tmp_path_factory):
    """(the day, the settle result) of D1, settled into a fresh data directory."""
    data = tmp_path_factory.mktemp("report") / "var"
    day = Day()
    write_journal(data, day.rows.all)
    return day, settle(make_network(data), D1)


@pytest.mark.timeout(1500)     # the first run on a fresh machine installs Chromium
def test_report_renders_tables_and_chart(chromium, settled, tmp_path):
    day, res = settled
    report = res.folder / "report.html"
    assert report.exists(), [p.name for p in res.files]

    done = chrome(chromium, tmp_path / "profile1", "--virtual-time-budget=2000", "--dump-dom", report.as_uri())
    assert done.returncode == 0, f"chromium failed ({done.returncode}): {done.stderr[-2000:]}"
    dom = done.stdout
    page = Page()
    page.feed(dom)
    page.close()
    assert f"Settlement of business date {D1}" in dom

    # Merchant settlement: what the day holds, by hand (purchases, bill payments and
    # completions are purchases; the same-day void cancels p6; p15's reversal is on D2).
    merchants = {r[0]: r for r in page.table("merchant")}
    assert set(merchants) == {"898440154110001", "898440154110002"}, merchants   # the ATM pays no merchant
    coffee, shop = merchants["898440154110001"], merchants["898440154110002"]
    assert coffee[1:7] == ["Shanghai Coffee", "156", "4", _n(12345 + 1250 + 1_000_000 + 4000), "1", _n(2000)]
    assert shop[1:7] == ["Beijing Shop, Ltd", "156", "3", _n(100 + 8400 + 15000), "0", "0"]
    # ...and exactly the figures of merchant_settlement.csv (fees and net included)
    assert sorted(merchants.values()) == sorted([[r[0], r[1], r[2], *map(_n, r[3:])] for r in res.merchant_rows])
    for r in merchants.values():
        purchases, refunds, fees, net = (int(r[i].replace(",", "")) for i in (4, 6, 7, 8))
        assert net == purchases - refunds - fees and fees > 0

    # Interbank positions: every participant of the day, netting to zero.
    positions = page.table("participant")
    assert [p[0] for p in positions] == ["99900001", "BANKA", "BANKB", "BANKC"]
    assert positions == [[r[0], r[1], *map(_n, r[2:])] for r in res.position_rows]
    nets = [int(p[4].replace(",", "")) for p in positions]
    assert sum(nets) == 0 and any(nets)
    for p in positions:
        recv, pay, net = (int(p[i].replace(",", "")) for i in (2, 3, 4))
        assert net == recv - pay

    # Approval/decline mix of every request received on the date.
    d1 = [r for r in day.rows.all if r.business_date == D1]
    assert len(d1) == 21
    outcomes = {r[0]: r[1:] for r in page.table("outcome")}
    assert outcomes == {"approved": ["19", "90.5%"], "declined": ["1", "4.8%"], "timeout": ["1", "4.8%"]}
    codes = {r[0]: r[2] for r in page.table("response code")}
    assert codes == {"00": "19", "05": "1", "91": "1"}
    kinds = {r[0]: r[-1] for r in page.table("kind", "approved", "declined", "timeout", "all")}
    assert kinds == {k: str(n) for k, n in Counter(r.kind for r in d1).items()}
    assert "21" in dom and "90.5%" in dom          # the summary cards

    # The chart: an <svg> with one drawn bar per response code, longest for 00.
    chart = [s for s in page.svgs if s["label"] == "Requests by response code"]
    assert len(chart) == 1, [s["label"] for s in page.svgs]
    widths = [float(r.get("width", "0")) for r in chart[0]["rects"]]
    assert len(widths) == 3 and all(w > 0 for w in widths), widths
    assert widths[0] == max(widths) > 10 * min(widths)
    assert any(s["label"].startswith("Net to merchant") and s["rects"] for s in page.svgs)

    for pan in ISSUER_OF:
        assert pan not in dom, "a full PAN reached the report"

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "report.png"
    shot.unlink(missing_ok=True)
    done = chrome(chromium, tmp_path / "profile2", "--virtual-time-budget=2000", "--window-size=1280,1600",
                  f"--screenshot={shot}", report.as_uri())
    assert done.returncode == 0 and shot.exists(), done.stderr[-2000:]
    data = Path(shot).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 20_000, f"report.png is {len(data)} bytes: a blank page?"
