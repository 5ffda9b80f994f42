"""Transaction, balance-change and alert events on MQTT (operations.md 3).

Topics and payloads (JSON, orjson):

- ``cardswitch/txn/<merchant_id>``: every completed transaction (``txn_event``):
  masked PAN and token, amount, currency, kind, codes, RRN, times, trace ID.
- ``cardswitch/notify/<issuer_id>``: a balance-change notice per card for each
  approved money-moving transaction (``balance_notices``): the bank's SMS
  alert feed. A transfer gives two (debit of the sending card, credit of the
  receiving one); a void or a reversal that undid an approved debit gives the
  mirror notice (credit), and so on.
- ``cardswitch/alert/<kind>``: link and store-and-forward alerts
  (``publish_alert``; ``link_state`` fits ``BankLink(on_state=...)``).

Never a full PAN, PIN block, track data, CVV or key: the record holds none,
and ``_masked`` re-masks anything that still looks like a bare PAN.

How a slow or absent broker is kept away from transactions
-----------------------------------------------------------
``publish_*`` and ``count`` build the payload, append it to a bounded
``deque`` and return: O(1), no awaiting, never raising. When the buffer is
full the *oldest* event is dropped (``dropped`` += 1): the feed stays
current, and a notice minutes late is worth less than the newest one.
One background task (``start``) connects with aiomqtt, publishes from the
head of the buffer with up to ``window`` publishes in flight, and when the
broker is down or goes away reconnects with exponential backoff; what was
in flight and not acknowledged goes back to the head of the buffer.

Delivery (``qos_*``): balance notices and alerts use QoS 1: the broker
acknowledges each; one not acknowledged when the connection fails goes back
to the head of the buffer and is sent again after reconnecting: at least
once while the switch runs, so a consumer deduplicates on ``id`` + ``leg``.
The transaction feed uses QoS 0: it is the high-volume one (dashboards; the
journal and the admin API hold the record), and with aiomqtt a QoS 1
publish costs about half as much CPU again as a QoS 0 one (measured here:
about 60 against 40 microseconds per event). A QoS 0 event already written to a
connection that then fails may be lost; buffered ones are sent after
reconnecting. Events still buffered when the switch stops, or pushed out of
a full buffer, are lost: the journal is the record, events are a feed.

Counters (plain ints, for the metrics module): ``published`` (acknowledged
by the broker; for QoS 0, written to the connection), ``dropped`` (pushed
out of a full buffer), ``failed`` (given up: could not be encoded, left
unsent at ``stop``, or offered after it), ``errors`` (publish attempts that
failed and were retried), ``connects``, ``connect_failures``; ``pending`` is
the buffer depth and ``connected`` the broker link's state. Every event
offered ends up counted once in ``published``, ``dropped`` or ``failed``, or
is still pending or in flight.

Call the ``publish_*`` methods from the event loop's thread (the pipeline
does); they are not thread-safe.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import ssl
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import orjson

from cardswitch.iso8583.constants import RC
from cardswitch.logs import trace_id
from cardswitch.pan import mask_pan
from cardswitch.switch.backoff import Backoff
from cardswitch.switch.records import CREDIT_KINDS, DEBIT_KINDS, Kind, Status, TxnRecord

log = logging.getLogger("cardswitch.events")

TOPIC_ROOT = "cardswitch"
DEBIT = "debit"
CREDIT = "credit"

# Alert kinds (the last topic level of cardswitch/alert/<kind>).
ALERT_LINK = "link"
ALERT_SAF = "saf"


# -- connection target -----------------------------------------------------------


@dataclass(slots=True, frozen=True)
class BrokerAddress:
    host: str
    port: int
    username: str | None = None
    password: str | None = None
    tls: bool = False

    def __str__(self) -> str:                  # for logs: never the password
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def parse_broker_url(url: str) -> BrokerAddress:
    """``mqtt://[user[:pass]@]host[:port]`` (1883), ``mqtts://...`` (TLS, 8883);
    ``tcp://`` is taken as ``mqtt://``. ValueError names what is wrong."""
    parts = urlsplit(url if "://" in url else "mqtt://" + url)
    scheme = parts.scheme.lower()
    if scheme not in ("mqtt", "tcp", "mqtts", "ssl"):
        raise ValueError(f"mqtt url {url!r}: scheme must be mqtt:// or mqtts://")
    tls = scheme in ("mqtts", "ssl")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"mqtt url {url!r}: bad port") from None
    if not parts.hostname:
        raise ValueError(f"mqtt url {url!r}: no host")
    return BrokerAddress(parts.hostname, port or (8883 if tls else 1883),
                         unquote(parts.username) if parts.username else None,
                         unquote(parts.password) if parts.password else None, tls)


