"""Fuzzing the bank-link reader: a bank that answers garbage.

Three levels: hypothesis straight into the link's frame handler (no socket),
a seeded garbage issuer over TCP (the link must keep working, count what it
could not read and recover), and 100,000 bad frames through a connection's
reader with memory measured. The event loop's exception handler must stay
silent (``run`` checks it) and no task may be left behind.
"""

from __future__ import annotations

import asyncio
import gc
import random
import tracemalloc

import iso8583
from hypothesis import given, settings
from hypothesis import strategies as st
from iso8583.specs import default_ascii as ascii_spec

from cardswitch.config import Endpoint, LinkOptions
from cardswitch.iso8583.constants import response_mti
from cardswitch.switch.banklink import LinkDown, LinkTimeout, _LinkConn
from test_banklink import fin_request, make_link, run


def enc(msg: dict) -> bytes:
    raw, _ = iso8583.encode(dict(msg), ascii_spec)
    return bytes(raw)


def dec(payload: bytes) -> dict:
    doc, _ = iso8583.decode(payload, ascii_spec)
    return doc


def answer_to(req: dict, rc: str = "00") -> dict:
    resp = {"t": response_mti(req["t"]), "11": req["11"], "39": rc}
    for k in ("4", "37", "41"):
        if k in req:
            resp[k] = req[k]
    return resp


RESPONSE = enc({"t": "0210", "3": "000000", "4": "000000000100", "11": "000001",
                "37": "000000000001", "39": "00", "41": "TERM0001"})
ISSUER_REQUEST = enc({"t": "0200", "3": "000000", "4": "000000000100", "11": "000777",
                      "37": "ABC123456789", "41": "TERM0001"})
ISSUER_ECHO = enc({"t": "0800", "7": "1128101010", "11": "424242", "70": "301"})


# -- hypothesis, no socket ----------------------------------------------------------

class FakeConn:
    """Stands in for a connection: what the link writes back is kept."""

    closed = False

    def __init__(self, host) -> None:
        self.host = host
        self.sent = 0
        self.draining = False
        self.written: list[bytes] = []

    def write_frame(self, payload: bytes, header: bytes = b"") -> bool:
        self.written.append(payload)
        return True


