"""A simulated bank verifying through a real HSM simulator, over TCP: PIN
(PVV and IBM offset), track 2 CVV, chip ARQC/ARPC; an HSM that is not up yet,
goes down or fails; keys under the LMK (live mode); what is stored."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import sqlite3

from cardswitch.config import Card, Endpoint, Key
from cardswitch.hsm_sim.lmk import CVK, MK_AC, PVK, ZPK, encrypt_under_lmk
from cardswitch.hsm_sim.server import HsmServer
from cardswitch.iso8583.constants import RC, F
from cardswitch.iso8583.fields import tlv_dict
from cardswitch.issuer_sim.cards import arpc_for, icc_data_for, pin_ref_for, track2_for
from cardswitch.issuer_sim.hsmverifier import BankKeys
from cardswitch.issuer_sim.store import SCHEMA, db_path, load
from cardswitch.netfile import free_ports
from cardswitch.storage.sqlite_writer import connect
from test_issuer_sim_host import Client, started
from test_issuer_sim_support import (
    CARD,
    CARDS,
    CVK_HEX,
    IBM,
    MK_AC_HEX,
    POOR,
    PVK_HEX,
    RICH,
    ZPK_HEX,
    make_bank,
    request,
)

BANK = make_bank()


def chip(card: str = RICH, amount: int = 1_000, **kw) -> dict:
    return request("0200", "000000", card, amount,
                   **{F.ICC_DATA: icc_data_for(CARD[card], BANK, amount=amount, **kw)})


def swipe(card: str = RICH, amount: int = 1_000, **kw) -> dict:
    return request("0200", "000000", None, amount, **{F.TRACK2: track2_for(CARD[card], BANK, **kw)})


def wrong_cvv(card: str = RICH) -> str:
    right = track2_for(CARD[card], BANK)[-3:]
    return f"{(int(right) + 1) % 1000:03d}"


async def rc(c: Client, msg: dict) -> str:
    return (await c.call(msg))[F.RESPONSE_CODE]


def test_pin_cvv_and_chip_over_tcp(tmp_path):
    async def main():
        host = await started(tmp_path)
        hsm = host.hsm_server
        c = await Client.connect(host.port)
        try:
            # PIN, Visa PVV (EC)
            assert await rc(c, request("0200", "000000", RICH, 100, pin="1234")) == RC.APPROVED
            assert await rc(c, request("0200", "000000", RICH, 100, pin="4321")) == RC.INCORRECT_PIN
            # PIN, IBM 3624 offset (EA)
            assert await rc(c, request("0200", "010000", IBM, 100, pin="246810")) == RC.APPROVED
            assert await rc(c, request("0200", "010000", IBM, 100, pin="999999")) == RC.INCORRECT_PIN
            # track 2: CVV verified (CY)
            assert await rc(c, swipe(amount=200)) == RC.APPROVED
            assert await rc(c, swipe(amount=200, cvv=wrong_cvv())) == RC.DO_NOT_HONOUR
            # chip: ARQC verified, ARPC back in tag 91 (KQ)
            good = chip(amount=300)
            r = await c.call(good)
            assert r[F.RESPONSE_CODE] == RC.APPROVED
            arpc = arpc_for(CARD[RICH], BANK, good[F.ICC_DATA], "00")
            assert tlv_dict(r[F.ICC_DATA]) == {"91": (arpc + b"00").hex().upper()}
            bad = chip(amount=300, cryptogram=bytes.fromhex("0102030405060708"))
            r = await c.call(bad)
            assert r[F.RESPONSE_CODE] == RC.DO_NOT_HONOUR
            arpc = arpc_for(CARD[RICH], BANK, bad[F.ICC_DATA], "05")
            assert tlv_dict(r[F.ICC_DATA]) == {"91": (arpc + b"05").hex().upper()}
            assert host.logic.account_for(RICH).balance == 1_000_000 - 100 - 200 - 300
            assert host.logic.account_for(IBM).balance == 1_000_000 - 100
            codes = {cmd: e["codes"] for cmd, e in hsm.stats.snapshot().items()}
            assert codes == {"EC": {"00": 1, "01": 1}, "EA": {"00": 1, "01": 1}, "CY": {"00": 1, "01": 1},
                             "KQ": {"00": 2, "01": 1}}
        finally:
            await c.close()
            await host.stop()

    asyncio.run(main())


def test_three_wrong_pins_then_75(tmp_path):
    async def main():
        host = await started(tmp_path)
        c = await Client.connect(host.port)
        try:
            for _ in range(3):
                assert await rc(c, request("0200", "000000", POOR, 1, pin="0000")) == RC.INCORRECT_PIN
            assert await rc(c, request("0200", "000000", POOR, 1, pin="1111")) == RC.PIN_TRIES_EXCEEDED
            assert host.hsm_server.stats.requests("EC") == 3
        finally:
            await c.close()
            await host.stop()

    asyncio.run(main())


def test_hsm_not_up_yet_then_up(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="cardswitch")
    port = free_ports(1)[0]

    async def main():
        host = await started(tmp_path, hsm=Endpoint("127.0.0.1", port))
        c = await Client.connect(host.port)
        hsm = None
        try:
            assert not host.hsm_client.available
            for m in (request("0200", "000000", RICH, 1, pin="1234"), swipe(), chip()):
                assert await rc(c, m) == RC.SYSTEM_MALFUNCTION
            assert host.logic.account_for(RICH).pin_fails == 0
            # everything without a check keeps working
            assert await rc(c, request("0200", "000000", RICH, 1)) == RC.APPROVED
            assert await rc(c, request("0100", "000000", RICH, 5)) == RC.APPROVED
            hsm = HsmServer(port=port)
            await hsm.start()
            assert await host.hsm_client.wait_available(10)
            assert await rc(c, request("0200", "000000", RICH, 1, pin="1234")) == RC.APPROVED
            assert await rc(c, swipe()) == RC.APPROVED
            assert await rc(c, chip()) == RC.APPROVED
        finally:
            await c.close()
            await host.stop()
            if hsm is not None:
                await hsm.stop()

    asyncio.run(main())
    assert "not reachable yet" in caplog.text


def test_hsm_failures(tmp_path):
    async def main():
        host = await started(tmp_path, hsm_timeout_s=0.2)
        hsm = host.hsm_server
        c = await Client.connect(host.port)
        try:
            # no answer in time: 96, nothing counted
            hsm.set_failure("EC", "down")
            assert await rc(c, request("0200", "000000", RICH, 1, pin="1234")) == RC.SYSTEM_MALFUNCTION
            # the PIN block does not hold a valid PIN (20): a wrong PIN, counted
            hsm.set_failure("EC", "20")
            assert await rc(c, request("0200", "000000", RICH, 1, pin="1234")) == RC.INCORRECT_PIN
            assert host.logic.account_for(RICH).pin_fails == 1
            # any other HSM error: the bank cannot verify
            hsm.set_failure("EC", "13")
            assert await rc(c, request("0200", "000000", RICH, 1, pin="1234")) == RC.SYSTEM_MALFUNCTION
            hsm.set_failure("CY", "68")
            assert await rc(c, swipe()) == RC.SYSTEM_MALFUNCTION
            hsm.clear_faults()
            hsm.set_failure("KQ", "down")
            assert await rc(c, chip()) == RC.SYSTEM_MALFUNCTION
            # a good ARQC declined for funds: the ARPC of 51 comes from a second KQ
            hsm.clear_faults()
            r = await c.call(chip(POOR, 50_000))
            assert r[F.RESPONSE_CODE] == RC.INSUFFICIENT_FUNDS and "91" in tlv_dict(r[F.ICC_DATA])
            hsm.clear_faults()
            assert await rc(c, request("0200", "000000", RICH, 1, pin="1234")) == RC.APPROVED
            assert host.logic.account_for(RICH).pin_fails == 0
        finally:
            await c.close()
            await host.stop()

    asyncio.run(main())


def test_stop_waits_for_requests_at_the_hsm(tmp_path):
    async def main():
        host = await started(tmp_path)
        host.hsm_server.set_latency("EC", 150)
        c = await Client.connect(host.port)
        m = request("0200", "000000", RICH, 7, pin="1234")
        c.send(m)
        for _ in range(100):                     # until the request is at the HSM
            if host.hsm_client.in_flight:
                break
            await asyncio.sleep(0.01)
        stopping = asyncio.ensure_future(host.stop())
        r = await c.recv()
        assert r[F.STAN] == m[F.STAN] and r[F.RESPONSE_CODE] == RC.APPROVED
        await stopping
        await c.close()

    asyncio.run(main())


def test_keys_under_the_lmk_and_given_pvvs(tmp_path):
    """A live-style bank: every key under the LMK, cards with a PVV or offset and no PIN."""
    pvk = bytes.fromhex(PVK_HEX)
    cards = tuple(Card(c.pan, c.expiry, None, c.balance, c.currency, c.status, c.daily_withdrawal_limit,
                       c.delay_ms, c.pin_method, pin_ref_for(c, pvk).pvv, pin_ref_for(c, pvk).pin_offset)
                  for c in CARDS)
    live = dataclasses.replace(make_bank(cards=cards),
                               zpk=Key(encrypt_under_lmk(bytes.fromhex(ZPK_HEX), ZPK)),
                               pvk=Key(encrypt_under_lmk(pvk, PVK)),
                               cvk=Key(encrypt_under_lmk(bytes.fromhex(CVK_HEX), CVK)),
                               mk_ac=Key(encrypt_under_lmk(bytes.fromhex(MK_AC_HEX), MK_AC)))
    assert not any(k.is_clear for k in (live.zpk, live.pvk, live.cvk, live.mk_ac))
    # the published check: the CVK of hsm.md 2 under the test LMK
    assert encrypt_under_lmk(bytes.fromhex("0123456789ABCDEFFEDCBA9876543210"), CVK) \
        == "U9B4934384B19946B040CD702B4D58145"
    assert BankKeys.from_bank(live).pvk == live.pvk.text == BankKeys.from_bank(BANK).pvk

    async def main():
        host = await started(tmp_path, live)
        c = await Client.connect(host.port)
        try:
            assert await rc(c, request("0200", "000000", RICH, 1, pin="1234")) == RC.APPROVED
            assert await rc(c, request("0200", "000000", RICH, 1, pin="1235")) == RC.INCORRECT_PIN
            assert await rc(c, request("0200", "000000", IBM, 1, pin="246810")) == RC.APPROVED
            assert await rc(c, swipe()) == RC.APPROVED
            assert await rc(c, chip()) == RC.APPROVED
        finally:
            await c.close()
            await host.stop()

    asyncio.run(main())


def test_stored_pvv_and_offset_survive_restarts(tmp_path):
    async def main():
        host = await started(tmp_path)
        await host.stop()
        # restarted from a file whose cards give neither PIN nor PVV/offset:
        # what was issued is still there
        bare = tuple(Card(c.pan, c.expiry, None, c.balance, pin_method=c.pin_method) for c in CARDS)
        host = await started(tmp_path, make_bank(cards=bare))
        c = await Client.connect(host.port)
        try:
            assert await rc(c, request("0200", "000000", RICH, 1, pin="1234")) == RC.APPROVED
            assert await rc(c, request("0200", "000000", IBM, 1, pin="246810")) == RC.APPROVED
        finally:
            await c.close()
            await host.stop()

    asyncio.run(main())
    con = sqlite3.connect(db_path(tmp_path, "BANKA"))
    rows = dict(con.execute("SELECT pan_masked, pin_method || ':' || pvv || ':' || pin_offset FROM cards"))
    con.close()
    pvk = bytes.fromhex(PVK_HEX)
    rich, ibm = pin_ref_for(CARD[RICH], pvk), pin_ref_for(CARD[IBM], pvk)
    assert rows[RICH[:6] + "******" + RICH[-4:]] == f"pvv:{rich.pvv}:"
    assert rows[IBM[:6] + "******" + IBM[-4:]] == f"ibm::{ibm.pin_offset}"


def test_a_database_of_the_first_release_gains_the_new_columns(tmp_path):
    path = tmp_path / "old.db"
    old = SCHEMA.replace(",\n    pin_method TEXT NOT NULL DEFAULT 'pvv',\n    pvv TEXT NOT NULL DEFAULT '',\n"
                         "    pin_offset TEXT NOT NULL DEFAULT ''", "")
    assert "pvv" not in old
    con = connect(str(path))
    con.executescript(old)
    con.execute("INSERT INTO cards (token, pan_masked, expiry, currency, status, daily_withdrawal_limit, "
                "delay_ms, balance) VALUES ('t', 'm', '2812', '156', 'active', 0, 0, 5)")
    loaded = load(con, CARDS[:1], 10, lambda card: pin_ref_for(card, bytes.fromhex(PVK_HEX)))
    cols = {r[1] for r in con.execute("PRAGMA table_info(cards)")}
    con.close()
    assert {"pin_method", "pvv", "pin_offset"} <= cols
    by_token = {a.token: a for a in loaded.accounts}
    assert by_token["t"].pvv == "" and by_token["t"].balance == 5
    assert len(loaded.accounts) == 2


def test_a_block_that_is_no_pin_block_is_55(tmp_path):
    async def main():
        host = await started(tmp_path)
        c = await Client.connect(host.port)
        try:
            for block in ("0" * 16, "F" * 16):
                m = request("0200", "000000", RICH, 1, **{F.PIN_BLOCK: block})
                assert await rc(c, m) == RC.INCORRECT_PIN
            assert host.logic.account_for(RICH).pin_fails == 2
            # both "not a valid PIN block" errors of the HSM: 20 and 24 (length nibble)
            assert host.hsm_server.stats.snapshot()["EC"]["codes"] == {"20": 1, "24": 1}
        finally:
            await c.close()
            await host.stop()

    asyncio.run(main())


def test_no_hsm_configured_or_no_keys(tmp_path):
    async def main():
        # no HSM endpoint: PIN/CVV/chip requests 96, the rest works
        host = await started(tmp_path / "a", with_hsm=False)
        c = await Client.connect(host.port)
        try:
            assert host.hsm_client is None
            for m in (request("0200", "000000", RICH, 1, pin="1234"), swipe(), chip()):
                assert await rc(c, m) == RC.SYSTEM_MALFUNCTION
            assert await rc(c, request("0200", "000000", RICH, 1)) == RC.APPROVED
        finally:
            await c.close()
            await host.stop()
        # a bank without PVK, CVK and MK-AC opens no HSM connection at all
        host = await started(tmp_path / "b", make_bank(keys=False))
        c = await Client.connect(host.port)
        try:
            assert host.hsm_client is None and host.hsm_server.connections == 0
            assert await rc(c, request("0200", "000000", RICH, 1, pin="1234")) == RC.SYSTEM_MALFUNCTION
            assert await rc(c, swipe(cvv="000")) == RC.APPROVED        # CVVs not checked
        finally:
            await c.close()
            await host.stop()

    asyncio.run(main())
