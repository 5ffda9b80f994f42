"""The admin API without sockets: health, the JSON routes, the token, settlement files.

``AdminApi.handle`` is called with requests parsed by ``parse_head`` from
the bytes a client would send; the switch is a stub with the attributes
``SwitchApp`` has, or a real ``Journal`` where health depends on it.
"""

from __future__ import annotations

import asyncio
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import pytest

from cardswitch.switch.admin import (
    DASHBOARD_CSP, PROBE_KEY, TOKEN_FILE, AdminApi, Response, admin_token, health, parse_head,
    settlement_file,
)
from cardswitch.switch.banklink import LinkStats
from cardswitch.switch.journal import Journal
from cardswitch.switch.metrics import SwitchMetrics

TOKEN = "s3cret-token"


# -- a stub switch ---------------------------------------------------------------------


@dataclass
class StubLink:
    state: str = "online"
    in_flight: int = 0
    stats: LinkStats = field(default_factory=LinkStats)
    endpoint: str = "127.0.0.1:9101"

    @property
    def online(self) -> bool:
        return self.state == "online"


class StubServer:
    def __init__(self, serving: bool = True) -> None:
        self.serving = serving

    def is_serving(self) -> bool:
        return self.serving


class StubAcceptor:
    def __init__(self, serving: bool = True) -> None:
        self._server = StubServer(serving)
        self.in_flight = 0
        self.connections = 1


@dataclass
class StubHsm:
    available: bool = True
    in_flight: int = 0


class StubCtx:
    business_date = "2026-03-14"


class StubPipeline:
    ctx = StubCtx()


class StubJournal:
    def __init__(self, healthy: bool = True) -> None:
        self.healthy = healthy
        self.writer = None


class StubApp:
    def __init__(self) -> None:
        self.links = {"BANKA": StubLink(), "BANKB": StubLink()}
        self.acceptor = StubAcceptor()
        self.hsm = StubHsm()
        self.journal = StubJournal()
        self.pipeline = StubPipeline()


def make_api(app, tmp_path: Path, **kw) -> AdminApi:
    metrics = SwitchMetrics()
    metrics.attach(app)
    kw.setdefault("journal_probe_s", None)
    return AdminApi(app, metrics, token=TOKEN, data_dir=tmp_path, **kw)


