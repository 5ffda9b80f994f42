"""Test-side helpers for the reliability end-to-end tests and the chaos test.

The network's parts run as separate `cardswitch up --only PART` processes
(each with its own `ready`), so a test can stop, pause, kill and restart one
of them. Everything a terminal sends is built with pyiso8583 (``e2e_support``);
the journal and the simulated banks' databases are only ever read, read-only,
after the fact.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE.parent / "e2e"))

from e2e_support import Running, start_up  # noqa: E402

from cardswitch.config import Network  # noqa: E402
from cardswitch.switch.journal import Journal  # noqa: E402


def wait_until(check: Callable[[], object], timeout: float, what: str, interval: float = 0.1):
    """``check()``'s first truthy value within ``timeout`` s, or an AssertionError naming ``what``."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        last = check()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f}s (last: {last!r})")
        time.sleep(interval)


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (Linux /proc)."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


@dataclass
class Parts:
    """One network run as three `up --only` processes: hsm, banks, switch."""

    net: Network
    workdir: Path
    runs: dict[str, Running] = field(default_factory=dict)
    starts: dict[str, int] = field(default_factory=dict)

    def start(self, part: str) -> Running:
        n = self.starts.get(part, 0) + 1
        self.starts[part] = n
        run = start_up(self.net, self.workdir, name=f"{part}{n}", args=("--only", part))
        self.runs[part] = run
        return run

    def start_all(self) -> None:
        for part in ("hsm", "banks", "switch"):
            self.start(part)

    def stop(self, part: str) -> int:
        run = self.runs.pop(part)
        return run.stop()

    def server_pid(self, part: str) -> int:
        """The `serve PART` process under `up --only PART`."""
        run = self.runs[part]
        kids = wait_until(lambda: children(run.proc.pid), 10, f"the {part} process")
        return kids[0]

    def pause(self, part: str) -> int:
        pid = self.server_pid(part)
        os.kill(pid, signal.SIGSTOP)
        return pid

    def resume(self, pid: int) -> None:
        os.kill(pid, signal.SIGCONT)

    def crash(self, part: str) -> None:
        """SIGKILL the part's server (no draining, no clean-up); `up` notices and exits."""
        run = self.runs.pop(part)
        pid = self.server_pid_of(run)
        os.kill(pid, signal.SIGKILL)
        run.wait(30)

    @staticmethod
    def server_pid_of(run: Running) -> int:
        kids = wait_until(lambda: children(run.proc.pid), 10, "the server process")
        return kids[0]

    def stop_all(self) -> None:
        for part in ("switch", "banks", "hsm"):
            if part in self.runs:
                self.stop(part)

    def kill_all(self) -> None:
        for run in self.runs.values():
            run.kill()
        self.runs.clear()

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-4000:]}"
                         for p in sorted(self.workdir.glob("*.stderr.log")))

    @property
    def data_dir(self) -> Path:
        return Path(self.net.switch.data_dir)

    def journal(self) -> Journal:
        return Journal.open(self.net.switch.journal, str(self.data_dir), readonly=True)

    def saf_counts(self) -> dict[str, int]:
        """state -> advices, from the journal (read-only)."""
        j = self.journal()
        try:
            out: dict[str, int] = {}
            for (_bank, state), n in j.saf_counts().items():
                out[state] = out.get(state, 0) + n
            return out
        finally:
            j.close()

    def bank_db(self, bank_id: str) -> sqlite3.Connection:
        path = self.data_dir / "banks" / f"{bank_id}.db"
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
        con.execute("PRAGMA busy_timeout=5000")
        return con

    def bank_balance(self, bank_id: str, pan_masked: str) -> int:
        con = self.bank_db(bank_id)
        try:
            rows = con.execute("SELECT balance FROM cards WHERE pan_masked = ?", (pan_masked,)).fetchall()
        finally:
            con.close()
        assert len(rows) == 1, f"{bank_id}: {len(rows)} cards masked {pan_masked}"
        return rows[0][0]
