"""report.html: the page an operator reads after settling a date (pure).

One self-contained HTML file: inline CSS, charts as inline SVG, no script,
no external resource, nothing but masked card numbers (and only in batch
exceptions, which name transactions by RRN and STAN anyway). Deterministic:
the same inputs give the same bytes (no generation time on the page).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from html import escape

from cardswitch.iso8583.constants import RC_TEXT
from cardswitch.settlement.batches import BatchCheck
from cardswitch.settlement.source import MixRow

TOP_MERCHANTS = 10


@dataclass(slots=True)
class ReportData:
    business_date: str
    network_source: str
    fingerprint: str
    merchant_rows: list[tuple]                 # as in merchant_settlement.csv, all of them
    position_rows: list[tuple]                 # as in interbank_positions.csv
    clearing: dict[str, tuple[int, dict[str, int]]]   # issuer -> (rows, amount per currency)
    kind_counts: dict[str, int]                # clearing kind -> rows
    entries: int
    mix: list[MixRow]
    batches: list[BatchCheck]
    files: dict[str, str] = field(default_factory=dict)   # name -> sha256
    warnings: list[str] = field(default_factory=list)


def _n(v: int) -> str:
    return f"{v:,}"


def _pct(part: int, whole: int) -> str:
    return f"{100.0 * part / whole:.1f}%" if whole else "-"


def _table(headers: list[str], rows: list[list[object]], numeric: set[int] | None = None,
           cls: str = "") -> str:
    numeric = numeric or set()
    out = [f'<table class="{cls}">' if cls else "<table>", "<thead><tr>"]
    for i, h in enumerate(headers):
        out.append(f'<th class="num">{escape(h)}</th>' if i in numeric else f"<th>{escape(h)}</th>")
    out.append("</tr></thead><tbody>")
    for row in rows:
        out.append("<tr>")
        for i, v in enumerate(row):
            text = _n(v) if isinstance(v, int) and not isinstance(v, bool) else escape(str(v))
            out.append(f'<td class="num">{text}</td>' if i in numeric else f"<td>{text}</td>")
        out.append("</tr>")
    if not rows:
        out.append(f'<tr><td colspan="{len(headers)}" class="none">none</td></tr>')
    out.append("</tbody></table>")
    return "".join(out)


def bar_chart(title: str, items: list[tuple[str, int, str]], width: int = 640) -> str:
    """A horizontal bar chart as inline SVG: (label, value, colour) per bar."""
    bar_h, gap, value_w = 18, 6, 90
    items = [(label if len(label) <= 40 else label[:39] + "\u2026", value, colour)
             for label, value, colour in items]
    label_w = min(300, max(80, 7 * max((len(label) for label, _, _ in items), default=0) + 12))
    height = 28 + len(items) * (bar_h + gap)
    top = max((v for _, v, _ in items), default=0)
    span = width - label_w - value_w
    parts = [f'<svg width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}">',
             f'<text x="0" y="16" class="ct">{escape(title)}</text>']
    for i, (label, value, colour) in enumerate(items):
        y = 28 + i * (bar_h + gap)
        w = max(1, round(span * value / top)) if top > 0 and value > 0 else 0
        parts.append(f'<text x="{label_w - 6}" y="{y + 13}" text-anchor="end" class="cl">{escape(label)}</text>')
        parts.append(f'<rect x="{label_w}" y="{y}" width="{w}" height="{bar_h}" fill="{colour}"/>')
        parts.append(f'<text x="{label_w + w + 6}" y="{y + 13}" class="cl">{_n(value)}</text>')
    parts.append("</svg>")
    return "".join(parts)


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px;color:#1d2733;background:#fff}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #d5dbe3;padding-bottom:4px}
p.meta{color:#5b6878;margin:0 0 16px;font-size:13px}
table{border-collapse:collapse;margin:6px 0 12px;font-size:13px}
th,td{border:1px solid #d5dbe3;padding:4px 8px;text-align:left}th{background:#eef2f6}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}td.none{color:#8a96a3;text-align:center}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin:8px 0}
.card{border:1px solid #d5dbe3;border-radius:6px;padding:10px 14px;min-width:150px}
.card .v{font-size:20px;font-weight:600}.card .k{color:#5b6878;font-size:12px}
.warn{background:#fff6e0;border:1px solid #e8c66a;padding:8px 12px;border-radius:6px}
.ok{color:#2e7d32}.bad{color:#c62828}
svg .ct{font-size:13px;font-weight:600;fill:#1d2733}svg .cl{font-size:12px;fill:#1d2733}
code{font-size:12px}
"""


