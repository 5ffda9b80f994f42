"""DuplicateGuard: claims of request keys shared by switch processes through
Redis. Logic against fakes (no Redis needed); sharing, expiry, concurrency
and several OS processes against the real local Redis (``require_redis``:
skipped with a reason when it is absent, a failure with CI=true)."""

from __future__ import annotations

import asyncio
import logging
import socket
import subprocess
import sys
import textwrap
import uuid

import pytest

import services
from cardswitch.config import SwitchConfig
from cardswitch.switch.dedupe import DEFAULT_TTL_S, KEY_PREFIX, DedupeStats, DuplicateGuard, duplicate_key
from services import require_redis

KEY = duplicate_key("POS00001", "000123", "1128120000", "0200", "1128")


class FakeRedis:
    """``SET NX EX`` in a dict; ``fail`` makes every call raise, ``hang`` never answer."""

    def __init__(self) -> None:
        self.data: dict[str, tuple[bytes, int]] = {}
        self.fail: Exception | None = None
        self.hang = False
        self.calls = 0
        self.closed = False
        self.batches: list[int] = []

    async def _gate(self) -> None:
        self.calls += 1
        if self.hang:
            await asyncio.sleep(3600)
        if self.fail is not None:
            raise self.fail

    def pipeline(self, transaction=True):
        return FakePipeline(self)

    def _set(self, key, value, nx=False, ex=None):
        if nx and key in self.data:
            return None
        self.data[key] = (value, ex)
        return True

    def _delete(self, key):
        return 1 if self.data.pop(key, None) is not None else 0

    async def ping(self):
        await self._gate()
        return True

    async def aclose(self):
        self.closed = True


class FakePipeline:
    def __init__(self, redis: FakeRedis) -> None:
        self.redis = redis
        self.ops: list = []

    def set(self, *a, **kw):
        self.ops.append((self.redis._set, a, kw))
        return self

    def delete(self, *a):
        self.ops.append((self.redis._delete, a, {}))
        return self

    async def execute(self):
        self.redis.batches.append(len(self.ops))
        await self.redis._gate()
        return [fn(*a, **kw) for fn, a, kw in self.ops]


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def guard(client=None, **kw) -> DuplicateGuard:
    return DuplicateGuard("redis://127.0.0.1:6379/0", client=client or FakeRedis(), **kw)


# -- the key ---------------------------------------------------------------------------

def test_key_is_terminal_stan_field7_mti_class_and_business_date():
    assert KEY == "1128:POS00001:000123:1128120000:020"
    # A repeat shares its original's class; a reversal does not.
    assert duplicate_key("POS00001", "000123", "1128120000", "0201", "1128") == KEY
    assert duplicate_key("POS00001", "000123", "1128120000", "0400", "1128") != KEY
    for other in (("POS00002", "000123", "1128120000", "0200", "1128"),
                  ("POS00001", "000124", "1128120000", "0200", "1128"),
                  ("POS00001", "000123", "1128120001", "0200", "1128"),
                  ("POS00001", "000123", "1128120000", "0200", "1129")):
        assert duplicate_key(*other) != KEY


# -- claims against a fake -----------------------------------------------------------------

def test_first_claim_wins_and_the_key_expires_after_the_ttl():
    async def main():
        fake = FakeRedis()
        g = guard(fake, prefix="net1:")
        assert await g.claim(KEY) is True
        assert await g.claim(KEY) is False
        assert await g.claim(KEY + "x") is True
        assert fake.data["net1:" + KEY] == (b"1", DEFAULT_TTL_S)
        assert g.stats == DedupeStats(claimed=2, duplicates=1)
        await g.release(KEY)
        assert await g.claim(KEY) is True
        await g.close()
        assert fake.closed
    asyncio.run(main())


def test_claims_made_together_go_as_one_pipeline():
    async def main():
        fake = FakeRedis()
        g = guard(fake, parallel=2)
        keys = [f"k{i % 50}" for i in range(200)]
        results = await asyncio.gather(*(g.claim(k) for k in keys))
        assert sum(results) == 50 and g.stats == DedupeStats(claimed=50, duplicates=150)
        # The first claims each started a flush (up to 2 at a time); the rest waited and went together.
        assert len(fake.batches) <= 4 and sum(fake.batches) == 200
        await g.close()
    asyncio.run(main())


def test_default_ttl_covers_two_days_and_prefix_is_namespaced():
    assert DEFAULT_TTL_S == 2 * 86400
    assert KEY_PREFIX == "cardswitch:dup:"
    with pytest.raises(ValueError):
        guard(ttl_s=0)
    with pytest.raises(ValueError):
        guard(timeout_s=0)


def test_redis_failing_fails_open_then_is_left_alone_until_retry(caplog):
    async def main():
        fake, clock = FakeRedis(), Clock()
        g = guard(fake, retry_s=2.0, clock=clock)
        fake.fail = ConnectionError("refused")
        with caplog.at_level(logging.INFO, logger="cardswitch.dedupe"):
            assert await g.claim(KEY) is True               # fail open
            assert not g.available
            calls = fake.calls
            for _ in range(5):
                assert await g.claim(KEY) is True           # not even asked while marked down
            assert fake.calls == calls
            clock.t += 2.0
            assert await g.claim(KEY) is True               # one probe: still down
            assert fake.calls == calls + 1
            fake.fail = None
            assert await g.claim(KEY) is True               # within the interval: skipped
            clock.t += 2.0
            assert await g.claim(KEY) is True               # probe: back, and first
            assert await g.claim(KEY) is False              # ...so duplicates are caught again
        assert g.available
        assert g.stats == DedupeStats(claimed=1, duplicates=1, errors=2, skipped=6)
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "unreachable" in warnings[0].getMessage()
        assert any("is back" in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)
    asyncio.run(main())


