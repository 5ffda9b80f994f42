"""The simulated terminal: request building (pure) and the TCP client.

The client is tested against a small loopback server (port 0) that decodes
and encodes with pyiso8583 directly, answering out of order.
"""

from __future__ import annotations

import asyncio
import itertools
import re
from datetime import datetime, timezone

import iso8583
import pytest
from iso8583.specs import default_ascii

from cardswitch.config import Endpoint, LinkOptions, Terminal
from cardswitch.iso8583.constants import F
from cardswitch.iso8583.fields import parse_field90
from cardswitch.iso8583.validate import format_errors
from cardswitch.merchants.registry import Registry
from cardswitch.netfile import load_network
from cardswitch.routing.bintable import BinTable
from cardswitch.switch import steps
from cardswitch.switch.index import TxnIndex
from cardswitch.switch.records import Kind
from cardswitch.switch.steps import Context, Txn
from cardswitch.terminal import (
    KINDS,
    Sent,
    TerminalClient,
    TerminalState,
    batch_close_request,
    build_request,
    network_request,
)

CARD = "6221260000000018"


def state(batch: int = 1) -> TerminalState:
    term = Terminal(id="POS00001", kind="pos", merchant_id="898440158120001")
    return TerminalState(term, "898440158120001", batch=batch, acquirer_inst="10000001")


def encodes(msg: dict) -> dict:
    raw, _ = iso8583.encode(dict(msg), default_ascii)
    back, _ = iso8583.decode(bytes(raw), default_ascii)
    return {k: v for k, v in back.items() if k not in ("p", "1")}


# -- building requests (wire.md 3) ------------------------------------------------------


def test_purchase_request_fields():
    msg = build_request(state(batch=7), "purchase", pan=CARD, amount=1234)
    assert msg[F.MTI] == "0200" and msg[F.PROC] == "000000"
    assert msg[F.PAN] == CARD and msg[F.AMOUNT] == "000000001234"
    assert re.fullmatch(r"\d{10}", msg[F.TRANSMISSION_DT])
    assert msg[F.STAN] == "000001"
    assert re.fullmatch(r"\d{6}", msg[F.LOCAL_TIME]) and re.fullmatch(r"\d{4}", msg[F.LOCAL_DATE])
    assert msg[F.ENTRY_MODE] == "021" and msg[F.CONDITION_CODE] == "00"
    assert (msg[F.TERMINAL_ID], msg[F.MERCHANT_ID], msg[F.CURRENCY]) == ("POS00001", "898440158120001", "156")
    assert msg[F.BATCH_NUMBER] == "000007"
    assert format_errors(msg) == []
    assert encodes(msg) == msg


@pytest.mark.parametrize("kind, mti, proc", [
    ("preauth", "0100", "000000"), ("purchase", "0200", "000000"), ("withdrawal", "0200", "010000"),
    ("refund", "0200", "200000"), ("deposit", "0200", "210000"), ("balance", "0200", "300000"),
    ("transfer", "0200", "400000"), ("bill", "0200", "500000"), ("void", "0200", "020000"),
])
def test_kinds_map_to_mti_and_processing_code(kind, mti, proc):
    assert KINDS[kind] == (mti, proc)
    msg = build_request(state(), kind, pan=CARD, amount=100, to_pan="6228480000000015")
    assert (msg[F.MTI], msg[F.PROC]) == (mti, proc)


def test_stans_count_up_and_wrap():
    st = state()
    assert [st.next_stan() for _ in range(3)] == ["000001", "000002", "000003"]
    st._stan = itertools.count(999_999)
    assert st.next_stan() == "999999"
    assert st.next_stan() == "000001"          # never 000000


def test_explicit_stan_and_field7():
    msg = build_request(state(), "purchase", pan=CARD, amount=1, stan="000042", transmitted="0314101500")
    assert (msg[F.STAN], msg[F.TRANSMISSION_DT]) == ("000042", "0314101500")


def test_pin_block_sets_entry_mode():
    msg = build_request(state(), "purchase", pan=CARD, amount=1, pin_block="0123456789ABCDEF")
    assert msg[F.PIN_BLOCK] == "0123456789ABCDEF" and msg[F.ENTRY_MODE] == "051"


def test_track2_replaces_field_2():
    track2 = CARD + "=30121010000000000000"
    msg = build_request(state(), "purchase", pan=CARD, amount=1, track2=track2, expiry="3012")
    assert F.PAN not in msg and msg[F.TRACK2] == track2 and msg[F.EXPIRY] == "3012"
    assert format_errors(msg) == []


