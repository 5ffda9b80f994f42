"""Event payloads, balance notices, the bounded buffer and the hooks: no broker."""

from __future__ import annotations

import asyncio
import inspect
from types import SimpleNamespace

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cardswitch.logs import trace_scope
from cardswitch.switch.events import (
    CREDIT,
    DEBIT,
    EventPublisher,
    Fanout,
    balance_notices,
    parse_balances,
    parse_broker_url,
    topic_level,
    txn_event,
)
from cardswitch.switch.records import Cancel, Kind, Status, TxnRecord

PAN = "6221260000000018"
TO_PAN = "6222000000000016"


def record(**kw) -> TxnRecord:
    base = dict(id=7, business_date="2026-11-28", received_at="2026-11-28T01:02:03.000004Z",
                mti="0200", proc="000000", kind=Kind.PURCHASE, amount=12345, currency="156",
                terminal_id="POS00001", merchant_id="898440154110001", stan="000123",
                transmitted="1128010203", batch="000001", pan_masked="622126******0018",
                pan_token="ab" * 16, acquirer_id="BANKA", issuer_id="BANKB", rrn="633201000123",
                status=Status.APPROVED, response_code="00", auth_code="A1B2C3",
                completed_at="2026-11-28T01:02:03.004000Z", latency_us=4000)
    base.update(kw)
    return TxnRecord(**base)


def declined(**kw) -> TxnRecord:
    return record(status=Status.DECLINED, response_code="51", auth_code="", **kw)


# -- payloads -------------------------------------------------------------------------


def test_txn_event_carries_the_record_but_no_secret():
    rec = record(balances="0002156C000000100000")
    ev = txn_event(rec, trace="0123456789abcdef")
    assert ev["event"] == "txn" and ev["id"] == 7 and ev["trace"] == "0123456789abcdef"
    assert (ev["amount"], ev["currency"], ev["kind"]) == (12345, "156", "purchase")
    assert (ev["pan_masked"], ev["pan_token"]) == ("622126******0018", "ab" * 16)
    assert (ev["response_code"], ev["auth_code"], ev["rrn"], ev["approved"]) == ("00", "A1B2C3", "633201000123", True)
    assert ev["received_at"] == rec.received_at and ev["completed_at"] == rec.completed_at
    assert (ev["terminal_id"], ev["merchant_id"], ev["issuer_id"], ev["acquirer_id"]) == \
        ("POS00001", "898440154110001", "BANKB", "BANKA")
    assert "balances" not in ev                      # a merchant's topic: not the cardholder's balance
    assert "to_pan_masked" not in ev
    orjson.dumps(ev)


def test_a_bare_pan_in_the_record_is_masked_again():
    ev = txn_event(record(pan_masked=PAN, to_pan_masked=TO_PAN, to_issuer_id="BANKC", kind=Kind.TRANSFER))
    blob = orjson.dumps(ev).decode()
    assert PAN not in blob and TO_PAN not in blob
    assert ev["pan_masked"] == "622126******0018" and ev["to_pan_masked"] == "622200******0016"


def test_purchase_approved_gives_one_debit_notice_declined_none():
    [(issuer, ev)] = balance_notices(record(), merchant_name="Shanghai Coffee", trace="t" * 16)
    assert issuer == "BANKB"
    assert ev["event"] == "notify" and ev["direction"] == DEBIT and ev["amount"] == 12345
    assert (ev["pan_masked"], ev["pan_token"], ev["currency"]) == ("622126******0018", "ab" * 16, "156")
    assert (ev["merchant_id"], ev["merchant_name"]) == ("898440154110001", "Shanghai Coffee")
    assert ev["at"] == "2026-11-28T01:02:03.004000Z" and ev["trace"] == "t" * 16
    assert balance_notices(declined()) == []
    assert balance_notices(record(status=Status.TIMEOUT, response_code="91")) == []


@pytest.mark.parametrize("kind,direction", [
    (Kind.PURCHASE, DEBIT), (Kind.COMPLETION, DEBIT), (Kind.WITHDRAWAL, DEBIT),
    (Kind.BILL_PAYMENT, DEBIT), (Kind.REFUND, CREDIT), (Kind.DEPOSIT, CREDIT),
])
def test_money_moving_kinds(kind, direction):
    [(_, ev)] = balance_notices(record(kind=kind))
    assert ev["direction"] == direction and ev["kind"] == kind


@pytest.mark.parametrize("kind", [Kind.PREAUTH, Kind.BALANCE, Kind.NETWORK, Kind.BATCH_CLOSE])
def test_no_balance_change_no_notice(kind):
    assert balance_notices(record(kind=kind)) == []


def test_transfer_notifies_both_cards_at_their_issuers():
    rec = record(kind=Kind.TRANSFER, to_issuer_id="BANKC", to_pan_masked="622200******0016",
                 to_pan_token="cd" * 16)
    notices = balance_notices(rec)
    assert [(i, e["direction"], e["pan_masked"], e["leg"]) for i, e in notices] == [
        ("BANKB", DEBIT, "622126******0018", "debit"),
        ("BANKC", CREDIT, "622200******0016", "credit"),
    ]