def call(api: AdminApi, method: str, target: str, headers: dict[str, str] | None = None,
         body: bytes = b"") -> Response:
    lines = [f"{method} {target} HTTP/1.1", "Host: admin"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    req = parse_head(("\r\n".join(lines) + "\r\n\r\n").encode())
    req.body = body
    return asyncio.run(api.handle(req))


def body_of(resp: Response):
    return orjson.loads(resp.body)


# -- /healthz -------------------------------------------------------------------------------


def test_healthy_switch():
    status, body = health(StubApp())
    assert status == 200
    assert body == {"status": "ok", "acceptor": "up", "journal": "up", "hsm": "up",
                    "banks": {"BANKA": "online", "BANKB": "online"}, "business_date": "2026-03-14"}


def test_hsm_or_bank_down_is_reported_but_not_fatal():
    app = StubApp()
    app.hsm.available = False
    app.links["BANKB"].state = "offline"
    status, body = health(app)
    assert status == 200
    assert body["hsm"] == "down" and body["banks"]["BANKB"] == "offline"


def test_not_accepting_is_503():
    app = StubApp()
    app.acceptor._server.serving = False
    status, body = health(app)
    assert status == 503
    assert body["status"] == "down" and body["acceptor"] == "down: not listening"
    app.acceptor = None
    assert health(app)[1]["acceptor"] == "down: not started"


def test_an_acceptor_that_says_whether_it_listens_is_believed():
    app = StubApp()
    app.acceptor.listening = False
    assert health(app)[0] == 503


def test_journal_that_cannot_write_is_503_naming_the_error(tmp_path):
    journal = Journal.open("sqlite:///" + str(tmp_path / "j.db"), str(tmp_path))
    app = StubApp()
    app.journal = journal
    try:
        assert health(app)[0] == 200
        # The disk turns read-only under the writer (as SQLite sees it).
        journal.writer.call(lambda con: con.execute("PRAGMA query_only=1"))
        journal.set_state("x", "1")
        journal.flush()
        status, body = health(app)
        assert status == 503
        assert body["journal"].startswith("down: ") and "readonly" in body["journal"]
        assert body["acceptor"] == "up"
        # ...and back: the next successful commit heals it.
        journal.writer.call(lambda con: con.execute("PRAGMA query_only=0"))
        journal.set_state("x", "2")
        journal.flush()
        assert health(app)[0] == 200
    finally:
        journal.close()
    status, body = health(app)
    assert status == 503 and body["journal"].startswith("down: closed")


def test_healthz_probes_an_idle_journal(tmp_path):
    journal = Journal.open("sqlite:///" + str(tmp_path / "j.db"), str(tmp_path))
    app = StubApp()
    app.journal = journal
    api = make_api(app, tmp_path, journal_probe_s=0)
    try:
        resp = call(api, "GET", "/healthz")
        assert resp.status == 200
        assert journal.get_state(PROBE_KEY) is not None        # it really wrote
        journal.writer.call(lambda con: con.execute("PRAGMA query_only=1"))
        assert journal.healthy                                 # nothing has failed yet...
        resp = call(api, "GET", "/healthz")
        assert resp.status == 503                              # ...but the probe finds out
        assert "readonly" in body_of(resp)["journal"]
        journal.writer.call(lambda con: con.execute("PRAGMA query_only=0"))
        assert call(api, "GET", "/healthz").status == 200
    finally:
        journal.close()


def test_a_journal_in_use_is_not_probed(tmp_path):
    journal = Journal.open("sqlite:///" + str(tmp_path / "j.db"), str(tmp_path))
    app = StubApp()
    app.journal = journal
    api = make_api(app, tmp_path, journal_probe_s=3600)
    try:
        journal.set_state("busy", "1")
        journal.flush()
        assert call(api, "GET", "/healthz").status == 200
        assert journal.get_state(PROBE_KEY) is None
    finally:
        journal.close()


def test_healthz_route_answers_json(tmp_path):
    app = StubApp()
    api = make_api(app, tmp_path)
    resp = call(api, "GET", "/healthz")
    assert resp.status == 200 and resp.content_type == "application/json"
    assert body_of(resp)["status"] == "ok"
    app.journal.healthy = False
    resp = call(api, "GET", "/healthz")
    assert resp.status == 503 and body_of(resp)["journal"] == "down: closed"


# -- JSON API -------------------------------------------------------------------------------------


def test_links_queue_stats_transactions(tmp_path):
    app = StubApp()
    app.links["BANKB"].state = "connecting"
    app.links["BANKA"].stats.requests = 12
    api = make_api(app, tmp_path)
    links = body_of(call(api, "GET", "/api/links"))["links"]
    assert [(x["bank_id"], x["state"], x["online"]) for x in links] == \
        [("BANKA", "online", True), ("BANKB", "connecting", False)]
    assert links[0]["stats"]["requests"] == 12 and links[0]["endpoint"] == "127.0.0.1:9101"

    queue = body_of(call(api, "GET", "/api/queue"))
    assert queue == {"available": False, "banks": {"BANKA": 0, "BANKB": 0}, "total": 0}
    api.metrics.set_saf_source(lambda: {"BANKB": 3})
    queue = body_of(call(api, "GET", "/api/queue"))
    assert queue == {"available": True, "banks": {"BANKA": 0, "BANKB": 3}, "total": 3}

    stats = body_of(call(api, "GET", "/api/stats"))
    assert stats["business_date"] == "2026-03-14" and stats["connections"] == 1
    assert stats["journal"] == "up" and stats["hsm"] == "up" and len(stats["series"]) == 60

    assert body_of(call(api, "GET", "/api/transactions")) == {"transactions": []}
    for bad in ("0", "201", "abc", "-1", ""):
        assert call(api, "GET", f"/api/transactions?limit={bad}").status == 400
    assert call(api, "GET", "/api/transactions?limit=200").status == 200


def test_unknown_paths_and_methods(tmp_path):
    api = make_api(StubApp(), tmp_path)
    assert call(api, "GET", "/nope").status == 404
    assert call(api, "GET", "/api").status == 404
    resp = call(api, "DELETE", "/api/links")
    assert resp.status == 405 and ("Allow", "GET, HEAD") in resp.headers
    resp = call(api, "GET", "/api/cutover")
    assert resp.status == 405 and ("Allow", "POST") in resp.headers
    assert call(api, "POST", "/metrics").status == 405
    assert call(api, "HEAD", "/metrics").status == 200


def test_a_failing_handler_is_a_500_not_a_crash(tmp_path):
    app = StubApp()
    app.links = {"BANKA": object()}      # no state, no stats: the view copes
    api = make_api(app, tmp_path)
    assert call(api, "GET", "/api/links").status == 200

    class Exploding:
        @property
        def in_flight(self):
            raise RuntimeError("boom")

        connections = 0

    app.acceptor = Exploding()
    resp = call(api, "GET", "/api/stats")
    assert resp.status == 500 and body_of(resp) == {"error": "internal error (logged)"}


def test_dashboard_is_self_contained(tmp_path):
    resp = call(make_api(StubApp(), tmp_path), "GET", "/")
    assert resp.status == 200 and resp.content_type.startswith("text/html")
    assert ("Content-Security-Policy", DASHBOARD_CSP) in resp.headers
    page = resp.body.decode()
    assert "http://" not in page and "https://" not in page       # nothing fetched from elsewhere
    assert "<link" not in page and " src=" not in page
    for wanted in ("/api/stats", "/api/links", "/api/queue", "/api/transactions", "/api/settlement"):
        assert wanted in page
    for element in ('id="rate"', 'id="total"', 'id="p50"', 'id="p99"', 'id="mix"', 'id="links"',
                    'id="txns"', 'id="settlement"', 'id="spark-line"'):
        assert element in page


# -- the token and what it guards -------------------------------------------------------------------


class Cfg:
    def __init__(self, admin_token: str = "") -> None:
        self.admin_token = admin_token


def test_token_file_made_once_with_mode_0600(tmp_path):
    data = tmp_path / "var"
    token = admin_token(object(), data)           # no admin_token field in the config yet
    path = data / TOKEN_FILE
    assert len(token) >= 32
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert path.read_text().strip() == token
    assert admin_token(Cfg(""), data) == token    # the same one at the next start


def test_configured_token_wins(tmp_path):
    assert admin_token(Cfg("from-the-file"), tmp_path) == "from-the-file"
    assert not (tmp_path / TOKEN_FILE).exists()


def test_empty_token_file_is_refused(tmp_path):
    (tmp_path / TOKEN_FILE).write_text("\n")
    with pytest.raises(ValueError, match="admin.token is empty"):
        admin_token(Cfg(), tmp_path)


def test_cutover_needs_the_token(tmp_path):
    calls = []

    def on_cutover():
        calls.append(1)
        return "2026-03-14", "2026-03-15"

    api = make_api(StubApp(), tmp_path, on_cutover=on_cutover)
    resp = call(api, "POST", "/api/cutover")
    assert resp.status == 401 and ("WWW-Authenticate", 'Bearer realm="cardswitch"') in resp.headers
    for auth in ("Bearer wrong", f"Basic {TOKEN}", "Bearer", f"Bearer {TOKEN}x", TOKEN, "Bearer  "):
        assert call(api, "POST", "/api/cutover", {"Authorization": auth}).status == 401, auth
    assert calls == []
    resp = call(api, "POST", "/api/cutover", {"Authorization": f"Bearer {TOKEN}"})
    assert resp.status == 200
    assert body_of(resp) == {"previous": "2026-03-14", "business_date": "2026-03-15"}
    assert calls == [1]
    assert call(api, "POST", "/api/cutover", {"Authorization": f"bearer {TOKEN}"}).status == 200


def test_cutover_callback_may_be_async_and_defaults_to_the_cutover_service(tmp_path):
    async def on_cutover():
        return "a", "b"

    api = make_api(StubApp(), tmp_path, on_cutover=on_cutover)
    assert body_of(call(api, "POST", "/api/cutover", {"Authorization": f"Bearer {TOKEN}"})) == \
        {"previous": "a", "business_date": "b"}

    class Service:
        def cutover_now(self, by):
            assert by == "admin"
            return "2026-03-15"

    app = StubApp()
    app.cutover = Service()
    api = make_api(app, tmp_path)
    assert body_of(call(api, "POST", "/api/cutover", {"Authorization": f"Bearer {TOKEN}"})) == \
        {"previous": "2026-03-14", "business_date": "2026-03-15"}
    api = make_api(StubApp(), tmp_path)          # no cutover service at all
    assert call(api, "POST", "/api/cutover", {"Authorization": f"Bearer {TOKEN}"}).status == 503


# -- settlement reports -------------------------------------------------------------------------------


@pytest.fixture
def settled(tmp_path) -> Path:
    """A data_dir with two settlement runs and a secret next to them."""
    root = tmp_path / "settlement"
    for date in ("2026-03-13", "2026-03-14"):
        d = root / date
        d.mkdir(parents=True)
        (d / "report.html").write_text(f"<html>report {date}</html>")
        (d / "summary.json").write_text("{}")
        (d / "merchant_settlement.csv").write_text("merchant_id\n")
    (root / "2026-03-12").mkdir()                  # a run that wrote no report yet
    (root / "2026-03-12" / "summary.json").write_text("{}")
    (root / "notes").mkdir()                       # not a date: ignored
    (root / "2026-03-14" / ".hidden.html").write_text("x")
    (tmp_path / TOKEN_FILE).write_text(TOKEN)
    (tmp_path / "secret.html").write_text("SECRET")
    return tmp_path


def test_settlement_runs_listed_newest_first_with_links(settled):
    api = make_api(StubApp(), settled)
    runs = body_of(call(api, "GET", "/api/settlement"))["runs"]
    assert [r["date"] for r in runs] == ["2026-03-14", "2026-03-13", "2026-03-12"]
    assert runs[0]["report"] == "/api/settlement/2026-03-14/report.html"
    assert runs[2]["report"] is None
    assert [f["name"] for f in runs[0]["files"]] == ["merchant_settlement.csv", "report.html", "summary.json"]
    resp = call(api, "GET", runs[0]["report"])
    assert resp.status == 200 and resp.content_type.startswith("text/html")
    assert resp.file is not None and resp.file.read_text() == "<html>report 2026-03-14</html>"
    assert resp.file_size == len("<html>report 2026-03-14</html>")
    csv = call(api, "GET", "/api/settlement/2026-03-13/merchant_settlement.csv")
    assert csv.status == 200 and csv.content_type.startswith("text/csv")


def test_no_settlement_folder_yet(tmp_path):
    assert body_of(call(make_api(StubApp(), tmp_path), "GET", "/api/settlement")) == {"runs": []}


@pytest.mark.parametrize("target", [
    "/api/settlement/../secret.html",
    "/api/settlement/2026-03-14/../../secret.html",
    "/api/settlement/2026-03-14/..%2F..%2Fsecret.html",
    "/api/settlement/%2e%2e/secret.html",
    "/api/settlement/2026-03-14/%2e%2e%2f%2e%2e%2fsecret.html",
    "/api/settlement/2026-03-14/..",
    "/api/settlement/2026-03-14/",
    "/api/settlement/2026-03-14",
    "/api/settlement/2026-03-14/report.html/",
    "/api/settlement/2026-03-14/report.html/x",
    "/api/settlement/2026-03-14/.hidden.html",
    "/api/settlement/notes/report.html",
    "/api/settlement/2026-03-14/admin.token",
    "/api/settlement/2026-03-14//etc/passwd",
    "/api/settlement//etc/passwd",
    "/api/settlement/2026-03-15/report.html",
])
def test_nothing_outside_the_settlement_reports_is_served(settled, target):
    resp = call(make_api(StubApp(), settled), "GET", target)
    assert resp.status == 404, target
    assert resp.file is None and b"SECRET" not in resp.body and TOKEN.encode() not in resp.body


def test_a_symlink_out_of_the_settlement_folder_is_refused(settled):
    run = settled / "settlement" / "2026-03-14"
    (run / "leak.html").symlink_to(settled / "secret.html")
    (settled / "settlement" / "2026-03-11").symlink_to(settled, target_is_directory=True)
    assert settlement_file(settled, "2026-03-14", "leak.html") is None
    assert settlement_file(settled, "2026-03-11", "secret.html") is None
    assert settlement_file(settled, "2026-03-14", "report.html") is not None
    assert call(make_api(StubApp(), settled), "GET", "/api/settlement/2026-03-14/leak.html").status == 404
