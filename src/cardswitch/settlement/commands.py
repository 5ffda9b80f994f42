"""`cardswitch settle` and `cardswitch reconcile` (operations.md 2).

Errors a user can cause are one line on stderr and exit 2; progress goes to
stderr only when it is a terminal. Heavy imports wait until a command runs,
so building the parser stays cheap.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Callable

EXIT_OK = 0
EXIT_EXCEPTIONS = 1
EXIT_ERROR = 2
TOP_MERCHANTS = 10


def add_settlement_commands(sub, with_config: Callable[[argparse.ArgumentParser], argparse.ArgumentParser]) -> None:
    """Add ``settle`` and ``reconcile`` to the ``cardswitch`` subcommands."""
    sp = with_config(sub.add_parser("settle", help="settle a closed business date: clearing files, "
                                                    "merchant settlement, interbank positions, report"))
    sp.add_argument("--date", required=True, help="business date YYYY-MM-DD (cut over already)")
    sp.add_argument("--lock-timeout", type=float, default=30.0, metavar="S",
                    help="wait this long for another run of the same date (default 30)")
    sp.set_defaults(func=cmd_settle)

    sp = with_config(sub.add_parser("reconcile", help="compare an issuer's own record of a date "
                                                       "with the switch's"))
    sp.add_argument("--date", required=True, help="business date YYYY-MM-DD")
    sp.add_argument("--issuer", required=True, help="bank id (or its institution ID)")
    sp.add_argument("--file", required=True, help="the issuer's CSV: header with rrn,amount,auth_code")
    sp.add_argument("--lock-timeout", type=float, default=30.0, metavar="S", help=argparse.SUPPRESS)
    sp.set_defaults(func=cmd_reconcile)


def _error(msg: str) -> int:
    print(f"cardswitch: {msg}", file=sys.stderr, flush=True)
    return EXIT_ERROR


def _network(path: str | None):
    from cardswitch.netfile import NetworkFileError, load_network

    try:
        return load_network(path)
    except NetworkFileError as e:
        raise _UserError(str(e)) from None
    except FileNotFoundError:
        raise _UserError(f"{path}: no such network file") from None


class _UserError(Exception):
    pass


class TerminalProgress:
    """``settle D: 412,000 / 1,000,000 rows`` rewritten in place, on a terminal only."""

    def __init__(self, label: str, stream=None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.label = label
        self.enabled = bool(getattr(self.stream, "isatty", lambda: False)())
        self._shown = False
        self._last = 0.0

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if done < total and now - self._last < 0.2:
            return
        self._last = now
        self.stream.write(f"\r{self.label}: {done:,} transactions counted (of {total:,} requests)")
        self.stream.flush()
        self._shown = True

    def finish(self) -> None:
        if self._shown:
            self.stream.write("\n")
            self.stream.flush()


def _table(headers: list[str], rows: list[list[object]], right: set[int]) -> str:
    cells = [[f"{v:,}" if isinstance(v, int) else str(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]

    def line(values: list[str]) -> str:
        return "  ".join(v.rjust(widths[i]) if i in right else v.ljust(widths[i])
                         for i, v in enumerate(values)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in cells])


def cmd_settle(args) -> int:
    from cardswitch.settlement.run import SettleError, settle

    try:
        network = _network(args.config)
    except _UserError as e:
        return _error(str(e))
    progress = TerminalProgress(f"settle {args.date}")
    try:
        result = settle(network, args.date, lock_timeout_s=args.lock_timeout, progress=progress)
    except SettleError as e:
        progress.finish()
        return _error(str(e))
    except KeyboardInterrupt:
        progress.finish()
        return 130
    progress.finish()
    for w in result.warnings:
        print(f"warning: {w}", file=sys.stderr)
    s = result.summary["counts"]
    again = "" if result.first_run or result.replaced else " (settled before: same files rewritten)"
    print(f"settled {result.business_date}: {result.entries:,} counted transactions of "
          f"{s['requests']:,} requests{again}")
    print(f"files in {result.folder}:")
    for p in result.files:
        print(f"  {p.name}")
    print()
    rows = sorted(result.merchant_rows, key=lambda r: (-r[4], r[0], r[2]))
    shown = rows[:TOP_MERCHANTS]
    title = "merchants" if len(rows) <= TOP_MERCHANTS else \
        f"merchants (top {TOP_MERCHANTS} of {len(rows):,} by purchase amount)"
    print(title)
    print(_table(["merchant", "name", "cur", "purchases", "amount", "refunds", "amount", "fees", "net"],
                 [list(r) for r in shown], {3, 4, 5, 6, 7, 8}) if shown else "  none")
    print()
    print("interbank positions")
    print(_table(["participant", "cur", "receivable", "payable", "net"],
                 [list(r) for r in result.position_rows], {2, 3, 4}) if result.position_rows else "  none")
    exc = s["batch_exceptions"]
    if exc:
        print(f"\n{exc} batch close exception(s): see {result.folder / 'report.html'}")
    print(f"\nreport: {result.folder / 'report.html'}")
    return EXIT_OK


def cmd_reconcile(args) -> int:
    from cardswitch.settlement.recon import STATUSES, ReconInputError
    from cardswitch.settlement.run import SettleError, reconcile

    try:
        network = _network(args.config)
    except _UserError as e:
        return _error(str(e))
    try:
        result = reconcile(network, args.date, args.issuer, args.file, lock_timeout_s=args.lock_timeout)
    except (SettleError, ReconInputError) as e:
        return _error(str(e))
    print(f"reconciled {result.issuer} on {result.business_date}: {result.path}")
    width = max(len(s) for s in STATUSES)
    for status in STATUSES:
        print(f"  {status.ljust(width)}  {result.counts.get(status, 0):,}")
    if result.auth_differences:
        n = len(result.auth_differences)
        print(f"note: {n} matched transaction(s) carry another auth_code at the issuer:")
        for d in result.auth_differences[:10]:
            print(f"  rrn {d.rrn}: switch {d.switch_auth_code}, issuer {d.issuer_auth_code}")
        if n > 10:
            print(f"  ... and {n - 10} more")
    return result.exit_code
