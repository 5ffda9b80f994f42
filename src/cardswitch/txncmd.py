"""`cardswitch txn`: one transaction from a simulated terminal, for people and scripts."""

from __future__ import annotations

import asyncio
import sys

from cardswitch.config import Network
from cardswitch.iso8583.constants import RC_TEXT, F
from cardswitch.iso8583.dialect import Message
from cardswitch.iso8583.fields import parse_field54
from cardswitch.pan import mask_pan
from cardswitch.terminal import Sent, TerminalClient, TerminalState, build_request

FIELD_NAMES = {
    F.MTI: "MTI", F.PAN: "PAN", F.PROC: "processing code", F.AMOUNT: "amount",
    F.TRANSMISSION_DT: "transmitted", F.STAN: "STAN", F.SETTLEMENT_DATE: "business date",
    F.RRN: "RRN", F.AUTH_CODE: "auth code", F.RESPONSE_CODE: "response",
    F.TERMINAL_ID: "terminal", F.MERCHANT_ID: "merchant", F.CURRENCY: "currency",
    F.ADDITIONAL_AMOUNTS: "balances", F.BATCH_NUMBER: "batch", F.ORIGINAL_DATA: "original",
}


class TxnError(Exception):
    pass


def terminal_state(net: Network, terminal_id: str, batch: int = 1) -> TerminalState:
    for m in net.merchants:
        for t in m.terminals:
            if t.id == terminal_id:
                acq = net.bank(m.acquirer)
                return TerminalState(terminal=t, merchant_id=m.id, currency=m.currency, batch=batch,
                                     acquirer_inst=acq.institution_id)
    raise TxnError(f"--terminal: no terminal {terminal_id!r} in {net.source}")


def pin_block_for(term: TerminalState, pin: str, pan: str) -> str:
    from cardswitch.crypto.pinblock import encrypt_pin_block

    tpk = term.terminal.tpk
    if tpk is None or not tpk.is_clear:
        raise TxnError(f"terminal {term.terminal.id} has no clear TPK to encrypt a PIN under")
    return encrypt_pin_block(pin, pan, tpk.clear_bytes())


def parse_original(text: str, amount: int, pan: str) -> Sent:
    parts = text.split(":")
    if len(parts) != 3 or not all(p.isdigit() for p in parts) or \
            (len(parts[0]), len(parts[1]), len(parts[2])) != (4, 6, 10):
        raise TxnError(f"--original {text!r}: expected MTI:STAN:FIELD7, e.g. 0200:000123:1128093015")
    return Sent(mti=parts[0], stan=parts[1], transmitted=parts[2], proc="000000", amount=amount, pan=pan)


def describe_response(resp: Message) -> list[str]:
    lines = []
    for k, name in FIELD_NAMES.items():
        if k not in resp:
            continue
        v = resp[k]
        if k == F.PAN:
            v = mask_pan(v)
        elif k == F.RESPONSE_CODE:
            v = f"{v} ({RC_TEXT.get(v, 'unknown')})"
        elif k == F.ADDITIONAL_AMOUNTS:
            try:
                v = ", ".join(f"{'ledger' if a.amount_type == '01' else 'available'} {a.amount} {a.currency}"
                              for a in parse_field54(v))
            except ValueError:
                pass
        lines.append(f"{name:>16}: {v}")
    return lines


async def run_txn(net: Network, args) -> int:
    try:
        term = terminal_state(net, args.terminal, args.batch)
        original = parse_original(args.original, args.amount, args.pan) if args.original else None
        if args.kind in ("void", "completion", "reversal") and original is None:
            raise TxnError(f"{args.kind} needs --original MTI:STAN:FIELD7")
        if args.kind == "transfer" and not args.to_pan:
            raise TxnError("transfer needs --to PAN")
        pin = pin_block_for(term, args.pin, args.pan) if args.pin else ""
        msg = build_request(term, args.kind, pan=args.pan, amount=args.amount, pin_block=pin,
                            to_pan=args.to_pan or "", bill=args.bill or "", original=original,
                            stan=args.stan)
    except TxnError as e:
        print(f"cardswitch: {e}", file=sys.stderr)
        return 2
    try:
        client = await TerminalClient.connect(net.switch.listen, net.switch.link)
    except OSError as e:
        print(f"cardswitch: cannot reach the switch at {net.switch.listen}: {e.strerror or e}", file=sys.stderr)
        return 1
    try:
        resp = await client.send(msg, args.timeout, tak=term.tak)
    except asyncio.TimeoutError:
        print(f"cardswitch: no answer from the switch within {args.timeout:.0f}s", file=sys.stderr)
        return 1
    except ConnectionError as e:
        print(f"cardswitch: {e}", file=sys.stderr)
        return 1
    finally:
        client.close()
    print(f"{'request':>16}: {args.kind} {msg[F.MTI]} STAN {msg[F.STAN]} field7 {msg[F.TRANSMISSION_DT]}")
    for line in describe_response(resp):
        print(line)
    return 0 if resp.get(F.RESPONSE_CODE) == "00" else 1
