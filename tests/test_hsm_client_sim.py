"""HSM client against the real simulator (cardswitch.hsm_sim.server): every
typed command, the golden vectors of hsm.md 5, unavailability, timeouts by
latency injection, failure injection, recovery after a restart, and many
concurrent requests over the pool.

Expected values come from clear test keys put under the test LMK here and
independent implementations (psec, pyemv) where they exist.
"""

from __future__ import annotations

import asyncio
import socket

import psec.mac
import psec.pin
import pytest
import uvloop
from pyemv import ac as emv_ac
from pyemv import kd as emv_kd

from cardswitch.config import Endpoint
from cardswitch.crypto.des import fix_parity, kcv, tdes_ecb_decrypt
from cardswitch.crypto.ibm3624 import pin_offset, validation_data
from cardswitch.crypto.pinblock import decrypt_pin_block, encrypt_pin_block, pin_from_block
from cardswitch.hsm_sim.client import (
    HsmClient, HsmError, HsmTimeout, HsmUnavailable, account12,
)
from cardswitch.hsm_sim.lmk import Lmk
from cardswitch.hsm_sim.server import HsmOptions, HsmServer

# psec and pyemv are oracles here; they use cryptography's deprecated TripleDES path.
pytestmark = pytest.mark.filterwarnings("ignore::cryptography.utils.CryptographyDeprecationWarning")

LMK = Lmk.test()
FAST = dict(reconnect_initial_s=0.01, reconnect_max_s=0.05)

# hsm.md 2 and 5
TPK = "0406FBB23A5214DF"
TPK_CLEAR = bytes.fromhex("0B681FC20E62C734")
ZPK_GOLDEN = "BAB32D775A38E4AB"
ZPK = "U1EF828AA8F6B80EB83E19FBC373F3A85"
ZPK_CLEAR = bytes.fromhex("C7152C20BC2C830EA7EC9E8334ABE3FE")
CVK = "U9B4934384B19946B040CD702B4D58145"
CVK_CLEAR = bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")

PVK_CLEAR = fix_parity(bytes.fromhex("0123456789ABCDEFFEDCBA9876543210"))
PVK = LMK.encrypt(PVK_CLEAR, "002")
TAK_CLEAR = fix_parity(bytes.fromhex("1111111111111111FEDCBA9876543210"))
TAK = LMK.encrypt(TAK_CLEAR, "003")
ZAK_CLEAR = fix_parity(bytes.fromhex("2323232323232323ABABABABABABABAB"))
ZAK = LMK.encrypt(ZAK_CLEAR, "008")
BDK = LMK.encrypt(bytes.fromhex("0123456789ABCDEFFEDCBA9876543210"), "009")
IMK_CLEAR = fix_parity(bytes.fromhex("9E15204313F7318ACB79B90BD986AD29"))
MK_AC = LMK.encrypt(IMK_CLEAR, "109")
ZMK = LMK.encrypt(fix_parity(bytes.fromhex("4545454545454545CDCDCDCDCDCDCDCD")), "000")

PAN = "4123456789012345"
ACCT = account12(PAN)


def run(coro, loop_kind: str = "uvloop"):
    factory = uvloop.new_event_loop if loop_kind == "uvloop" else asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        errors: list[dict] = []
        runner.get_loop().set_exception_handler(lambda loop, ctx: errors.append(ctx))
        result = runner.run(asyncio.wait_for(coro, 30))
    assert errors == [], errors
    return result


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


async def sim_and_client(header_len: int = 4, **kw) -> tuple[HsmServer, HsmClient]:
    srv = HsmServer(HsmOptions(header_len=header_len))
    await srv.start()
    opts = dict(FAST)
    opts.update(kw)
    c = HsmClient(Endpoint("127.0.0.1", srv.port), header_len=header_len, **opts)
    await c.start()
    assert c.available and c.connections_up == c.pool_size
    return srv, c


async def close(srv: HsmServer, c: HsmClient) -> None:
    await c.stop()
    await srv.stop()


# -- golden vectors (hsm.md 5) ---------------------------------------------------------

@pytest.mark.parametrize("loop_kind", ["uvloop", "asyncio"])
def test_golden_vectors(loop_kind: str) -> None:
    async def main():
        srv, c = await sim_and_client()
        assert await c.generate_cvv(CVK, "4123456789012345", "8701", "101") == "561"
        assert await c.translate_pin(TPK, ZPK_GOLDEN, "DC80B186C30902B0", "550000025321",
                                     src_fmt="03", dst_fmt="03") == "F7808F2CBEC63168"
        assert await c.translate_pin(TPK, ZPK_GOLDEN, "DC80B186C30902B0", "550000025321",
                                     src_fmt="03", dst_fmt="01") == "E98FFDA17099AF55"
        lmk_check, firmware = await c.diagnostics()
        assert lmk_check == LMK.check_value() and len(firmware) == 9
        await close(srv, c)
    run(main(), loop_kind)


