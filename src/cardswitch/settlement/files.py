"""Writing the settlement files: CSV with a header row, integer minor units,
``\\n`` line ends, UTF-8; every file written to a temporary name in the
date's folder and renamed into place only when the whole run succeeded, so
a reader never sees half a file and a failed run leaves the last good set.
"""

from __future__ import annotations

import csv
import fcntl
import hashlib
import json
import os
import time
from pathlib import Path
from typing import IO

from cardswitch.settlement.counting import CLEARING_COLUMNS, ClearingRow
from cardswitch.settlement.positions import MERCHANT_COLUMNS, POSITION_COLUMNS

MERCHANT_FILE = "merchant_settlement.csv"
POSITIONS_FILE = "interbank_positions.csv"
SUMMARY_FILE = "summary.json"
REPORT_FILE = "report.html"
SETTLED_FILE = "settled.json"
LOCK_FILE = ".lock"
TMP_SUFFIX = ".tmp"


def clearing_name(issuer_id: str) -> str:
    return f"clearing_{issuer_id}.csv"


def recon_name(issuer_id: str) -> str:
    return f"recon_{issuer_id}.csv"


def date_dir(data_dir: str | os.PathLike, business_date: str) -> Path:
    return Path(data_dir) / "settlement" / business_date


class LockBusy(Exception):
    """Another run holds the date's lock."""


class DateLock:
    """``flock`` on ``<date dir>/.lock``: one settle (or reconcile) per date at a time.

    Waits up to ``timeout`` seconds, then raises ``LockBusy`` naming the holder.
    """

    def __init__(self, folder: Path, timeout: float) -> None:
        self.path = folder / LOCK_FILE
        self.timeout = timeout
        self._fd: int | None = None

    def __enter__(self) -> DateLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        end = time.monotonic() + self.timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= end:
                    holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
                    os.close(fd)
                    raise LockBusy(f"another run for this date holds {self.path}"
                                   f" (process {holder or '?'}); try again when it has finished") from None
                time.sleep(0.05)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)   # releases the flock
            self._fd = None


class OutputSet:
    """Files written under temporary names, renamed into place by ``commit``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._open: dict[str, IO[str]] = {}
        self._done: list[str] = []

    def open(self, name: str) -> IO[str]:
        f = open(self.folder / (name + TMP_SUFFIX), "w", encoding="utf-8", newline="")
        self._open[name] = f
        return f

    def close(self, name: str) -> None:
        f = self._open.pop(name)
        f.flush()
        os.fsync(f.fileno())
        f.close()
        self._done.append(name)

    def write_text(self, name: str, text: str) -> None:
        f = self.open(name)
        f.write(text)
        self.close(name)

    def commit(self) -> list[Path]:
        for name in list(self._open):
            self.close(name)
        paths = []
        for name in self._done:
            os.replace(self.folder / (name + TMP_SUFFIX), self.folder / name)
            paths.append(self.folder / name)
        _fsync_dir(self.folder)
        return paths

    def abort(self) -> None:
        for name, f in list(self._open.items()):
            f.close()
            self._done.append(name)
        self._open.clear()
        for name in self._done:
            try:
                os.unlink(self.folder / (name + TMP_SUFFIX))
            except FileNotFoundError:
                pass
        self._done.clear()


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def csv_writer(f: IO[str]):
    return csv.writer(f, lineterminator="\n")


class _IssuerFile:
    __slots__ = ("writerow", "count", "amounts")

    def __init__(self, f: IO[str]) -> None:
        w = csv_writer(f)
        w.writerow(CLEARING_COLUMNS)
        self.writerow = w.writerow
        self.count = 0
        self.amounts: dict[str, int] = {}


class ClearingFiles:
    """One open CSV per issuer; rows appended as entries stream by (in clearing order)."""

    def __init__(self, out: OutputSet, issuers: list[str]) -> None:
        self.out = out
        self._files: dict[str, _IssuerFile] = {}
        for issuer in issuers:
            self._file(issuer)

    def _file(self, issuer: str) -> _IssuerFile:
        f = self._files.get(issuer)
        if f is None:
            f = self._files[issuer] = _IssuerFile(self.out.open(clearing_name(issuer)))
        return f

    def add(self, row: ClearingRow) -> None:
        f = self._files.get(row[0]) or self._file(row[0] or "UNROUTED")
        f.writerow(row[2:])
        f.count += 1
        cur = row.currency
        f.amounts[cur] = f.amounts.get(cur, 0) + row.amount

    @property
    def counts(self) -> dict[str, int]:
        return {i: f.count for i, f in self._files.items()}

    @property
    def amounts(self) -> dict[str, dict[str, int]]:
        return {i: f.amounts for i, f in self._files.items()}

    def names(self) -> list[str]:
        return sorted(clearing_name(i) for i in self._files)


def write_csv(out: OutputSet, name: str, header: tuple[str, ...], rows: list[tuple]) -> None:
    f = out.open(name)
    w = csv_writer(f)
    w.writerow(header)
    w.writerows(rows)
    out.close(name)


def write_merchants(out: OutputSet, rows: list[tuple]) -> None:
    write_csv(out, MERCHANT_FILE, MERCHANT_COLUMNS, rows)


def write_positions(out: OutputSet, rows: list[tuple]) -> None:
    write_csv(out, POSITIONS_FILE, POSITION_COLUMNS, rows)


def json_text(doc: dict) -> str:
    """Deterministic JSON: sorted keys, two-space indent, a final newline."""
    return json.dumps(doc, sort_keys=True, indent=2, ensure_ascii=False) + "\n"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tmp_sha256(out: OutputSet, name: str) -> str:
    """Digest of a file written but not yet committed."""
    return file_sha256(out.folder / (name + TMP_SUFFIX))


def stale_clearing_files(folder: Path, keep: set[str]) -> list[Path]:
    """Clearing files of an earlier run for issuers this run has none for."""
    return sorted(p for p in folder.glob("clearing_*.csv") if p.name not in keep)