# -- payloads (pure) ----------------------------------------------------------------


def topic_level(value: str) -> str:
    """One topic level from an ID: no separators or wildcards, never empty."""
    v = value.strip()
    if not v:
        return "_"
    if "/" in v or "+" in v or "#" in v or "\0" in v:
        v = v.replace("/", "_").replace("+", "_").replace("#", "_").replace("\0", "_")
    return v


def _masked(pan_masked: str) -> str:
    """The record's masked PAN; a bare digit string is masked again (last guard)."""
    if pan_masked.isdigit() and len(pan_masked) >= 11:
        return mask_pan(pan_masked)
    return pan_masked


def txn_event(rec: TxnRecord, trace: str = "") -> dict[str, Any]:
    """The ``cardswitch/txn/<merchant_id>`` payload of a completed transaction."""
    ev: dict[str, Any] = {
        "event": "txn",
        "id": rec.id,
        "trace": trace,
        "business_date": rec.business_date,
        "received_at": rec.received_at,
        "completed_at": rec.completed_at,
        "mti": rec.mti,
        "proc": rec.proc,
        "kind": rec.kind,
        "amount": rec.amount,
        "currency": rec.currency,
        "pan_masked": _masked(rec.pan_masked),
        "pan_token": rec.pan_token,
        "terminal_id": rec.terminal_id,
        "merchant_id": rec.merchant_id,
        "acquirer_id": rec.acquirer_id,
        "issuer_id": rec.issuer_id,
        "stan": rec.stan,
        "rrn": rec.rrn,
        "auth_code": rec.auth_code,
        "response_code": rec.response_code,
        "status": rec.status,
        "approved": rec.status == Status.APPROVED,
        "stand_in": rec.stand_in,
        "latency_us": rec.latency_us,
        "orig_id": rec.orig_id,
    }
    if rec.to_pan_masked or rec.to_issuer_id:
        ev["to_issuer_id"] = rec.to_issuer_id
        ev["to_pan_masked"] = _masked(rec.to_pan_masked)
        ev["to_pan_token"] = rec.to_pan_token
    return ev


def parse_balances(field54: str) -> dict[str, int]:
    """Field 54 (wire.md 4) -> {"ledger": n, "available": n} in minor units,
    signed (D = negative); entries that do not parse are skipped."""
    out: dict[str, int] = {}
    for i in range(0, len(field54) - 19, 20):
        entry = field54[i:i + 20]
        amount_type, sign, amount = entry[2:4], entry[7], entry[8:20]
        if not amount.isdigit() or sign not in "CD":
            continue
        name = {"01": "ledger", "02": "available"}.get(amount_type)
        if name is not None and name not in out:
            out[name] = int(amount) if sign == "C" else -int(amount)
    return out


@dataclass(slots=True, frozen=True)
class _Leg:
    issuer_id: str
    pan_masked: str
    pan_token: str
    direction: str
    leg: str                # "debit" / "credit" leg of the record (a transfer has both)


