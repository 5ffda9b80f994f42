"""What a simulated bank issues with a card, and what it reads back from one.

Pure functions, no I/O. Two sides:

- Issuance (the bank's own setup step, with its clear test keys): the PIN
  verification value kept instead of the PIN (:func:`pin_ref_for`), and, for
  tests and the demo, the data a genuine card would present: a track 2 with
  a valid CVV (:func:`track2_for`) and an EMV field 55 with a valid ARQC
  (:func:`icc_data_for`). Only a test network (``mode = "test"``, clear keys)
  can do this; a live bank's keys are under the LMK.
- Reading a request: the CVV in track 2 (:func:`parse_track2`) and the ARQC
  inputs in field 55 (:func:`arqc_check_from`), which the bank then hands to
  the HSM.

Conventions (where the contract leaves the choice to the issuer):

- PIN method: ``pvv`` (Visa PVV, PVKI ``1``) unless the card says
  ``pin_method = "ibm"`` (IBM 3624 offset).
- IBM 3624: decimalisation table ``0123456789012345``, PIN validation data
  template ``<first 7 digits of the 12-digit account>N FFFF`` (``N`` stands
  for the account's last 5 digits, hsm.md EA), so the validation data is the
  12-digit account number right-padded with ``F``; check length 4, maximum
  PIN length 12. The offset has as many digits as the PIN.
- Track 2: ``PAN=YYMM`` + service code (3) + discretionary data laid out as
  Visa does: PVKI (1) + PVV (4, ``0000`` for an IBM-method card) + CVV (3);
  anything after the CVV is ignored. The CVV is the 3 digits at offsets 5-7
  of the discretionary data.
- EMV: ARQC with the EMV common session key (HSM KQ scheme 1), ICC master
  key by option A from PAN (tag 5A, else the request's PAN) and PSN (5F34,
  default ``00``). The transaction data is the concatenation of the values
  of :data:`ARQC_DATA_TAGS`, in that order, those present.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date

from cardswitch.config import Bank, Card
from cardswitch.crypto import cvv as cvv_mod
from cardswitch.crypto import emv, ibm3624
from cardswitch.crypto import pvv as pvv_mod
from cardswitch.hsm_sim.client import account12
from cardswitch.iso8583.fields import build_tlv, parse_tlv
from cardswitch.issuer_sim.checks import ArqcCheck

PVKI = "1"
DECIMALISATION = "0123456789012345"
IBM_CHECK_LEN = 4
IBM_MAX_PIN_LEN = 12
PIN_BLOCK_FORMAT = "01"             # ISO 9564 format 0 (HSM format code)
SERVICE_CODE = "101"                # international, normal authorization, no restrictions
DISCRETIONARY_LEN = 8               # PVKI + PVV + CVV
CVV_AT = slice(5, 8)                # the CVV inside the discretionary data

# Field 55 tags whose values, concatenated in this order, are the data the
# ARQC covers (a CDOL1 as most EMV common-core cards define it).
ARQC_DATA_TAGS = ("9F02", "9F03", "9F1A", "95", "5F2A", "9A", "9C", "9F37", "82", "9F36", "9F10")
TAG_ARQC = "9F26"
TAG_ATC = "9F36"
TAG_UN = "9F37"
TAG_PAN = "5A"
TAG_PSN = "5F34"
TAG_CID = "9F27"
TAG_ISSUER_AUTH = "91"
MAX_KQ_DATA = 255                   # the KQ "transaction data length" is 2 hex digits


# -- PIN verification data kept by the bank ------------------------------------

@dataclass(slots=True, frozen=True)
class PinRef:
    """What the bank keeps to verify a card's PIN: never the PIN itself."""

    method: str = "pvv"             # "pvv" | "ibm"
    pvv: str = ""                   # 4 digits (method pvv)
    pin_offset: str = ""            # 4-12 digits (method ibm)

    @property
    def usable(self) -> bool:
        return bool(self.pvv if self.method == "pvv" else self.pin_offset)


def ibm_validation_template(pan: str) -> str:
    """The 12-character EA "PIN validation data" for a card (see the module doc)."""
    return account12(pan)[:7] + "N" + "FFFF"


def ibm_validation_data(pan: str) -> str:
    """The 16 hex digits of validation data the HSM makes from the template."""
    return ibm3624.validation_data(ibm_validation_template(pan), account12(pan))


