"""Shared fixtures for the issuer simulator tests (no tests here): a small bank,
request builders, and a fake verifier standing in for the HSM."""

from __future__ import annotations

import asyncio
import itertools
from datetime import datetime, timedelta, timezone

from cardswitch.config import Bank, BinRange, Card, Endpoint, Key, LinkOptions
from cardswitch.crypto import cvv as cvv_mod
from cardswitch.crypto import decrypt_pin_block, emv, encrypt_pin_block, ibm3624
from cardswitch.crypto import pvv as pvv_mod
from cardswitch.iso8583.constants import F
from cardswitch.issuer_sim.cards import (
    DECIMALISATION,
    IBM_CHECK_LEN,
    PVKI,
    ibm_validation_data,
    pin_ref_for,
)
from cardswitch.issuer_sim.checks import CAN_ARQC, CAN_CVV, CAN_PIN, ArqcResult, Verdict
from cardswitch.issuer_sim.ledger import Account, IssuerLogic
from cardswitch.pan import luhn_check_digit

ZPK_HEX = "0123456789ABCDEFFEDCBA9876543210"
ZAK_HEX = "89ABCDEF0123456776543210FEDCBA98"
PVK_HEX = "FD8AA2D632B0103476317543CE79D3F7"
CVK_HEX = "A40D7C3867076720EAE9D50704D6B5EF"
MK_AC_HEX = "F46B8A16D00D45B33729408576D55449"
ZPK = bytes.fromhex(ZPK_HEX)
ZAK = bytes.fromhex(ZAK_HEX)
PVK = bytes.fromhex(PVK_HEX)
CVK = bytes.fromhex(CVK_HEX)
MK_AC = bytes.fromhex(MK_AC_HEX)
SECRET = b"k" * 32
NOW = datetime(2025, 6, 15, 10, 0, 0, tzinfo=timezone.utc)
TODAY_MMDD = "0615"


def pan(body: str) -> str:
    return body + luhn_check_digit(body)


RICH = pan("622126000000001")
POOR = pan("622126000000002")
EXPIRED = pan("622126000000003")
LOST = pan("622126000000004")
STOLEN = pan("622126000000005")
BLOCKED = pan("622126000000006")
LIMITED = pan("622126000000007")
SLOW = pan("622126000000008")
FRIEND = pan("622126000000009")
IBM = pan("622126000000011")              # PIN verified with an IBM 3624 offset
UNKNOWN_OWN = pan("622126999999999")     # in our BINs, no such card
OTHER_BANK = pan("438888000000001")       # outside our BINs

CARDS = (
    Card(RICH, "2812", "1234", 1_000_000, daily_withdrawal_limit=0),
    Card(POOR, "2812", "1111", 1_000),
    Card(EXPIRED, "2201", "1234", 1_000_000),
    Card(LOST, "2812", "1234", 1_000_000, status="lost"),
    Card(STOLEN, "2812", "1234", 1_000_000, status="stolen"),
    Card(BLOCKED, "2812", "1234", 1_000_000, status="blocked"),
    Card(LIMITED, "2812", "4321", 1_000_000, daily_withdrawal_limit=50_000),
    Card(SLOW, "2812", "1234", 1_000_000, delay_ms=300),
    Card(FRIEND, "2812", "9999", 10_000),
    Card(IBM, "2812", "246810", 1_000_000, pin_method="ibm"),
)
CARD = {c.pan: c for c in CARDS}


def make_bank(cards=CARDS, port: int = 0, zak: bool = False, link: LinkOptions = LinkOptions(),
              bank_id: str = "BANKA", simulate: bool = True, keys: bool = True) -> Bank:
    """The test bank; ``keys``: with its PVK, CVK and MK-AC (clear test keys)."""
    return Bank(
        id=bank_id, institution_id="10000001", name="Bank A",
        hosts=(Endpoint("127.0.0.1", port),), simulate=simulate,
        zpk=Key("clear:" + ZPK_HEX), zak=Key("clear:" + ZAK_HEX) if zak else None,
        bins=(BinRange("622126", "622126"),), cards=tuple(cards), link=link,
        pvk=Key("clear:" + PVK_HEX) if keys else None,
        cvk=Key("clear:" + CVK_HEX) if keys else None,
        mk_ac=Key("clear:" + MK_AC_HEX) if keys else None,
    )