def test_a_redis_that_never_answers_costs_at_most_the_timeout():
    async def main():
        fake = FakeRedis()
        fake.hang = True
        g = guard(fake, timeout_s=0.05)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        assert await g.claim(KEY) is True
        assert loop.time() - t0 < 1.0
        assert g.stats.errors == 1 and not g.available
        assert await g.ping() is False
    asyncio.run(main())


def test_from_config():
    assert DuplicateGuard.from_config(SwitchConfig()) is None          # redis = "": one process only
    g = DuplicateGuard.from_config(SwitchConfig(redis="redis://127.0.0.1:6379/0"), client=FakeRedis(),
                                   ttl_s=60)
    assert g is not None and g.url == "redis://127.0.0.1:6379/0" and g.ttl_s == 60


def test_password_never_logged(caplog):
    async def main():
        fake = FakeRedis()
        fake.fail = OSError("down")
        g = DuplicateGuard("redis://user:s3cret@127.0.0.1:6379/0", client=fake)
        with caplog.at_level(logging.WARNING, logger="cardswitch.dedupe"):
            await g.claim(KEY)
        assert caplog.records and "s3cret" not in caplog.text and "user:***@" in caplog.text
    asyncio.run(main())


# -- against the real Redis ------------------------------------------------------------------

@pytest.fixture
def redis_url():
    return require_redis().url


@pytest.fixture
def prefix():
    return f"test:dedupe:{uuid.uuid4().hex}:"


@pytest.mark.services
def test_two_guards_share_claims_and_keys_expire(redis_url, prefix):
    async def main():
        import redis.asyncio as aioredis

        a = DuplicateGuard(redis_url, prefix=prefix, ttl_s=120)
        b = DuplicateGuard(redis_url, prefix=prefix, ttl_s=120)
        raw = aioredis.Redis.from_url(redis_url)
        try:
            assert await a.ping() and await b.ping()
            assert await a.claim(KEY) is True
            assert await b.claim(KEY) is False              # the other "process" sees the claim
            assert await a.claim(KEY) is False
            assert 0 < await raw.ttl(prefix + KEY) <= 120
            await b.release(KEY)
            assert await b.claim(KEY) is True
            short = DuplicateGuard(redis_url, prefix=prefix, ttl_s=1)
            assert await short.claim("short") is True
            assert 0 < await raw.pttl(prefix + "short") <= 1000   # Redis expires it
            await short.close()
        finally:
            await raw.delete(prefix + KEY, prefix + "short")
            await raw.aclose()
            await a.close()
            await b.close()
    asyncio.run(main())


@pytest.mark.services
def test_concurrent_claims_of_one_key_have_exactly_one_winner(redis_url, prefix):
    async def main():
        guards = [DuplicateGuard(redis_url, prefix=prefix, ttl_s=60) for _ in range(4)]
        try:
            keys = [f"k{i}" for i in range(50)]
            results = await asyncio.gather(*(g.claim(k) for k in keys for g in guards for _ in range(3)))
            per_key = [sum(results[i * 12:(i + 1) * 12]) for i in range(len(keys))]
            assert per_key == [1] * len(keys)
            assert sum(g.stats.errors for g in guards) == 0
        finally:
            import redis.asyncio as aioredis
            raw = aioredis.Redis.from_url(redis_url)
            await raw.delete(*(prefix + k for k in keys))
            await raw.aclose()
            for g in guards:
                await g.close()
    asyncio.run(main())


CLAIMER = textwrap.dedent("""
    import asyncio, sys
    from cardswitch.switch.dedupe import DuplicateGuard

    async def main(url, prefix, n):
        g = DuplicateGuard(url, prefix=prefix, ttl_s=60)
        won = [k for k in range(n) if await g.claim(f"key{k}")]
        await g.close()
        print(" ".join(map(str, won)))
        assert g.stats.errors == 0

    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
""")


@pytest.mark.services
def test_claims_across_os_processes(redis_url, prefix):
    """Three processes claim the same 300 keys at the same time: each key is won once."""
    n = 300
    procs = [subprocess.Popen([sys.executable, "-c", CLAIMER, redis_url, prefix, str(n)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    won: list[int] = []
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        won += [int(x) for x in out.split()]
    assert sorted(won) == list(range(n))

    async def cleanup():
        import redis.asyncio as aioredis
        raw = aioredis.Redis.from_url(redis_url)
        await raw.delete(*(f"{prefix}key{k}" for k in range(n)))
        await raw.aclose()
    asyncio.run(cleanup())


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_unreachable_redis_fails_open_at_once():
    async def main():
        g = DuplicateGuard(f"redis://127.0.0.1:{_closed_port()}/0", timeout_s=0.5)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        assert await g.claim(KEY) is True
        assert await g.claim(KEY) is True                  # no memory of the claim: fail open
        assert loop.time() - t0 < 1.0
        assert g.stats.errors == 1 and g.stats.skipped == 1
        await g.close()
    asyncio.run(main())


# -- tests/services.py: skip elsewhere, fail in CI ---------------------------------------------

@pytest.fixture
def no_redis(monkeypatch):
    monkeypatch.setenv("CARDSWITCH_TEST_REDIS", f"redis://127.0.0.1:{_closed_port()}/0")
    services._probe.cache_clear()
    yield
    services._probe.cache_clear()


def test_missing_service_skips_with_a_reason(no_redis, monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match=r"Redis not available at 127\.0\.0\.1:\d+ \("):
        services.require_redis()


def test_missing_service_fails_in_ci(no_redis, monkeypatch):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true requires it"):
        services.require_redis()


def test_service_info(redis_url):
    svc = services.require_redis()
    assert svc == redis_url and svc.url == redis_url and svc.port > 0 and svc.host
