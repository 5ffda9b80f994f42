"""The admin HTTP server: /metrics, /healthz, the JSON API and the dashboard.

A small HTTP/1.1 server on ``[switch] admin`` (no web framework), in three
layers, as the rest of the switch:

- pure: ``parse_head`` turns a request head into a ``Request`` or raises
  ``HttpError`` naming the status to answer; ``render_head`` writes a
  response head;
- ``AdminApi``: the routes. ``await api.handle(request) -> Response`` reads
  the switch (duck-typed ``SwitchApp``: ``.acceptor``, ``.links``,
  ``.journal``, ``.hsm``, ``.pipeline``, ``.cutover``) and the
  ``SwitchMetrics``; testable without a socket;
- ``AdminServer``: the asyncio shell (streams) with bounded heads, header
  counts, bodies, connections and idle time.

Routes (GET also answers HEAD)::

    GET  /                      the dashboard (one self-contained page)
    GET  /metrics               Prometheus text format
    GET  /healthz               200 when the switch accepts and its journal writes, else 503
    GET  /api/links             bank links: state and counters
    GET  /api/queue             SAF depth per bank
    GET  /api/transactions      ?limit=N (1..200, default 50): the last ones, masked PANs
    GET  /api/stats             rates, approval mix, latency percentiles, connections
    GET  /api/settlement        settlement runs under <data_dir>/settlement/, with links
    GET  /api/settlement/<YYYY-MM-DD>/<file>   report.html, summary.json, *.csv of a run
    POST /api/cutover           end the business day now (Authorization: Bearer <token>)

Whatever changes state needs the admin token: ``[switch] admin_token``, else
the one in ``<data_dir>/admin.token`` (made at first start, mode 0600).
Unknown paths are 404, wrong methods 405; a bad request gets its 4xx and
the connection is closed; nothing a client sends stops the server.
"""

from __future__ import annotations

import asyncio
import hmac
import inspect
import logging
import os
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field, is_dataclass
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote

import orjson
from prometheus_client import CONTENT_TYPE_LATEST

from cardswitch.config import Endpoint
from cardswitch.switch.metrics import SwitchMetrics

__all__ = [
    "AdminApi", "AdminServer", "HttpError", "Limits", "Request", "Response", "TOKEN_FILE",
    "admin_token", "health", "parse_head", "render_head",
]

log = logging.getLogger("cardswitch.admin")

TOKEN_FILE = "admin.token"
PROBE_KEY = "admin:healthz"     # journal state key the health probe writes

REASONS = {
    100: "Continue", 200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
    405: "Method Not Allowed", 408: "Request Timeout", 409: "Conflict", 411: "Length Required",
    413: "Content Too Large", 414: "URI Too Long", 431: "Request Header Fields Too Large",
    500: "Internal Server Error", 501: "Not Implemented", 503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}

JSON = "application/json"
HTML = "text/html; charset=utf-8"
# The dashboard loads nothing from anywhere but this server, and runs its own inline script only.
DASHBOARD_CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                 "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
                 "frame-ancestors 'none'")
REPORT_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; frame-ancestors 'none'"

_TOKEN_CHARS = re.compile(rb"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_SETTLEMENT_FILE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,100}\.(html|csv|json)$")
_FILE_TYPES = {"html": HTML, "csv": "text/csv; charset=utf-8", "json": JSON}


@dataclass(slots=True, frozen=True)
class Limits:
    max_head: int = 8192            # request line + headers, bytes
    max_headers: int = 64
    max_body: int = 64 * 1024
    max_target: int = 2048          # request target, bytes
    head_timeout_s: float = 10.0    # a started request head must arrive whole within this
    idle_timeout_s: float = 30.0    # keep-alive: an idle connection is closed after this
    write_timeout_s: float = 30.0   # a client that stops reading is dropped
    max_connections: int = 64
    max_requests_per_connection: int = 1000


# -- HTTP, pure ------------------------------------------------------------------------