# -- every command -----------------------------------------------------------------------

def test_echo() -> None:
    async def main():
        srv, c = await sim_and_client()
        assert await c.echo(b"\x00\xffraw\x02") == b"\x00\xffraw\x02"
        assert await c.echo(b"") == b""
        assert await c.echo("hello") == "hello"
        await close(srv, c)
    run(main())


def test_pin_translation_ca_cc_ci() -> None:
    async def main():
        srv, c = await sim_and_client()
        block = encrypt_pin_block("4321", PAN, TPK_CLEAR)
        out = await c.translate_pin(TPK, ZPK, block, ACCT)
        assert decrypt_pin_block(out, ZPK_CLEAR, PAN) == "4321"
        # CC: the golden block's PIN, moved from the golden single-length ZPK to ZPK.
        pin = pin_from_block("IBM3624", tdes_ecb_decrypt(TPK_CLEAR, bytes.fromhex("DC80B186C30902B0")), "")
        z1 = await c.translate_pin(TPK, ZPK_GOLDEN, "DC80B186C30902B0", "550000025321", "03", "01")
        z2 = await c.translate_pin_zpk(ZPK_GOLDEN, ZPK, z1, "550000025321")
        assert decrypt_pin_block(z2, ZPK_CLEAR, "5500000253210") == pin
        # CI: ANSI X9.24 DUKPT test vector (PIN 1234, PAN 4012345678909).
        dukpt_out = await c.translate_pin_dukpt(BDK, ZPK, "FFFF9876543210E00001", "1B9C1845EB993A7A",
                                                account12("4012345678909"))
        assert decrypt_pin_block(dukpt_out, ZPK_CLEAR, "4012345678909") == "1234"
        # A block that does not decrypt to a valid format 0 block for this account: error 20.
        with pytest.raises(HsmError) as e:
            await c.translate_pin(TPK, ZPK, block, account12("4999999999999999"))
        assert e.value.code in ("20", "24")
        await close(srv, c)
    run(main())


def test_pvv_verification_dc_ec() -> None:
    async def main():
        srv, c = await sim_and_client()
        pvv = psec.pin.generate_visa_pvv(PVK_CLEAR, "1", "4321", PAN)
        wrong = f"{(int(pvv) + 1) % 10000:04d}"
        tblock = encrypt_pin_block("4321", PAN, TPK_CLEAR)
        zblock = encrypt_pin_block("4321", PAN, ZPK_CLEAR)
        assert await c.verify_pin_pvv_tpk(TPK, PVK, tblock, "01", ACCT, "1", pvv) is True
        assert await c.verify_pin_pvv_tpk(TPK, PVK, tblock, "01", ACCT, 1, wrong) is False
        assert await c.verify_pin_pvv_zpk(ZPK, PVK, zblock, "01", ACCT, 1, pvv) is True
        assert await c.verify_pin_pvv_zpk(ZPK, PVK, encrypt_pin_block("4322", PAN, ZPK_CLEAR),
                                          "01", ACCT, 1, pvv) is False
        await close(srv, c)
    run(main())


def test_ibm_offset_verification_da_ea() -> None:
    async def main():
        srv, c = await sim_and_client()
        dectab, template = "0123456789012345", "40000012345N"
        offset = pin_offset(PVK_CLEAR[:8], validation_data(template, ACCT), dectab, "4321")
        pvk1 = LMK.encrypt(PVK_CLEAR[:8], "002")
        tblock = encrypt_pin_block("4321", PAN, TPK_CLEAR)
        zblock = encrypt_pin_block("4321", PAN, ZPK_CLEAR)
        args = (12, tblock, "01", 4, ACCT, dectab, template)
        assert await c.verify_pin_ibm_tpk(TPK, pvk1, *args, offset) is True
        bad = "".join(str((int(d) + 1) % 10) for d in offset)
        assert await c.verify_pin_ibm_tpk(TPK, pvk1, *args, bad) is False
        assert await c.verify_pin_ibm_zpk(ZPK, pvk1, 12, zblock, "01", 4, ACCT, dectab, template, offset) is True
        assert await c.verify_pin_ibm_zpk(ZPK, pvk1, 12, zblock, "01", 4, ACCT, dectab, template, bad) is False
        await close(srv, c)
    run(main())


