"""Process plumbing for the bench: start children that die with us, wait for
their ``ready`` line, read their CPU time, and stop on our own when orphaned.

Linux only (``/proc`` and ``prctl``), like the bench itself.
"""

from __future__ import annotations

import ctypes
import os
import selectors
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

_PR_SET_PDEATHSIG = 1
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def die_with_parent() -> None:
    """Ask the kernel to SIGTERM this process when its parent dies."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except Exception:
        pass


class Child:
    """A child process whose stdout we read line by line and stderr goes to a file."""

    def __init__(self, name: str, argv: list[str], log_dir: Path, env: dict | None = None,
                 cwd: str | None = None) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_dir / f"{name}.stderr.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=self._log, stdin=subprocess.DEVNULL,
            env=env, cwd=cwd, preexec_fn=die_with_parent,
        )
        self.pid = self.proc.pid
        self._sel = selectors.DefaultSelector()
        self._sel.register(self.proc.stdout, selectors.EVENT_READ)
        self._buf = b""
        self._drain: threading.Thread | None = None
        self.tail: deque[str] = deque(maxlen=50)

    def readline(self, deadline: float) -> str | None:
        """The next stdout line, or None at EOF; TimeoutError past ``deadline`` (monotonic)."""
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not self._sel.select(left):
                raise TimeoutError(f"{self.name}: no output in time")
            chunk = os.read(fd, 65536)
            if not chunk:
                if self._buf:
                    line, self._buf = self._buf, b""
                    return line.decode("utf-8", "replace").rstrip("\r\n")
                return None
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        text = line.decode("utf-8", "replace").rstrip("\r")
        self.tail.append(text)
        return text

    def wait_ready(self, timeout: float, word: str = "ready") -> str:
        """Wait for a stdout line starting with ``word``; return that line."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.readline(deadline)
            except TimeoutError:
                raise ChildFailed(self, f"did not print {word!r} within {timeout:g} s") from None
            if line is None:
                self.proc.wait(timeout=5)
                raise ChildFailed(self, f"exited with {self.proc.returncode} before {word!r}")
            if line.split(" ", 1)[0] == word:
                return line

    def drain_stdout(self) -> None:
        """Keep reading stdout in a thread so a chatty child never blocks on a full pipe."""
        if self._drain is not None:
            return

        def run() -> None:
            try:
                for raw in self.proc.stdout:
                    self.tail.append(raw.decode("utf-8", "replace").rstrip("\r\n"))
            except (OSError, ValueError):
                pass

        self._drain = threading.Thread(target=run, name=f"drain-{self.name}", daemon=True)
        self._drain.start()

    def stderr_tail(self, lines: int = 20) -> str:
        try:
            self._log.flush()
            text = self.log_path.read_text("utf-8", "replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, wait, then SIGKILL; then the same for any process it started
        that outlived it (``cardswitch up`` runs each part as its own process).
        Returns the exit status."""
        p = self.proc
        if p.poll() is None:
            left_behind = descendants(p.pid)
            try:
                p.send_signal(signal.SIGTERM)
                p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)
            except ProcessLookupError:
                pass
            _reap(left_behind)
        if self._drain is None:
            try:
                p.stdout.close()
            except OSError:
                pass
        self._log.close()
        return p.returncode


class ChildFailed(RuntimeError):
    def __init__(self, child: Child, what: str) -> None:
        tail = child.stderr_tail()
        msg = f"{child.name} ({' '.join(child.argv[:4])} ...) {what}"
        if tail:
            msg += "\n--- its stderr (last lines) ---\n" + tail
        super().__init__(msg)
        self.child = child


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(b")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    return children


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid``."""
    children = _children_map()
    out: list[int] = []
    todo = list(children.get(pid, ()))
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, ()))
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is dead for our purpose
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return stat[stat.rindex(b")") + 2:stat.rindex(b")") + 3] != b"Z"
    except OSError:
        return False


def _reap(pids: list[int], timeout: float = 10.0) -> None:
    """SIGTERM then SIGKILL the given processes that are still alive."""
    alive = [p for p in pids if _alive(p)]
    for p in alive:
        try:
            os.kill(p, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = [p for p in alive if _alive(p)]
    for p in alive:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    fields = stat[stat.rindex(b")") + 2:].split()
    # fields[0] is field 3 (state): utime and stime are fields 14 and 15
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of a process and its live descendants (a server may fork workers)."""
    total = 0.0
    for p in [pid, *descendants(pid)]:
        try:
            total += cpu_seconds(p)
        except (OSError, ValueError):
            continue
    return total


def watch_parent(loop, stop, max_seconds: float = 0.0) -> None:
    """Call ``stop()`` when our parent goes away or after ``max_seconds`` (0: never).

    For the bench servers, so that nothing outlives the run that started it.
    """
    parent = os.getppid()
    deadline = time.monotonic() + max_seconds if max_seconds > 0 else None

    def check() -> None:
        if os.getppid() != parent or (deadline is not None and time.monotonic() >= deadline):
            stop()
            return
        loop.call_later(1.0, check)

    loop.call_later(1.0, check)


def python_argv(script: str) -> list[str]:
    """argv to run one of the bench scripts with the current interpreter."""
    return [sys.executable, str(Path(__file__).with_name(script))]
