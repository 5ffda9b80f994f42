"""A bare asyncio relay: the floor cost of one proxy hop, for benchmarks.

    python bench/relay.py --listen P --upstream HOST:PORT     (P = 0: any free port)

Terminals connect to it; every frame goes on one upstream connection to the
bank, with field 11 re-stamped with the relay's own trace number (so requests
from different terminals never collide); the answer is routed back by that
number, with the terminal's field 11 put back. That is the least a switch
must do: frame, find one field, match, forward. No decoding, no journal.

Prints ``ready <port>`` on stdout once listening and connected upstream.
Stops on SIGINT/SIGTERM, when its parent goes away, or after ``--max-seconds``.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

import uvloop

from wirebytes import ASCII_LAYOUT, STAN, Frames2, Layout, MalformedMessage

STAN_MAX = 999999


class Restamper:
    """Sans-I/O matching: our trace number out, the terminal's back in."""

    __slots__ = ("layout", "pending", "_next", "unmatched", "malformed")

    def __init__(self, layout: Layout = ASCII_LAYOUT) -> None:
        self.layout = layout
        self.pending: dict[bytes, tuple[object, bytes]] = {}
        self._next = 0
        self.unmatched = 0
        self.malformed = 0

    def outbound(self, payload: bytes, origin: object) -> bytes | None:
        """The request to send upstream, remembering ``origin``; None if unusable."""
        try:
            span = self.layout.find(payload, STAN)
        except MalformedMessage:
            span = None
        if span is None or span[1] - span[0] != 6:
            self.malformed += 1
            return None
        s, e = span
        pending = self.pending
        n = self._next
        while True:
            n = n + 1 if n < STAN_MAX else 1
            ours = b"%06d" % n
            if ours not in pending:
                break
        self._next = n
        pending[ours] = (origin, payload[s:e])
        return b"".join((payload[:s], ours, payload[e:]))

    def inbound(self, payload: bytes) -> tuple[object, bytes] | None:
        """(origin, response with the terminal's field 11) or None when unmatched."""
        try:
            span = self.layout.find(payload, STAN)
        except MalformedMessage:
            span = None
        if span is None:
            self.malformed += 1
            return None
        s, e = span
        got = self.pending.pop(payload[s:e], None)
        if got is None:
            self.unmatched += 1
            return None
        origin, theirs = got
        return origin, b"".join((payload[:s], theirs, payload[e:]))

    def forget(self, origin: object) -> None:
        """A terminal went away: drop what it has in flight."""
        dead = [k for k, (o, _) in self.pending.items() if o is origin]
        for k in dead:
            del self.pending[k]


class Upstream(asyncio.Protocol):
    def __init__(self, relay: "Relay") -> None:
        self.relay = relay
        self.frames = Frames2()

    def connection_made(self, transport) -> None:
        self.relay.upstream = transport

    def data_received(self, data: bytes) -> None:
        try:
            payloads = self.frames.feed(data)
        except ValueError:
            self.relay.upstream.close()
            return
        inbound = self.relay.stamps.inbound
        if len(payloads) == 1:
            got = inbound(payloads[0])
            if got is not None:
                t, msg = got
                t.write(len(msg).to_bytes(2, "big") + msg)
            return
        # many answers in one read: one write per terminal
        batches: dict[object, list[bytes]] = {}
        for p in payloads:
            got = inbound(p)
            if got is not None:
                t, msg = got
                b = batches.get(t)
                if b is None:
                    batches[t] = b = []
                b.append(len(msg).to_bytes(2, "big"))
                b.append(msg)
        for t, parts in batches.items():
            t.write(b"".join(parts))

    def connection_lost(self, exc) -> None:
        self.relay.upstream_lost()


class Downstream(asyncio.Protocol):
    __slots__ = ("relay", "frames", "transport")

    def __init__(self, relay: "Relay") -> None:
        self.relay = relay
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
        relay = self.relay
        up = relay.upstream
        if up is None or up.is_closing():
            self.transport.close()
            return
        outbound = relay.stamps.outbound
        t = self.transport
        out = []
        for p in payloads:
            msg = outbound(p, t)
            if msg is not None:
                out.append(len(msg).to_bytes(2, "big"))
                out.append(msg)
        if out:
            up.write(b"".join(out))

    def connection_lost(self, exc) -> None:
        self.relay.stamps.forget(self.transport)


class Relay:
    def __init__(self) -> None:
        self.stamps = Restamper()
        self.upstream = None
        self.lost = asyncio.Event()

    def upstream_lost(self) -> None:
        self.upstream = None
        self.lost.set()


async def serve(listen_host: str, listen_port: int, up_host: str, up_port: int,
                max_seconds: float, on_ready=None) -> int:
    from children import watch_parent

    loop = asyncio.get_running_loop()
    relay = Relay()
    await loop.create_connection(lambda: Upstream(relay), up_host, up_port)
    server = await loop.create_server(lambda: Downstream(relay), listen_host, listen_port, backlog=1024)
    done = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, done.set)
    watch_parent(loop, done.set, max_seconds)
    if on_ready:
        on_ready(server.sockets[0].getsockname()[1])
    stop = asyncio.ensure_future(done.wait())
    lost = asyncio.ensure_future(relay.lost.wait())
    await asyncio.wait((stop, lost), return_when=asyncio.FIRST_COMPLETED)
    server.close()
    for f in (stop, lost):
        f.cancel()
    if relay.lost.is_set() and not done.is_set():
        print("relay: upstream connection lost", file=sys.stderr)
        return 1
    if relay.upstream is not None:
        relay.upstream.close()
    return 0


def parse_hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    return host or "127.0.0.1", int(port)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--listen", type=int, default=0, help="port on 127.0.0.1 (0 = any free port)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--upstream", type=parse_hostport, required=True, help="the bank, HOST:PORT")
    ap.add_argument("--max-seconds", type=float, default=0, help="stop after this long (0 = no limit)")
    args = ap.parse_args(argv)

    def ready(port: int) -> None:
        print(f"ready {port}", flush=True)

    up_host, up_port = args.upstream
    try:
        return uvloop.run(serve(args.host, args.listen, up_host, up_port, args.max_seconds, ready))
    except OSError as e:
        print(f"relay: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
