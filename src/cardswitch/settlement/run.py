"""The settle and reconcile jobs: check the date, lock it, stream the journal,
write the files.

``settle`` reads the journal through a ``SettlementSource`` snapshot (never
writing to it: the switch may be running), streams the date's candidate rows
in clearing order, prices each counted entry, appends clearing rows to one
open file per issuer and adds to per-merchant and per-participant totals:
memory grows with merchants and participants, not with transactions.
Everything is written under temporary names and renamed at the end, under
an exclusive lock on the date's folder; a rerun gives the same bytes.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from pathlib import Path

from cardswitch.config import Network
from cardswitch.settlement import files as F
from cardswitch.settlement.batches import BatchCheck, batch_exceptions, batches_to_check
from cardswitch.settlement.counting import (
    Entry,
    UndoIndex,
    clearing_rows,
    day_changes,
    entries,
    is_on_us_transfer,
    is_undo,
    replay,
)
from cardswitch.settlement.positions import FeeBook, MerchantBook, PositionBook, book_entry
from cardswitch.settlement.recon import (
    AuthDifference,
    Item,
    ReconOutcome,
    RECON_COLUMNS,
    read_issuer_file,
    reconcile_items,
)
from cardswitch.settlement.report import ReportData, render_report
from cardswitch.settlement.source import SettlementSource, SourceError, iter_rows, open_source
from cardswitch.switch.records import TxnRecord

Progress = Callable[[int, int], None]

DEFAULT_LOCK_TIMEOUT_S = 30.0
DEFAULT_PENDING_WAIT_S = 10.0


class SettleError(Exception):
    """A run that cannot be made; the message is one line for the operator."""


@dataclass(slots=True)
class SettleResult:
    business_date: str
    folder: Path
    files: list[Path]
    merchant_rows: list[tuple]
    position_rows: list[tuple]
    summary: dict
    fingerprint: str
    entries: int
    first_run: bool                       # no earlier settlement of this date was recorded
    replaced: str = ""                    # fingerprint of an earlier, different settlement
    warnings: list[str] = field(default_factory=list)


# -- checks ---------------------------------------------------------------------------


def check_date(text: str) -> str:
    try:
        d = date.fromisoformat(text)
    except (TypeError, ValueError):
        raise SettleError(f"--date: {text!r} is not a date (YYYY-MM-DD)") from None
    if d.isoformat() != text:
        raise SettleError(f"--date: {text!r} is not a date (YYYY-MM-DD)")
    return text


def check_closed(source: SettlementSource, business_date: str) -> None:
    """Refuse a date the switch has not cut over yet (settlement.md 1)."""
    current = source.current_business_date()
    if current is None:
        raise SettleError("the journal has no business date yet: start the switch once")
    if business_date >= current:
        raise SettleError(f"business date {business_date} is still open: run cardswitch cutover first"
                          if business_date == current else
                          f"business date {business_date} has not begun (the current one is {current})")


def open_checked(network: Network, business_date: str, pending_wait_s: float,
                 opener: Callable[[Network], SettlementSource] = open_source) -> SettlementSource:
    """A snapshot of the journal in which the date is closed and has no request
    still waiting for its outcome (in flight at cutover: waits up to
    ``pending_wait_s`` for them to finish)."""
    end = time.monotonic() + pending_wait_s
    while True:
        try:
            source = opener(network)
        except SourceError as e:
            raise SettleError(str(e)) from None
        try:
            check_closed(source, business_date)
            pending = source.count_pending(business_date)
        except BaseException:
            source.close()
            raise
        if not pending:
            return source
        source.close()
        if time.monotonic() >= end:
            raise SettleError(f"{pending} request(s) of {business_date} still have no outcome (in flight, "
                              "or left by a switch that stopped abruptly: start it again to recover them)")
        time.sleep(0.2)


# -- settle ---------------------------------------------------------------------------------


def _entry_line(e: Entry, card_type: str, acquirer: str) -> str:
    """What the fingerprint covers of one counted entry."""
    o, x = e.orig, e.ident
    return (f"{e.sign}|{o.id}|{x.id}|{o.kind}|{o.amount}|{o.currency}|{o.merchant_id}|{acquirer}|"
            f"{o.issuer_id}|{o.to_issuer_id}|{card_type}|{x.rrn}\n")


def settle(network: Network, business_date: str, *, lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S,
           pending_wait_s: float = DEFAULT_PENDING_WAIT_S, progress: Progress | None = None,
           opener: Callable[[Network], SettlementSource] = open_source) -> SettleResult:
    """Settle ``business_date``; see the module docstring. Raises ``SettleError``."""
    check_date(business_date)
    source = open_checked(network, business_date, pending_wait_s, opener)
    try:
        folder = F.date_dir(network.switch.data_dir, business_date)
        try:
            lock = F.DateLock(folder, lock_timeout_s)
            with lock:
                return _settle_locked(network, business_date, source, folder, progress)
        except F.LockBusy as e:
            raise SettleError(f"settle {business_date}: {e}") from None
        except SourceError as e:
            raise SettleError(str(e)) from None
        except OSError as e:
            raise SettleError(f"cannot write {folder}: {e.strerror or e}") from None
    finally:
        source.close()


def _settle_locked(network: Network, business_date: str, source: SettlementSource, folder: Path,
                   progress: Progress | None) -> SettleResult:
    book = FeeBook(network)
    merchants, positions = MerchantBook(), PositionBook(book.switch_id)
    undo = UndoIndex(source, business_date)
    changes = day_changes(business_date, source, undo)
    total = source.count_requests(business_date)
    out = F.OutputSet(folder)
    try:
        clearing = F.ClearingFiles(out, sorted(book.banks))
        # Millions of short-lived acyclic objects: the cyclic collector's passes
        # over them would find nothing and cost about a tenth of the run.
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            n, kind_counts, fingerprint = _stream(business_date, source, changes, book, merchants,
                                                  positions, clearing, progress, total)
        finally:
            if gc_was_enabled:
                gc.enable()
        merchant_rows = merchants.rows(book=book)
        position_rows = positions.rows()
        clearing_names = clearing.names()
        for name in clearing_names:
            out.close(name)
        F.write_merchants(out, merchant_rows)
        F.write_positions(out, position_rows)
        digests = {name: F.tmp_sha256(out, name)
                   for name in [F.MERCHANT_FILE, F.POSITIONS_FILE, *clearing_names]}

        mix = source.request_mix(business_date)
        batches = _batch_checks(source, business_date, undo)
        warnings = [f"{what} is not in the network file: settled with no fees"
                    for what in sorted(book.unknown)]
        summary = _summary(business_date, fingerprint, n, kind_counts, merchant_rows, position_rows,
                           clearing, digests, mix, batches, warnings)
        out.write_text(F.SUMMARY_FILE, F.json_text(summary))
        clearing_summary = {
            issuer: (clearing.counts[issuer], dict(sorted(clearing.amounts[issuer].items())))
            for issuer in clearing.counts}
        report = render_report(ReportData(
            business_date=business_date, network_source=network.source, fingerprint=fingerprint,
            merchant_rows=merchant_rows, position_rows=position_rows, clearing=clearing_summary,
            kind_counts=kind_counts, entries=n, mix=mix, batches=batches, files=digests,
            warnings=warnings))
        out.write_text(F.REPORT_FILE, report)
        paths = out.commit()
    except BaseException:
        out.abort()
        raise
    for stale in F.stale_clearing_files(folder, set(clearing_names)):
        stale.unlink()
    first_run, replaced = _record_settled(folder, business_date, fingerprint)
    if replaced:
        warnings.append(f"{business_date} was settled before with other inputs ({replaced}): "
                        "its files were rewritten")
    return SettleResult(business_date=business_date, folder=folder, files=paths,
                        merchant_rows=merchant_rows, position_rows=position_rows, summary=summary,
                        fingerprint=fingerprint, entries=n, first_run=first_run, replaced=replaced,
                        warnings=warnings)


def _stream(business_date: str, source: SettlementSource, changes, book: FeeBook, merchants: MerchantBook,
            positions: PositionBook, clearing: F.ClearingFiles, progress: Progress | None,
            total: int) -> tuple[int, dict[str, int], str]:
    """Every counted entry, in clearing order, into the books and the clearing
    files; answers (entries, clearing rows per kind, the inputs' fingerprint)."""
    h = hashlib.sha256()
    h.update(f"cardswitch settlement v1 {business_date}\n".encode())
    h.update(book.parameters_digest().encode() + b"\n")
    kind_counts: dict[str, int] = {}
    lines: list[str] = []
    n = 0
    step = 25_000
    next_report = step
    add_row = clearing.add
    for e in entries(iter_rows(source, business_date), changes):
        p = book_entry(e, book, merchants, positions)
        for row in clearing_rows(e):
            add_row(row)
            kind_counts[row.kind] = kind_counts.get(row.kind, 0) + 1
        lines.append(_entry_line(e, p.card_type, p.acquirer))
        n += 1
        if n >= next_report:
            h.update("".join(lines).encode())
            lines.clear()
            next_report += step
            if progress is not None:
                progress(n, total)
    h.update("".join(lines).encode())
    if progress is not None:
        progress(n, total)
    return n, kind_counts, "sha256:" + h.hexdigest()


def _batch_checks(source: SettlementSource, business_date: str, undo: UndoIndex) -> list[BatchCheck]:
    out = []
    for terminal, batch, ours, theirs in batches_to_check(source.batch_closes_on(business_date)):
        rows = [r for r in source.batch_rows(terminal, batch) if r.business_date <= business_date]
        undos = {u.id: u for u in rows if is_undo(u)}
        since = min((r.business_date for r in rows), default=business_date)
        for u in undo.naming([r.id for r in rows], since):
            undos.setdefault(u.id, u)
        marks = replay({r.id: r for r in rows}, undos.values()).state
        exc = batch_exceptions(terminal, batch, source.uploads(terminal, batch), rows, marks)
        out.append(BatchCheck(terminal, batch, ours, theirs, tuple(exc)))
    return out


def _summary(business_date: str, fingerprint: str, n: int, kind_counts: dict[str, int],
             merchant_rows: list[tuple], position_rows: list[tuple], clearing: F.ClearingFiles,
             digests: dict[str, str], mix, batches: list[BatchCheck], warnings: list[str]) -> dict:
    by_status: dict[str, int] = {}
    for m in mix:
        by_status[m.status] = by_status.get(m.status, 0) + m.count
    m_totals: dict[str, dict[str, int]] = {}
    for _, _, cur, pc, pa, rc, ra, fee, net in merchant_rows:
        t = m_totals.setdefault(cur, dict.fromkeys(("purchase_count", "purchase_amount", "refund_count",
                                                    "refund_amount", "fee_amount", "net_amount"), 0))
        for k, v in zip(("purchase_count", "purchase_amount", "refund_count", "refund_amount",
                         "fee_amount", "net_amount"), (pc, pa, rc, ra, fee, net)):
            t[k] += v
    p_totals: dict[str, dict[str, int]] = {}
    for _, cur, r, p, net in position_rows:
        t = p_totals.setdefault(cur, {"receivable": 0, "payable": 0, "net": 0})
        t["receivable"] += r
        t["payable"] += p
        t["net"] += net
    files = {
        F.MERCHANT_FILE: {"rows": len(merchant_rows), "sha256": digests[F.MERCHANT_FILE], "totals": m_totals},
        F.POSITIONS_FILE: {"rows": len(position_rows), "sha256": digests[F.POSITIONS_FILE], "totals": p_totals},
    }
    for issuer in clearing.counts:
        name = F.clearing_name(issuer)
        files[name] = {"rows": clearing.counts[issuer], "sha256": digests[name],
                       "totals": {cur: {"amount": a} for cur, a in clearing.amounts[issuer].items()}}
    return {
        "business_date": business_date,
        "fingerprint": fingerprint,
        "counts": {
            "requests": sum(by_status.values()),
            "requests_by_status": by_status,
            "counted": n,
            "clearing_rows": sum(clearing.counts.values()),
            "clearing_rows_by_kind": kind_counts,
            "merchants": len(merchant_rows),
            "participants": len({r[0] for r in position_rows}),
            "batches_uploaded": len(batches),
            "batch_exceptions": sum(len(b.exceptions) for b in batches),
        },
        "files": files,
        "warnings": warnings,
    }


def _record_settled(folder: Path, business_date: str, fingerprint: str) -> tuple[bool, str]:
    """Keep "settled" for the date once: (first run?, the fingerprint it replaced)."""
    path = folder / F.SETTLED_FILE
    previous: dict | None = None
    try:
        previous = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        previous = None
    if isinstance(previous, dict) and previous.get("fingerprint") == fingerprint:
        return False, ""
    now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    doc = {"business_date": business_date, "fingerprint": fingerprint, "settled_at": now}
    replaced = ""
    if isinstance(previous, dict) and previous.get("fingerprint"):
        replaced = str(previous["fingerprint"])
        history = list(previous.get("replaced", []))
        history.append({"fingerprint": replaced, "settled_at": previous.get("settled_at", "")})
        doc["replaced"] = history
    tmp = path.with_name(path.name + F.TMP_SUFFIX)
    tmp.write_text(F.json_text(doc), encoding="utf-8")
    os.replace(tmp, path)
    return previous is None, replaced


# -- reconcile ----------------------------------------------------------------------------


@dataclass(slots=True)
class ReconResult:
    business_date: str
    issuer: str
    path: Path
    counts: dict[str, int]
    auth_differences: list[AuthDifference]

    @property
    def exit_code(self) -> int:
        return 0 if self.counts.get("matched", 0) == sum(self.counts.values()) else 1


def resolve_issuer(network: Network, issuer: str) -> str:
    """A bank id, given the id or the bank's institution ID."""
    for b in network.banks:
        if b.id == issuer:
            return b.id
    for b in network.banks:
        if b.institution_id == issuer:
            return b.id
    raise SettleError(f"--issuer: no bank {issuer!r} in {network.source}")


def switch_items(source: SettlementSource, business_date: str, issuer: str) -> list[Item]:
    """The switch's counted transactions of ``issuer`` on the date, as in its
    clearing file; an on-us transfer (both legs at this issuer) is one item."""
    changes = day_changes(business_date, source)
    out: list[Item] = []

    def involves(o: TxnRecord) -> bool:
        return o.issuer_id == issuer or o.to_issuer_id == issuer

    for e in entries(iter_rows(source, business_date, issuer), changes, keep=involves):
        for row in clearing_rows(e):
            if row.issuer_id != issuer:
                continue
            if row.leg == "in" and is_on_us_transfer(e.orig):
                continue
            out.append(Item(row.rrn, row.amount, row.auth_code))
    return out


def reconcile(network: Network, business_date: str, issuer: str, issuer_file: str, *,
              lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S,
              pending_wait_s: float = DEFAULT_PENDING_WAIT_S,
              opener: Callable[[Network], SettlementSource] = open_source) -> ReconResult:
    """Compare the issuer's record with the switch's; write recon_<issuer>.csv.

    Raises ``ReconInputError`` for an unreadable issuer file and ``SettleError``
    for anything else that stops the run.
    """
    check_date(business_date)
    bank_id = resolve_issuer(network, issuer)
    theirs = read_issuer_file(issuer_file)
    source = open_checked(network, business_date, pending_wait_s, opener)
    try:
        ours = switch_items(source, business_date, bank_id)
    except SourceError as e:
        raise SettleError(str(e)) from None
    finally:
        source.close()
    outcome: ReconOutcome = reconcile_items(ours, theirs)
    folder = F.date_dir(network.switch.data_dir, business_date)
    name = F.recon_name(bank_id)
    try:
        with F.DateLock(folder, lock_timeout_s):
            out = F.OutputSet(folder)
            try:
                F.write_csv(out, name, RECON_COLUMNS, [r.values() for r in outcome.rows])
                out.commit()
            except BaseException:
                out.abort()
                raise
    except F.LockBusy as e:
        raise SettleError(f"reconcile {business_date}: {e}") from None
    except OSError as e:
        raise SettleError(f"cannot write {folder / name}: {e.strerror or e}") from None
    return ReconResult(business_date, bank_id, folder / name, outcome.counts(), outcome.auth_differences)