def pin_ref_for(card: Card, pvk: bytes | None) -> PinRef:
    """The card's PVV or IBM offset: as the file gives it, else computed from
    its PIN with the bank's clear PVK; empty when neither is possible."""
    if card.pin_method == "ibm":
        if card.pin_offset:
            return PinRef("ibm", pin_offset=card.pin_offset)
        if card.pin and pvk is not None:
            return PinRef("ibm", pin_offset=ibm3624.pin_offset(pvk, ibm_validation_data(card.pan),
                                                               DECIMALISATION, card.pin))
        return PinRef("ibm")
    if card.pvv:
        return PinRef("pvv", pvv=card.pvv)
    if card.pin and pvk is not None:
        return PinRef("pvv", pvv=pvv_mod.pvv(pvk, PVKI, card.pin, card.pan))
    return PinRef("pvv")


def pin_matches(card: Card, pvk: bytes) -> bool:
    """True when the card's given PVV or IBM offset verifies its ``pin`` under
    ``pvk`` as the HSM would (EC; EA with check length 4)."""
    if card.pin is None:
        return False
    if card.pin_method == "ibm":
        return ibm3624.verify_offset(pvk, ibm_validation_data(card.pan), DECIMALISATION, card.pin,
                                     card.pin_offset, IBM_CHECK_LEN)
    return pvv_mod.verify_pvv(pvk, PVKI, card.pin, card.pan, card.pvv)


def clear_key(bank: Bank, name: str) -> bytes:
    """A bank's clear test key (``pvk``, ``cvk``, ``mk_ac``); ValueError if it has none."""
    key = getattr(bank, name)
    if key is None or not key.is_clear:
        raise ValueError(f"{bank.id}: no clear {name} (a test network with clear keys is needed)")
    return key.clear_bytes()


# -- track 2 -------------------------------------------------------------------

@dataclass(slots=True, frozen=True)
class Track2:
    pan: str
    expiry: str                     # YYMM
    service_code: str
    discretionary: str

    @property
    def cvv(self) -> str:
        """The CVV at its place in the discretionary data; "" when there is none."""
        d = self.discretionary
        v = d[CVV_AT] if len(d) >= DISCRETIONARY_LEN else ""
        return v if v.isascii() and v.isdigit() else ""

    def __repr__(self) -> str:      # never print track data
        return "Track2(***)"


def parse_track2(track2: str) -> Track2 | None:
    """Track 2 equivalent data (``=`` or ``D`` separator); None when unreadable."""
    for sep in ("=", "D", "d"):
        if sep in track2:
            pan, rest = track2.split(sep, 1)
            pan = pan.lstrip(";")
            rest = rest.rstrip("?")
            if not (pan.isascii() and pan.isdigit()) or len(rest) < 7 or not rest[:7].isdigit():
                return None
            return Track2(pan, rest[:4], rest[4:7], rest[7:])
    return None


def track2_for(card: Card, bank: Bank, *, service_code: str = SERVICE_CODE,
               cvv: str | None = None, expiry: str | None = None) -> str:
    """A genuine track 2 for a test card: PVKI + PVV + CVV computed with the
    bank's clear PVK and CVK. ``cvv`` overrides the CVV (a counterfeit card),
    ``expiry`` the expiry written on the track."""
    exp = expiry or card.expiry
    if cvv is None:
        cvv = cvv_mod.cvv(clear_key(bank, "cvk"), card.pan, exp, service_code)
    pvk = bank.pvk.clear_bytes() if bank.pvk is not None and bank.pvk.is_clear else None
    ref = pin_ref_for(card, pvk)
    pvv = ref.pvv if ref.method == "pvv" and ref.pvv else "0000"
    return f"{card.pan}={exp}{service_code}{PVKI}{pvv}{cvv}"


# -- EMV field 55 ----------------------------------------------------------------

def _pan_psn(pan: str, psn: str) -> bytes:
    """PAN/PSN for KQ and option A: the right-most 16 digits of PAN || PSN, 8 BCD bytes."""
    return bytes.fromhex((pan + psn)[-16:].rjust(16, "0"))


def transaction_data(tags: dict[str, str]) -> bytes:
    """The data an ARQC covers: the values of ARQC_DATA_TAGS present, in order."""
    return b"".join(bytes.fromhex(tags[t]) for t in ARQC_DATA_TAGS if t in tags)


