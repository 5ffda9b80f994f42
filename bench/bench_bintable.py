"""BIN table: build time and lookups/s on a large random table, against a naive
linear scan as the baseline.

    .venv/bin/python bench/bench_bintable.py [--entries 100000] [--runs 5] [--seed 1]

The table mixes prefixes and ranges of 6, 8 and 9 digits (longer entries fall
inside shorter ones: nesting by length) plus higher-priority ranges nested
inside same-length ones. Lookups use 16-digit PANs, half of them inside a
random entry and half uniformly random. Every figure is the median of --runs
runs; the linear scan runs on 1,000 entries (it is O(n)), and the ratio
compares it with the indexed table on the same 1,000 entries.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from cardswitch.config import BinRange  # noqa: E402
from cardswitch.routing.bintable import BinTable, Route  # noqa: E402

LENGTHS = (6, 8, 9)


def random_entries(n: int, rnd: random.Random) -> list[tuple[str, BinRange]]:
    """``n`` entries: non-overlapping per length at priority 0, plus ranges nested
    at priority 1 inside a quarter of them (never two in one parent)."""
    nested = n // 4
    base = n - nested
    per_len = [base // len(LENGTHS)] * len(LENGTHS)
    per_len[0] += base - sum(per_len)
    banks = [f"BANK{i:02d}" for i in range(40)]
    out: list[tuple[str, BinRange]] = []
    for length, count in zip(LENGTHS, per_len):
        space = 10**length
        starts = sorted(rnd.sample(range(space), count))
        starts.append(space)
        for i in range(count):
            lo = starts[i]
            room = starts[i + 1] - lo          # free values up to the next start
            hi = lo if rnd.random() < 0.4 else lo + rnd.randrange(min(room, 1000))
            out.append((rnd.choice(banks),
                        BinRange(str(lo).zfill(length), str(hi).zfill(length),
                                 rnd.choice(("debit", "credit")))))
    for bank, parent in rnd.sample(out, nested):
        lo, hi = int(parent.low), int(parent.high)
        a = rnd.randint(lo, hi)
        b = rnd.randint(a, hi)
        w = len(parent.low)
        out.append((bank, BinRange(str(a).zfill(w), str(b).zfill(w), parent.card_type, 1)))
    rnd.shuffle(out)
    return out


def random_pans(entries: list[tuple[str, BinRange]], count: int, rnd: random.Random) -> list[str]:
    pans = []
    for i in range(count):
        if i & 1:
            pans.append("".join(rnd.choices("0123456789", k=16)))
        else:
            r = rnd.choice(entries)[1]
            lead = str(rnd.randint(int(r.low), int(r.high))).zfill(len(r.low))
            pans.append(lead + "".join(rnd.choices("0123456789", k=16 - len(lead))))
    return pans


class LinearTable:
    """The obvious implementation: scan every entry, keep the longest, then highest priority."""

    def __init__(self, entries: list[tuple[str, BinRange]]) -> None:
        self.entries = [(len(r.low), r.priority, r.low, r.high, Route(b, r.card_type, r.low, r.high, r.priority))
                        for b, r in entries]

    def lookup(self, pan: str) -> Route | None:
        best = None
        best_key = (-1, 0)
        for n, prio, low, high, route in self.entries:
            key = pan[:n]
            if len(key) == n and low <= key <= high and (n, prio) > best_key:
                best, best_key = route, (n, prio)
        return best


def rate(lookup, pans: list[str]) -> float:
    t0 = time.perf_counter()
    for p in pans:
        lookup(p)
    return len(pans) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--entries", type=int, default=100_000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--lookups", type=int, default=200_000)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    rnd = random.Random(args.seed)

    big = random_entries(args.entries, rnd)
    builds = []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        table = BinTable.from_entries(big)
        builds.append(time.perf_counter() - t0)
    pans = random_pans(big, args.lookups, rnd)
    big_rates = [rate(table.lookup, pans) for _ in range(args.runs)]

    small = random_entries(1_000, rnd)
    small_table = BinTable.from_entries(small)
    linear = LinearTable(small)
    small_pans = random_pans(small, 5_000, rnd)
    mismatches = sum(small_table.lookup(p) != linear.lookup(p) for p in small_pans)
    small_rates = [rate(small_table.lookup, small_pans) for _ in range(args.runs)]
    linear_rates = [rate(linear.lookup, small_pans) for _ in range(args.runs)]

    hits = sum(table.lookup(p) is not None for p in pans)
    med = statistics.median
    print(f"python {sys.version.split()[0]}, median of {args.runs} runs")
    print(f"BinTable {len(table):>7} entries ({table.segments} segments): "
          f"build {med(builds) * 1000:7.1f} ms, {med(big_rates):>10,.0f} lookups/s "
          f"({1e6 / med(big_rates):.2f} us/lookup, {hits * 100 // len(pans)}% hits)")
    print(f"BinTable {len(small_table):>7} entries: {med(small_rates):>10,.0f} lookups/s")
    print(f"linear   {len(small):>7} entries: {med(linear_rates):>10,.0f} lookups/s "
          f"(indexed/linear on 1,000 entries: {med(small_rates) / med(linear_rates):.0f}x; "
          f"answers differ on {mismatches} of {len(small_pans)} PANs)")


if __name__ == "__main__":
    main()