def render_report(d: ReportData) -> str:
    total_requests = sum(m.count for m in d.mix)
    by_status: dict[str, int] = {}
    by_rc: dict[str, int] = {}
    by_kind: dict[str, dict[str, int]] = {}
    for m in d.mix:
        by_status[m.status] = by_status.get(m.status, 0) + m.count
        code = m.response_code or "--"
        by_rc[code] = by_rc.get(code, 0) + m.count
        k = by_kind.setdefault(m.kind, {})
        k[m.status] = k.get(m.status, 0) + m.count
    approved = by_status.get("approved", 0)
    exceptions = sum(len(b.exceptions) for b in d.batches)

    currencies = sorted({r[2] for r in d.merchant_rows} | {r[1] for r in d.position_rows})
    totals_rows = []
    for cur in currencies:
        ms = [r for r in d.merchant_rows if r[2] == cur]
        ps = [r for r in d.position_rows if r[1] == cur]
        totals_rows.append([cur, sum(r[3] for r in ms), sum(r[4] for r in ms), sum(r[5] for r in ms),
                            sum(r[6] for r in ms), sum(r[7] for r in ms), sum(r[8] for r in ms),
                            sum(r[2] for r in ps)])

    o: list[str] = ['<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">',
                    f"<title>Settlement {escape(d.business_date)} - cardswitch</title>",
                    f"<style>{_CSS}</style></head><body>",
                    f"<h1>Settlement of business date {escape(d.business_date)}</h1>",
                    f'<p class="meta">network {escape(d.network_source)} &middot; inputs fingerprint '
                    f"<code>{escape(d.fingerprint)}</code> &middot; amounts in minor units</p>"]
    if d.warnings:
        o.append('<div class="warn"><b>Warnings</b><ul>')
        o += [f"<li>{escape(w)}</li>" for w in d.warnings]
        o.append("</ul></div>")

    o.append('<div class="cards">')
    for k, v in (("requests received", _n(total_requests)), ("approved", _pct(approved, total_requests)),
                 ("counted transactions", _n(d.entries)), ("merchants paid", _n(len(d.merchant_rows))),
                 ("participants", _n(len({r[0] for r in d.position_rows}))),
                 ("batch exceptions", _n(exceptions))):
        o.append(f'<div class="card"><div class="v">{v}</div><div class="k">{escape(k)}</div></div>')
    o.append("</div>")

    o.append("<h2>Totals</h2>")
    o.append(_table(["currency", "purchases", "purchase amount", "refunds", "refund amount", "fees",
                     "merchant net", "interbank receivable"], totals_rows, set(range(1, 8))))
    clearing_rows = []
    for issuer in sorted(d.clearing):
        n, amounts = d.clearing[issuer]
        if not amounts:
            clearing_rows.append([issuer, n, "", 0])
        for cur in sorted(amounts):
            clearing_rows.append([issuer, n, cur, amounts[cur]])
    o.append(_table(["clearing file of issuer", "rows", "currency", "amount"], clearing_rows, {1, 3}))
    o.append(_table(["kind", "clearing rows"], [[k, d.kind_counts[k]] for k in sorted(d.kind_counts)], {1}))

    o.append("<h2>Requests of the day: approvals and declines</h2>")
    status_rows = [[s, n, _pct(n, total_requests)] for s, n in sorted(by_status.items(), key=lambda x: (-x[1], x[0]))]
    o.append(_table(["outcome", "requests", "share"], status_rows, {1, 2}))
    rc_rows = [[code, RC_TEXT.get(code, "no response code" if code == "--" else "other"), n, _pct(n, total_requests)]
               for code, n in sorted(by_rc.items())]
    o.append(_table(["response code", "meaning", "requests", "share"], rc_rows, {2, 3}))
    statuses = sorted(by_status)
    kind_rows = [[k] + [by_kind[k].get(s, 0) for s in statuses] + [sum(by_kind[k].values())]
                 for k in sorted(by_kind)]
    o.append(_table(["kind"] + statuses + ["all"], kind_rows, set(range(1, len(statuses) + 2))))
    chart_items = [(f"{code} {RC_TEXT.get(code, '')}".strip(), n, "#2e7d32" if code == "00" else "#c62828")
                   for code, n in sorted(by_rc.items(), key=lambda x: (-x[1], x[0]))]
    o.append(bar_chart("Requests by response code", chart_items))

    o.append(f"<h2>Top merchants (of {_n(len(d.merchant_rows))})</h2>")
    top = sorted(d.merchant_rows, key=lambda r: (-r[4], r[0], r[2]))[:TOP_MERCHANTS]
    o.append(_table(["merchant", "name", "currency", "purchases", "purchase amount", "refunds",
                     "refund amount", "fees", "net"], [list(r) for r in top], set(range(3, 9))))
    if top:
        o.append(bar_chart("Net to merchant (top merchants by purchase amount)",
                           [(f"{r[1] or r[0]} ({r[2]})", r[8], "#1f5fa8") for r in top]))

    o.append("<h2>Interbank positions</h2>")
    o.append(_table(["participant", "currency", "receivable", "payable", "net"],
                    [list(r) for r in d.position_rows], {2, 3, 4}))

    o.append("<h2>Batch close exceptions</h2>")
    if not d.batches:
        o.append('<p class="ok">No batch close on this date needed an upload (every terminal\'s totals '
                 "matched the switch's).</p>")
    for b in d.batches:
        st, tt = b.switch_totals, b.terminal_totals
        o.append(f"<p>Terminal <b>{escape(b.terminal_id)}</b>, batch <b>{escape(b.batch)}</b>: "
                 f"switch {st[2]} debits {_n(st[3])} / {st[0]} credits {_n(st[1])}; terminal "
                 f"{tt[2]} debits {_n(tt[3])} / {tt[0]} credits {_n(tt[1])}.</p>")
        o.append(_table(["rrn", "stan", "difference", "terminal", "switch"],
                        [[x.rrn, x.stan, x.problem, x.terminal_value, x.switch_value] for x in b.exceptions],
                        cls="exc"))

    if d.files:
        o.append("<h2>Files</h2>")
        o.append(_table(["file", "sha256"], [[n, h] for n, h in sorted(d.files.items())]))
    o.append("</body></html>\n")
    return "".join(o)
