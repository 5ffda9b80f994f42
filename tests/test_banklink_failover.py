"""Bank links with several hosts: failover to a healthy host, probing the
primary back, draining what was sent to the host left behind.

The issuer hosts are the tiny pyiso8583 fake of ``test_banklink`` (one per
host); a host "goes away" by closing its listener and connections and
"comes back" by listening on the same port again.
"""

from __future__ import annotations

import asyncio

import pytest

from cardswitch.config import Endpoint
from cardswitch.switch.banklink import (
    HOST_ACTIVE, HOST_DRAINING, HOST_IDLE, ONLINE, HostStatus, LinkDown, LinkTimeout,
)
from test_banklink import FakeIssuer, fin_request, free_port, make_link, run

PROBE = 0.2     # probe interval of the tests' links, seconds


def failover_link(endpoints, **kw):
    kw.setdefault("probe_interval_s", PROBE)
    kw.setdefault("failure_threshold", 3)
    return make_link(endpoints, **kw)


async def until(pred, timeout: float = 5.0, what: str = "condition") -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not pred():
        if loop.time() > end:
            raise AssertionError(f"{what} not reached within {timeout} s")
        await asyncio.sleep(0.01)


def financial_count(issuer: FakeIssuer) -> int:
    return sum(1 for m in issuer.received if m["t"] == "0200")


def by_endpoint(link) -> dict[Endpoint, HostStatus]:
    return {h.endpoint: h for h in link.hosts()}


async def ask(link, n: int, timeout: float = 5.0) -> dict:
    return await link.request(fin_request(n, "%012d" % n), timeout)


def test_primary_first_failover_when_it_goes_and_back_when_it_returns():
    async def main():
        a = await FakeIssuer().start()
        b = await FakeIssuer().start()
        port_a = a.port
        link = failover_link([a.endpoint, b.endpoint])
        await link.start()
        assert await link.wait_online(5)
        assert link.endpoint == a.endpoint
        await ask(link, 1)
        assert financial_count(a) == 1 and financial_count(b) == 0
        hosts = link.hosts()
        assert [h.primary for h in hosts] == [True, False]
        assert [h.state for h in hosts] == [HOST_ACTIVE, HOST_IDLE]
        assert all(h.healthy for h in hosts)

        await a.stop()                                   # the primary goes
        await until(lambda: link.online and link.endpoint == b.endpoint, what="failover to B")
        assert (await ask(link, 2))["39"] == "00"
        assert financial_count(b) == 1
        st = by_endpoint(link)
        assert st[a.endpoint].state == HOST_IDLE and not st[a.endpoint].healthy
        assert st[b.endpoint].state == HOST_ACTIVE and st[b.endpoint].healthy
        assert link.stats.failovers == 1

        a2 = await FakeIssuer(port=port_a).start()      # the primary is back
        await until(lambda: link.endpoint == a.endpoint, what="return to the primary")
        assert link.online
        assert (await ask(link, 3))["39"] == "00"
        assert financial_count(a2) == 1 and financial_count(b) == 1
        await b.wait_for(lambda: b.netmgmt("002"))      # the secondary was signed off...
        await until(lambda: by_endpoint(link)[b.endpoint].state == HOST_IDLE, what="B closed")
        st = by_endpoint(link)
        assert st[a.endpoint].state == HOST_ACTIVE and st[a.endpoint].healthy
        assert link.stats.failovers == 2
        await link.stop()
        await a2.stop()
        await b.stop()
    run(main())


