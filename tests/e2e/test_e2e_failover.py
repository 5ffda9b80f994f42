"""End to end: a bank with two hosts, and two switch processes sharing Redis.

The network runs as separate `cardswitch up --only ...` processes so that each
part can be stopped on its own: the HSM; Bank B's primary host (the usual
simulated banks); Bank B's secondary host, a second bank simulator for the
same bank id with a data directory of its own (two simulator hosts cannot
share one ledger, so each keeps its own balances: which host answered shows in
the balance it reports); and the switch, which lists both hosts for Bank B.

1. Traffic goes to the primary.
2. The primary stops: requests keep being approved, by the secondary.
3. The primary comes back: traffic returns to it.

Then: a duplicate sent to a second switch process that shares Redis with the
first is caught (94): the pipeline claims each request's key with the
DuplicateGuard (switch/dedupe.py) before anything reaches an issuer.
"""

from __future__ import annotations

import sys
import time
import uuid
from dataclasses import replace
from pathlib import Path

import pytest

from cardswitch.config import Endpoint, Network, StandIn
from cardswitch.netfile import default_journal, free_ports

from e2e_support import BALANCE, PURCHASE, Driver, Stans, balances, default_test_network

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # tests/: services.py
from services import require_redis  # noqa: E402

pytestmark = pytest.mark.e2e

BANK = "BANKB"
B_DEBIT = "6228480000000015"          # Bank B's rich debit card (balance 1,000,000.00)
B_DEBIT_BALANCE = 100_000_000
TID = "POS00012"
SWITCH_OVER_S = 30.0                  # a host change must show within this (probe interval 5 s)


def with_bank(net: Network, bank_id: str, **changes) -> Network:
    return replace(net, banks=tuple(replace(b, **changes) if b.id == bank_id else b for b in net.banks))


def with_data_dir(net: Network, data_dir: Path) -> Network:
    sw = replace(net.switch, data_dir=str(data_dir), journal=default_journal(str(data_dir)))
    return replace(net, switch=sw)


@pytest.fixture(scope="module")
def topology(workdir):
    """(network of the switch and the primary, network of the secondary simulator)."""
    net = default_test_network(workdir / "var")
    primary = net.bank(BANK).host
    (secondary_port,) = free_ports(1)
    secondary = Endpoint(primary.host, secondary_port)
    # No stand-in for Bank B here: every answer must come from one of its hosts.
    net = with_bank(net, BANK, hosts=(primary, secondary), stand_in=StandIn())
    # The secondary simulator: the same bank on the secondary port, its own ledger;
    # the other banks are not simulated by that process.
    net2 = replace(net, banks=tuple(replace(b, hosts=(secondary,)) if b.id == BANK else replace(b, simulate=False)
                                    for b in net.banks))
    net2 = with_data_dir(net2, workdir / "var-secondary")
    return net, net2


@pytest.fixture(scope="module")
def parts(launch, workdir, topology):
    net, net2 = topology
    p = {
        "hsm": launch(net, workdir / "hsm", args=("--only", "hsm")),
        "primary": launch(net, workdir / "primary", args=("--only", "banks")),
        "secondary": launch(net2, workdir / "secondary", args=("--only", "banks")),
        "switch": launch(net, workdir / "switch", args=("--only", "switch")),
    }
    yield p
    for name in ("switch", "secondary", "primary", "hsm"):
        run = p[name]
        if run.proc.poll() is None:
            assert run.stop() == 0, f"`cardswitch up --only` ({name}) did not exit 0"


@pytest.fixture(scope="module")
def d(parts):
    drv = Driver(parts["switch"], Stans(start=uuid.uuid4().int % 500_000))
    yield drv
    drv.close()


