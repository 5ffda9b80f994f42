"""The switch process: wires the acceptor, pipeline, bank links and journal.

``SwitchApp.start`` opens the journal, restores the business date and the
in-memory index from it, settles what a crash left open (requests written
ahead with no outcome are reversed) and resumes the store-and-forward queue,
connects to every issuer and listens for terminals; ``stop`` stops
accepting, drains what is in flight (and, for a few seconds, the advices
owed to banks that are up), signs off and closes.

Scale-out (operations.md 4): several switch processes (``cardswitch up
--workers N``, or nodes on other machines) share one PostgreSQL journal and
Redis. Each runs as node ``worker`` (0-9): its RRNs come from its own range
(``RRN_NODE_SPAN`` per node and day, state key ``rrn:<K>:<YDDD>``; node 0
keeps ``rrn:<YDDD>``). Node 0 alone serves the admin port, runs the automatic
cutover timer, takes SIGUSR1 cutovers and, at start, the recovery of what
the last run left open (requests with no outcome, queued advices); the other
nodes follow the shared business date by re-reading it every
``DATE_POLL_S`` seconds.

For metrics and alerts: ``saf.depth()`` ({bank: queued advices}),
``saf.total_depth``, ``saf.alerts``/``saf.alert_counts``, ``standin``
counters; ``on_alert`` (set before ``start``) is called as
``on_alert(kind, detail)`` for store-and-forward alerts (kind ``"saf"``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import secrets
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cardswitch.config import Bank, Network
from cardswitch.iso8583.constants import RC
from cardswitch.merchants.registry import Registry, TerminalInfo
from cardswitch.routing.bintable import BinTable
from cardswitch.switch.acceptor import Acceptor
from cardswitch.switch.admin import AdminServer
from cardswitch.switch.banklink import BankLink
from cardswitch.switch.clock import RrnAllocator, utc_now
from cardswitch.switch.cutover import CutoverService
from cardswitch.switch.dedupe import DuplicateGuard
from cardswitch.switch.events import EventPublisher, Fanout
from cardswitch.switch.index import TxnIndex
from cardswitch.switch.journals import AnyJournal, is_postgres_url, open_journal
from cardswitch.hsm_sim.client import HsmClient
from cardswitch.switch.metrics import SwitchMetrics
from cardswitch.switch.pipeline import PinError, Pipeline
from cardswitch.switch.saf import SafForwarder, SafPolicy
from cardswitch.switch.security import STATE_PREFIX, KeyStore, Security, SecurityError
from cardswitch.switch.standin import LocalCounters, RedisCounters, StandInService, profile_problems
from cardswitch.switch.steps import Context

log = logging.getLogger("cardswitch.switch")

MAX_NODES = 10                  # node index 0-9: one digit of the RRN's 8-digit sequence
RRN_NODE_SPAN = 10_000_000      # RRNs per node and day: node K uses [K * span, (K + 1) * span)
DATE_POLL_S = 2.0               # how often a node on a shared journal re-reads the business date


def rrn_state_key(worker: int, prefix: str) -> str:
    """Where node ``worker`` keeps its RRN high-water mark of day ``prefix`` (YDDD)."""
    return f"rrn:{prefix}" if worker == 0 else f"rrn:{worker}:{prefix}"


def token_secret(network: Network, data_dir: str) -> bytes:
    """The key of PAN tokens: from the network file, else made once under data_dir."""
    if network.switch.token_key:
        return network.switch.token_key.encode()
    path = Path(data_dir) / "token.key"
    if path.exists():
        return bytes.fromhex(path.read_text().strip())
    key = secrets.token_bytes(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key.hex())
    return key


class HsmPinTranslator:
    """TPK -> ZPK through the HSM (CA), as the pipeline's PIN step wants it."""

    def __init__(self, security: Security) -> None:
        self.security = security

    async def __call__(self, block: str, info: TerminalInfo, bank: Bank, pan: str) -> str:
        try:
            return await self.security.translate_pin(block, info.terminal_id, bank, pan)
        except SecurityError as e:
            raise PinError(e.rc) from None


class LinkMac:
    """A bank link's MACs under its ZAK, through the HSM."""

    def __init__(self, security: Security, bank_id: str) -> None:
        self.security = security
        self.bank_id = bank_id

    async def sign(self, data: bytes) -> str:
        mac = await self.security.link_mac(self.bank_id, data)
        if mac is None:
            raise SecurityError(RC.SYSTEM_MALFUNCTION, "no ZAK")
        return mac

    async def verify(self, data: bytes, mac: str) -> bool:
        return await self.security.verify_link_mac(self.bank_id, data, mac)


def first_stan(last: str) -> int:
    """Where a bank link's STANs go on after a restart: past the last one journaled."""
    return int(last) % 999_999 + 1 if last.isdigit() and last.strip("0") else 1


