"""A simulated issuer's own record of a business day (settlement.md 5).

``export_day`` writes what the bank approved and still stands for that date:
the file ``cardswitch reconcile`` compares with the switch's clearing. It
reads the bank's database directly; with WAL that works while the bank runs.
"""

from __future__ import annotations

import csv
import os
import sqlite3
from datetime import date
from pathlib import Path

from cardswitch.iso8583.constants import RC
from cardswitch.issuer_sim.ledger import CLS_ADVICE, CLS_FIN, EXPORT_KINDS
from cardswitch.issuer_sim.store import db_path

HEADER = ("rrn", "amount", "auth_code", "stan", "pan_masked", "processing_code", "business_date", "kind")

_QUERY = f"""
SELECT rrn, amount, auth_code, stan, pan_masked, proc, business_date, kind
FROM txns
WHERE business_date = ? AND response_code = ? AND reversed = 0 AND voided = 0
  AND substr(mti, 1, 3) IN ('{CLS_FIN}', '{CLS_ADVICE}')
  AND kind IN ({", ".join("?" * len(EXPORT_KINDS))})
  AND effects != '[]'
ORDER BY rrn, id
"""


class ExportError(Exception):
    """The export cannot be made (no such bank database, bad date)."""


def export_day(data_dir: str | os.PathLike, bank_id: str, business_date: str,
               out_path: str | os.PathLike) -> int:
    """Write the bank's approved, standing, money-moving requests of ``business_date``
    (YYYY-MM-DD) to ``out_path`` as CSV sorted by RRN; answer the number of rows."""
    try:
        date.fromisoformat(business_date)
    except ValueError:
        raise ExportError(f"business date {business_date!r} is not YYYY-MM-DD") from None
    path = db_path(data_dir, bank_id)
    if not path.is_file():
        raise ExportError(f"no records for bank {bank_id}: {path} does not exist")
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        con.execute("PRAGMA busy_timeout=5000")
        rows = con.execute(_QUERY, (business_date, RC.APPROVED, *EXPORT_KINDS)).fetchall()
    except sqlite3.Error as e:
        raise ExportError(f"cannot read {path}: {e}") from None
    finally:
        con.close()
    out = Path(out_path)
    if out.parent != Path(""):
        out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", newline="", encoding="ascii") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(HEADER)
        w.writerows(rows)
    os.replace(tmp, out)
    return len(rows)
