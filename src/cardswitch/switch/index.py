"""In-memory view of the journal the pipeline decides on.

Pure data structure, no I/O: duplicate and repeat detection (41 + 11 + 7 +
MTI class), finding an original by field 90 and 41, batch totals per
terminal batch, and the responses already given (for repeats). Rebuilt from
the journal at start-up, so it holds across restarts.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from cardswitch.switch.records import CREDIT_KINDS, DEBIT_KINDS, Cancel, Kind, TxnRecord

RequestKey = tuple[str, str, str, str]  # terminal id, STAN, field 7, MTI class


def request_key(terminal_id: str, stan: str, transmitted: str, mti: str) -> RequestKey:
    return (terminal_id, stan, transmitted, mti[:3])


@dataclass(slots=True, frozen=True)
class BatchTotals:
    credits_number: int = 0
    credits_amount: int = 0
    debits_number: int = 0
    debits_amount: int = 0


def batch_totals(records: list[TxnRecord]) -> BatchTotals:
    """wire.md 6: approved, not reversed, not voided; a void and a reversal count nothing."""
    cn = ca = dn = da = 0
    for r in records:
        if not r.approved or r.cancelled in (Cancel.REVERSED, Cancel.VOIDED):
            continue
        if r.kind in DEBIT_KINDS:
            dn += 1
            da += r.amount
        elif r.kind in CREDIT_KINDS:
            cn += 1
            ca += r.amount
    return BatchTotals(cn, ca, dn, da)


class TxnIndex:
    def __init__(self, max_responses: int = 200_000) -> None:
        self._by_key: dict[RequestKey, TxnRecord] = {}
        self._by_id: dict[int, TxnRecord] = {}
        self._batches: dict[tuple[str, str], list[TxnRecord]] = {}
        self._closed: set[tuple[str, str]] = set()
        self._responses: OrderedDict[int, dict[str, str]] = OrderedDict()
        self._max_responses = max_responses

    def __len__(self) -> int:
        return len(self._by_key)

    # -- requests ------------------------------------------------------------

    def add(self, rec: TxnRecord) -> None:
        """Index a request. The first one of a key wins: a later row with the same
        key (a duplicate journaled when rebuilding) never hides its original."""
        key = request_key(rec.terminal_id, rec.stan, rec.transmitted, rec.mti)
        if key in self._by_key:
            return
        self._by_key[key] = rec
        self._by_id[rec.id] = rec
        if rec.kind not in (Kind.NETWORK, Kind.BATCH_CLOSE, Kind.BATCH_UPLOAD) and rec.batch:
            self._batches.setdefault((rec.terminal_id, rec.batch), []).append(rec)

    def get(self, rec_id: int) -> TxnRecord | None:
        return self._by_id.get(rec_id)

    def find(self, terminal_id: str, stan: str, transmitted: str, mti: str) -> TxnRecord | None:
        return self._by_key.get(request_key(terminal_id, stan, transmitted, mti))

    # -- responses given (for repeats) ---------------------------------------

    def remember_response(self, rec_id: int, response: dict[str, str]) -> None:
        self._responses[rec_id] = response
        if len(self._responses) > self._max_responses:
            self._responses.popitem(last=False)

    def response_for(self, rec_id: int) -> dict[str, str] | None:
        return self._responses.get(rec_id)

    # -- batches -------------------------------------------------------------

    def batch_records(self, terminal_id: str, batch: str) -> list[TxnRecord]:
        return self._batches.get((terminal_id, batch), [])

    def totals(self, terminal_id: str, batch: str) -> BatchTotals:
        return batch_totals(self.batch_records(terminal_id, batch))

    def is_closed(self, terminal_id: str, batch: str) -> bool:
        return (terminal_id, batch) in self._closed

    def close_batch(self, terminal_id: str, batch: str) -> None:
        self._closed.add((terminal_id, batch))
        # A closed batch's rows are no longer needed for totals.
        self._batches.pop((terminal_id, batch), None)

    def mark_closed(self, closed: set[tuple[str, str]]) -> None:
        self._closed |= closed