def test_requests_in_flight_on_the_secondary_survive_the_return_to_the_primary():
    async def main():
        port_a = free_port()
        b = await FakeIssuer().start()
        link = failover_link([Endpoint("127.0.0.1", port_a), b.endpoint])
        await link.start()
        assert await link.wait_online(5)
        assert link.endpoint == b.endpoint               # the primary is not there yet
        b.hold = True
        held = [asyncio.ensure_future(ask(link, 100 + i, timeout=10.0)) for i in range(5)]
        await b.wait_for(lambda: len(b.held) == 5)
        a = await FakeIssuer(port=port_a).start()
        await until(lambda: link.endpoint == a.endpoint, what="return to the primary")
        st = by_endpoint(link)
        assert st[b.endpoint].state == HOST_DRAINING and st[b.endpoint].in_flight == 5
        assert not any(t.done() for t in held)
        # New requests go to the primary while the secondary drains.
        assert (await ask(link, 7))["39"] == "00"
        assert financial_count(a) == 1
        assert not b.netmgmt("002")                      # not signed off while answers are due
        b.release()
        answers = await asyncio.gather(*held)
        assert [r["37"] for r in answers] == ["%012d" % (100 + i) for i in range(5)]
        assert all(r["39"] == "00" for r in answers)
        await b.wait_for(lambda: b.netmgmt("002"))
        await until(lambda: by_endpoint(link)[b.endpoint].state == HOST_IDLE, what="B closed")
        assert link.stats.timeouts == 0 and link.in_flight == 0
        await link.stop()
        await a.stop()
        await b.stop()
    run(main())


def test_timeouts_in_a_row_leave_a_host_that_signs_on_but_does_not_answer():
    async def main():
        a = await FakeIssuer().start()
        b = await FakeIssuer().start()
        late = []
        link = failover_link([a.endpoint, b.endpoint], probe_interval_s=30.0, on_late=late.append)
        await link.start()
        assert await link.wait_online(5)
        a.hold = True                                    # signed on, answers nothing more
        for i in range(3):
            with pytest.raises(LinkTimeout):
                await ask(link, 10 + i, timeout=0.05)
        st = by_endpoint(link)
        assert not st[a.endpoint].healthy and st[a.endpoint].timeouts == 3
        await until(lambda: link.online and link.endpoint == b.endpoint, what="failover to B")
        assert (await ask(link, 20))["39"] == "00"
        assert financial_count(b) == 1
        # Nothing was pending on A, so its connection was closed (no sign-off to a sick host).
        await until(lambda: by_endpoint(link)[a.endpoint].state == HOST_IDLE, what="A closed")
        assert not a.netmgmt("002")
        await link.stop()
        await a.stop()
        await b.stop()
    run(main())


def test_an_answer_between_timeouts_keeps_the_host():
    async def main():
        a = await FakeIssuer().start()
        b = await FakeIssuer().start()
        link = failover_link([a.endpoint, b.endpoint], probe_interval_s=30.0)
        await link.start()
        assert await link.wait_online(5)
        for round_ in range(3):
            a.hold = True
            for i in range(2):
                with pytest.raises(LinkTimeout):
                    await ask(link, 100 * round_ + i, timeout=0.05)
            a.hold = False
            a.held.clear()
            assert (await ask(link, 100 * round_ + 50))["39"] == "00"
        assert link.endpoint == a.endpoint and link.stats.failovers == 0
        assert by_endpoint(link)[a.endpoint].healthy
        assert financial_count(b) == 0
        await link.stop()
        await a.stop()
        await b.stop()
    run(main())


def test_a_single_host_is_kept_through_timeouts():
    """Leaving the only host would not help: timeouts mark it, the link stays up."""
    async def main():
        a = await FakeIssuer().start()
        link = failover_link([a.endpoint])
        await link.start()
        assert await link.wait_online(5)
        a.hold = True
        for i in range(5):
            with pytest.raises(LinkTimeout):
                await ask(link, i, timeout=0.03)
        assert link.online and link.stats.connects == 1
        assert not link.hosts()[0].healthy
        a.hold = False
        assert (await ask(link, 9))["39"] == "00"
        assert link.hosts()[0].healthy                    # one answer makes it healthy again
        await link.stop()
        await a.stop()
    run(main())