def _legs(rec: TxnRecord) -> list[_Leg]:
    """The balance changes an approved record makes by itself (no original needed)."""
    if rec.kind in DEBIT_KINDS:
        legs = [_Leg(rec.issuer_id, rec.pan_masked, rec.pan_token, DEBIT, "debit")]
        if rec.kind == Kind.TRANSFER and rec.to_pan_masked:
            legs.append(_Leg(rec.to_issuer_id or rec.issuer_id, rec.to_pan_masked, rec.to_pan_token,
                             CREDIT, "credit"))
        return legs
    if rec.kind in CREDIT_KINDS:
        return [_Leg(rec.issuer_id, rec.pan_masked, rec.pan_token, CREDIT, "credit")]
    if rec.kind == Kind.VOID:              # a void undoes an approved purchase (steps.find_original)
        return [_Leg(rec.issuer_id, rec.pan_masked, rec.pan_token, CREDIT, "credit")]
    return []                              # preauth (a hold), balance inquiry, network...


def balance_notices(rec: TxnRecord, original: TxnRecord | None = None, *,
                    merchant_name: str = "", trace: str = "") -> list[tuple[str, dict[str, Any]]]:
    """(issuer_id, payload) for each card whose balance ``rec`` changed.

    Nothing unless ``rec`` was approved. A reversal changes balances only when
    it undid ``original`` (approved, and cancelled by this very record): then
    each of the original's changes comes back mirrored, on the original's card.
    """
    if rec.status != Status.APPROVED:
        return []
    source = rec
    if rec.kind == Kind.REVERSAL:
        if original is None or original.status != Status.APPROVED or original.cancelled_by != rec.id:
            return []
        source = original
        legs = [_Leg(g.issuer_id, g.pan_masked, g.pan_token,
                     CREDIT if g.direction == DEBIT else DEBIT, g.leg) for g in _legs(original)]
    else:
        legs = _legs(rec)
    balances = parse_balances(source.balances) if source.balances and rec.kind != Kind.REVERSAL else {}
    out = []
    for g in legs:
        if not g.issuer_id or not g.pan_masked:
            continue
        ev: dict[str, Any] = {
            "event": "notify",
            "id": rec.id,
            "leg": g.leg,
            "trace": trace,
            "issuer_id": g.issuer_id,
            "pan_masked": _masked(g.pan_masked),
            "pan_token": g.pan_token,
            "direction": g.direction,
            "amount": rec.amount or source.amount,
            "currency": rec.currency or source.currency,
            "kind": rec.kind,
            "merchant_id": source.merchant_id,
            "merchant_name": merchant_name,
            "terminal_id": source.terminal_id,
            "rrn": rec.rrn,
            "auth_code": rec.auth_code,
            "stand_in": rec.stand_in,
            "at": rec.completed_at or rec.received_at,
        }
        if rec.kind in (Kind.REVERSAL, Kind.VOID) and original is not None:
            ev["reverses"] = {"id": original.id, "kind": original.kind, "rrn": original.rrn}
        if balances and g.leg == "debit":
            ev["balance"] = balances        # field 54 as the issuer answered (withdrawals)
        out.append((g.issuer_id, ev))
    return out


def alert_event(kind: str, detail: Mapping[str, Any]) -> dict[str, Any]:
    """The detail's keys plus ``event``, ``kind`` and ``at`` (those three are ours)."""
    ev: dict[str, Any] = dict(detail)
    ev.update(event="alert", kind=kind, at=_now_iso())
    return ev


def _now_iso() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e6):06d}Z"


# -- the publisher -----------------------------------------------------------------


class _Event:
    __slots__ = ("topic", "payload", "qos")

    def __init__(self, topic: str, payload: bytes, qos: int) -> None:
        self.topic = topic
        self.payload = payload
        self.qos = qos