class SwitchApp:
    def __init__(self, network: Network, *, listen_port: int | None = None,
                 link_wait_s: float = 3.0, saf_policy: SafPolicy | None = None,
                 worker: int = 0, reuse_port: bool = False) -> None:
        node = network.switch.node_id + worker
        if not 0 <= node < MAX_NODES:
            raise ValueError(f"node {node} ([switch] node_id {network.switch.node_id} + worker {worker}) "
                             f"out of range 0-{MAX_NODES - 1}")
        self.network = network
        self.worker = worker            # this machine's worker index: worker 0 serves the admin port
        self.node = node                # network-wide node index: RRN range; node 0 leads
        self._date_poll: asyncio.Task | None = None
        self.reuse_port = reuse_port    # several processes on one port (SO_REUSEPORT)
        self.link_wait_s = link_wait_s
        self.data_dir = network.switch.data_dir
        self.listen_port = listen_port
        self.journal: AnyJournal | None = None
        self.links: dict[str, BankLink] = {}
        self.acceptor: Acceptor | None = None
        self.pipeline: Pipeline | None = None
        self.hsm: HsmClient | None = None
        self.cutover: CutoverService | None = None
        self.saf: SafForwarder | None = None
        self.standin: StandInService | None = None
        self.dedupe: DuplicateGuard | None = None
        self.saf_policy = saf_policy or SafPolicy(max_age_s=float(network.switch.saf_max_age_s))
        # on_alert(kind, detail): store-and-forward alerts (the MQTT feed hooks in here).
        self.on_alert: Callable[[str, dict], Any] | None = None
        self.recovered = (0, 0)               # (rows settled, reversals queued) at the last start
        self.metrics = SwitchMetrics()
        self.admin: AdminServer | None = None
        self.events: EventPublisher | None = None

    async def start(self) -> None:
        net = self.network
        sw = net.switch
        Path(self.data_dir).mkdir(parents=True, exist_ok=True)
        self.journal = journal = open_journal(sw.journal, self.data_dir)   # SQLite or PostgreSQL
        self.metrics.attach(self)
        if sw.mqtt:
            # Events never slow a transaction: a down broker only fills a bounded buffer.
            self.events = EventPublisher.from_network(net)
            await self.events.start()
            self.on_alert = self.on_alert or self.events.publish_alert
        self.cutover = CutoverService(journal, sw.timezone, sw.cutover, self._business_date_changed)
        business_date = self.cutover.restore()
        index = TxnIndex()
        index.mark_closed(journal.closed_batches())
        for rec in journal.load_for_recovery([business_date]):
            index.add(rec)
        secret = token_secret(net, self.data_dir)
        ctx = Context(network=net, registry=Registry.from_network(net), bins=BinTable.from_network(net),
                      index=index, token_secret=secret, business_date=business_date)
        # Every secret goes through the HSM; the switch holds keys under its LMK only.
        self.hsm = HsmClient(net.hsm.listen, pool_size=2, timeout_s=1.0)
        await self.hsm.start()
        keys = KeyStore(net)
        keys.restore(journal.state_items(STATE_PREFIX))
        security = Security(self.hsm, keys)
        for bank in net.banks:
            link = BankLink(bank.id, list(bank.hosts), bank.link,
                            switch_institution_id=sw.institution_id,
                            echo_interval_s=sw.echo_interval_ms / 1000,
                            mac=LinkMac(security, bank.id) if keys.zak.get(bank.id) else None,
                            first_stan=first_stan(journal.last_issuer_stan(bank.id)),
                            on_state=self.events.link_state if self.events else None)
            self.links[bank.id] = link
        issuer_timeout_s = sw.issuer_timeout_ms / 1000
        self.saf = SafForwarder(journal, self.links, switch_inst=sw.institution_id,
                                issuer_insts={b.id: b.institution_id for b in net.banks}, secret=secret,
                                timeout_s=issuer_timeout_s, policy=self.saf_policy,
                                on_alert=self._alert)
        if sw.redis:
            # Several switch processes share the per-card stand-in limits.
            counters = RedisCounters(sw.redis)
        else:
            counters = LocalCounters()
            counters.load(business_date, journal.standin_usage(business_date))
        self.standin = StandInService(net, secret, counters)
        for bank in net.banks:
            for problem in profile_problems(bank.id, bank.stand_in):
                log.error("%s", problem)
        # Several switch processes share duplicate detection in Redis ([switch] redis).
        self.dedupe = DuplicateGuard.from_config(sw)
        rrn = RrnAllocator(self._reserve_rrn)
        self.pipeline = Pipeline(ctx, journal, self.links, rrn=lambda: rrn.next(utc_now()),
                                 translate_pin=HsmPinTranslator(security),
                                 issuer_timeout_s=issuer_timeout_s,
                                 security=security, saf=self.saf, standin=self.standin,
                                 dedupe=self.dedupe, stats=Fanout(self.metrics, self.events))
        for bank_id, link in self.links.items():
            link.on_late = functools.partial(self.pipeline.on_late, bank_id)
        # What the last run left open: advices still owed, requests with no outcome.
        # Node 0 only: another node's requests in flight are not this node's to reverse.
        resumed = self.saf.load() if self.node == 0 else 0
        self.recovered = self.pipeline.recover_pending() if self.node == 0 else (0, 0)
        if resumed or self.recovered[0]:
            log.warning("recovery: %d advice(s) still owed, %d request(s) left without an outcome "
                        "(timed out, %d reversal(s) queued)", resumed, *self.recovered)
        journal.flush()
        for link in self.links.values():
            await link.start()
        self.saf.start()
        # Terminals are let in once the banks have signed on (or after a short
        # wait: a bank that is down answers 91 until it is back).
        await self.wait_links_online(self.link_wait_s)
        if self.node == 0:
            self.cutover.start()
        else:
            # SIGUSR1 (a cutover request) would kill a node that does not handle it.
            asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, lambda: None)
        if self.shared_journal:
            self._date_poll = asyncio.get_running_loop().create_task(self._follow_business_date())
        listen = sw.listen if self.listen_port is None else type(sw.listen)(sw.listen.host, self.listen_port)
        self.acceptor = Acceptor(listen, sw.link, self.pipeline, reuse_port=self.reuse_port)
        await self.acceptor.start()
        if self.worker == 0:
            self.admin = AdminServer(self, self.metrics, on_cutover=self._cutover_now)
            await self.admin.start()
        log.info("switch node %d listening on %s, business date %s; admin on %s", self.node, listen,
                 business_date, sw.admin if self.worker == 0 else "worker 0")

    @property
    def shared_journal(self) -> bool:
        """True when other nodes may write the same journal (PostgreSQL)."""
        return is_postgres_url(self.network.switch.journal)

    async def _follow_business_date(self) -> None:
        """Apply a cutover another node (or `cardswitch cutover`) wrote to the shared state."""
        while True:
            await asyncio.sleep(DATE_POLL_S)
            try:
                current = self.journal.get_state("business_date") if self.journal else None
            except Exception as e:   # the journal reconnects on its own; try again next time
                log.warning("business date not re-read: %s", e)
                continue
            if current and self.pipeline is not None and current > self.pipeline.ctx.business_date:
                log.info("business date %s -> %s (from the shared journal)",
                         self.pipeline.ctx.business_date, current)
                self._business_date_changed(current)

    async def wait_links_online(self, timeout: float) -> bool:
        """True once every bank link has signed on (used by `up` before `ready`)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while loop.time() < end:
            if all(link.online for link in self.links.values()):
                return True
            await asyncio.sleep(0.05)
        return False

    def _reserve_rrn(self, prefix: str, wanted: int) -> int:
        """Durably raise the RRN high-water mark of ``prefix`` (see clock.RrnAllocator)."""
        assert self.journal is not None
        key = rrn_state_key(self.node, prefix)
        base = self.node * RRN_NODE_SPAN
        current = max(base, int(self.journal.get_state(key) or 0))
        if wanted <= current:
            return current
        if self.node < MAX_NODES - 1 and wanted > base + RRN_NODE_SPAN:
            # node K+1's range starts here: stop rather than hand out its RRNs
            raise OverflowError(f"RRN range of node {self.node} exhausted for today")
        self.journal.set_state(key, str(wanted))
        self.journal.flush()
        return wanted

    def _business_date_changed(self, new: str) -> None:
        """Requests received from now on carry the new date; those in flight keep theirs."""
        if self.pipeline is not None:
            self.pipeline.ctx.business_date = new
        if self.standin is not None and isinstance(self.standin.counters, LocalCounters):
            self.standin.counters.forget_before(new)

    def _cutover_now(self) -> tuple[str, str]:
        """POST /api/cutover: one day forward now (the operator's cutover)."""
        assert self.cutover is not None and self.journal is not None
        old = self.journal.get_state("business_date") or ""
        return old, self.cutover.cutover_now("operator")

    def _alert(self, kind: str, detail: dict) -> None:
        cb = self.on_alert
        if cb is not None:
            cb(kind, detail)

    async def stop(self, drain_timeout: float = 10.0) -> None:
        if self._date_poll is not None:
            self._date_poll.cancel()
            try:
                await self._date_poll
            except asyncio.CancelledError:
                pass
        if self.node != 0:
            try:
                asyncio.get_running_loop().remove_signal_handler(signal.SIGUSR1)
            except (RuntimeError, ValueError):
                pass
        if self.cutover is not None:
            await self.cutover.stop()
        if self.acceptor is not None:
            await self.acceptor.stop(drain_timeout)
        if self.pipeline is not None:
            await self.pipeline.drain()      # advices owed to banks that are up, for a few seconds
            await self.pipeline.stop()
        for link in self.links.values():
            await link.stop()
        if self.admin is not None:
            await self.admin.stop()
        if self.events is not None:
            await self.events.stop()
        if self.dedupe is not None:
            await self.dedupe.close()
        if self.standin is not None and isinstance(self.standin.counters, RedisCounters):
            await self.standin.counters.close()
        if self.hsm is not None:
            await self.hsm.stop()
        if self.journal is not None:
            self.journal.flush()
            self.journal.close()
