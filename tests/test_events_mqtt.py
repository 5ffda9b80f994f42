"""Events through a real Mosquitto: a subscriber sees every event on its topic;
a broker that stops and comes back changes nothing for the caller.

The shared broker (127.0.0.1:1883, see tests/services.py) serves the first
test, on topics unique to the run; the restart test runs a Mosquitto of its
own on a free port. Without Mosquitto both skip, unless CI=true (then fail).
"""

from __future__ import annotations

import asyncio
import getpass
import os
import secrets
import shutil
import socket
import subprocess
from pathlib import Path
from types import SimpleNamespace

import aiomqtt
import orjson
import pytest

from services import in_ci, require_mqtt

from cardswitch.logs import trace_scope
from cardswitch.switch.backoff import Backoff
from cardswitch.switch.events import EventPublisher, parse_broker_url
from cardswitch.switch.records import Kind, Status, TxnRecord

pytestmark = pytest.mark.services

PAN = "6221260000000018"
TO_PAN = "6222000000000016"
SAFETY_S = 15.0          # only a guard against hanging: nothing here is timed


def record(i: int, merchant: str, issuer: str, **kw) -> TxnRecord:
    base = dict(id=i, business_date="2026-11-28", received_at="2026-11-28T01:02:03.000004Z",
                mti="0200", proc="000000", kind=Kind.PURCHASE, amount=100 * i, currency="156",
                terminal_id="POS00001", merchant_id=merchant, stan=f"{i:06d}",
                transmitted="1128010203", batch="000001", pan_masked="622126******0018",
                pan_token="ab" * 16, acquirer_id="BANKA", issuer_id=issuer, rrn=f"63320100{i:04d}",
                status=Status.APPROVED, response_code="00", auth_code=f"A{i:05d}",
                completed_at="2026-11-28T01:02:03.004000Z", latency_us=4000)
    base.update(kw)
    return TxnRecord(**base)


def txn(rec: TxnRecord) -> SimpleNamespace:
    return SimpleNamespace(record=rec, kind=rec.kind, original=None)


async def collect(client: aiomqtt.Client, into: list, until) -> None:
    async for m in client.messages:
        into.append((str(m.topic), bytes(m.payload)))
        if until():
            return


# -- on the shared broker ---------------------------------------------------------------


