"""The dashboard in a real browser while transactions flow.

The HSM and bank simulators run under `cardswitch up --only hsm,banks`, the
switch with its admin server under ``serve_admin.py`` (its own process);
a thread sends purchases as a terminal would. Headless Chromium (Debian's
package) loads the page twice a few seconds apart with ``--dump-dom`` (with
a virtual time budget, so the page's script has polled the API and drawn its
figures); the live counters must have moved between the two, and the page
must show masked PANs only. A screenshot is kept in test-artifacts/.
"""

from __future__ import annotations

import html
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from e2e_support import PURCHASE, Driver, default_test_network, start_up

pytestmark = pytest.mark.e2e

HERE = Path(__file__).resolve().parent
ARTIFACTS = HERE.parent.parent / "test-artifacts"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--mute-audio")

A_DEBIT = "6221260000000018"    # BANKA
A_LOST = "6221260000000042"     # BANKA, lost: 41
B_DEBIT = "6228480000000015"    # BANKB
PANS = (A_DEBIT, A_LOST, B_DEBIT)

MAX_TXNS = 4000                 # the traffic stops by itself: at most this many
MAX_SECONDS = 180.0             # ...or after this long


class Traffic(threading.Thread):
    """Purchases from one terminal, a few dozen a second, until stopped (bounded)."""

    def __init__(self, run) -> None:
        super().__init__(daemon=True)
        self.run_ = run
        self.stop_ = threading.Event()
        self.sent = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        d = Driver(self.run_)
        end = time.monotonic() + MAX_SECONDS
        try:
            while not self.stop_.is_set() and self.sent < MAX_TXNS and time.monotonic() < end:
                pan = (A_DEBIT, B_DEBIT, A_DEBIT, A_LOST)[self.sent % 4]
                d.ask(d.fin("POS00002", PURCHASE, pan, 100))
                self.sent += 1
                self.stop_.wait(0.03)
        except BaseException as e:      # reported by the test
            self.error = e
        finally:
            d.close()


def chrome(path: str, profile: Path, *args: str, timeout: float = 90.0) -> subprocess.CompletedProcess:
    profile.mkdir(parents=True, exist_ok=True)
    cmd = [path, *FLAGS, f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def dump(path: str, profile: Path, url: str) -> str:
    done = chrome(path, profile, "--virtual-time-budget=4000", "--dump-dom", url)
    assert done.returncode == 0, f"chromium failed ({done.returncode}): {done.stderr[-2000:]}"
    return done.stdout


def figure(dom: str, element_id: str) -> str:
    m = re.search(rf'id="{element_id}"[^>]*>([^<]*)<', dom)
    assert m, f"no element #{element_id} in the page"
    return html.unescape(m.group(1)).strip()


def number(text: str) -> float:
    assert re.fullmatch(r"[\d,]+(\.\d+)?", text), f"{text!r} is not a figure: the page's script did not run"
    return float(text.replace(",", ""))


@pytest.fixture
def switch_with_admin(tmp_path):
    """(admin base URL, the network's Running handle) for a switch carrying no traffic yet."""
    parts = start_up(default_test_network(tmp_path / "var"), tmp_path, args=("--only", "hsm,banks"))
    log = open(tmp_path / "switch.stderr.log", "wb")
    proc = subprocess.Popen([sys.executable, str(HERE / "serve_admin.py"), str(parts.netfile)],
                            stdout=subprocess.PIPE, stderr=log, text=True, cwd=tmp_path)
    try:
        line = proc.stdout.readline()           # `ready <port>`, or EOF if it died
        if not line.startswith("ready "):
            proc.wait(10)
            pytest.fail(f"the switch did not start: {(tmp_path / 'switch.stderr.log').read_text()[-3000:]}")
        yield f"http://127.0.0.1:{int(line.split()[1])}", parts
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        assert parts.stop() == 0


@pytest.mark.timeout(1500)     # the first run on a fresh machine installs Chromium
def test_dashboard_shows_live_traffic(chromium, switch_with_admin, tmp_path):
    base, parts = switch_with_admin
    traffic = Traffic(parts)
    traffic.start()
    try:
        deadline = time.monotonic() + 30
        while traffic.sent < 20 and traffic.error is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert traffic.error is None, f"traffic failed: {traffic.error!r}"
        assert traffic.sent >= 20, "no traffic flowed"

        first = dump(chromium, tmp_path / "profile1", base + "/")
        time.sleep(2.0)
        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "dashboard.png"
        shot.unlink(missing_ok=True)
        done = chrome(chromium, tmp_path / "profile2", "--virtual-time-budget=4000", "--window-size=1280,900",
                      f"--screenshot={shot}", base + "/")
        assert done.returncode == 0 and shot.exists() and shot.stat().st_size > 10_000, done.stderr[-2000:]
        second = dump(chromium, tmp_path / "profile3", base + "/")
    finally:
        traffic.stop_.set()
        traffic.join(30)
    assert traffic.error is None, f"traffic failed: {traffic.error!r}"

    for dom in (first, second):
        assert 'data-state="live"' in dom, "the page never reached the API"
        assert figure(dom, "acceptor") == "up" and figure(dom, "journal") == "up"
    total1, total2 = number(figure(first, "total")), number(figure(second, "total"))
    assert 0 < total1 < total2 <= traffic.sent, (total1, total2, traffic.sent)
    assert number(figure(second, "rate")) > 0
    assert figure(second, "p50").endswith(" ms") and figure(second, "p99").endswith(" ms")
    assert re.search(r"\d+\.\d %", figure(second, "approval"))
    assert "not sufficient funds" not in second            # only what happened is listed...
    assert "approved" in second and "lost card" in second  # ...with the codes' names
    for bank in ("BANKA", "BANKB", "BANKC"):
        assert f"<b>{bank}</b>" in second
    assert "622126******0018" in second and "622848******0015" in second
    for pan in PANS:
        assert pan not in first and pan not in second, "a full PAN reached the page"
