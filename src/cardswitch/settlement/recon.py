"""Reconciliation of an issuer's own record with the switch's (settlement.md 5), pure.

The issuer's file: CSV, a header row naming at least ``rrn``, ``amount`` and
``auth_code`` (any order, any case; other columns ignored), one row per
transaction. Anything unreadable raises ``ReconInputError`` naming the file
and line.

Matching is by RRN. Within one RRN, rows with equal amounts pair first,
then the rest pair in file order as ``amount_mismatch``, and what is left
over is missing on the other side. An auth_code that differs (both sides
non-empty) on a matched pair keeps it ``matched`` (the money agrees) and is
reported as a note.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

REQUIRED = ("rrn", "amount", "auth_code")
RECON_COLUMNS = ("rrn", "status", "switch_amount", "issuer_amount")


class Status:
    MATCHED = "matched"
    MISSING_AT_ISSUER = "missing_at_issuer"
    MISSING_AT_SWITCH = "missing_at_switch"
    AMOUNT_MISMATCH = "amount_mismatch"


STATUSES = (Status.MATCHED, Status.MISSING_AT_ISSUER, Status.MISSING_AT_SWITCH, Status.AMOUNT_MISMATCH)
_ORDER = {s: i for i, s in enumerate(STATUSES)}
_INT = re.compile(r"-?[0-9]+\Z")


class ReconInputError(Exception):
    """The issuer's file cannot be read; the message names the file and line."""


@dataclass(slots=True, frozen=True)
class Item:
    """One transaction on either side."""

    rrn: str
    amount: int
    auth_code: str = ""
    line: int = 0             # issuer side: the line it was read from


@dataclass(slots=True, frozen=True)
class ReconRow:
    rrn: str
    status: str
    switch_amount: int | None
    issuer_amount: int | None

    def values(self) -> tuple:
        return (self.rrn, self.status, "" if self.switch_amount is None else self.switch_amount,
                "" if self.issuer_amount is None else self.issuer_amount)


@dataclass(slots=True, frozen=True)
class AuthDifference:
    rrn: str
    switch_auth_code: str
    issuer_auth_code: str


def _lines(path: Path) -> Iterator[str]:
    """Decoded lines (UTF-8, an optional BOM), naming the line that is not text."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise ReconInputError(f"{path}: cannot read: {e.strerror or e}") from None
    with f:
        for n, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError:
                raise ReconInputError(f"{path}:{n}: not UTF-8 text") from None
            if "\x00" in text:
                raise ReconInputError(f"{path}:{n}: not text (NUL byte)")
            yield text


def read_issuer_file(path: str | Path) -> list[Item]:
    """The issuer's rows; ``ReconInputError`` for the first line that cannot be read."""
    path = Path(path)
    reader = csv.reader(_lines(path), strict=True)
    header: list[str] | None = None
    cols: dict[str, int] = {}
    items: list[Item] = []
    try:
        for row in reader:
            line = reader.line_num
            if not row or all(not c.strip() for c in row):
                continue                           # blank line
            if header is None:
                header = [c.strip().lower() for c in row]
                missing = [c for c in REQUIRED if c not in header]
                if missing:
                    raise ReconInputError(f"{path}:{line}: header lacks column(s) {', '.join(missing)} "
                                          f"(needs {', '.join(REQUIRED)})")
                dup = sorted({c for c in REQUIRED if header.count(c) > 1})
                if dup:
                    raise ReconInputError(f"{path}:{line}: header names {', '.join(dup)} more than once")
                cols = {c: header.index(c) for c in REQUIRED}
                continue
            if len(row) != len(header):
                raise ReconInputError(f"{path}:{line}: {len(row)} fields, the header has {len(header)}")
            rrn = row[cols["rrn"]].strip()
            if not rrn:
                raise ReconInputError(f"{path}:{line}: rrn is empty")
            amount_text = row[cols["amount"]].strip()
            if not _INT.match(amount_text):
                raise ReconInputError(f"{path}:{line}: amount {amount_text!r} is not an integer "
                                      "(minor units)")
            items.append(Item(rrn, int(amount_text), row[cols["auth_code"]].strip(), line))
    except csv.Error as e:
        raise ReconInputError(f"{path}:{reader.line_num}: {e}") from None
    if header is None:
        raise ReconInputError(f"{path}:1: empty file: expected a header row with {', '.join(REQUIRED)}")
    return items


@dataclass(slots=True)
class ReconOutcome:
    rows: list[ReconRow]
    auth_differences: list[AuthDifference]

    def counts(self) -> dict[str, int]:
        out = {s: 0 for s in STATUSES}
        for r in self.rows:
            out[r.status] += 1
        return out

    @property
    def all_matched(self) -> bool:
        return all(r.status == Status.MATCHED for r in self.rows)


def reconcile_items(switch: Iterable[Item], issuer: Iterable[Item]) -> ReconOutcome:
    """Match both sides by RRN; rows sorted by rrn, then status, then amounts."""
    theirs: dict[str, list[Item]] = {}
    for it in issuer:
        theirs.setdefault(it.rrn, []).append(it)
    ours: dict[str, list[Item]] = {}
    for it in switch:
        ours.setdefault(it.rrn, []).append(it)
    rows: list[ReconRow] = []
    auth: list[AuthDifference] = []
    for rrn in sorted(ours.keys() | theirs.keys()):
        s_items = list(ours.get(rrn, ()))
        i_items = list(theirs.get(rrn, ()))
        # equal amounts pair first
        rest_s: list[Item] = []
        for s in s_items:
            j = next((k for k, i in enumerate(i_items) if i.amount == s.amount), None)
            if j is None:
                rest_s.append(s)
                continue
            i = i_items.pop(j)
            rows.append(ReconRow(rrn, Status.MATCHED, s.amount, i.amount))
            if s.auth_code and i.auth_code and s.auth_code != i.auth_code:
                auth.append(AuthDifference(rrn, s.auth_code, i.auth_code))
        for s, i in zip(rest_s, i_items):
            rows.append(ReconRow(rrn, Status.AMOUNT_MISMATCH, s.amount, i.amount))
        n = min(len(rest_s), len(i_items))
        rows += [ReconRow(rrn, Status.MISSING_AT_ISSUER, s.amount, None) for s in rest_s[n:]]
        rows += [ReconRow(rrn, Status.MISSING_AT_SWITCH, None, i.amount) for i in i_items[n:]]
    rows.sort(key=lambda r: (r.rrn, _ORDER[r.status],
                             r.switch_amount if r.switch_amount is not None else 0,
                             r.issuer_amount if r.issuer_amount is not None else 0))
    return ReconOutcome(rows, auth)