class EventPublisher:
    """Buffers events and publishes them to an MQTT broker in the background.

    ``publish_txn``, ``publish_notify``, ``publish_alert``, ``count`` and
    ``link_state`` only append to the buffer; ``start`` launches the sender,
    ``stop`` flushes for up to ``flush_timeout_s`` and disconnects.
    """

    def __init__(self, url: str, *, buffer: int = 10_000, client_id: str | None = None,
                 qos_txn: int = 0, qos_notify: int = 1, qos_alert: int = 1,
                 window: int = 32, timeout_s: float = 5.0, keepalive_s: int = 30,
                 merchant_names: Mapping[str, str] | None = None,
                 backoff: Backoff | None = None) -> None:
        if buffer < 1:
            raise ValueError("event buffer must hold at least one event")
        if not {qos_txn, qos_notify, qos_alert} <= {0, 1, 2}:
            raise ValueError("qos must be 0, 1 or 2")
        self.broker = parse_broker_url(url)
        self.client_id = client_id or f"cardswitch-{os.getpid()}-{secrets.token_hex(3)}"
        self.buffer_size = buffer
        self.qos_txn, self.qos_notify, self.qos_alert = qos_txn, qos_notify, qos_alert
        self.window = max(1, window)
        self.timeout_s = timeout_s
        self.keepalive_s = keepalive_s
        self.merchant_names: Mapping[str, str] = merchant_names or {}
        self._backoff = backoff or Backoff(initial=0.2, maximum=10.0)
        # counters
        self.published = 0
        self.dropped = 0
        self.failed = 0
        self.errors = 0
        self.connects = 0
        self.connect_failures = 0
        self.connected = False
        # state
        self._buf: deque[_Event] = deque()
        self._inflight: dict[int, _Event] = {}     # seq -> event sent, not yet acknowledged
        self._seq = 0
        self._wake = asyncio.Event()               # the pump has something to do
        self._idle = False                         # the pump waits for events (not for acks)
        self._stop_event = asyncio.Event()
        self._broken: BaseException | None = None  # the current connection failed
        self._runner: asyncio.Task | None = None
        self._stopping = False
        self._stopped = False
        self._link_up: dict[str, bool] = {}
        self._warned_down = False
        # paho logs every packet at DEBUG: not even `cardswitch up -v` wants that.
        self._mqtt_log = logging.getLogger("cardswitch.events.mqtt")
        if self._mqtt_log.level == logging.NOTSET:
            self._mqtt_log.setLevel(logging.INFO)

    @classmethod
    def from_network(cls, network, **kw) -> "EventPublisher":
        """From ``[switch] mqtt`` (must be set), merchant names from the network."""
        names = {m.id: m.name for m in network.merchants}
        return cls(network.switch.mqtt, merchant_names=names, **kw)

    # -- publishing: O(1), never awaits, never raises --------------------------------

    @property
    def pending(self) -> int:
        """Events buffered and not yet handed to the broker."""
        return len(self._buf)

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    def publish_txn(self, record: TxnRecord) -> None:
        """``cardswitch/txn/<merchant_id>``: one completed transaction."""
        try:
            self._put(f"{TOPIC_ROOT}/txn/{topic_level(record.merchant_id)}",
                      txn_event(record, trace_id.get()), self.qos_txn)
        except Exception:
            self._broken_event("txn")

    def publish_notify(self, record: TxnRecord, original: TxnRecord | None = None) -> None:
        """``cardswitch/notify/<issuer_id>``: a notice per card whose balance changed."""
        try:
            name = self.merchant_names.get(record.merchant_id, "")
            for issuer, ev in balance_notices(record, original, merchant_name=name, trace=trace_id.get()):
                self._put(f"{TOPIC_ROOT}/notify/{topic_level(issuer)}", ev, self.qos_notify)
        except Exception:
            self._broken_event("notify")

    def publish_alert(self, kind: str, detail: Mapping[str, Any]) -> None:
        """``cardswitch/alert/<kind>``: the detail's keys plus event, kind, at."""
        try:
            self._put(f"{TOPIC_ROOT}/alert/{topic_level(kind)}", alert_event(kind, detail), self.qos_alert)
        except Exception:
            self._broken_event("alert")

    def count(self, t, rc: str) -> None:
        """The pipeline's per-transaction hook (``stats.count(t, rc)``): the
        transaction on its merchant's topic, and when approved its balance
        notices. Call it in the transaction's task (the trace ID comes along)."""
        try:
            rec, original = t.record, getattr(t, "original", None)
        except Exception:
            self._broken_event("txn")
            return
        if rec is None:
            return
        self.publish_txn(rec)
        if rc == RC.APPROVED:
            self.publish_notify(rec, original)

    def link_state(self, bank_id: str, state: str) -> None:
        """``BankLink(on_state=...)``: an alert when a link goes up or down (not
        for every reconnect attempt in between)."""
        if state == "online":
            up = True
        elif state in ("offline", "stopped"):
            up = False
        else:
            return
        if self._link_up.get(bank_id) == up:
            return
        self._link_up[bank_id] = up
        self.publish_alert(ALERT_LINK, {"bank": bank_id, "state": state, "up": up})

    def _put(self, topic: str, payload: dict[str, Any], qos: int) -> None:
        if self._stopped:
            self.failed += 1
            return
        buf = self._buf
        if len(buf) >= self.buffer_size:
            buf.popleft()
            self.dropped += 1
        buf.append(_Event(topic, orjson.dumps(payload), qos))
        if self._idle:                  # one wake-up per idle period, not one per event
            self._idle = False
            self._wake.set()

    def _broken_event(self, what: str) -> None:
        self.failed += 1
        log.exception("cannot build a %s event", what)

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Launch the sender; returns at once (the broker may be down)."""
        if self._runner is None:
            self._stopping = self._stopped = False
            self._stop_event.clear()
            self._runner = asyncio.get_running_loop().create_task(self._run(), name="mqtt-events")

    async def stop(self, flush_timeout_s: float = 2.0) -> None:
        """Publish what is buffered (for up to ``flush_timeout_s`` while connected),
        disconnect; what is left counts as ``failed``."""
        runner, self._runner = self._runner, None
        self._stopping = True
        self._stop_event.set()
        self._wake.set()
        if runner is not None:
            try:
                await asyncio.wait_for(asyncio.shield(runner), flush_timeout_s)
            except (asyncio.TimeoutError, Exception):
                pass
            if not runner.done():
                runner.cancel()
                try:
                    await runner
                except BaseException:
                    pass
        self._stopped = True
        left = len(self._buf) + len(self._inflight)
        if left:
            self.failed += left
            log.warning("mqtt: %d events not published at stop", left)
        self._buf.clear()
        self._inflight.clear()
        self.connected = False

    async def wait_connected(self, timeout: float) -> bool:
        """For tests and start-up probes: True once connected to the broker."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while not self.connected and loop.time() < end:
            await asyncio.sleep(0.02)
        return self.connected

    async def wait_idle(self, timeout: float) -> bool:
        """True once nothing is buffered or in flight."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while (self._buf or self._inflight) and loop.time() < end:
            await asyncio.sleep(0.02)
        return not (self._buf or self._inflight)

    # -- the sender -------------------------------------------------------------------

    async def _run(self) -> None:
        import aiomqtt

        b = self.broker
        while not self._stopping:
            tls = ssl.create_default_context() if b.tls else None
            was_connected = False
            try:
                client = aiomqtt.Client(b.host, b.port, username=b.username, password=b.password,
                                        identifier=self.client_id, timeout=self.timeout_s,
                                        keepalive=self.keepalive_s, tls_context=tls,
                                        logger=self._mqtt_log)
                client.pending_calls_threshold = self.window + 16   # its warning assumes few calls
                async with client:
                    self.connected = was_connected = True
                    self.connects += 1
                    self._backoff.reset()
                    self._warned_down = False
                    log.info("mqtt: connected to %s as %s", b, self.client_id)
                    await self._pump(client)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                if was_connected:
                    log.warning("mqtt: connection to %s lost: %s", b, e)
                else:
                    self.connect_failures += 1
                    if not self._warned_down:
                        log.warning("mqtt: cannot connect to %s: %s; events are buffered", b, e)
                        self._warned_down = True
            finally:
                self.connected = False
                self._requeue()
            if self._stopping:
                return
            await self._sleep(self._backoff.next())

    async def _sleep(self, delay: float) -> None:
        """Backoff that ``stop`` can cut short."""
        try:
            await asyncio.wait_for(self._stop_event.wait(), delay)
        except asyncio.TimeoutError:
            pass

    async def _pump(self, client) -> None:
        """Publish from the head of the buffer, ``window`` at a time, until the
        connection fails (raises) or ``stop`` finds nothing left (returns)."""
        loop = asyncio.get_running_loop()
        self._broken = None
        watch = loop.create_task(self._watch(client))
        sends: set[asyncio.Task] = set()
        try:
            buf, inflight, wake = self._buf, self._inflight, self._wake
            while True:
                if self._broken is not None:
                    raise self._broken
                while buf and len(inflight) < self.window:
                    ev = buf.popleft()
                    self._seq += 1
                    inflight[self._seq] = ev
                    task = loop.create_task(self._send(client, self._seq, ev))
                    sends.add(task)
                    task.add_done_callback(sends.discard)
                if self._stopping and not buf and not inflight:
                    return
                wake.clear()
                self._idle = not buf            # else waiting for acks: new events need no wake-up
                await wake.wait()
                self._idle = False
        finally:
            self._idle = False
            watch.cancel()
            for task in list(sends):
                task.cancel()
            if sends:
                await asyncio.gather(*sends, return_exceptions=True)

    async def _send(self, client, seq: int, ev: _Event) -> None:
        try:
            await client.publish(ev.topic, ev.payload, qos=ev.qos)
        except asyncio.CancelledError:
            raise
        except Exception as e:             # stays in _inflight: requeued after reconnecting
            self.errors += 1
            if self._broken is None:
                self._broken = e
        else:
            if self._inflight.pop(seq, None) is not None:
                self.published += 1
        self._wake.set()

    async def _watch(self, client) -> None:
        """Ends the pump when the broker goes away (aiomqtt reports it through
        its message iterator; nothing is subscribed, so nothing else arrives)."""
        try:
            async for _ in client.messages:
                pass
        except asyncio.CancelledError:
            raise
        except Exception as e:
            if self._broken is None:
                self._broken = e
        else:
            if self._broken is None:
                self._broken = ConnectionError("mqtt message stream ended")
        self._wake.set()

    def _requeue(self) -> None:
        """Unacknowledged events go back to the head of the buffer, in order;
        beyond the buffer's size the oldest are dropped."""
        if not self._inflight:
            return
        events = list(self._inflight.values())
        self._inflight.clear()
        self._buf.extendleft(reversed(events))
        while len(self._buf) > self.buffer_size:
            self._buf.popleft()
            self.dropped += 1


class Fanout:
    """Several per-transaction hooks as one: ``Fanout(metrics, events)``.

    ``count(t, rc)`` calls each hook in order; a hook that raises is logged and
    the others still run (a hook must never fail a transaction). ``None``
    hooks are skipped. Any other attribute is the first hook's that has it, so
    a wrapped metrics object keeps the rest of its API.
    """

    def __init__(self, *hooks) -> None:
        self.hooks = tuple(h for h in hooks if h is not None)

    def count(self, t, rc: str) -> None:
        for h in self.hooks:
            try:
                h.count(t, rc)
            except Exception:
                log.exception("per-transaction hook %s failed", type(h).__name__)

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        for h in self.__dict__.get("hooks", ()):
            if hasattr(h, name):
                return getattr(h, name)
        raise AttributeError(name)
