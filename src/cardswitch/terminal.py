"""A simulated POS terminal or ATM: builds requests and talks to the switch.

Used by `cardswitch txn`, the demo and the load generator. Request building
is pure (``build_request``); ``TerminalClient`` is a small asyncio client
with many requests in flight, matched by 41 + 11 as wire.md 4 says.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field

from cardswitch.config import Endpoint, LinkOptions, Terminal
from cardswitch.iso8583.constants import (
    CONDITION_COMPLETION,
    MTI,
    PROC_BATCH_CLOSE,
    F,
    NetMgmt,
    TxnType,
)
from cardswitch.crypto.mac import mac_alg3
from cardswitch.iso8583 import macfield
from cardswitch.iso8583.dialect import Message, get_dialect
from cardswitch.iso8583.fields import format_field90
from cardswitch.iso8583.framing import FrameReader, Framing
from cardswitch.switch.clock import field7, utc_now

# `cardswitch txn KIND`: the kinds a person can ask for, and their MTI + field 3.
KINDS: dict[str, tuple[str, str]] = {
    "preauth": (MTI.AUTH_REQUEST, TxnType.PURCHASE + "0000"),
    "purchase": (MTI.FIN_REQUEST, TxnType.PURCHASE + "0000"),
    "completion": (MTI.FIN_REQUEST, TxnType.PURCHASE + "0000"),
    "withdrawal": (MTI.FIN_REQUEST, TxnType.WITHDRAWAL + "0000"),
    "void": (MTI.FIN_REQUEST, TxnType.VOID + "0000"),
    "refund": (MTI.FIN_REQUEST, TxnType.REFUND + "0000"),
    "deposit": (MTI.FIN_REQUEST, TxnType.DEPOSIT + "0000"),
    "balance": (MTI.FIN_REQUEST, TxnType.BALANCE + "0000"),
    "transfer": (MTI.FIN_REQUEST, TxnType.TRANSFER + "0000"),
    "bill": (MTI.FIN_REQUEST, TxnType.BILL_PAYMENT + "0000"),
    "reversal": (MTI.REVERSAL_REQUEST, TxnType.PURCHASE + "0000"),
}


@dataclass(slots=True)
class Sent:
    """What a terminal sent, kept to build voids, completions and reversals."""

    mti: str
    stan: str
    transmitted: str
    proc: str
    amount: int
    pan: str
    rrn: str = ""
    auth_code: str = ""
    response_code: str = ""


@dataclass
class TerminalState:
    terminal: Terminal
    merchant_id: str
    currency: str = "156"
    batch: int = 1
    acquirer_inst: str = ""
    _stan: itertools.count = field(default_factory=lambda: itertools.count(1))

    def next_stan(self) -> str:
        return f"{(next(self._stan) - 1) % 999999 + 1:06d}"

    @property
    def tak(self) -> bytes | None:
        """The terminal's clear MAC key (test networks), or None: no MACs."""
        k = self.terminal.tak
        return k.clear_bytes() if k is not None and k.is_clear else None


def build_request(term: TerminalState, kind: str, *, pan: str = "", amount: int = 0,
                  pin_block: str = "", to_pan: str = "", bill: str = "", original: Sent | None = None,
                  track2: str = "", expiry: str = "", stan: str | None = None,
                  transmitted: str | None = None) -> Message:
    """A terminal request as a real terminal would send it (wire.md 3)."""
    mti, proc = KINDS[kind]
    now = utc_now()
    msg: Message = {
        F.MTI: mti,
        F.PROC: proc if original is None or kind != "reversal" else original.proc,
        F.AMOUNT: f"{amount:012d}",
        F.TRANSMISSION_DT: transmitted or field7(now),
        F.STAN: stan or term.next_stan(),
        F.LOCAL_TIME: now.strftime("%H%M%S"),
        F.LOCAL_DATE: now.strftime("%m%d"),
        F.ENTRY_MODE: "051" if pin_block else "021",
        F.CONDITION_CODE: "00",
        F.TERMINAL_ID: term.terminal.id,
        F.MERCHANT_ID: term.merchant_id,
        F.CURRENCY: term.currency,
        F.BATCH_NUMBER: f"{term.batch:06d}",
    }
    if track2:
        msg[F.TRACK2] = track2
    else:
        msg[F.PAN] = pan
    if expiry:
        msg[F.EXPIRY] = expiry
    if pin_block:
        msg[F.PIN_BLOCK] = pin_block
    if kind == "transfer":
        msg[F.ACCOUNT_2] = to_pan
    if kind == "bill":
        msg[F.BILL_DATA] = bill or "UTILITY-0000000001"
    if original is not None and kind in ("void", "completion", "reversal"):
        msg[F.ORIGINAL_DATA] = format_field90(original.mti, original.stan, original.transmitted,
                                              term.acquirer_inst or "0", "0")
        if kind == "completion":
            msg[F.CONDITION_CODE] = CONDITION_COMPLETION
        if kind == "reversal":
            msg[F.AMOUNT] = f"{original.amount:012d}"
    return msg


