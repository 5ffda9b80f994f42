"""The security checks a simulated bank has verified, and who verifies them.

``IssuerLogic`` (ledger.py) says what a request needs verified (a
:class:`Checks`); a :class:`Verifier` verifies it, asynchronously; the
ledger step then decides with the :class:`Results`. The real verifier asks
the HSM (hsmverifier.py); tests pass a fake. Nothing here holds a key or a
clear PIN: a PIN block is encrypted under the bank's ZPK, a PVV or IBM
offset is not a PIN.

Verdicts: ``ok``; ``wrong`` (verified, does not match); ``bad_input`` (the
HSM refused the data itself, e.g. a PIN block that does not decrypt to a
valid block: errors 20, 24); ``unavailable`` (it could not be verified: the
HSM is down, slow or failed, or the bank lacks the key).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Protocol

from cardswitch.pan import mask_pan


class Verdict:
    OK = "ok"
    WRONG = "wrong"
    BAD_INPUT = "bad_input"
    UNAVAILABLE = "unavailable"


# What a verifier can verify (it has the keys): Verifier.capabilities.
CAN_PIN = "pin"
CAN_CVV = "cvv"
CAN_ARQC = "arqc"


@dataclass(slots=True, frozen=True)
class PinCheck:
    pan: str
    pin_block: str                  # 16 hex, ISO format 0 under the bank's ZPK
    method: str                     # "pvv" | "ibm"
    pvv: str = ""
    pin_offset: str = ""

    def __repr__(self) -> str:
        return f"PinCheck({mask_pan(self.pan)}, {self.method})"


@dataclass(slots=True, frozen=True)
class CvvCheck:
    pan: str
    expiry: str                     # YYMM, as on the track
    service_code: str
    cvv: str

    def __repr__(self) -> str:
        return f"CvvCheck({mask_pan(self.pan)})"


@dataclass(slots=True, frozen=True)
class ArqcCheck:
    """The inputs of HSM command KQ (all raw bytes)."""

    pan_psn: bytes                  # 8 bytes
    atc: bytes                      # 2
    un: bytes                       # 4
    data: bytes                     # the transaction data the ARQC covers
    arqc: bytes                     # 8

    def __repr__(self) -> str:
        return f"ArqcCheck(atc={self.atc.hex()})"


@dataclass(slots=True, frozen=True)
class ArqcResult:
    verdict: str
    arpc: bytes | None = None       # with OK: the ARPC for ARC "00" (KQ mode 1)


@dataclass(slots=True)
class Checks:
    """What one request needs verified before the ledger decides."""

    pin: PinCheck | None = None
    cvv: CvvCheck | None = None
    arqc: ArqcCheck | None = None

    def __bool__(self) -> bool:
        return self.pin is not None or self.cvv is not None or self.arqc is not None


@dataclass(slots=True)
class Results:
    """The verdicts of a request's checks; None where nothing was verified."""

    pin: str | None = None
    cvv: str | None = None
    arqc: ArqcResult | None = None


class Verifier(Protocol):
    """Verifies a bank's security checks; never raises for a failed check."""

    capabilities: frozenset[str]    # CAN_PIN, CAN_CVV, CAN_ARQC: the keys it holds

    async def verify_pin(self, check: PinCheck) -> str: ...

    async def verify_cvv(self, check: CvvCheck) -> str: ...

    async def verify_arqc(self, check: ArqcCheck) -> ArqcResult: ...

    async def arpc(self, check: ArqcCheck, arc: bytes) -> bytes | None:
        """The ARPC for another ARC (KQ mode 2); None when it cannot be had."""
        ...


async def _none() -> None:
    return None


async def verify_all(verifier: Verifier, checks: Checks) -> Results:
    """Run a request's checks concurrently."""
    pin, cvv, arqc = await asyncio.gather(
        verifier.verify_pin(checks.pin) if checks.pin is not None else _none(),
        verifier.verify_cvv(checks.cvv) if checks.cvv is not None else _none(),
        verifier.verify_arqc(checks.arqc) if checks.arqc is not None else _none(),
    )
    return Results(pin=pin, cvv=cvv, arqc=arqc)
