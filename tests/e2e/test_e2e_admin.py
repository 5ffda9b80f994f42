"""End to end: the admin HTTP server of a switch that carries real traffic.

`cardswitch up --only hsm,banks` starts the HSM and bank simulators; the
switch itself runs in this process (``SwitchApp``) so that its admin server
can be attached here as long as ``SwitchApp`` does not start one itself
(when it does, that one is used). Terminals talk ISO 8583 over TCP with
pyiso8583 (e2e_support); the admin API is read over HTTP with urllib.
"""

from __future__ import annotations

import asyncio
import json
import re
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import pytest

from e2e_support import PURCHASE, Driver, Running, default_test_network

from cardswitch.switch.admin import TOKEN_FILE, AdminServer
from cardswitch.switch.app import SwitchApp
from cardswitch.switch.metrics import SwitchMetrics

pytestmark = pytest.mark.e2e

A_DEBIT = "6221260000000018"    # BANKA, rich
A_LOST = "6221260000000042"     # BANKA, reported lost: 41
B_DEBIT = "6228480000000015"    # BANKB, rich
ISSUER = {A_DEBIT: "BANKA", A_LOST: "BANKA", B_DEBIT: "BANKB"}


@pytest.fixture(scope="module")
def parts(launch, workdir) -> Running:
    run = launch(default_test_network(workdir / "var"), workdir, args=("--only", "hsm,banks"))
    yield run
    assert run.stop() == 0


# -- helpers -----------------------------------------------------------------------------


async def attach_admin(app: SwitchApp) -> tuple[SwitchMetrics, AdminServer, bool]:
    """The switch's own metrics and admin server when it has them; else wired here."""
    metrics = getattr(app, "metrics", None)
    if metrics is None:
        metrics = SwitchMetrics()
        metrics.attach(app)
        app.pipeline.stats = metrics
    admin = getattr(app, "admin", None)
    if admin is not None:
        return metrics, admin, False
    admin = AdminServer(app, metrics)
    await admin.start()
    return metrics, admin, True


