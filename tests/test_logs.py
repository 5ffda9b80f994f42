"""JSON log lines: trace IDs across a transaction's tasks and callbacks, redaction."""

from __future__ import annotations

import asyncio
import io
import logging
import multiprocessing
import re

import orjson
import pytest

from cardswitch import logs
from cardswitch.logs import JsonFormatter, bind_trace, current_trace, new_trace_id, redact, trace_scope

PAN = "6221260000000018"            # passes Luhn
TRACK2 = PAN + "=28121010000012345"


@pytest.fixture
def capture():
    """A logger writing through JsonFormatter into a buffer; yields (logger, lines())."""
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(JsonFormatter("switch"))
    logger = logging.getLogger("cardswitch.test_logs")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG)
    logger.propagate = False

    def lines() -> list[dict]:
        return [orjson.loads(line) for line in buf.getvalue().splitlines()]

    yield logger, lines
    logger.handlers[:] = []


def test_trace_ids_are_16_hex_and_unique():
    ids = [new_trace_id() for _ in range(10_000)]
    assert all(re.fullmatch(r"[0-9a-f]{16}", i) for i in ids)
    assert len(set(ids)) == len(ids)
    assert len({i[:8] for i in ids}) == 1          # one process prefix, a counter behind it


def _child_trace(q) -> None:
    q.put(new_trace_id())


def test_a_forked_child_draws_its_own_prefix():
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child_trace, args=(q,))
    p.start()
    child = q.get(timeout=10)
    p.join(10)
    assert child[:8] != new_trace_id()[:8]


def test_one_json_object_per_line_with_the_bound_trace(capture):
    logger, lines = capture
    logger.info("before")
    with trace_scope() as tid:
        logger.info("inside %s", "the transaction")
        logger.warning("two\nlines", extra={"bank": "BANKA"})
    logger.info("after")
    out = lines()
    assert len(out) == 4                             # a newline in a message stays inside its line
    assert "trace" not in out[0] and "trace" not in out[3]
    assert out[1]["trace"] == out[2]["trace"] == tid
    assert out[1]["msg"] == "inside the transaction"
    assert out[2]["bank"] == "BANKA" and out[2]["level"] == "warning" and out[2]["proc"] == "switch"
    assert out[1]["ts"].endswith("Z")


def test_an_explicit_trace_wins_over_the_context(capture):
    logger, lines = capture
    with trace_scope("aaaabbbbccccdddd"):
        logger.info("x", extra={"trace": "1111222233334444"})
    assert lines()[0]["trace"] == "1111222233334444"


def test_trace_follows_the_transaction_task_into_what_it_spawns(capture):
    """The pipeline binds in handle(); the bank leg (awaited coroutines, tasks
    created inside, call_later callbacks such as a link timeout) inherits it;
    another transaction's task never sees it."""
    logger, lines = capture

    async def bank_leg(n: int) -> None:
        await asyncio.sleep(0)
        logger.info("bank leg %d", n)

    async def handle(n: int) -> str:
        tid = bind_trace()
        logger.info("terminal leg %d", n)
        await bank_leg(n)
        await asyncio.get_running_loop().create_task(bank_leg(n))   # a background task
        fired = asyncio.Event()
        asyncio.get_running_loop().call_later(0, lambda: (logger.info("timer %d", n), fired.set()))
        await fired.wait()
        return tid

    async def main() -> list[str]:
        # Like the acceptor: one task per request, created from a context without a trace.
        tasks = [asyncio.get_running_loop().create_task(handle(n)) for n in range(3)]
        tids = await asyncio.gather(*tasks)
        logger.info("connection callback")
        return tids

    tids = asyncio.run(main())
    assert len(set(tids)) == 3
    out = lines()
    for n, tid in enumerate(tids):
        mine = [o for o in out if o["msg"].endswith(f" {n}")]
        assert len(mine) == 4
        assert {o["trace"] for o in mine} == {tid}
    assert "trace" not in out[-1]
    assert current_trace() == ""                      # nothing leaked into the caller


def test_bind_trace_keeps_a_given_id():
    async def main() -> tuple[str, str]:
        return bind_trace("0123456789abcdef"), current_trace()

    assert asyncio.run(main()) == ("0123456789abcdef", "0123456789abcdef")


def test_pans_are_masked_in_messages_arguments_and_tracebacks(capture):
    logger, lines = capture
    with trace_scope():
        logger.info("card %s declined", PAN)
        logger.info("track %s", TRACK2)
        try:
            raise ValueError(f"bad card {PAN}")
        except ValueError:
            logger.exception("failed")
    text = "\n".join(orjson.dumps(o).decode() for o in lines())
    assert PAN not in text
    assert "28121010000012345" not in text
    out = lines()
    assert out[0]["msg"] == "card 622126******0018 declined"
    assert out[1]["msg"] == "track 622126******0018=***"
    assert "622126******0018" in out[2]["exc"]
    assert all("trace" in o for o in out)


def test_redact_leaves_what_is_not_a_card_number():
    assert redact("stan 000123 amount 000000010000") == "stan 000123 amount 000000010000"
    assert redact("rrn 123456789012") == "rrn 123456789012"         # 12 digits, fails Luhn
    assert redact(f"pan={PAN};") == "pan=622126******0018;"
    assert redact(PAN[:6] + "D" + "2812") == PAN[:6] + "D2812"       # too short to be a track


def test_setup_logging_installs_the_formatter(monkeypatch):
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        logs.setup_logging(logging.INFO, "test")
        assert isinstance(root.handlers[0].formatter, JsonFormatter)
    finally:
        root.handlers[:], lvl = saved
        root.setLevel(lvl)
