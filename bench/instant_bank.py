"""A bank host that approves every request at once, for benchmarks.

    python bench/instant_bank.py --port P        (P = 0: any free port)

2-byte framing, ISO 8583 ``default_ascii``. It never decodes a message into
fields: it copies the request's fields it must echo byte for byte and adds
38/39 (see ``wirebytes.Answerer``), so it costs a few microseconds per
request and is never what a run measures.

- 0100/0200 (and repeats): 0110/0210 echoing 2 3 4 7 11 12 13 15 32 33 37 41
  42 49 60 90 100 102 103, with 38 = 123456 and 39 = 00;
- 0220/0420 advices (and repeats): 0230/0430 echoing the same, 39 = 00;
- 0800 (sign-on, sign-off, echo): 0810 echoing 7 11 33 70, 39 = 00;
- other requests: MTI + 10 with the same echo and 39 = 00; responses are dropped.

Prints ``ready <port>`` on stdout once listening. Stops on SIGINT/SIGTERM,
when its parent goes away, or after ``--max-seconds``.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

import uvloop

from wirebytes import ASCII_LAYOUT, Frames2, Layout, MalformedMessage, encode_added

from cardswitch.iso8583.constants import RC

AUTH_CODE = "123456"

FINANCIAL_ECHO = frozenset({2, 3, 4, 7, 11, 12, 13, 15, 32, 33, 37, 41, 42, 49, 60, 90, 100, 102, 103})
NETWORK_ECHO = frozenset({7, 11, 33, 70})


class InstantBank:
    """Sans-I/O: request payload in, response payload out (or None)."""

    __slots__ = ("approve", "acknowledge", "network", "answered", "dropped")

    def __init__(self, layout: Layout = ASCII_LAYOUT) -> None:
        approved = encode_added(layout, {38: AUTH_CODE, 39: RC.APPROVED})
        ok = encode_added(layout, {39: RC.APPROVED})
        self.approve = layout.answerer(FINANCIAL_ECHO, approved).answer
        self.acknowledge = layout.answerer(FINANCIAL_ECHO, ok).answer
        self.network = layout.answerer(NETWORK_ECHO, ok).answer
        self.answered = 0
        self.dropped = 0

    def answer(self, payload: bytes) -> bytes | None:
        """The response to one request payload; None for responses and garbage."""
        # MTI digits: version, class, function (0 request, 1 response, 2 advice, 3 advice
        # response), origin
        cls = payload[1:2]
        fn = payload[2:3]
        try:
            if fn == b"0" and (cls == b"2" or cls == b"1"):
                out = self.approve(payload)
            elif fn == b"0" or fn == b"2":
                out = self.network(payload) if cls == b"8" else self.acknowledge(payload)
            else:
                self.dropped += 1
                return None
        except MalformedMessage:
            self.dropped += 1
            return None
        self.answered += 1
        return out


class BankProtocol(asyncio.Protocol):
    __slots__ = ("bank", "frames", "transport")

    def __init__(self, bank: InstantBank) -> None:
        self.bank = bank
        self.frames = Frames2()
        self.transport = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            payloads = self.frames.feed(data)
        except ValueError:
            self.transport.close()
            return
        answer = self.bank.answer
        out = []
        for p in payloads:
            r = answer(p)
            if r is not None:
                out.append(len(r).to_bytes(2, "big"))
                out.append(r)
        if out:
            self.transport.write(b"".join(out))


async def serve(host: str, port: int, max_seconds: float, on_ready=None) -> None:
    from children import watch_parent

    loop = asyncio.get_running_loop()
    bank = InstantBank()
    server = await loop.create_server(lambda: BankProtocol(bank), host, port, backlog=1024)
    done = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, done.set)
    watch_parent(loop, done.set, max_seconds)
    bound = server.sockets[0].getsockname()[1]
    if on_ready:
        on_ready(bound)
    await done.wait()
    server.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0 = any free port)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--max-seconds", type=float, default=0, help="stop after this long (0 = no limit)")
    args = ap.parse_args(argv)

    def ready(port: int) -> None:
        print(f"ready {port}", flush=True)

    try:
        uvloop.run(serve(args.host, args.port, args.max_seconds, ready))
    except OSError as e:
        print(f"instant_bank: cannot listen on {args.host}:{args.port}: {e.strerror}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