class FakeVerifier:
    """The HSM's verification commands done in-process with the clear test
    keys (tests only: the real bank never holds them). ``up = False``
    answers ``unavailable``, as the HSM verifier does when the HSM is down."""

    def __init__(self, capabilities=frozenset({CAN_PIN, CAN_CVV, CAN_ARQC})) -> None:
        self.capabilities = frozenset(capabilities)
        self.up = True
        self.calls: list[str] = []

    async def verify_pin(self, check) -> str:
        self.calls.append("EA" if check.method == "ibm" else "EC")
        if not self.up:
            return Verdict.UNAVAILABLE
        try:
            pin = decrypt_pin_block(check.pin_block, ZPK, check.pan)
        except ValueError:
            return Verdict.BAD_INPUT
        if check.method == "ibm":
            ok = ibm3624.verify_offset(PVK, ibm_validation_data(check.pan), DECIMALISATION, pin,
                                       check.pin_offset, IBM_CHECK_LEN)
        else:
            ok = pvv_mod.verify_pvv(PVK, PVKI, pin, check.pan, check.pvv)
        return Verdict.OK if ok else Verdict.WRONG

    async def verify_cvv(self, check) -> str:
        self.calls.append("CY")
        if not self.up:
            return Verdict.UNAVAILABLE
        ok = cvv_mod.verify_cvv(CVK, check.pan, check.expiry, check.service_code, check.cvv)
        return Verdict.OK if ok else Verdict.WRONG

    @staticmethod
    def _session_key(check) -> bytes:
        mk = emv.icc_master_key_from_data(MK_AC, check.pan_psn)
        return emv.session_key_common(mk, check.atc)

    async def verify_arqc(self, check) -> ArqcResult:
        self.calls.append("KQ1")
        if not self.up:
            return ArqcResult(Verdict.UNAVAILABLE)
        sk = self._session_key(check)
        if not emv.verify_arqc(sk, check.data, check.arqc):
            return ArqcResult(Verdict.WRONG)
        return ArqcResult(Verdict.OK, emv.arpc_method1(sk, check.arqc, b"00"))

    async def arpc(self, check, arc: bytes) -> bytes | None:
        self.calls.append("KQ2")
        if not self.up:
            return None
        return emv.arpc_method1(self._session_key(check), check.arqc, arc)


def accounts(bank: Bank | None = None, cards=CARDS) -> list[Account]:
    """The bank's accounts after card issuance: PVVs / offsets from the PINs."""
    bank = bank or make_bank(cards)
    pvk = bank.pvk.clear_bytes() if bank.pvk is not None else None
    return [Account.from_card(c, SECRET, pin_ref_for(c, pvk)) for c in cards]


def make_logic(verifier=None, bank: Bank | None = None) -> IssuerLogic:
    bank = bank or make_bank()
    return IssuerLogic(bank.id, bank.bins, SECRET, accounts(bank, bank.cards),
                       verifier=FakeVerifier() if verifier is None else verifier)


# One event loop for the pure-logic tests: IssuerLogic.process is a coroutine
# (the fake verifier never waits), asyncio.run per call would be slow.
_LOOP = asyncio.new_event_loop()


def run(coro):
    return _LOOP.run_until_complete(coro)


_stan = itertools.count(1)


def new_stan() -> str:
    return f"{next(_stan) % 1_000_000:06d}"


def request(mti: str, proc: str, card: str | None, amount: int | None = 0, *, pin: str | None = None,
            stan: str | None = None, rrn: str | None = None, f7: str = "0615100000",
            f15: str = TODAY_MMDD, **extra: str) -> dict[str, str]:
    stan = stan or new_stan()
    m = {F.MTI: mti, F.PROC: proc, F.TRANSMISSION_DT: f7, F.STAN: stan,
         F.LOCAL_TIME: "180000", F.LOCAL_DATE: "0615", F.SETTLEMENT_DATE: f15,
         F.ENTRY_MODE: "051", F.CONDITION_CODE: "00", F.ACQUIRER_ID: "10000002",
         F.FORWARDER_ID: "99900001", F.RRN: rrn or ("5166" + stan + "00")[:12],
         F.TERMINAL_ID: "POS00001", F.MERCHANT_ID: "898440154110001", F.CURRENCY: "156",
         F.RECEIVING_ID: "10000001"}
    if card is not None:
        m[F.PAN] = card
    if amount is not None:
        m[F.AMOUNT] = f"{amount:012d}"
    if pin is not None:
        m[F.PIN_BLOCK] = encrypt_pin_block(pin, card, ZPK)
    if f15 is None:
        del m[F.SETTLEMENT_DATE]
    m.update(extra)
    return m


def field90(orig: dict[str, str]) -> str:
    return orig[F.MTI] + orig[F.STAN] + orig[F.TRANSMISSION_DT] + "10000002".zfill(11) + "99900001".zfill(11)


def reversal(orig: dict[str, str], **extra: str) -> dict[str, str]:
    m = request("0420", orig[F.PROC], orig.get(F.PAN), int(orig.get(F.AMOUNT, "0")),
                f7="0615100500", **extra)
    m[F.ORIGINAL_DATA] = field90(orig)
    return m


def next_day(now: datetime = NOW) -> datetime:
    return now + timedelta(days=1)