class HttpError(Exception):
    """A request that gets ``status`` and no further: the connection is closed after it."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(slots=True)
class Request:
    method: str
    path: str                       # percent-decoded, without the query
    query: dict[str, str]           # first value of each name
    version: str                    # "HTTP/1.1" | "HTTP/1.0"
    headers: dict[str, str]         # names lower-cased; repeated headers joined with ", "
    body: bytes = b""

    @property
    def keep_alive(self) -> bool:
        conn = self.headers.get("connection", "").lower()
        tokens = {t.strip() for t in conn.split(",")}
        if self.version == "HTTP/1.0":
            return "keep-alive" in tokens
        return "close" not in tokens

    @property
    def content_length(self) -> int:
        return int(self.headers.get("content-length", "0") or 0)


@dataclass(slots=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str = JSON
    headers: list[tuple[str, str]] = field(default_factory=list)
    file: Path | None = None        # streamed instead of ``body``
    file_size: int = 0

    @property
    def length(self) -> int:
        return self.file_size if self.file is not None else len(self.body)


def json_response(status: int, obj: Any, headers: list[tuple[str, str]] | None = None) -> Response:
    return Response(status, orjson.dumps(obj, option=orjson.OPT_NON_STR_KEYS) + b"\n", JSON,
                    headers or [])


def error_response(status: int, message: str, headers: list[tuple[str, str]] | None = None) -> Response:
    return json_response(status, {"error": message}, headers)


def parse_head(head: bytes, limits: Limits = Limits()) -> Request:
    """A request head (request line and headers, up to and including the blank
    line) -> ``Request`` without body. Raises ``HttpError`` for anything that
    is not a well-formed HTTP/1.x request head within ``limits``."""
    if len(head) > limits.max_head:
        raise HttpError(431, "request head too large")
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError:      # latin-1 decodes every byte; kept for clarity
        raise HttpError(400, "undecodable request head") from None
    if text.endswith("\r\n\r\n"):
        text = text[:-4]
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3:
        raise HttpError(400, "malformed request line")
    method, target, version = parts
    if not method or not _TOKEN_CHARS.match(method.encode("latin-1")):
        raise HttpError(400, "malformed method")
    if not version.startswith("HTTP/") or len(version) != 8:
        raise HttpError(400, "malformed HTTP version")
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise HttpError(505, f"{version} is not supported")
    if len(target) > limits.max_target:
        raise HttpError(414, "request target too long")
    if not target.startswith("/") or any(ord(c) <= 0x20 or ord(c) >= 0x7F for c in target):
        raise HttpError(400, "malformed request target")
    raw_path, _, raw_query = target.partition("?")
    try:
        path = unquote(raw_path, errors="strict") if "%" in raw_path else raw_path
    except UnicodeDecodeError:
        raise HttpError(400, "malformed percent-encoding in the path") from None
    if "\x00" in path or "\\" in path:
        raise HttpError(400, "malformed path")
    try:
        query = {k: v[0] for k, v in parse_qs(raw_query, keep_blank_values=True, strict_parsing=False,
                                               max_num_fields=32).items()}
    except ValueError:
        raise HttpError(400, "too many query parameters") from None
    headers: dict[str, str] = {}
    if len(lines) - 1 > limits.max_headers:
        raise HttpError(431, "too many header fields")
    for line in lines[1:]:
        if not line:
            raise HttpError(400, "malformed header block")
        if line[0] in " \t":
            raise HttpError(400, "obsolete header line folding")
        name, sep, value = line.partition(":")
        if not sep or not name or not _TOKEN_CHARS.match(name.encode("latin-1")):
            raise HttpError(400, "malformed header field")
        value = value.strip(" \t")
        if any((ord(c) < 0x20 and c != "\t") or ord(c) == 0x7F for c in value):
            raise HttpError(400, "control character in a header field")
        key = name.lower()
        if key in headers:
            if key in ("content-length", "host", "authorization"):
                if headers[key] != value:
                    raise HttpError(400, f"conflicting {name} header fields")
                continue
            headers[key] = headers[key] + ", " + value
        else:
            headers[key] = value
    if version == "HTTP/1.1" and "host" not in headers:
        raise HttpError(400, "Host header missing")
    if "transfer-encoding" in headers:
        raise HttpError(501, "chunked request bodies are not accepted")
    cl = headers.get("content-length")
    if cl is not None:
        if not cl.isdigit() or len(cl) > 12:
            raise HttpError(400, "malformed Content-Length")
        if int(cl) > limits.max_body:
            raise HttpError(413, "request body too large")
    return Request(method, path, query, version, headers)


def render_head(resp: Response, *, keep_alive: bool) -> bytes:
    lines = [f"HTTP/1.1 {resp.status} {REASONS.get(resp.status, 'Unknown')}",
             f"Content-Type: {resp.content_type}",
             f"Content-Length: {resp.length}",
             "Cache-Control: no-store",
             "X-Content-Type-Options: nosniff",
             f"Connection: {'keep-alive' if keep_alive else 'close'}"]
    lines += [f"{k}: {v}" for k, v in resp.headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


# -- the admin token ------------------------------------------------------------------


def admin_token(switch_config: Any, data_dir: str | os.PathLike[str]) -> str:
    """``[switch] admin_token`` if set, else ``<data_dir>/admin.token``, made now if absent (0600)."""
    configured = getattr(switch_config, "admin_token", "") or ""
    if configured:
        return configured
    path = Path(data_dir) / TOKEN_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        token = secrets.token_urlsafe(32)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:     # another process made it first: use theirs
            pass
        else:
            with os.fdopen(fd, "w") as f:
                f.write(token + "\n")
            log.info("admin token written to %s", path)
            return token
    token = path.read_text().strip()
    if not token:
        raise ValueError(f"{path} is empty: delete it to make a new admin token")
    return token


# -- what the switch looks like from outside (pure over the duck-typed app) ---------------


def _stats_dict(stats: Any) -> dict[str, Any]:
    if stats is None:
        return {}
    return asdict(stats) if is_dataclass(stats) else dict(vars(stats))


def acceptor_status(app: Any) -> str:
    acc = getattr(app, "acceptor", None)
    if acc is None:
        return "down: not started"
    listening = getattr(acc, "listening", None)
    if listening is None:
        server = getattr(acc, "_server", None)
        listening = server is not None and server.is_serving()
    return "up" if listening else "down: not listening"


def journal_status(app: Any) -> str:
    journal = getattr(app, "journal", None)
    if journal is None:
        return "down: not open"
    if journal.healthy:
        return "up"
    writer = getattr(journal, "writer", None)
    err = getattr(writer, "last_error", None) if writer is not None else None
    if writer is None or getattr(writer, "closed", False):
        return "down: closed" if err is None else f"down: closed after {_error_text(err)}"
    return f"down: {_error_text(err)}" if err is not None else "down"


def _error_text(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text[:200]


def health(app: Any, probe_error: str | None = None) -> tuple[int, dict[str, Any]]:
    """(HTTP status, body) of /healthz.

    Only what stops the switch doing its job makes it 503: not accepting
    terminals, or a journal that cannot be written (nothing may be approved
    then). An HSM or a bank being down is reported, not fatal: the switch
    still answers (91/96) and recovers by itself.
    """
    acceptor = acceptor_status(app)
    journal = journal_status(app)
    if journal == "up" and probe_error is not None:
        journal = f"down: {probe_error}"
    hsm = getattr(app, "hsm", None)
    links = getattr(app, "links", None) or {}
    ok = acceptor == "up" and journal == "up"
    body: dict[str, Any] = {
        "status": "ok" if ok else "down",
        "acceptor": acceptor,
        "journal": journal,
        "hsm": "up" if hsm is not None and hsm.available else "down",
        "banks": {bank_id: str(getattr(link, "state", "unknown")) for bank_id, link in sorted(links.items())},
    }
    date = business_date(app)
    if date:
        body["business_date"] = date
    return (200 if ok else 503), body


def business_date(app: Any) -> str:
    pipeline = getattr(app, "pipeline", None)
    ctx = getattr(pipeline, "ctx", None)
    return str(getattr(ctx, "business_date", "") or "")


def links_view(app: Any) -> list[dict[str, Any]]:
    network = getattr(app, "network", None)
    names = {b.id: b.name for b in getattr(network, "banks", ())}
    out = []
    for bank_id, link in sorted((getattr(app, "links", None) or {}).items()):
        endpoint = getattr(link, "endpoint", None)
        out.append({
            "bank_id": bank_id,
            "name": names.get(bank_id, ""),
            "state": str(getattr(link, "state", "unknown")),
            "online": bool(getattr(link, "online", False)),
            "endpoint": str(endpoint) if endpoint is not None else None,
            "in_flight": int(getattr(link, "in_flight", 0)),
            "stats": _stats_dict(getattr(link, "stats", None)),
        })
    return out


def settlement_runs(data_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Settlement runs under ``<data_dir>/settlement/<date>/``, newest first, with links."""
    root = Path(data_dir) / "settlement"
    if not root.is_dir():
        return []
    runs = []
    for d in sorted(root.iterdir(), reverse=True):
        if not _DATE.match(d.name) or not d.is_dir():
            continue
        files = []
        for f in sorted(d.iterdir()):
            if f.is_file() and _SETTLEMENT_FILE.match(f.name):
                files.append({"name": f.name, "size": f.stat().st_size,
                              "href": f"/api/settlement/{d.name}/{f.name}"})
        has_report = any(f["name"] == "report.html" for f in files)
        runs.append({"date": d.name, "report": f"/api/settlement/{d.name}/report.html" if has_report else None,
                     "files": files})
    return runs