def test_every_host_down_then_the_secondary_then_the_primary():
    async def main():
        port_a, port_b = free_port(), free_port()
        link = failover_link([Endpoint("127.0.0.1", port_a), Endpoint("127.0.0.1", port_b)])
        await link.start()
        assert not await link.wait_online(0.3)
        with pytest.raises(LinkDown):
            await ask(link, 1)
        assert all(not h.healthy for h in link.hosts())
        b = await FakeIssuer(port=port_b).start()
        assert await link.wait_online(5)
        assert link.endpoint == b.endpoint
        a = await FakeIssuer(port=port_a).start()
        await until(lambda: link.endpoint == a.endpoint, what="return to the primary")
        assert (await ask(link, 2))["39"] == "00" and financial_count(a) == 1
        await link.stop()
        await a.stop()
        await b.stop()
    run(main())


def test_a_primary_refusing_sign_on_is_probed_without_disturbing_the_secondary():
    async def main():
        a = await FakeIssuer(signon_rc="91").start()
        b = await FakeIssuer().start()
        states = []
        link = failover_link([a.endpoint, b.endpoint], on_state=lambda bank, s: states.append(s))
        await link.start()
        assert await link.wait_online(5)
        assert link.endpoint == b.endpoint
        online_since = len(states)
        await a.wait_for(lambda: len(a.netmgmt("001")) >= 3)  # probed again and again...
        for i in range(5):
            assert (await ask(link, i))["39"] == "00"
        assert states[online_since:] == []                    # ...while B served throughout
        assert link.endpoint == b.endpoint and not by_endpoint(link)[a.endpoint].healthy
        a.signon_rc = "00"
        await until(lambda: link.endpoint == a.endpoint, what="return to the primary")
        assert states[online_since:] == []                    # moved back without going offline
        await link.stop()
        await a.stop()
        await b.stop()
    run(main())


def test_stop_while_draining_closes_everything():
    async def main():
        port_a = free_port()
        b = await FakeIssuer().start()
        link = failover_link([Endpoint("127.0.0.1", port_a), b.endpoint])
        await link.start()
        assert await link.wait_online(5)
        b.hold = True
        task = asyncio.ensure_future(ask(link, 1, timeout=10.0))
        await b.wait_for(lambda: b.held)
        a = await FakeIssuer(port=port_a).start()
        await until(lambda: link.endpoint == a.endpoint, what="return to the primary")
        assert by_endpoint(link)[b.endpoint].state == HOST_DRAINING
        before = asyncio.all_tasks()
        await link.stop()
        with pytest.raises(LinkTimeout):
            await task
        assert all(h.state == HOST_IDLE for h in link.hosts())
        assert link.state != ONLINE
        assert not [t for t in asyncio.all_tasks() - before if not t.done()]
        await a.stop()
        await b.stop()
    run(main())


def test_timeouts_of_requests_whose_connection_dropped_do_not_count_against_the_host():
    """The connection to A drops with 3 requests unanswered, A takes the link
    back at once; those 3 then time out: that says nothing of A now."""
    async def main():
        a = await FakeIssuer().start()
        b = await FakeIssuer().start()
        link = failover_link([a.endpoint, b.endpoint])
        await link.start()
        assert await link.wait_online(5)
        a.hold = True
        pending = [asyncio.ensure_future(ask(link, i, timeout=0.5)) for i in range(3)]
        await a.wait_for(lambda: len(a.held) == 3)
        for w in a.writers:                              # A drops the connection, keeps listening
            w.close()
        a.hold = False
        await until(lambda: link.stats.sign_ons == 2, what="signed on again")
        for t in pending:
            with pytest.raises(LinkTimeout):
                await t
        st = by_endpoint(link)
        assert st[a.endpoint].healthy and st[a.endpoint].timeouts == 3
        assert link.endpoint == a.endpoint and link.stats.failovers == 0
        assert (await ask(link, 9))["39"] == "00" and financial_count(b) == 0
        await link.stop()
        await a.stop()
        await b.stop()
    run(main())