def test_withdrawal_notice_carries_the_balances_the_issuer_answered():
    rec = record(kind=Kind.WITHDRAWAL, balances="1001156C000000200000" "1002156C000000150000")
    [(_, ev)] = balance_notices(rec)
    assert ev["balance"] == {"ledger": 200000, "available": 150000}


def test_parse_balances():
    assert parse_balances("") == {}
    assert parse_balances("1002156D000000000500") == {"available": -500}
    assert parse_balances("10021560000000000500") == {}           # no C/D: skipped
    assert parse_balances("1002156C0000001") == {}                # truncated


def test_void_credits_the_card_back():
    purchase = record(id=5, cancelled=Cancel.VOIDED, cancelled_by=7)
    void = record(kind=Kind.VOID, orig_id=5)
    [(issuer, ev)] = balance_notices(void, purchase)
    assert issuer == "BANKB" and ev["direction"] == CREDIT
    assert ev["reverses"] == {"id": 5, "kind": "purchase", "rrn": purchase.rrn}


def test_reversal_mirrors_what_it_undid():
    purchase = record(id=5, cancelled=Cancel.REVERSED, cancelled_by=9)
    rev = record(id=9, kind=Kind.REVERSAL, mti="0400", orig_id=5, pan_masked="", pan_token="",
                 auth_code="")
    [(issuer, ev)] = balance_notices(rev, purchase)
    assert issuer == "BANKB" and ev["direction"] == CREDIT and ev["amount"] == 12345
    assert ev["pan_masked"] == "622126******0018" and ev["reverses"]["id"] == 5
    # a reversed transfer: both legs come back
    transfer = record(id=6, kind=Kind.TRANSFER, to_issuer_id="BANKC", to_pan_masked="622200******0016",
                      cancelled=Cancel.REVERSED, cancelled_by=9)
    assert [(i, e["direction"]) for i, e in balance_notices(rev, transfer)] == [("BANKB", CREDIT), ("BANKC", DEBIT)]
    # a reversed void: the purchase stands again
    void = record(id=6, kind=Kind.VOID, cancelled=Cancel.REVERSED, cancelled_by=9)
    assert [e["direction"] for _, e in balance_notices(rev, void)] == [DEBIT]


def test_reversal_that_changed_nothing_gives_no_notice():
    rev = record(id=9, kind=Kind.REVERSAL, mti="0400", orig_id=5)
    assert balance_notices(rev, None) == []
    assert balance_notices(rev, declined(id=5)) == []                               # never approved
    assert balance_notices(rev, record(id=5, cancelled=Cancel.REVERSED, cancelled_by=4)) == []   # by another
    assert balance_notices(rev, record(id=5, status=Status.TIMEOUT, cancelled=Cancel.REVERSED,
                                       cancelled_by=9)) == []                       # 91: not notified before
    assert balance_notices(rev, record(id=5, kind=Kind.PREAUTH, cancelled=Cancel.REVERSED,
                                       cancelled_by=9)) == []


@given(st.text())
def test_topic_level_is_one_level_never_a_wildcard(value):
    level = topic_level(value)
    assert level and "/" not in level and "+" not in level and "#" not in level and "\0" not in level


def test_parse_broker_url():
    a = parse_broker_url("mqtt://127.0.0.1:1883")
    assert (a.host, a.port, a.tls, a.username) == ("127.0.0.1", 1883, False, None)
    a = parse_broker_url("mqtts://ops:s%40cret@broker.example")
    assert (a.host, a.port, a.tls, a.username, a.password) == ("broker.example", 8883, True, "ops", "s@cret")
    assert "s@cret" not in str(a) and "s%40cret" not in str(a)
    assert parse_broker_url("localhost").port == 1883
    for bad in ("http://x:1", "mqtt://:1883", "mqtt://h:99999"):
        with pytest.raises(ValueError, match="mqtt url"):
            parse_broker_url(bad)


# -- the publisher without a broker -------------------------------------------------------


def txn(rec: TxnRecord, original: TxnRecord | None = None) -> SimpleNamespace:
    """What the pipeline's hook gets: steps.Txn's record, kind and original."""
    return SimpleNamespace(record=rec, kind=rec.kind, original=original)


def buffered(p: EventPublisher) -> list[tuple[str, dict]]:
    return [(e.topic, orjson.loads(e.payload)) for e in p._buf]