def test_subscriber_gets_every_event_on_the_right_topic():
    addr = parse_broker_url(require_mqtt())
    uid = secrets.token_hex(4)
    merchant, issuer_a, issuer_b, alert = f"M{uid}", f"IA{uid}", f"IB{uid}", f"test{uid}"
    n = 40

    # Every 4th declined, every 4th a refund, every 4th a transfer A -> B.
    recs: list[tuple[TxnRecord, str]] = []
    for i in range(1, n + 1):
        if i % 4 == 1:
            recs.append((record(i, merchant, issuer_a, status=Status.DECLINED, response_code="51",
                                auth_code=""), "51"))
        elif i % 4 == 2:
            recs.append((record(i, merchant, issuer_a, kind=Kind.REFUND, proc="200000"), "00"))
        elif i % 4 == 3:
            recs.append((record(i, merchant, issuer_a, kind=Kind.TRANSFER, proc="400000",
                                to_issuer_id=issuer_b, to_pan_masked="622200******0016",
                                to_pan_token="cd" * 16), "00"))
        else:
            recs.append((record(i, merchant, issuer_a), "00"))
    want_txn = n
    want_notify_a = sum(1 for r, rc in recs if rc == "00")
    want_notify_b = sum(1 for r, rc in recs if r.kind == Kind.TRANSFER)
    want_total = want_txn + want_notify_a + want_notify_b + 2

    async def main():
        got: list[tuple[str, bytes]] = []
        async with aiomqtt.Client(addr.host, addr.port, identifier=f"sub-{uid}") as sub:
            await sub.subscribe([(f"cardswitch/txn/{merchant}", 1), (f"cardswitch/notify/{issuer_a}", 1),
                                 (f"cardswitch/notify/{issuer_b}", 1), (f"cardswitch/alert/{alert}", 1)])
            pub = EventPublisher(str(addr), merchant_names={merchant: "Test Shop"})
            await pub.start()
            try:
                assert await pub.wait_connected(SAFETY_S)
                traces = {}
                for rec, rc in recs:
                    with trace_scope() as tid:
                        traces[rec.id] = tid
                        pub.count(txn(rec), rc)
                pub.publish_alert(alert, {"bank": issuer_a, "depth": 12})
                pub.link_state(issuer_a, "offline")             # a link alert (its own topic)
                pub.publish_alert(alert, {"bank": issuer_a, "depth": 0})
                await asyncio.wait_for(collect(sub, got, lambda: len(got) >= want_total), SAFETY_S)
                assert await pub.wait_idle(SAFETY_S)
            finally:
                await pub.stop()
        return got, traces, pub

    got, traces, pub = asyncio.run(main())
    assert pub.published == want_total + 1 and pub.dropped == 0 and pub.failed == 0
    for _, payload in got:
        assert PAN.encode() not in payload and TO_PAN.encode() not in payload

    by_topic: dict[str, list[dict]] = {}
    for topic, payload in got:
        by_topic.setdefault(topic, []).append(orjson.loads(payload))
    txns = by_topic[f"cardswitch/txn/{merchant}"]
    assert sorted(e["id"] for e in txns) == list(range(1, n + 1))
    for e in txns:
        rec, rc = recs[e["id"] - 1]
        assert e["event"] == "txn" and e["trace"] == traces[rec.id]
        assert (e["amount"], e["currency"], e["kind"], e["response_code"]) == (rec.amount, "156", rec.kind, rc)
        assert (e["pan_masked"], e["pan_token"], e["rrn"], e["auth_code"]) == \
            ("622126******0018", "ab" * 16, rec.rrn, rec.auth_code)
        assert (e["merchant_id"], e["terminal_id"], e["issuer_id"]) == (merchant, "POS00001", issuer_a)
        assert e["received_at"] and e["completed_at"]

    notify_a = by_topic[f"cardswitch/notify/{issuer_a}"]
    assert sorted(e["id"] for e in notify_a) == sorted(r.id for r, rc in recs if rc == "00")
    for e in notify_a:
        rec = recs[e["id"] - 1][0]
        assert e["direction"] == ("credit" if rec.kind == Kind.REFUND else "debit")
        assert (e["amount"], e["currency"], e["pan_masked"], e["pan_token"]) == \
            (rec.amount, "156", "622126******0018", "ab" * 16)
        assert (e["merchant_id"], e["merchant_name"]) == (merchant, "Test Shop")
        assert e["at"] == rec.completed_at
    notify_b = by_topic[f"cardswitch/notify/{issuer_b}"]
    assert sorted(e["id"] for e in notify_b) == [r.id for r, _ in recs if r.kind == Kind.TRANSFER]
    assert {(e["direction"], e["pan_masked"]) for e in notify_b} == {("credit", "622200******0016")}

    alerts = by_topic[f"cardswitch/alert/{alert}"]
    assert [a["depth"] for a in alerts] == [12, 0] and all(a["kind"] == alert for a in alerts)


# -- a broker of our own that goes away and comes back ----------------------------------