def settlement_file(data_dir: str | os.PathLike[str], date: str, name: str) -> Path | None:
    """The file ``/api/settlement/<date>/<name>`` names, or None: never outside the settlement folder."""
    if not _DATE.match(date) or not _SETTLEMENT_FILE.match(name) or ".." in name:
        return None
    root = (Path(data_dir) / "settlement").resolve()
    path = (root / date / name).resolve()
    if not path.is_relative_to(root) or path.parent.parent != root or not path.is_file():
        return None
    return path


# -- routes ----------------------------------------------------------------------------


Handler = Callable[["Request"], Awaitable[Response]]
CutoverCallback = Callable[[], Any]   # -> (old, new) or awaitable of it


class AdminApi:
    """The routes; ``await handle(request)`` never raises for a bad request."""

    def __init__(self, app: Any, metrics: SwitchMetrics, *, token: str, data_dir: str | os.PathLike[str],
                 on_cutover: CutoverCallback | None = None, journal_probe_s: float | None = 10.0,
                 probe_timeout_s: float = 2.0) -> None:
        self.app = app
        self.metrics = metrics
        self._token = token.encode()
        self.data_dir = Path(data_dir)
        self.on_cutover = on_cutover if on_cutover is not None else _default_cutover(app)
        self.journal_probe_s = journal_probe_s    # None: no probe; 0: probe on every /healthz
        self.probe_timeout_s = probe_timeout_s
        self._probe: asyncio.Future | None = None
        self._probe_error: str | None = None
        self._last_commits = -1
        self._last_activity = time.monotonic()
        self._last_probe = float("-inf")
        self._dashboard: bytes | None = None
        self._routes: dict[str, dict[str, Handler]] = {
            "/": {"GET": self.dashboard},
            "/metrics": {"GET": self.metrics_text},
            "/healthz": {"GET": self.healthz},
            "/api/links": {"GET": self.links},
            "/api/queue": {"GET": self.queue},
            "/api/transactions": {"GET": self.transactions},
            "/api/stats": {"GET": self.stats},
            "/api/settlement": {"GET": self.settlement},
            "/api/cutover": {"POST": self.cutover},
        }

    async def handle(self, req: Request) -> Response:
        methods = self._routes.get(req.path)
        handler_args: tuple = ()
        if methods is None and req.path.startswith("/api/settlement/"):
            methods = {"GET": self.settlement_download}
            handler_args = (req.path[len("/api/settlement/"):],)
        if methods is None:
            return error_response(404, f"no such resource: {req.path[:100]}")
        method = "GET" if req.method == "HEAD" else req.method
        handler = methods.get(method)
        if handler is None:
            allowed = sorted(set(methods) | ({"HEAD"} if "GET" in methods else set()))
            return error_response(405, f"{req.method} is not allowed here",
                                  [("Allow", ", ".join(allowed))])
        try:
            return await handler(req, *handler_args)
        except Exception:
            log.exception("admin %s %s failed", req.method, req.path[:100])
            return error_response(500, "internal error (logged)")

    # -- pages and figures ----------------------------------------------------------

    async def dashboard(self, req: Request) -> Response:
        if self._dashboard is None:
            self._dashboard = (resources.files("cardswitch") / "data" / "dashboard.html").read_bytes()
        return Response(200, self._dashboard, HTML, [("Content-Security-Policy", DASHBOARD_CSP),
                                                     ("Referrer-Policy", "no-referrer")])

    async def metrics_text(self, req: Request) -> Response:
        return Response(200, self.metrics.exposition(), CONTENT_TYPE_LATEST)

    async def healthz(self, req: Request) -> Response:
        probe_error = await self._probe_journal()
        status, body = health(self.app, probe_error)
        return json_response(status, body)

    async def links(self, req: Request) -> Response:
        return json_response(200, {"links": links_view(self.app)})

    async def queue(self, req: Request) -> Response:
        saf = self.metrics.saf()
        depth = dict.fromkeys(sorted(getattr(self.app, "links", None) or {}), 0)
        depth.update(saf or {})
        return json_response(200, {"available": saf is not None, "banks": depth,
                                   "total": sum(depth.values())})

    async def transactions(self, req: Request) -> Response:
        raw = req.query.get("limit", "50")
        if not raw.isdigit() or not 1 <= int(raw) <= self.metrics.recent_size:
            return error_response(400, f"limit must be 1..{self.metrics.recent_size}")
        return json_response(200, {"transactions": self.metrics.recent(int(raw))})

    async def stats(self, req: Request) -> Response:
        body = self.metrics.stats()
        acc = getattr(self.app, "acceptor", None)
        body["connections"] = acc.connections if acc is not None else 0
        body["in_flight"] = acc.in_flight if acc is not None else 0
        body["business_date"] = business_date(self.app)
        body["journal"] = journal_status(self.app)
        hsm = getattr(self.app, "hsm", None)
        body["hsm"] = "up" if hsm is not None and hsm.available else "down"
        return json_response(200, body)

    async def settlement(self, req: Request) -> Response:
        runs = await asyncio.to_thread(settlement_runs, self.data_dir)
        return json_response(200, {"runs": runs})

    async def settlement_download(self, req: Request, rest: str) -> Response:
        date, _, name = rest.partition("/")
        path = await asyncio.to_thread(settlement_file, self.data_dir, date, name)
        if path is None:
            return error_response(404, "no such settlement file")
        ext = path.suffix[1:]
        headers = [("Content-Security-Policy", REPORT_CSP)] if ext == "html" else []
        if ext == "csv":
            headers.append(("Content-Disposition", f'attachment; filename="{date}_{path.name}"'))
        return Response(200, content_type=_FILE_TYPES[ext], headers=headers, file=path,
                        file_size=path.stat().st_size)

    # -- what changes state ------------------------------------------------------------

    def authorized(self, req: Request) -> bool:
        auth = req.headers.get("authorization", "")
        scheme, _, given = auth.partition(" ")
        if scheme.lower() != "bearer" or not given:
            return False
        return hmac.compare_digest(given.strip().encode("latin-1", "replace"), self._token)

    async def cutover(self, req: Request) -> Response:
        if not self.authorized(req):
            log.warning("admin: refused %s %s without a valid token", req.method, req.path)
            return error_response(401, "a valid admin token is required (Authorization: Bearer <token>)",
                                  [("WWW-Authenticate", 'Bearer realm="cardswitch"')])
        if self.on_cutover is None:
            return error_response(503, "cutover is not available in this process")
        result = self.on_cutover()
        if inspect.isawaitable(result):
            result = await result
        old, new = result
        log.info("admin: cutover %s -> %s", old, new)
        return json_response(200, {"previous": old, "business_date": new})

    # -- the journal probe --------------------------------------------------------------

    async def _probe_journal(self) -> str | None:
        """Write to an idle or failed journal to learn whether it writes now.

        A journal that has committed since the last look is known to write;
        one idle for ``journal_probe_s`` gets one small state write (one at a
        time, however many ask). A journal whose last commit failed is
        probed at most once a second, so that an idle switch also sees it
        heal. The probe's own error (a timeout) is reported until a write
        succeeds; a failed commit shows in ``journal.healthy`` already.
        """
        if self.journal_probe_s is None:
            return None
        journal = getattr(self.app, "journal", None)
        writer = getattr(journal, "writer", None) if journal is not None else None
        if writer is None or writer.closed:
            return None
        now = time.monotonic()
        healthy = journal.healthy
        commits = writer.commits
        if commits != self._last_commits:
            self._last_commits = commits
            self._last_activity = now
            if healthy:
                self._probe_error = None
        if healthy:
            due = self.journal_probe_s == 0 or now - self._last_activity >= self.journal_probe_s
        else:
            due = now - self._last_probe >= min(self.journal_probe_s, 1.0)
        if due and self._probe is None:
            self._last_probe = now
            self._probe = asyncio.ensure_future(self._run_probe(journal))
        if self._probe is not None:
            try:
                await asyncio.shield(self._probe)
            except Exception:
                pass
        return self._probe_error if journal.healthy else None

    async def _run_probe(self, journal: Any) -> None:
        try:
            fut = journal.set_state(PROBE_KEY, _utc_text(), asyncio.get_running_loop())
            await asyncio.wait_for(fut, self.probe_timeout_s)
            self._probe_error = None
            self._last_activity = time.monotonic()
            self._last_commits = journal.writer.commits
        except asyncio.TimeoutError:
            self._probe_error = f"no commit within {self.probe_timeout_s:g}s"
        except Exception as e:
            self._probe_error = _error_text(e)
        finally:
            self._probe = None