def test_cvv_generate_and_verify() -> None:
    async def main():
        srv, c = await sim_and_client()
        assert await c.verify_cvv(CVK, "561", "4123456789012345", "8701", "101") is True
        assert await c.verify_cvv(CVK, "562", "4123456789012345", "8701", "101") is False
        pair = LMK.encrypt(CVK_CLEAR[:8], "402") + LMK.encrypt(CVK_CLEAR[8:], "402")
        assert await c.generate_cvv(pair, "4123456789012345", "8701", "101") == "561"
        await close(srv, c)
    run(main())


def test_mac_generate_and_verify() -> None:
    async def main():
        srv, c = await sim_and_client()
        data = bytes(range(256)) + b"\x02\x00 message with binary"
        for key_type, key, clear in (("003", TAK, TAK_CLEAR), ("008", ZAK, ZAK_CLEAR)):
            want = psec.mac.generate_retail_mac(clear[:8], clear[8:], data, 1).hex().upper()
            mac = await c.generate_mac(key_type, key, data)
            assert mac == want and len(mac) == 16
            assert await c.verify_mac(key_type, key, data, mac) is True
            assert await c.verify_mac(key_type, key, data + b"x", mac) is False
            mac8 = await c.generate_mac(key_type, key, data, mac_len=8)
            assert mac8 == want[:8]
            assert await c.verify_mac(key_type, key, data, mac8) is True
        with pytest.raises(HsmError) as e:           # a TPK is no MAC key
            await c.generate_mac("008", "U" + "0" * 31 + "1", data)
        assert e.value.code in ("10", "15", "26", "27")
        await close(srv, c)
    run(main())


def test_keys_a0_bu_fa() -> None:
    async def main():
        srv, c = await sim_and_client()
        k = await c.generate_key("001")
        assert k.under_lmk.startswith("U") and len(k.under_lmk) == 33 and k.under_zmk_or_tmk is None
        assert (await c.key_check_value("01", k.under_lmk)).startswith(k.check_value)
        bu = await c.key_check_value("01", ZPK)
        assert len(bu) == 16 and bu.startswith(kcv(ZPK_CLEAR))
        exported = await c.generate_key("001", export_under=ZMK)
        assert exported.under_zmk_or_tmk is not None and len(exported.under_zmk_or_tmk) == 33
        imported, check = await c.import_zpk(ZMK, exported.under_zmk_or_tmk)
        assert (imported, check) == (exported.under_lmk, exported.check_value)
        tmk = LMK.encrypt(fix_parity(bytes.fromhex("6767676767676767ABCDEFABCDEFABCD")), "002")
        tpk = await c.generate_key("002", export_under=tmk, export_flag="1")
        assert tpk.under_zmk_or_tmk is not None
        with pytest.raises(HsmError) as e:
            await c.key_check_value("01", "U" + "0" * 32)      # bad parity
        assert e.value.code == "10"
        await close(srv, c)
    run(main())


@pytest.mark.parametrize("scheme", [0, 1])
def test_arqc_verify_and_arpc(scheme: int) -> None:
    async def main():
        srv, c = await sim_and_client()
        pan, psn = "5413330089600010", "01"
        pan_psn = bytes.fromhex(pan[-14:] + psn)
        atc, un = b"\x00\x1c", b"\x11\x22\x33\x44"
        data = bytes.fromhex("000000001000000000000000084000000000000840230807") + un + b"\x58\x00" + atc
        icc_mk = emv_kd.derive_icc_mk_a(IMK_CLEAR, pan, psn)
        if scheme == 1:
            key = emv_kd.derive_common_sk(icc_mk, atc + bytes(6))
            arqc = emv_ac.generate_ac(key, data, emv_ac.PaddingType.EMV)
        else:
            key = icc_mk
            arqc = emv_ac.generate_ac(key, data, emv_ac.PaddingType.VISA)
        arc = b"00"
        args = (MK_AC, pan_psn, atc, un, data, arqc, arc)
        assert await c.verify_arqc(0, scheme, *args) is True
        assert await c.verify_arqc(1, scheme, *args) == emv_ac.generate_arpc_1(key, arqc, arc)
        wrong = bytes([arqc[0] ^ 1]) + arqc[1:]
        assert await c.verify_arqc(0, scheme, MK_AC, pan_psn, atc, un, data, wrong, arc) is False
        assert await c.verify_arqc(1, scheme, MK_AC, pan_psn, atc, un, data, wrong, arc) is False
        assert await c.verify_arqc(2, scheme, MK_AC, pan_psn, atc, un, data, arqc, b"05") == \
            emv_ac.generate_arpc_1(key, arqc, b"05")
        await close(srv, c)
    run(main())


# -- failures and recovery ------------------------------------------------------------------

