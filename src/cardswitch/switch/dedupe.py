"""Duplicate detection shared by several switch processes (wire.md 6a, scale-out).

Each switch process keeps its own in-memory index of what it received
(``switch.index``); that catches a resend on the same process. Behind a load
balancer, or with several processes sharing a port, a terminal's resend may
reach another process. ``DuplicateGuard`` closes that gap: the first process
to ``claim`` a request's key in Redis (``SET key 1 NX EX ttl``) processes it,
every other claim of the same key is a duplicate (94).

The key is the request's 41 + 11 + 7 + MTI class (a repeat, MTI ending in 1,
shares its original's class) and the business date (``duplicate_key``); keys
expire after ``ttl_s`` (2 days: the business day plus a cutover's margin).

**Redis unreachable: fail open.** ``claim`` then answers True (process the
request), counts ``errors`` and logs a warning once per outage (and info when
it is back). The in-process index still catches every duplicate that reaches
the same process, which is the common case (a terminal resends on its
connection); refusing all traffic (96) because a shared cache is down would
turn a Redis outage into a network outage. What is lost during the outage is
only a duplicate that reaches another process, and the issuer's own duplicate
check (its idempotency key) is the next line. After a failure Redis is not
asked again for ``retry_s`` (claims fail open at once, counted as
``skipped``), so an outage adds no latency per transaction; then one claim
probes it. Every Redis call is bounded by ``timeout_s``; claims made together
go to Redis as one pipeline.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from cardswitch.config import SwitchConfig
from cardswitch.iso8583.constants import mti_class
from cardswitch.routing.routes import EndpointHealth

log = logging.getLogger("cardswitch.dedupe")

DEFAULT_TTL_S = 2 * 86400
KEY_PREFIX = "cardswitch:dup:"


def duplicate_key(terminal_id: str, stan: str, transmitted: str, mti: str, business_date: str) -> str:
    """The key two requests share exactly when one duplicates the other (wire.md 6a)."""
    return f"{business_date}:{terminal_id}:{stan}:{transmitted}:{mti_class(mti)}"


@dataclass(slots=True)
class DedupeStats:
    claimed: int = 0              # first claims: the request is processed
    duplicates: int = 0           # keys already claimed (by any process)
    errors: int = 0               # Redis failed or timed out: failed open
    skipped: int = 0              # Redis not asked (marked down): failed open


class DuplicateGuard:
    """Claims of request keys in Redis, shared by every switch process using it.

    Claims made in the same turn of the event loop go to Redis together, as
    one pipeline (one round trip), on at most ``parallel`` connections at a
    time: under load, claims wait for a batch rather than opening a
    connection each.

    ``client`` is an object with redis.asyncio's ``pipeline(transaction=False)``
    (``set(key, value, nx=, ex=)``, ``delete(key)``, ``execute()``), ``ping()``
    and ``aclose()`` (tests pass fakes); by default one is made from ``url``.
    ``prefix`` namespaces the keys (several networks, or tests, on one Redis).
    """

    def __init__(self, url: str, *, ttl_s: int = DEFAULT_TTL_S, prefix: str = KEY_PREFIX,
                 timeout_s: float = 0.25, retry_s: float = 1.0, parallel: int = 4, max_batch: int = 1000,
                 client: Any = None, logger: logging.Logger | None = None, clock=time.monotonic) -> None:
        if ttl_s < 1:
            raise ValueError("ttl_s must be at least 1 second")
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        if parallel < 1 or max_batch < 1:
            raise ValueError("parallel and max_batch must be at least 1")
        self.url = url
        self.ttl_s = ttl_s
        self.prefix = prefix
        self.timeout_s = timeout_s
        self.parallel = parallel
        self.max_batch = max_batch
        self.log = logger or log
        self.stats = DedupeStats()
        self._clock = clock
        # One failure marks Redis down; it is tried again after retry_s.
        self._health = EndpointHealth(failure_threshold=1, probe_interval=retry_s)
        self._client = client if client is not None else _client_for(url, timeout_s, parallel + 2)
        self._queue: list[tuple[str, str, asyncio.Future]] = []    # (op, full key, future)
        self._flushes: set[asyncio.Task] = set()

    @classmethod
    def from_config(cls, switch: SwitchConfig, **kw: Any) -> DuplicateGuard | None:
        """The guard ``[switch] redis`` asks for; None when it is empty (one process only)."""
        if not switch.redis:
            return None
        return cls(switch.redis, **kw)

    @property
    def available(self) -> bool:
        """False while Redis is marked down (claims fail open)."""
        return self._health.healthy

    async def claim(self, key: str) -> bool:
        """True when this is the first claim of ``key`` (or Redis cannot say: fail open)."""
        now = self._clock()
        health = self._health
        if not health.usable(now):
            self.stats.skipped += 1
            return True
        health.mark_attempt(now)
        first = await self._submit("claim", key)
        if first is None:
            self.stats.errors += 1
            return True
        if first:
            self.stats.claimed += 1
            return True
        self.stats.duplicates += 1
        return False

    async def release(self, key: str) -> None:
        """Withdraw a claim whose request was never processed (best effort)."""
        if not self._health.healthy:
            return
        if await self._submit("release", key) is None:
            self.stats.errors += 1

    async def ping(self) -> bool:
        """True when Redis answers now (for start-up checks and health pages)."""
        try:
            async with asyncio.timeout(self.timeout_s * 2):
                return bool(await self._client.ping())
        except Exception:
            return False

    async def close(self) -> None:
        if self._flushes:
            await asyncio.gather(*self._flushes, return_exceptions=True)
        try:
            await self._client.aclose()
        except Exception:  # closing a client whose server is gone
            pass

    # -- batching --------------------------------------------------------------

    def _submit(self, op: str, key: str) -> asyncio.Future:
        """Queue one operation; its future gives True/False (claim: first or not,
        release: done) or None when Redis failed."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._queue.append((op, self.prefix + key, fut))
        if len(self._flushes) < self.parallel:
            self._start_flush(loop)
        return fut

    def _start_flush(self, loop: asyncio.AbstractEventLoop) -> None:
        task = loop.create_task(self._flush())
        self._flushes.add(task)
        task.add_done_callback(self._flush_done)

    def _flush_done(self, task: asyncio.Task) -> None:
        self._flushes.discard(task)
        if self._queue and len(self._flushes) < self.parallel:
            self._start_flush(task.get_loop())

    async def _flush(self) -> None:
        batch, self._queue = self._queue[:self.max_batch], self._queue[self.max_batch:]
        if not batch:
            return
        try:
            async with asyncio.timeout(self.timeout_s * 2):
                pipe = self._client.pipeline(transaction=False)
                for op, key, _ in batch:
                    if op == "claim":
                        pipe.set(key, b"1", nx=True, ex=self.ttl_s)
                    else:
                        pipe.delete(key)
                results = await pipe.execute()
        except Exception as e:  # redis.RedisError, OSError, TimeoutError, anything: fail open
            if self._health.mark_down(self._clock()):
                self.log.warning("duplicate guard: Redis %s unreachable (%s); duplicates across "
                                 "processes are not caught until it is back", _safe_url(self.url),
                                 type(e).__name__)
            for _, _, fut in batch:
                if not fut.done():
                    fut.set_result(None)
            return
        if self._health.mark_success(self._clock()):
            self.log.info("duplicate guard: Redis %s is back", _safe_url(self.url))
        for (op, _, fut), res in zip(batch, results):
            if not fut.done():
                fut.set_result(bool(res) if op == "claim" else True)


def _client_for(url: str, timeout_s: float, connections: int) -> Any:
    import redis.asyncio as aioredis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    # One retry: a pooled connection that Redis closed (restart) is replaced
    # transparently; a Redis that is down costs two refused connects, no wait.
    return aioredis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                   retry=Retry(NoBackoff(), 1), health_check_interval=0,
                                   max_connections=connections)


def _safe_url(url: str) -> str:
    """The URL without a password."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    cred, _, host = rest.rpartition("@")
    user = cred.split(":", 1)[0]
    return f"{scheme}://{user + ':***' if ':' in cred else user}@{host}"