def _utc_text() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _default_cutover(app: Any) -> CutoverCallback | None:
    service = getattr(app, "cutover", None)
    if service is None or not hasattr(service, "cutover_now"):
        return None

    def run() -> tuple[str, str]:
        old = business_date(app)
        new = service.cutover_now("admin")
        return old, new

    return run


# -- the asyncio shell -----------------------------------------------------------------


class AdminServer:
    """Serves an ``AdminApi`` on ``endpoint`` (default ``[switch] admin`` of ``app.network``)."""

    def __init__(self, app: Any, metrics: SwitchMetrics, endpoint: Endpoint | None = None, *,
                 token: str | None = None, data_dir: str | None = None,
                 on_cutover: CutoverCallback | None = None, limits: Limits = Limits(),
                 journal_probe_s: float | None = 10.0) -> None:
        network = getattr(app, "network", None)
        sw = getattr(network, "switch", None)
        if endpoint is None:
            if sw is None:
                raise ValueError("AdminServer: no endpoint given and app has no network")
            endpoint = sw.admin
        if data_dir is None:
            data_dir = getattr(app, "data_dir", None) or getattr(sw, "data_dir", "var")
        self.endpoint = endpoint
        self.limits = limits
        self.api = AdminApi(app, metrics, token=token if token is not None else admin_token(sw, data_dir),
                            data_dir=data_dir, on_cutover=on_cutover, journal_probe_s=journal_probe_s)
        self._server: asyncio.AbstractServer | None = None
        self._conns: set[asyncio.Task] = set()
        self._stopping = False

    @property
    def port(self) -> int:
        if self._server is None or not self._server.sockets:
            raise RuntimeError("admin server not started")
        return self._server.sockets[0].getsockname()[1]

    async def start(self) -> None:
        self._stopping = False
        self._server = await asyncio.start_server(
            self._connection, self.endpoint.host, self.endpoint.port, limit=self.limits.max_head,
            reuse_address=True)
        log.info("admin HTTP on %s:%d", self.endpoint.host, self.port)

    async def stop(self) -> None:
        if self._server is None:
            return
        self._stopping = True
        self._server.close()
        for task in list(self._conns):
            task.cancel()
        if self._conns:
            await asyncio.wait(list(self._conns), timeout=2.0)
        try:
            async with asyncio.timeout(2.0):
                await self._server.wait_closed()
        except TimeoutError:
            pass
        self._server = None

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if len(self._conns) >= self.limits.max_connections or self._stopping:
            writer.close()
            return
        assert task is not None
        self._conns.add(task)
        try:
            await self._serve(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("admin connection failed")
        finally:
            writer.close()
            try:
                async with asyncio.timeout(1.0):
                    await writer.wait_closed()
            except (Exception, asyncio.CancelledError):
                pass
            self._conns.discard(task)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        lim = self.limits
        for n in range(lim.max_requests_per_connection):
            # Waiting for a request to start: the idle time (the head time for the first);
            # once it has started, its head must arrive within the head time.
            async with asyncio.timeout(lim.idle_timeout_s if n else lim.head_timeout_s):
                first = await reader.read(1)
            if not first:
                return
            try:
                async with asyncio.timeout(lim.head_timeout_s):
                    rest = await reader.readuntil(b"\r\n\r\n")
            except asyncio.LimitOverrunError:
                await self._send(writer, error_response(431, "request head too large"), False, False)
                return
            except TimeoutError:
                await self._send(writer, error_response(408, "request head not received in time"), False, False)
                return
            except asyncio.IncompleteReadError:
                return
            try:
                req = parse_head(first + rest, lim)
            except HttpError as e:
                await self._send(writer, error_response(e.status, e.message), False, False)
                return
            if req.content_length:
                if req.headers.get("expect", "").lower() == "100-continue":
                    writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                async with asyncio.timeout(lim.head_timeout_s):
                    req.body = await reader.readexactly(req.content_length)
            keep = req.keep_alive and n + 1 < lim.max_requests_per_connection
            resp = await self.api.handle(req)
            await self._send(writer, resp, keep, req.method == "HEAD")
            if not keep:
                return

    async def _send(self, writer: asyncio.StreamWriter, resp: Response, keep_alive: bool,
                    head_only: bool) -> None:
        writer.write(render_head(resp, keep_alive=keep_alive))
        if not head_only:
            if resp.file is not None:
                await self._send_file(writer, resp.file, resp.file_size)
            else:
                writer.write(resp.body)
        async with asyncio.timeout(self.limits.write_timeout_s):
            await writer.drain()

    async def _send_file(self, writer: asyncio.StreamWriter, path: Path, size: int) -> None:
        # No more than the announced size; a file cut short meanwhile ends the connection.
        with open(path, "rb") as f:
            left = size
            while left > 0:
                chunk = await asyncio.to_thread(f.read, min(left, 256 * 1024))
                if not chunk:
                    raise ConnectionError(f"{path.name} shrank while being sent")
                writer.write(chunk)
                left -= len(chunk)
                async with asyncio.timeout(self.limits.write_timeout_s):
                    await writer.drain()