def http(method: str, url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, method=method, headers=headers or {}, data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(req, timeout=15) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


async def get_json(url: str) -> tuple[int, dict]:
    status, body = await asyncio.to_thread(http, "GET", url)
    return status, json.loads(body)


def transaction_counts(metrics_text: str) -> Counter:
    """cardswitch_transactions_total by (mti, txn_type, issuer, rc), parsed from the text format."""
    out: Counter = Counter()
    for m in re.finditer(r'^cardswitch_transactions_total\{([^}]*)\} ([0-9.e+]+)$', metrics_text, re.M):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        out[(labels["mti"], labels["txn_type"], labels["issuer"], labels["rc"])] += float(m.group(2))
    return out


def sample(metrics_text: str, name: str) -> float | None:
    m = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", metrics_text, re.M)
    return float(m.group(1)) if m else None


# -- the test ------------------------------------------------------------------------------


def test_admin_server_of_a_switch_carrying_traffic(parts: Running):
    asyncio.run(scenario(parts))


async def scenario(parts: Running) -> None:
    app = SwitchApp(parts.net)
    await app.start()
    try:
        metrics, admin, own = await attach_admin(app)
        base = f"http://{admin.endpoint.host}:{admin.port}"
        await check_admin(parts, app, base)
    finally:
        if own:
            await admin.stop()
        await app.stop()


async def check_admin(parts: Running, app: SwitchApp, base: str) -> None:
    # Healthy: accepting, journal writing, every bank signed on.
    status, health = await get_json(base + "/healthz")
    assert status == 200, health
    assert health["status"] == "ok" and health["acceptor"] == "up" and health["journal"] == "up"
    assert health["hsm"] == "up"
    assert health["banks"] == {b.id: "online" for b in parts.net.banks}

    status, text = await asyncio.to_thread(http, "GET", base + "/metrics")
    assert status == 200
    before = transaction_counts(text.decode())

    # Traffic as terminals send it: approvals at two issuers and a decline.
    def drive() -> list[tuple[str, dict]]:
        d = Driver(parts)
        try:
            sent = []
            for pan, amount in [(A_DEBIT, 100), (A_DEBIT, 200), (B_DEBIT, 300), (A_LOST, 400), (A_DEBIT, 500)]:
                sent.append((pan, d.ask(d.fin("POS00002", PURCHASE, pan, amount))))
            return sent
        finally:
            d.close()

    answered = await asyncio.to_thread(drive)
    codes = [resp["39"] for _, resp in answered]
    assert codes == ["00", "00", "00", "41", "00"]

    status, text = await asyncio.to_thread(http, "GET", base + "/metrics")
    metrics_text = text.decode()
    after = transaction_counts(metrics_text)
    expected = Counter(("0200", PURCHASE, ISSUER[pan], resp["39"]) for pan, resp in answered)
    assert after - before == expected
    assert (sample(metrics_text, "cardswitch_transaction_latency_seconds_count") or 0) >= 5
    assert (sample(metrics_text, "cardswitch_journal_write_latency_seconds_count") or 0) > 0
    assert sample(metrics_text, "cardswitch_terminal_connections") is not None
    for bank in parts.net.banks:
        assert f'cardswitch_issuer_link_up{{issuer="{bank.id}"}} 1.0' in metrics_text
        assert f'cardswitch_saf_queue_depth{{issuer="{bank.id}"}}' in metrics_text
    assert "cardswitch_hsm_available 1.0" in metrics_text

    # The dashboard's figures: the last transactions, masked; the mix; the links.
    status, body = await get_json(base + "/api/transactions?limit=5")
    assert status == 200
    recent = body["transactions"]
    assert [t["rc"] for t in recent] == list(reversed(codes))
    assert [t["pan"] for t in recent] == [p[:6] + "******" + p[-4:] for p, _ in reversed(answered)]
    raw = json.dumps(body)
    for pan in ISSUER:
        assert pan not in raw

    status, stats = await get_json(base + "/api/stats")
    mix = {m["rc"]: m["count"] for m in stats["mix"]}
    assert mix.get("00", 0) >= 4 and mix.get("41", 0) >= 1
    assert stats["total"] >= 5 and stats["latency_ms"]["p50"] is not None
    assert stats["business_date"] == health["business_date"]

    status, links = await get_json(base + "/api/links")
    by_bank = {x["bank_id"]: x for x in links["links"]}
    assert by_bank["BANKA"]["online"] and by_bank["BANKA"]["stats"]["requests"] >= 4
    assert by_bank["BANKB"]["stats"]["requests"] >= 1

    status, queue = await get_json(base + "/api/queue")
    assert status == 200 and set(queue["banks"]) == {b.id for b in parts.net.banks}

    status, page = await asyncio.to_thread(http, "GET", base + "/")
    assert status == 200 and b"cardswitch" in page

    # Cutover: refused without the token, done with it.
    status, _ = await asyncio.to_thread(http, "POST", base + "/api/cutover")
    assert status == 401
    status, _ = await asyncio.to_thread(http, "POST", base + "/api/cutover", {"Authorization": "Bearer wrong"})
    assert status == 401
    token = getattr(parts.net.switch, "admin_token", "") or \
        (Path(parts.net.switch.data_dir) / TOKEN_FILE).read_text().strip()
    status, body = await asyncio.to_thread(http, "POST", base + "/api/cutover",
                                           {"Authorization": f"Bearer {token}"})
    assert status == 200, body
    moved = json.loads(body)
    assert moved["previous"] == health["business_date"] and moved["business_date"] > moved["previous"]
    status, health = await get_json(base + "/healthz")
    assert status == 200 and health["business_date"] == moved["business_date"]

    # Not accepting any more: 503, naming the acceptor.
    await app.acceptor.stop(1.0)
    status, health = await get_json(base + "/healthz")
    assert status == 503 and health["acceptor"].startswith("down") and health["journal"] == "up"
