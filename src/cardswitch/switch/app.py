"""The switch process: wires the acceptor, pipeline, bank links and journal.

``SwitchApp.start`` opens the journal, restores the business date and the
in-memory index from it, connects to every issuer and listens for terminals;
``stop`` stops accepting, drains what is in flight, signs off and closes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
from pathlib import Path

from cardswitch.config import Bank, Network
from cardswitch.iso8583.constants import RC
from cardswitch.merchants.registry import Registry, TerminalInfo
from cardswitch.routing.bintable import BinTable
from cardswitch.switch.acceptor import Acceptor
from cardswitch.switch.banklink import BankLink
from cardswitch.switch.clock import RrnAllocator, utc_now
from cardswitch.switch.cutover import CutoverService
from cardswitch.switch.index import TxnIndex
from cardswitch.switch.journal import Journal
from cardswitch.hsm_sim.client import HsmClient
from cardswitch.switch.pipeline import PinError, Pipeline
from cardswitch.switch.security import STATE_PREFIX, KeyStore, Security, SecurityError
from cardswitch.switch.steps import Context

log = logging.getLogger("cardswitch.switch")


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


class SwitchApp:
    def __init__(self, network: Network, *, listen_port: int | None = None,
                 link_wait_s: float = 3.0) -> None:
        self.network = network
        self.link_wait_s = link_wait_s
        self.data_dir = network.switch.data_dir
        self.listen_port = listen_port
        self.journal: Journal | None = None
        self.links: dict[str, BankLink] = {}
        self.acceptor: Acceptor | None = None
        self.pipeline: Pipeline | None = None
        self.hsm: HsmClient | None = None
        self.cutover: CutoverService | None = None

    async def start(self) -> None:
        net = self.network
        sw = net.switch
        Path(self.data_dir).mkdir(parents=True, exist_ok=True)
        self.journal = journal = Journal.open(sw.journal, self.data_dir)
        self.cutover = CutoverService(journal, sw.timezone, sw.cutover, self._business_date_changed)
        business_date = self.cutover.restore()
        index = TxnIndex()
        index.mark_closed(journal.closed_batches())
        for rec in journal.load_for_recovery([business_date]):
            index.add(rec)
        ctx = Context(network=net, registry=Registry.from_network(net), bins=BinTable.from_network(net),
                      index=index, token_secret=token_secret(net, self.data_dir),
                      business_date=business_date)
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
                            mac=LinkMac(security, bank.id) if keys.zak.get(bank.id) else None)
            self.links[bank.id] = link
        rrn = RrnAllocator(self._reserve_rrn)
        self.pipeline = Pipeline(ctx, journal, self.links, rrn=lambda: rrn.next(utc_now()),
                                 translate_pin=HsmPinTranslator(security),
                                 issuer_timeout_s=sw.issuer_timeout_ms / 1000,
                                 security=security)
        for link in self.links.values():
            await link.start()
        # Terminals are let in once the banks have signed on (or after a short
        # wait: a bank that is down answers 91 until it is back).
        await self.wait_links_online(self.link_wait_s)
        self.cutover.start()
        listen = sw.listen if self.listen_port is None else type(sw.listen)(sw.listen.host, self.listen_port)
        self.acceptor = Acceptor(listen, sw.link, self.pipeline)
        await self.acceptor.start()
        log.info("switch listening on %s, business date %s", listen, business_date)

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
        key = f"rrn:{prefix}"
        current = int(self.journal.get_state(key) or 0)
        if wanted <= current:
            return current
        self.journal.set_state(key, str(wanted))
        self.journal.flush()
        return wanted

    def _business_date_changed(self, new: str) -> None:
        """Requests received from now on carry the new date; those in flight keep theirs."""
        if self.pipeline is not None:
            self.pipeline.ctx.business_date = new

    async def stop(self, drain_timeout: float = 10.0) -> None:
        if self.cutover is not None:
            await self.cutover.stop()
        if self.acceptor is not None:
            await self.acceptor.stop(drain_timeout)
        if self.pipeline is not None:
            await self.pipeline.drain()
        for link in self.links.values():
            await link.stop()
        if self.hsm is not None:
            await self.hsm.stop()
        if self.journal is not None:
            self.journal.flush()
            self.journal.close()