def test_unavailable_at_once_when_the_hsm_is_down() -> None:
    async def main():
        srv, c = await sim_and_client()
        await srv.stop()
        while c.available:
            await asyncio.sleep(0.001)
        coro = c.generate_cvv(CVK, PAN, "8701", "101")
        with pytest.raises(HsmUnavailable):
            coro.send(None)                 # raised on its first step: it never waited
        coro.close()
        await c.stop()
        # A client whose HSM was never there starts, and answers at once too.
        c2 = HsmClient(Endpoint("127.0.0.1", free_port()), connect_timeout_s=0.5, **FAST)
        await c2.start()
        assert not c2.available
        with pytest.raises(HsmUnavailable):
            await c2.echo(b"x")
        await c2.stop()
    run(main())


def test_timeout_by_latency_injection_and_late_answer_discarded() -> None:
    async def main():
        srv, c = await sim_and_client(pool_size=1, timeout_s=0.05)
        srv.set_latency("CW", 100)
        with pytest.raises(HsmTimeout) as e:
            await c.generate_cvv(CVK, "4123456789012345", "8701", "101")
        assert e.value.command == "CW"
        srv.set_latency("CW", None)
        assert c.in_flight == 0                 # the timed-out request is no longer pending
        while c.late_answers == 0:              # its answer still comes, and is discarded
            await asyncio.sleep(0.005)
        assert await c.echo(b"after") == b"after"
        assert c.late_answers == 1 and c.in_flight == 0
        assert await c.generate_cvv(CVK, "4123456789012345", "8701", "101") == "561"
        await close(srv, c)
    run(main())


def test_failure_injection_modes() -> None:
    async def main():
        srv, c = await sim_and_client(pool_size=1, timeout_s=0.05)
        srv.set_failure("CA", "12")
        with pytest.raises(HsmError) as e:
            await c.translate_pin(TPK, ZPK, "0" * 16, ACCT)
        assert (e.value.code, e.value.meaning) == ("12", "no keys loaded")
        srv.disable("CW")
        with pytest.raises(HsmError) as e:
            await c.generate_cvv(CVK, PAN, "8701", "101")
        assert (e.value.code, e.value.meaning) == ("68", "command disabled")
        srv.set_failure("B2", "down")
        with pytest.raises(HsmTimeout):
            await c.echo(b"swallowed")
        srv.set_failure("B2", "close")
        with pytest.raises(HsmUnavailable):
            await c.echo(b"closed")
        srv.clear_faults()
        assert await c.wait_available(5.0)
        assert await c.echo(b"back") == b"back"
        await close(srv, c)
    run(main())


def test_recovery_after_the_hsm_restarts() -> None:
    async def main():
        srv, c = await sim_and_client()
        srv.set_latency("B2", 5000)
        in_flight = asyncio.ensure_future(c.echo(b"lost"))
        await asyncio.sleep(0)
        while c.in_flight == 0:
            await asyncio.sleep(0.001)
        port = srv.port
        await srv.stop()
        with pytest.raises(HsmUnavailable):
            await in_flight
        while c.available:
            await asyncio.sleep(0.001)
        with pytest.raises(HsmUnavailable):
            await c.echo(b"down")
        srv2 = HsmServer(HsmOptions(), port=port)
        await srv2.start()
        assert await c.wait_available(5.0)
        assert await c.generate_cvv(CVK, "4123456789012345", "8701", "101") == "561"
        while c.connections_up < 2:          # every slot comes back
            await asyncio.sleep(0.005)
        await close(srv2, c)
    run(main())


# -- load over the pool ------------------------------------------------------------------------

@pytest.mark.parametrize("header_len", [4, 8])
def test_many_concurrent_requests_over_the_pool(header_len: int) -> None:
    async def main():
        srv, c = await sim_and_client(header_len=header_len, pool_size=2)
        pins = [f"{1000 + i:04d}" for i in range(150)]
        blocks = [encrypt_pin_block(p, PAN, TPK_CLEAR) for p in pins]
        jobs = []
        for i, b in enumerate(blocks):
            jobs.append(c.translate_pin(TPK, ZPK, b, ACCT))
            jobs.append(c.echo(b"echo-%d" % i))
            jobs.append(c.generate_cvv(CVK, "4123456789012345", "8701", "101"))
        out = await asyncio.gather(*jobs)
        for i, p in enumerate(pins):
            assert decrypt_pin_block(out[3 * i], ZPK_CLEAR, PAN) == p
            assert out[3 * i + 1] == b"echo-%d" % i
            assert out[3 * i + 2] == "561"
        assert srv.stats.connections == 2 and c.late_answers == 0 and c.timeouts == 0
        assert srv.stats.requests("CA") == 150
        await close(srv, c)
    run(main())