def balance_until(d: Driver, wanted: int | None, timeout: float = SWITCH_OVER_S) -> list[str]:
    """Balance inquiries until one is approved with available balance ``wanted``
    (None: any); every answer's (39, available) on the way, for the failure message."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        resp = d.ask(d.fin(TID, BALANCE, B_DEBIT, None, batch=99))
        if resp["39"] == "00":
            available = d_available(resp)
            seen.append(f"00:{available}")
            if wanted is None or available == wanted:
                return seen
        else:
            seen.append(resp["39"])
        time.sleep(0.1)
    raise AssertionError(f"no answer with available balance {wanted} within {timeout:.0f}s: {seen[-20:]}")


def d_available(resp: dict) -> int:
    return balances(resp)[1]


def purchase_until_approved(d: Driver, amount: int, timeout: float = SWITCH_OVER_S) -> dict:
    """A purchase, resent with a new STAN while the link is between hosts (91)."""
    deadline = time.monotonic() + timeout
    codes = []
    while time.monotonic() < deadline:
        resp = d.ask(d.fin(TID, PURCHASE, B_DEBIT, amount))
        codes.append(resp["39"])
        if resp["39"] == "00":
            return resp
        assert resp["39"] == "91", f"purchase declined {resp['39']} (codes so far {codes})"
        time.sleep(0.1)
    raise AssertionError(f"no approval within {timeout:.0f}s: {codes}")


def test_traffic_goes_to_the_primary_then_the_secondary_then_back(parts, d, workdir, launch, topology):
    net, _ = topology
    # 1. Both hosts up: the primary answers.
    balance_until(d, B_DEBIT_BALANCE, timeout=10)
    d.ask(d.fin(TID, PURCHASE, B_DEBIT, 100), "00")
    balance_until(d, B_DEBIT_BALANCE - 100, timeout=10)          # the primary's ledger

    # 2. The primary goes away: requests are approved by the secondary.
    assert parts["primary"].stop() == 0
    seen = balance_until(d, B_DEBIT_BALANCE)                      # the secondary's (fresh) ledger
    assert all(s == "91" or s.startswith("00:") for s in seen), seen
    purchase_until_approved(d, 200)
    balance_until(d, B_DEBIT_BALANCE - 200, timeout=10)           # spent at the secondary
    for _ in range(5):
        d.ask(d.fin(TID, PURCHASE, B_DEBIT, 1), "00")              # and it keeps serving
    balance_until(d, B_DEBIT_BALANCE - 205, timeout=10)

    # 3. The primary is back (its ledger persisted): traffic returns to it.
    parts["primary"] = launch(net, workdir / "primary", name="up2", args=("--only", "banks"))
    seen = balance_until(d, B_DEBIT_BALANCE - 100)
    assert all(s in ("00:%d" % (B_DEBIT_BALANCE - 205), "00:%d" % (B_DEBIT_BALANCE - 100), "91")
               for s in seen), seen
    d.ask(d.fin(TID, PURCHASE, B_DEBIT, 300), "00")
    balance_until(d, B_DEBIT_BALANCE - 400, timeout=10)           # the primary's ledger again
    logs = parts["switch"].logs()
    assert "new requests go to" in logs and "(primary)" in logs


# -- two switch processes sharing Redis ------------------------------------------------------

@pytest.fixture(scope="module")
def second_switch(parts, launch, workdir, topology):
    """A second switch process on the same network (its own port and data
    directory); both switches use Redis."""
    redis_url = require_redis().url
    net, _ = topology
    (port, admin) = free_ports(2)
    first_net = parts["switch"].net
    sw2 = replace(first_net.switch, listen=Endpoint("127.0.0.1", port), admin=Endpoint("127.0.0.1", admin),
                  redis=redis_url)
    net2 = with_data_dir(replace(first_net, switch=sw2), workdir / "var-switch2")
    # The first switch again, now with Redis (restarted on its own data directory).
    assert parts["switch"].stop() == 0
    net1 = replace(first_net, switch=replace(first_net.switch, redis=redis_url))
    parts["switch"] = launch(net1, workdir / "switch", name="up-redis", args=("--only", "switch"))
    s2 = launch(net2, workdir / "switch2", args=("--only", "switch"))
    for run in (parts["switch"], s2):
        wait_serving(run)
    yield parts["switch"], s2
    assert s2.stop() == 0


def wait_serving(run, timeout: float = SWITCH_OVER_S) -> None:
    """Until the switch approves a balance inquiry at Bank B (its links are up)."""
    drv = Driver(run, Stans(start=uuid.uuid4().int % 900_000))
    try:
        balance_until(drv, None, timeout)
    finally:
        drv.close()


@pytest.mark.services
def test_a_duplicate_sent_to_another_switch_process_is_caught(second_switch):
    s1, s2 = second_switch
    d1 = Driver(s1, Stans(start=uuid.uuid4().int % 500_000 + 500_000))
    d2 = Driver(s2)
    try:
        req = d1.fin(TID, PURCHASE, B_DEBIT, 7)
        d1.ask(dict(req), "00")
        # The terminal's resend reaches the other switch process (a load balancer's choice).
        resp = d2.ask(dict(req))
        assert resp["39"] == "94", f"the duplicate was answered {resp['39']}"
        # A different request on the second process is served normally.
        d2.ask(d2.fin(TID, BALANCE, B_DEBIT, None, batch=99, stan="%06d" % (int(req["11"]) + 1)), "00")
    finally:
        d1.close()
        d2.close()


@pytest.mark.services
def test_the_second_switch_process_serves(second_switch):
    """The two-process topology itself works: each process serves its own terminals."""
    s1, s2 = second_switch
    for run in (s1, s2):
        drv = Driver(run, Stans(start=uuid.uuid4().int % 900_000))
        try:
            drv.ask(drv.fin(TID, BALANCE, B_DEBIT, None, batch=99), "00")
            drv.ask(drv.fin(TID, PURCHASE, B_DEBIT, 1), "00")
        finally:
            drv.close()
