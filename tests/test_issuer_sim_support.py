"""Shared fixtures for the issuer simulator tests (no tests here): a small bank and request builders."""

from __future__ import annotations

import itertools
from datetime import datetime, timedelta, timezone

from cardswitch.config import Bank, BinRange, Card, Endpoint, Key, LinkOptions
from cardswitch.crypto import encrypt_pin_block
from cardswitch.iso8583.constants import F
from cardswitch.pan import luhn_check_digit

ZPK_HEX = "0123456789ABCDEFFEDCBA9876543210"
ZAK_HEX = "89ABCDEF0123456776543210FEDCBA98"
ZPK = bytes.fromhex(ZPK_HEX)
ZAK = bytes.fromhex(ZAK_HEX)
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
)


def make_bank(cards=CARDS, port: int = 0, zak: bool = False, link: LinkOptions = LinkOptions(),
              bank_id: str = "BANKA", simulate: bool = True) -> Bank:
    return Bank(
        id=bank_id, institution_id="10000001", name="Bank A",
        hosts=(Endpoint("127.0.0.1", port),), simulate=simulate,
        zpk=Key("clear:" + ZPK_HEX), zak=Key("clear:" + ZAK_HEX) if zak else None,
        bins=(BinRange("622126", "622126"),), cards=tuple(cards), link=link,
    )


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