@st.composite
def issuer_frames(draw) -> bytes:
    base = draw(st.sampled_from([RESPONSE, ISSUER_REQUEST, ISSUER_ECHO]))
    kind = draw(st.sampled_from(["as_is", "random", "truncated", "flipped", "field", "mti"]))
    if kind == "as_is":
        return base
    if kind == "random":
        return draw(st.binary(max_size=300))
    if kind == "truncated":
        return base[:draw(st.integers(0, len(base) - 1))]
    if kind == "flipped":
        data = bytearray(base)
        for _ in range(draw(st.integers(1, 3))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        return bytes(data)
    if kind == "field":
        start = draw(st.integers(20, len(base) - 1))
        n = draw(st.integers(1, min(8, len(base) - start)))
        return base[:start] + draw(st.binary(min_size=n, max_size=n)) + base[start + n:]
    return draw(st.sampled_from(["0210", "0430", "0810", "0200", "0420", "0800", "9999", "0000", "02x0"])
                ).encode() + base[4:]


@settings(max_examples=400, deadline=None)
@given(frames=st.lists(issuer_frames(), min_size=1, max_size=20))
def test_any_frame_from_a_bank_is_handled(frames):
    async def main():
        late: list[dict] = []
        link = make_link([Endpoint("127.0.0.1", 9)], on_late=late.append)
        link._loop = asyncio.get_running_loop()
        conn = FakeConn(link._hosts[0])
        # A request in flight under STAN 000001 / RRN 000000000001, as RESPONSE answers.
        req = fin_request(100, "000000000001")
        p = link._send(req, 60.0, stan="000001", conn=conn)
        requests_written = len(conn.written)
        for payload in frames:
            link._on_frame(conn, payload)
        await asyncio.sleep(0)
        s = link.stats
        assert s.frames_in == len(frames)
        assert s.decode_errors + s.responses + s.late + s.unsolicited + s.issuer_netmgmt == len(frames)
        assert len(late) == s.late
        assert s.responses <= 1 and p.fut.done() == (s.responses == 1)
        for out in conn.written[requests_written:]:       # every answer we wrote decodes
            doc = dec(out)
            assert doc["t"][2] in "13" and doc["39"] in ("00", "12", "30")
        if p.timer is not None:
            p.timer.cancel()
    run(main())


# -- a garbage issuer over TCP ----------------------------------------------------------

class GarbageIssuer:
    """Signs on, then answers each request one of many wrong ways (seeded), or
    right; ``good = True`` makes every answer right."""

    WAYS = ("right", "right", "noise", "truncated", "wrong_stan", "wrong_rrn", "twice", "late_class",
            "unsolicited", "echo", "silence", "bad_fields", "oversized", "stall")

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.good = False
        self.server: asyncio.AbstractServer | None = None
        self.writers: list[asyncio.StreamWriter] = []
        self.ways: dict[str, int] = {}

    async def start(self) -> "GarbageIssuer":
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        return self

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint("127.0.0.1", self.server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        self.server.close()
        for w in self.writers:
            w.close()
        await self.server.wait_closed()

    def _send(self, w: asyncio.StreamWriter, payload: bytes) -> None:
        w.write(len(payload).to_bytes(2, "big") + payload)

    async def _client(self, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.writers.append(w)
        try:
            while True:
                n = int.from_bytes(await reader.readexactly(2), "big")
                msg = dec(await reader.readexactly(n))
                if msg["t"][2] in "13":
                    continue
                if msg["t"] == "0800" or self.good:
                    self._send(w, enc(answer_to(msg)))
                    continue
                way = self.rng.choice(self.WAYS)
                self.ways[way] = self.ways.get(way, 0) + 1
                good = enc(answer_to(msg))
                if way == "right":
                    self._send(w, good)
                elif way == "noise":
                    self._send(w, self.rng.randbytes(self.rng.randint(1, 200)))
                elif way == "truncated":
                    self._send(w, good[:self.rng.randint(0, len(good) - 1)])
                elif way == "wrong_stan":
                    self._send(w, enc(dict(answer_to(msg), **{"11": "%06d" % self.rng.randint(0, 999999)})))
                elif way == "wrong_rrn":
                    self._send(w, enc(dict(answer_to(msg), **{"37": "XXXXXXXXXXXX"})))
                elif way == "twice":
                    self._send(w, good)
                    self._send(w, good)
                elif way == "late_class":
                    self._send(w, enc(dict(answer_to(msg), t="0430")))
                elif way == "unsolicited":
                    self._send(w, ISSUER_REQUEST)
                    self._send(w, good)
                elif way == "echo":
                    self._send(w, ISSUER_ECHO)
                elif way == "bad_fields":
                    bad = bytearray(good)
                    bad[-3] = ord("Z")
                    self._send(w, bytes(bad))
                elif way == "oversized":
                    w.write((60000).to_bytes(2, "big") + b"0210")     # over max_frame: the link drops us
                elif way == "stall":
                    w.write((200).to_bytes(2, "big") + good[:10])     # never completed: read timeout
                    await asyncio.sleep(0.5)
                    return
        except (asyncio.IncompleteReadError, ConnectionError, iso8583.DecodeError):
            pass
        finally:
            w.close()


def test_a_bank_answering_garbage_does_not_break_the_link():
    async def main():
        before = asyncio.all_tasks()
        issuer = await GarbageIssuer(seed=4242).start()
        late = []
        link = make_link([issuer.endpoint], options=LinkOptions(read_timeout_ms=200), on_late=late.append)
        await link.start()
        assert await link.wait_online(5)
        outcomes = {"answered": 0, "timeout": 0, "down": 0}
        for batch in range(15):
            reqs = [fin_request(i, "%012d" % (batch * 100 + i)) for i in range(20)]
            results = await asyncio.gather(*(link.request(r, 0.15) for r in reqs), return_exceptions=True)
            for r, res in zip(reqs, results):
                if isinstance(res, dict):
                    outcomes["answered"] += 1
                    assert res["11"] == r["11"] and res["37"] == r["37"] and res["t"] == "0210"
                elif isinstance(res, LinkTimeout):
                    outcomes["timeout"] += 1
                elif isinstance(res, LinkDown):
                    outcomes["down"] += 1
                else:
                    raise AssertionError(f"unexpected outcome {res!r}")
            if not link.online:
                assert await link.wait_online(5), "the link did not come back"
        assert outcomes["answered"] > 0 and outcomes["timeout"] > 0, outcomes
        s = link.stats
        assert s.decode_errors > 0 and s.framing_errors > 0 and s.late > 0 and s.unsolicited > 0
        assert s.connects > 1                              # dropped (oversized, stalled) and back
        # Good answers again: everything works.
        issuer.good = True
        assert await link.wait_online(5)
        for i in range(5):
            resp = await link.request(fin_request(i, "%012d" % (9000 + i)), 5.0)
            assert resp["39"] == "00"
        await link.stop()
        await issuer.stop()
        me = asyncio.current_task()
        for _ in range(200):          # the fake issuer's own connection tasks see EOF and end
            left = [t for t in asyncio.all_tasks() - before if not t.done() and t is not me]
            if not left:
                break
            await asyncio.sleep(0.01)
        assert left == [], left
    run(main())


# -- 100,000 bad frames through one connection's reader ------------------------------------

class NullTransport:
    def __init__(self) -> None:
        self.bytes_out = 0
        self.closed = False

    def write(self, data: bytes) -> None:
        self.bytes_out += len(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name, default=None):
        return default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def bad_bank_frames(n: int, rng: random.Random) -> list[bytes]:
    """Frames that leave the connection open: noise, truncated and mangled
    responses and requests, unmatched responses, the bank's own 0800s."""
    out = []
    bases = [RESPONSE, ISSUER_REQUEST, ISSUER_ECHO]
    for i in range(n):
        base = bases[i % 3]
        kind = i % 5
        if kind == 0:
            p = rng.randbytes(rng.randint(1, 200))
        elif kind == 1:
            p = base[:rng.randint(0, len(base) - 1)]
        elif kind == 2:
            j = rng.randrange(len(base))
            p = base[:j] + bytes([rng.randrange(256)]) + base[j + 1:]
        elif kind == 3:
            p = base
        else:
            p = b"0210" + rng.randbytes(rng.randint(0, 80))
        out.append(len(p).to_bytes(2, "big") + p)
    return out


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_memory_stays_flat_over_100k_bad_frames_from_a_bank():
    """10,000 frames to warm up, 70,000 with the process's resident memory
    watched, then 20,000 with every allocation traced (tracemalloc, slow): what
    is still allocated afterwards must be next to nothing."""
    async def main():
        late = [0]
        link = make_link([Endpoint("127.0.0.1", 9)], on_late=lambda m: late.__setitem__(0, late[0] + 1))
        link._loop = asyncio.get_running_loop()
        conn = _LinkConn(link, link._hosts[0])
        transport = NullTransport()
        conn.connection_made(transport)
        pool = bad_bank_frames(1000, random.Random(11))
        chunk = b"".join(pool)
        per_chunk = sum(1 for f in pool if f != b"\x00\x00")    # keep-alives are not frames_in

        async def feed(chunks: int) -> None:
            for _ in range(chunks):
                for k in range(0, len(chunk), 16384):      # as a socket would hand it over
                    conn.data_received(chunk[k:k + 16384])
                await asyncio.sleep(0)                     # let coalesced answers flush

        await feed(10)
        gc.collect()
        rss0 = rss_bytes()
        await feed(70)
        gc.collect()
        rss_growth = rss_bytes() - rss0
        tracemalloc.start()
        try:
            await feed(20)
            await asyncio.sleep(0)
            gc.collect()
            growth, _ = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        print(f"bank link reader: RSS +{rss_growth} bytes over 70,000 bad frames, "
              f"{growth} bytes left allocated over 20,000")
        assert rss_growth < 8 * 1024 * 1024, rss_growth
        assert growth < 256 * 1024, growth
        s = link.stats
        assert s.frames_in == 100 * per_chunk and not conn.closed and not transport.closed
        assert s.decode_errors > 20_000 and s.late == late[0] > 0 and s.unsolicited > 0
        assert transport.bytes_out > 0                     # answers to the bank's requests went out
        assert link.in_flight == 0
        conn.close()
    run(main())