def test_transfer_and_bill_fields():
    msg = build_request(state(), "transfer", pan=CARD, amount=5, to_pan="6228480000000015")
    assert msg[F.ACCOUNT_2] == "6228480000000015"
    bill = build_request(state(), "bill", pan=CARD, amount=5)
    assert bill[F.BILL_DATA] and F.ACCOUNT_2 not in bill
    assert build_request(state(), "bill", pan=CARD, amount=5, bill="WATER-42")[F.BILL_DATA] == "WATER-42"


ORIGINAL = Sent(mti="0200", stan="000017", transmitted="0314101500", proc="000000", amount=2500, pan=CARD)


def test_void_names_its_original_in_field_90():
    msg = build_request(state(), "void", pan=CARD, amount=2500, original=ORIGINAL)
    od = parse_field90(msg[F.ORIGINAL_DATA])
    assert (od.mti, od.stan, od.transmitted) == ("0200", "000017", "0314101500")
    assert od.acquirer_id == "00010000001"
    assert msg[F.PROC] == "020000" and msg[F.CONDITION_CODE] == "00"


def test_completion_sets_condition_06():
    pre = Sent(mti="0100", stan="000018", transmitted="0314101600", proc="000000", amount=5000, pan=CARD)
    msg = build_request(state(), "completion", pan=CARD, amount=4000, original=pre)
    assert msg[F.MTI] == "0200" and msg[F.CONDITION_CODE] == "06"
    assert parse_field90(msg[F.ORIGINAL_DATA]).mti == "0100"
    assert msg[F.AMOUNT] == "000000004000"


def test_reversal_carries_the_originals_processing_code_and_amount():
    wd = Sent(mti="0200", stan="000019", transmitted="0314101700", proc="011000", amount=70000, pan=CARD)
    msg = build_request(state(), "reversal", pan=CARD, amount=1, original=wd)
    assert msg[F.MTI] == "0400" and msg[F.PROC] == "011000" and msg[F.AMOUNT] == "000000070000"
    assert parse_field90(msg[F.ORIGINAL_DATA]).stan == "000019"


def test_original_data_only_for_void_completion_reversal():
    assert F.ORIGINAL_DATA not in build_request(state(), "purchase", pan=CARD, amount=1, original=ORIGINAL)


@pytest.fixture(scope="module")
def ctx():
    net = load_network(None)
    return Context(network=net, registry=Registry.from_network(net), bins=BinTable.from_network(net),
                   index=TxnIndex(), token_secret=b"k", business_date="2026-03-14")


@pytest.mark.parametrize("kind, expect", [
    ("preauth", Kind.PREAUTH), ("purchase", Kind.PURCHASE), ("refund", Kind.REFUND),
    ("balance", Kind.BALANCE), ("transfer", Kind.TRANSFER), ("bill", Kind.BILL_PAYMENT),
    ("void", Kind.VOID), ("completion", Kind.COMPLETION), ("reversal", Kind.REVERSAL),
])
def test_built_requests_pass_the_switchs_checks(ctx, kind, expect):
    """What the simulator sends is what the switch accepts (classify, validate, terminal, kind)."""
    msg = build_request(state(), kind, pan=CARD, amount=100, to_pan="6228480000000015", original=ORIGINAL)
    t = Txn(req=msg, mti=msg[F.MTI], received=datetime.now(timezone.utc), t0=0.0)
    assert steps.classify(t) is None and t.kind == expect
    assert steps.validate(t, ctx) is None
    assert steps.identify_terminal(t, ctx) is None
    assert steps.check_allowed(t, ctx) is None
    assert encodes(msg) == msg


def test_batch_close_request():
    msg = batch_close_request(state(batch=3), credits=(2, 1500), debits=(5, 123456))
    assert msg[F.MTI] == "0500" and msg[F.PROC] == "920000" and msg[F.BATCH_NUMBER] == "000003"
    assert msg[F.CREDITS_NUMBER] == "0000000002" and msg[F.CREDITS_AMOUNT] == "0000000000001500"
    assert msg[F.DEBITS_NUMBER] == "0000000005" and msg[F.DEBITS_AMOUNT] == "0000000000123456"
    assert steps.terminal_totals(msg).debits_amount == 123456
    assert format_errors(msg) == [] and encodes(msg) == msg
    trailer = batch_close_request(state(), (0, 0), (0, 0), proc="960000")
    assert trailer[F.PROC] == "960000"