def batch_close_request(term: TerminalState, credits: tuple[int, int], debits: tuple[int, int],
                        proc: str = PROC_BATCH_CLOSE) -> Message:
    now = utc_now()
    return {
        F.MTI: MTI.RECONCILE_REQUEST,
        F.PROC: proc,
        F.TRANSMISSION_DT: field7(now),
        F.STAN: term.next_stan(),
        F.TERMINAL_ID: term.terminal.id,
        F.MERCHANT_ID: term.merchant_id,
        F.BATCH_NUMBER: f"{term.batch:06d}",
        F.CREDITS_NUMBER: f"{credits[0]:010d}",
        F.CREDITS_AMOUNT: f"{credits[1]:016d}",
        F.DEBITS_NUMBER: f"{debits[0]:010d}",
        F.DEBITS_AMOUNT: f"{debits[1]:016d}",
    }


def network_request(term: TerminalState, code: str = NetMgmt.ECHO) -> Message:
    return {
        F.MTI: MTI.NETWORK_REQUEST,
        F.TRANSMISSION_DT: field7(utc_now()),
        F.STAN: term.next_stan(),
        F.TERMINAL_ID: term.terminal.id,
        F.NETWORK_MGMT_CODE: code,
    }


class TerminalClient(asyncio.Protocol):
    """One TCP connection to the switch; many requests in flight, matched by 41 + 11."""

    def __init__(self, options: LinkOptions) -> None:
        self.dialect = get_dialect(options.dialect)
        hl = len(bytes.fromhex(options.header)) if options.header else 0
        self.framing = Framing(options.framing, hl, 65535)
        self.header = bytes.fromhex(options.header) if options.header else b""
        self.reader = FrameReader(self.framing)
        self.pending: dict[tuple[str, str], asyncio.Future] = {}
        self.transport: asyncio.Transport | None = None
        self.closed: asyncio.Future | None = None

    @classmethod
    async def connect(cls, endpoint: Endpoint, options: LinkOptions | None = None) -> TerminalClient:
        loop = asyncio.get_running_loop()
        client = cls(options or LinkOptions())
        client.closed = loop.create_future()
        await loop.create_connection(lambda: client, endpoint.host, endpoint.port)
        return client

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        for _header, payload in self.reader.feed(data):
            msg = self.dialect.decode(payload)
            fut = self.pending.pop((msg.get(F.TERMINAL_ID, ""), msg.get(F.STAN, "")), None)
            if fut is not None and not fut.done():
                fut.set_result(msg)

    def connection_lost(self, exc) -> None:
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(ConnectionError("switch closed the connection"))
        self.pending.clear()
        if self.closed is not None and not self.closed.done():
            self.closed.set_result(None)

    async def send(self, msg: Message, timeout: float = 30.0, tak: bytes | None = None) -> Message:
        """Send and wait for the answer; with the terminal's clear ``tak`` (a
        simulated terminal holds its own keys), MAC the request (wire.md 7)."""
        assert self.transport is not None
        key = (msg.get(F.TERMINAL_ID, ""), msg[F.STAN])
        fut = asyncio.get_running_loop().create_future()
        self.pending[key] = fut
        if tak is not None:
            msg = dict(msg)
            field, covered = macfield.prepare(self.dialect, msg)
            msg[field] = mac_alg3(tak, covered).hex().upper()
        self.transport.write(self.framing.encode(self.dialect.encode(msg), self.header))
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            self.pending.pop(key, None)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
