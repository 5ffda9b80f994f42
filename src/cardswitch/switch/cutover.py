"""Business date and cutover (settlement.md 1).

The switch keeps one business date: on first start, today in
``[switch] timezone``. Cutover moves it forward: automatically at
``[switch] cutover`` local time (to the next calendar day, unless it is
already there), or on demand (`cardswitch cutover`: always one day forward).
Every transaction keeps the date it was received on. Cutover is journaled
(state ``business_date`` and a history entry ``cutover:<old date>``), so it
survives a restart, and a date is never reused.

`cardswitch cutover` reaches a running switch with SIGUSR1 (its pid is in
the journal's lock file) and waits until the journal shows the new date; with
no switch running it cuts over in the journal directly.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Callable
from datetime import date, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import orjson

log = logging.getLogger("cardswitch.cutover")

STATE_BUSINESS_DATE = "business_date"
HISTORY_PREFIX = "cutover:"


# -- the rule (pure) ---------------------------------------------------------------


def first_business_date(now_local: datetime) -> date:
    return now_local.date()


def automatic_target(current: date, now_local: datetime, cutover_hhmm: str) -> date | None:
    """The date an automatic cutover moves to now, or None when none is due.

    After the cutover time the business date is tomorrow; before it, today.
    It only ever moves forward (a switch that was down over several cutovers
    catches up in one step; the dates in between had no transactions).
    """
    hh, mm = (int(x) for x in cutover_hhmm.split(":"))
    today = now_local.date()
    passed = (now_local.hour, now_local.minute) >= (hh, mm)
    target = today + timedelta(days=1) if passed else today
    return target if target > current else None


def manual_target(current: date) -> date:
    return current + timedelta(days=1)


def seconds_until_next_check(now_local: datetime, cutover_hhmm: str) -> float:
    """Sleep until the next cutover time (at most a minute, to follow clock changes)."""
    hh, mm = (int(x) for x in cutover_hhmm.split(":"))
    at = now_local.replace(hour=hh, minute=mm, second=0, microsecond=0)
    if at <= now_local:
        at += timedelta(days=1)
    return max(0.05, min(60.0, (at - now_local).total_seconds()))


def history_entry(new: date, by: str, now_utc: datetime) -> str:
    return orjson.dumps({"to": new.isoformat(), "by": by,
                         "at": now_utc.strftime("%Y-%m-%dT%H:%M:%SZ")}).decode()


# -- the switch's side -----------------------------------------------------------------


class CutoverService:
    """Keeps the running switch's business date; owns the journal state for it."""

    def __init__(self, journal, timezone_name: str, cutover_hhmm: str,
                 on_change: Callable[[str], None]) -> None:
        self.journal = journal
        self.tz = ZoneInfo(timezone_name)
        self.cutover_hhmm = cutover_hhmm
        self.on_change = on_change
        self._task: asyncio.Task | None = None
        self._manual = asyncio.Event()

    def now_local(self) -> datetime:
        return datetime.now(self.tz)

    def restore(self) -> str:
        """The business date at start: journaled, or today; then any cutover that is due."""
        saved = self.journal.get_state(STATE_BUSINESS_DATE)
        if saved is None:
            saved = first_business_date(self.now_local()).isoformat()
            self.journal.set_state(STATE_BUSINESS_DATE, saved)
            self.journal.flush()
        target = automatic_target(date.fromisoformat(saved), self.now_local(), self.cutover_hhmm)
        if target is not None:
            saved = self._move(date.fromisoformat(saved), target, "auto")
        return saved

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGUSR1, self._manual.set)
        self._task = loop.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        try:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGUSR1)
        except (RuntimeError, ValueError):
            pass

    def cutover_now(self, by: str = "operator") -> str:
        current = date.fromisoformat(self.journal.get_state(STATE_BUSINESS_DATE))
        return self._move(current, manual_target(current), by)

    async def _run(self) -> None:
        while True:
            wait = seconds_until_next_check(self.now_local(), self.cutover_hhmm)
            try:
                await asyncio.wait_for(self._manual.wait(), wait)
            except asyncio.TimeoutError:
                pass
            if self._manual.is_set():
                self._manual.clear()
                self.cutover_now("operator")
                continue
            current = date.fromisoformat(self.journal.get_state(STATE_BUSINESS_DATE))
            target = automatic_target(current, self.now_local(), self.cutover_hhmm)
            if target is not None:
                self._move(current, target, "auto")

    def _move(self, current: date, new: date, by: str) -> str:
        """Journal the new date (durably), then let the switch use it."""
        self.journal.set_state(HISTORY_PREFIX + current.isoformat(),
                               history_entry(new, by, datetime.now(timezone.utc)))
        self.journal.set_state(STATE_BUSINESS_DATE, new.isoformat())
        self.journal.flush()
        log.info("cutover (%s): business date %s -> %s", by, current, new)
        self.on_change(new.isoformat())
        return new.isoformat()