def test_network_request():
    msg = network_request(state())
    assert msg[F.MTI] == "0800" and msg[F.NETWORK_MGMT_CODE] == "301" and msg[F.TERMINAL_ID] == "POS00001"
    assert network_request(state(), "001")[F.NETWORK_MGMT_CODE] == "001"
    assert encodes(msg) == msg


# -- the client over TCP ------------------------------------------------------------------


class Server:
    """Loopback server: collects ``hold`` requests, then answers them in reverse order."""

    def __init__(self, hold: int = 2, answer: bool = True, header_len: int = 0) -> None:
        self.hold, self.answer, self.header_len = hold, answer, header_len
        self.received: list[dict] = []
        self.headers: list[bytes] = []
        self.writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> Endpoint:
        self.server = await asyncio.start_server(self.serve, "127.0.0.1", 0)
        return Endpoint("127.0.0.1", self.server.sockets[0].getsockname()[1])

    async def __aexit__(self, *exc) -> None:
        for w in self.writers:
            w.close()
        self.server.close()
        await self.server.wait_closed()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        batch = []
        try:
            while True:
                n = int.from_bytes(await reader.readexactly(2), "big")
                body = await reader.readexactly(n)
                header, payload = body[:self.header_len], body[self.header_len:]
                doc, _ = iso8583.decode(payload, default_ascii)
                self.received.append(doc)
                self.headers.append(header)
                batch.append((header, doc))
                if len(batch) < self.hold or not self.answer:
                    continue
                for hdr, req in reversed(batch):
                    resp = {k: v for k, v in req.items() if k not in ("p", "1")}
                    resp["t"] = req["t"][:2] + str(int(req["t"][2]) + 1) + "0"
                    resp["39"] = "00"
                    resp["4"] = req.get("4", "000000000000")
                    raw, _ = iso8583.encode(resp, default_ascii)
                    out = hdr[:1] + hdr[3:5] + hdr[1:3] + bytes(raw) if hdr else bytes(raw)
                    writer.write(len(out).to_bytes(2, "big") + out)
                batch = []
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass


def test_client_matches_out_of_order_responses_by_41_and_11():
    async def main():
        async with Server(hold=2) as ep:
            client = await TerminalClient.connect(ep)
            try:
                a = build_request(state(), "purchase", pan=CARD, amount=111, stan="000001")
                b = build_request(state(), "purchase", pan=CARD, amount=222, stan="000002")
                ra, rb = await asyncio.gather(client.send(a, timeout=10), client.send(b, timeout=10))
            finally:
                client.close()
        assert (ra[F.STAN], ra[F.AMOUNT]) == ("000001", "000000000111")
        assert (rb[F.STAN], rb[F.AMOUNT]) == ("000002", "000000000222")
        assert ra[F.MTI] == rb[F.MTI] == "0210"
        assert client.pending == {}

    asyncio.run(main())


def test_client_with_a_tpdu_header():
    async def main():
        srv = Server(hold=1, header_len=5)
        async with srv as ep:
            client = await TerminalClient.connect(ep, LinkOptions(header="6000010000"))
            try:
                resp = await client.send(network_request(state()), timeout=10)
            finally:
                client.close()
        assert resp[F.MTI] == "0810" and resp[F.RESPONSE_CODE] == "00"
        assert srv.headers == [bytes.fromhex("6000010000")]

    asyncio.run(main())


def test_client_fails_pending_requests_when_the_switch_closes():
    async def main():
        srv = Server(hold=1, answer=False)
        async with srv as ep:
            client = await TerminalClient.connect(ep)
            pending = asyncio.create_task(client.send(network_request(state()), timeout=10))
            for _ in range(1000):                      # until the server has it (bounded)
                if srv.received:
                    break
                await asyncio.sleep(0.01)
            for w in srv.writers:
                w.close()
            with pytest.raises(ConnectionError):
                await pending
            await asyncio.wait_for(client.closed, 10)
            assert client.pending == {}

    asyncio.run(main())


def test_client_send_times_out_and_forgets_the_request():
    async def main():
        async with Server(hold=1, answer=False) as ep:
            client = await TerminalClient.connect(ep)
            try:
                with pytest.raises(asyncio.TimeoutError):
                    await client.send(network_request(state()), timeout=0.05)
                assert client.pending == {}
            finally:
                client.close()

    asyncio.run(main())