def test_publishing_is_synchronous_and_only_buffers():
    for name in ("publish_txn", "publish_notify", "publish_alert", "count", "link_state"):
        assert not inspect.iscoroutinefunction(getattr(EventPublisher, name))
    p = EventPublisher("mqtt://127.0.0.1:1", merchant_names={"898440154110001": "Shanghai Coffee"})
    with trace_scope("feedfacefeedface"):
        p.count(txn(record()), "00")
        p.count(txn(declined(id=8)), "51")
    p.publish_alert("saf", {"bank": "BANKB", "depth": 3})
    out = buffered(p)
    assert [t for t, _ in out] == ["cardswitch/txn/898440154110001", "cardswitch/notify/BANKB",
                                   "cardswitch/txn/898440154110001", "cardswitch/alert/saf"]
    assert out[0][1]["trace"] == out[1][1]["trace"] == "feedfacefeedface"
    assert out[1][1]["merchant_name"] == "Shanghai Coffee"
    assert out[2][1]["response_code"] == "51"
    assert out[3][1] == {"event": "alert", "kind": "saf", "at": out[3][1]["at"], "bank": "BANKB", "depth": 3}
    assert [e.qos for e in p._buf] == [p.qos_txn, p.qos_notify, p.qos_txn, p.qos_alert] == [0, 1, 0, 1]
    assert p.pending == 4 and p.published == p.dropped == p.failed == 0


def test_alert_keeps_its_own_event_kind_and_time():
    from cardswitch.switch.events import alert_event

    ev = alert_event("saf", {"bank": "BANKB", "event": "mine", "kind": "other", "what": "backlog"})
    assert (ev["event"], ev["kind"], ev["bank"], ev["what"]) == ("alert", "saf", "BANKB", "backlog")
    assert ev["at"].endswith("Z") and len(ev["at"]) == len("2026-11-28T01:02:03.000004Z")


def test_a_full_buffer_drops_the_oldest():
    p = EventPublisher("mqtt://127.0.0.1:1", buffer=5)
    for i in range(1, 13):
        p.publish_txn(record(id=i, merchant_id=f"M{i}"))
    assert p.pending == 5 and p.dropped == 7
    assert [ev["id"] for _, ev in buffered(p)] == [8, 9, 10, 11, 12]


def test_a_broken_event_is_counted_never_raised():
    p = EventPublisher("mqtt://127.0.0.1:1")
    bad = record()
    bad.amount = object()                     # type: ignore[assignment]  # orjson cannot encode it
    p.publish_txn(bad)
    p.count(txn(bad), "00")
    p.count(SimpleNamespace(record=None, kind="", original=None), "30")
    assert p.failed == 3 and p.pending == 0


def test_link_alerts_only_when_a_link_goes_up_or_down():
    p = EventPublisher("mqtt://127.0.0.1:1")
    for state in ("starting", "connecting", "offline", "connecting", "offline", "connecting",
                  "signing_on", "online", "offline", "connecting", "online", "stopped"):
        p.link_state("BANKA", state)
    p.link_state("BANKB", "online")
    got = [(t, ev["bank"], ev["state"], ev["up"]) for t, ev in buffered(p)]
    assert got == [("cardswitch/alert/link", "BANKA", "offline", False),
                   ("cardswitch/alert/link", "BANKA", "online", True),
                   ("cardswitch/alert/link", "BANKA", "offline", False),
                   ("cardswitch/alert/link", "BANKA", "online", True),
                   ("cardswitch/alert/link", "BANKA", "stopped", False),
                   ("cardswitch/alert/link", "BANKB", "online", True)]


def test_stop_without_a_broker_counts_what_was_left():
    async def main() -> EventPublisher:
        p = EventPublisher("mqtt://127.0.0.1:1", backoff=None)     # port 1: refused at once
        await p.start()
        for i in range(4):
            p.publish_txn(record(id=i))
        await asyncio.sleep(0)
        await p.stop(flush_timeout_s=0.5)
        p.publish_txn(record(id=99))                                # after stop: counted, not kept
        return p

    p = asyncio.run(main())
    assert not p.connected and p.published == 0 and p.pending == 0
    assert p.failed == 5


def test_bad_arguments():
    with pytest.raises(ValueError):
        EventPublisher("mqtt://h", buffer=0)
    with pytest.raises(ValueError):
        EventPublisher("mqtt://h", qos_txn=3)


# -- fan-out ------------------------------------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.seen: list[str] = []
        self.extra = "metrics api"

    def count(self, t, rc: str) -> None:
        self.seen.append(rc)


class Broken:
    def count(self, t, rc: str) -> None:
        raise RuntimeError("hook bug")


def test_fanout_calls_every_hook_and_survives_a_broken_one():
    a, b = Recorder(), Recorder()
    f = Fanout(a, None, Broken(), b)
    f.count(txn(record()), "00")
    f.count(txn(declined()), "51")
    assert a.seen == b.seen == ["00", "51"]
    assert f.extra == "metrics api"                 # the first hook's other attributes show through
    with pytest.raises(AttributeError):
        f.nothing_here


def test_fanout_with_the_publisher():
    p = EventPublisher("mqtt://127.0.0.1:1")
    m = Recorder()
    Fanout(m, p).count(txn(record()), "00")
    assert m.seen == ["00"] and p.pending == 2
    assert Fanout(m, p).dropped == 0                # publisher counters readable through it