# -- `cardswitch cutover` -------------------------------------------------------------------


class CutoverError(Exception):
    pass


def running_switch_pid(journal_path: str) -> int | None:
    """The pid holding the journal's lock, if that process is alive."""
    try:
        with open(journal_path + ".lock") as f:
            pid = int(f.read().strip() or 0)
    except (OSError, ValueError):
        return None
    if pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid
    return pid


def request_cutover(journal_url: str, data_dir: str, timeout_s: float = 15.0) -> tuple[str, str]:
    """Cut over now: through the running switch if there is one. (old, new) dates."""
    from cardswitch.switch.journal import Journal, JournalError, sqlite_path

    if journal_url.startswith(("postgresql://", "postgres://")):
        return _cutover_shared(journal_url, data_dir)
    path = sqlite_path(journal_url, data_dir)
    if not os.path.exists(path):
        raise CutoverError(f"no journal at {path}: the switch has never run with this network file")
    pid = running_switch_pid(path)
    if pid is None:
        try:
            journal = Journal.open(journal_url, data_dir)
        except JournalError as e:
            raise CutoverError(str(e)) from None
        try:
            old = journal.get_state(STATE_BUSINESS_DATE)
            if old is None:
                raise CutoverError("the journal has no business date yet: start the switch once")
            new = manual_target(date.fromisoformat(old)).isoformat()
            journal.set_state(HISTORY_PREFIX + old, history_entry(date.fromisoformat(new), "operator",
                                                                   datetime.now(timezone.utc)))
            journal.set_state(STATE_BUSINESS_DATE, new)
            journal.flush()
            return old, new
        finally:
            journal.close()
    reader = Journal.open(journal_url, data_dir, readonly=True)
    try:
        old = reader.get_state(STATE_BUSINESS_DATE)
        os.kill(pid, signal.SIGUSR1)
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            now = reader.get_state(STATE_BUSINESS_DATE)
            if now != old:
                return old or "", now or ""
            time.sleep(0.05)
    finally:
        reader.close()
    raise CutoverError(f"the switch (process {pid}) did not cut over within {timeout_s:.0f}s")


def _cutover_shared(journal_url: str, data_dir: str) -> tuple[str, str]:
    """A PostgreSQL journal is shared by every switch node: write the new date
    there; each node reads it back within a few seconds and uses it."""
    from cardswitch.switch.journal import JournalError
    from cardswitch.switch.journals import open_journal

    try:
        journal = open_journal(journal_url, data_dir)
    except JournalError as e:
        raise CutoverError(str(e)) from None
    try:
        old = journal.get_state(STATE_BUSINESS_DATE)
        if old is None:
            raise CutoverError("the journal has no business date yet: start the switch once")
        new = manual_target(date.fromisoformat(old))
        journal.set_state(HISTORY_PREFIX + old, history_entry(new, "operator", datetime.now(timezone.utc)))
        journal.set_state(STATE_BUSINESS_DATE, new.isoformat())
        journal.flush()
        return old, new.isoformat()
    finally:
        journal.close()