def _need_mosquitto() -> str:
    exe = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None)
    if exe is None:
        reason = "mosquitto not installed (apt-get install mosquitto)"
        if in_ci():
            pytest.fail(f"CI=true: {reason}", pytrace=False)
        pytest.skip(reason)
    return exe


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Broker:
    """``mosquitto -c conf`` on a free port; the session store survives a stop
    (persistence), so a subscriber's session and queue outlive a restart."""

    def __init__(self, exe: str, tmp: Path) -> None:
        self.exe = exe
        self.port = _free_port()
        self.conf = tmp / "mosquitto.conf"
        self.conf.write_text(
            # mosquitto started as root drops to user "mosquitto", which could not
            # write here; naming ourselves keeps it as is (no effect when not root).
            f"user {getpass.getuser()}\n"
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\n"
            f"persistence true\npersistence_location {tmp}/\nqueue_qos0_messages true\n"
            f"log_dest file {tmp}/mosquitto.log\n")
        self.proc: subprocess.Popen | None = None

    async def start(self) -> None:
        self.proc = subprocess.Popen([self.exe, "-c", str(self.conf)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        loop = asyncio.get_running_loop()
        end = loop.time() + SAFETY_S
        while loop.time() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited with {self.proc.returncode}")
            try:
                _, w = await asyncio.open_connection("127.0.0.1", self.port)
                w.close()
                return
            except OSError:
                await asyncio.sleep(0.02)
        raise RuntimeError("mosquitto did not start listening")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()                 # SIGTERM: mosquitto saves its sessions and exits
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


async def until(cond, what: str) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + SAFETY_S
    while not cond():
        if loop.time() > end:
            raise AssertionError(f"never happened: {what}")
        await asyncio.sleep(0.01)


def test_broker_stops_and_returns_nothing_changes_for_the_caller(tmp_path):
    broker = Broker(_need_mosquitto(), tmp_path)
    uid = secrets.token_hex(4)
    buffer = 20

    async def subscriber(received: list, want, ready: asyncio.Event | None = None) -> None:
        # A persistent session: what is published while it is away waits for it.
        async with aiomqtt.Client("127.0.0.1", broker.port, identifier=f"sub-{uid}",
                                  clean_session=False) as sub:
            await sub.subscribe("cardswitch/#", qos=1)
            if ready is not None:
                ready.set()
            await collect(sub, received, lambda: want(received))

    async def main():
        await broker.start()
        pub = EventPublisher(f"mqtt://127.0.0.1:{broker.port}", buffer=buffer,
                             backoff=Backoff(initial=0.02, maximum=0.2))
        try:
            # Up: events flow.
            before: list = []
            ready = asyncio.Event()
            sub_task = asyncio.create_task(subscriber(before, lambda r: len(r) >= 6, ready))
            await asyncio.wait_for(ready.wait(), SAFETY_S)
            await pub.start()
            assert await pub.wait_connected(SAFETY_S)
            for i in range(1, 6):
                pub.publish_txn(record(i, "M1", "BANKB"))
            pub.publish_alert("saf", {"bank": "BANKB", "depth": 1})
            await asyncio.wait_for(sub_task, SAFETY_S)
            assert await pub.wait_idle(SAFETY_S)
            assert pub.published == 6

            # Down: the publisher notices; publishing stays a plain buffered call.
            broker.stop()
            await until(lambda: not pub.connected, "publisher saw the broker go")
            for k in range(1, 51):
                pub.publish_txn(record(5 + k, "M1", "BANKB"))     # ids 6..55
                assert pub.pending == min(k, buffer)
                assert pub.dropped == max(0, k - buffer)
            pub.publish_alert("saf", {"bank": "BANKB", "depth": 2})  # pushes out id 36
            assert pub.pending == buffer and pub.dropped == 31
            failures = pub.connect_failures
            await until(lambda: pub.connect_failures >= failures + 2, "reconnect attempts")
            assert pub.pending == buffer and not pub.connected and pub.published == 6

            # Back: it reconnects and sends what it kept, oldest first; the
            # subscriber's session kept it for it.
            await broker.start()
            await until(lambda: pub.connected, "publisher reconnected")
            assert await pub.wait_idle(SAFETY_S)
            after: list = []
            await asyncio.wait_for(subscriber(after, lambda r: len(r) >= buffer), SAFETY_S)
            return pub, before, after
        finally:
            await pub.stop()
            broker.stop()

    pub, before, after = asyncio.run(main())
    ids_before = [orjson.loads(p).get("id") for t, p in before if t == "cardswitch/txn/M1"]
    assert ids_before == [1, 2, 3, 4, 5]
    assert ("cardswitch/alert/saf" in {t for t, _ in before})
    txn_after = [orjson.loads(p)["id"] for t, p in after if t == "cardswitch/txn/M1"]
    assert txn_after == list(range(37, 56))                      # the newest 19, in order
    alerts_after = [orjson.loads(p) for t, p in after if t == "cardswitch/alert/saf"]
    assert [a["depth"] for a in alerts_after] == [2]
    assert pub.published == 6 + buffer and pub.dropped == 31 and pub.connects == 2
    assert pub.failed == 0