def arqc_check_from(field55: str, pan: str) -> ArqcCheck | None:
    """The KQ inputs of a request's field 55; None when it carries no ARQC.

    ValueError (its text names the problem, never a value) when field 55 is
    not BER-TLV, or the ARQC, ATC, unpredictable number, PAN or PSN are
    missing or malformed.
    """
    tags = dict(parse_tlv(field55))
    arqc_hex = tags.get(TAG_ARQC)
    if arqc_hex is None:
        return None
    for tag, n in ((TAG_ARQC, 8), (TAG_ATC, 2), (TAG_UN, 4)):
        v = tags.get(tag)
        if v is None:
            raise ValueError(f"field 55 has an ARQC but no tag {tag}")
        if len(v) != 2 * n:
            raise ValueError(f"field 55 tag {tag} is not {n} bytes")
    card_pan = pan
    if TAG_PAN in tags:
        card_pan = tags[TAG_PAN].rstrip("F")
        if card_pan != pan:
            raise ValueError("field 55 tag 5A is not the card number of the request")
    psn = tags.get(TAG_PSN, "00")
    if len(psn) != 2 or not psn.isdigit():
        raise ValueError("field 55 tag 5F34 is not a 1-byte PAN sequence number")
    data = transaction_data(tags)
    if len(data) > MAX_KQ_DATA:
        raise ValueError(f"field 55: the ARQC data is longer than {MAX_KQ_DATA} bytes")
    return ArqcCheck(pan_psn=_pan_psn(card_pan, psn), atc=bytes.fromhex(tags[TAG_ATC]),
                     un=bytes.fromhex(tags[TAG_UN]), data=data, arqc=bytes.fromhex(arqc_hex))


def arc_for(rc: str) -> bytes:
    """The authorization response code (EMV ARC) for field 39: its two ASCII characters."""
    return rc.encode("ascii")


def issuer_auth_data(arpc: bytes, arc: bytes) -> str:
    """Field 55 of a response: tag 91 = ARPC (8 bytes) || ARC (2 bytes)."""
    return build_tlv([(TAG_ISSUER_AUTH, (arpc + arc).hex().upper())])


def _session_key(bank: Bank, pan: str, psn: str, atc: int) -> bytes:
    mk = emv.icc_master_key_option_a(clear_key(bank, "mk_ac"), pan, psn)
    return emv.session_key_common(mk, atc.to_bytes(2, "big"))


def icc_data_for(card: Card, bank: Bank, *, amount: int, currency: str = "156",
                 country: str = "0156", when: date | None = None, txn_type: str = "00",
                 un: bytes = b"\x12\x34\x56\x78", atc: int = 1, psn: str = "00",
                 tvr: str = "0000000000", aip: str = "5800", iad: str = "06011203A00000",
                 cryptogram: bytes | None = None) -> str:
    """Field 55 of a chip transaction by a test card, with an ARQC computed
    with the bank's clear MK-AC (``cryptogram`` overrides it: a forged card)."""
    when = when or date(2025, 1, 1)
    tags = {
        "9F02": f"{amount:012d}",
        "9F03": "000000000000",
        "9F1A": country.rjust(4, "0"),
        "95": tvr,
        "5F2A": currency.rjust(4, "0"),
        "9A": when.strftime("%y%m%d"),
        "9C": txn_type,
        "9F37": un.hex().upper(),
        "82": aip,
        "9F36": f"{atc:04X}",
        "9F10": iad,
    }
    if cryptogram is None:
        cryptogram = emv.arqc(_session_key(bank, card.pan, psn, atc), transaction_data(tags))
    pan_bcd = card.pan + ("F" if len(card.pan) % 2 else "")
    items = [(TAG_CID, "80"), (TAG_ARQC, cryptogram.hex().upper()), (TAG_PAN, pan_bcd), (TAG_PSN, psn)]
    items += [(t, tags[t]) for t in ARQC_DATA_TAGS]
    return build_tlv(items)


def arpc_for(card: Card, bank: Bank, field55: str, rc: str) -> bytes:
    """The ARPC a genuine issuer returns for this request and response code (tests)."""
    tags = dict(parse_tlv(field55))
    sk = _session_key(bank, card.pan, tags.get(TAG_PSN, "00"), int(tags[TAG_ATC], 16))
    return emv.arpc_method1(sk, bytes.fromhex(tags[TAG_ARQC]), arc_for(rc))
