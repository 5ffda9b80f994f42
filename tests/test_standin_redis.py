"""Stand-in limits shared through Redis (several switch processes)."""

import asyncio
import uuid

from cardswitch.switch.standin import RedisCounters
from services import require_redis


def test_two_processes_share_the_per_card_limits():
    url = require_redis()
    prefix = f"cardswitch:test:{uuid.uuid4().hex}:"

    async def main():
        a, b = RedisCounters(url, prefix=prefix), RedisCounters(url, prefix=prefix)
        try:
            got = [await a.try_add("tok", "2026-11-28", 100, 3, 1_000),
                   await b.try_add("tok", "2026-11-28", 100, 3, 1_000),
                   await a.try_add("tok", "2026-11-28", 900, 3, 1_000),   # amount limit
                   await b.try_add("tok", "2026-11-28", 100, 3, 1_000),
                   await a.try_add("tok", "2026-11-28", 100, 3, 1_000),   # count limit
                   await b.try_add("tok", "2026-11-29", 100, 3, 1_000)]   # a new day
            await a.client.delete(f"{prefix}2026-11-28:tok", f"{prefix}2026-11-29:tok")
            return got
        finally:
            await a.close()
            await b.close()

    assert asyncio.run(main()) == [True, True, False, True, False, True]


def test_redis_unreachable_approves_nothing():
    async def main():
        c = RedisCounters("redis://127.0.0.1:1/0", timeout_s=0.1)
        try:
            return await c.try_add("tok", "2026-11-28", 100, 0, 0), c.errors
        finally:
            await c.close()

    assert asyncio.run(main()) == (False, 1)
