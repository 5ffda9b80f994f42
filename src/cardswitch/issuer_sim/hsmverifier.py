"""A simulated bank's verifier: its security checks go to the HSM (hsm.md 3).

- PIN, method ``pvv``: EC (ZPK, PVK, PIN block format 01, account, PVKI 1, PVV).
- PIN, method ``ibm``: EA (ZPK, PVK, max PIN length 12, PIN block format 01,
  check length 4, account, decimalisation table, validation data, offset).
- CVV on track 2: CY with the CVK.
- ARQC: KQ mode 1 (verify, and the ARPC for ARC "00") with scheme 1 (EMV
  common session key) and the MK-AC; KQ mode 2 for the ARPC of another ARC.

The bank holds its keys only under the LMK. With ``mode = "test"`` the
network file may give clear test keys: :meth:`BankKeys.from_bank` puts them
under the Thales test LMK (or the LMK given), which is what the HSM
simulator holds by default, so a test network runs unchanged against it.

Failures never raise: error 01 is ``wrong``; errors 20 and 24 (the PIN
block does not hold a valid PIN) and a block that cannot form the command
are ``bad_input``; every other HSM error, no connection, or a timeout is
``unavailable``. Log lines name the bank, the command and the error, never
a key, a PIN block, a PAN or a CVV.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from cardswitch.config import Bank, Key
from cardswitch.hsm_sim.client import (
    HsmClient,
    HsmError,
    HsmFailure,
    HsmRequestError,
    account12,
)
from cardswitch.hsm_sim.lmk import CVK, MK_AC, PVK, ZPK, Lmk, encrypt_under_lmk
from cardswitch.issuer_sim.cards import (
    DECIMALISATION,
    IBM_CHECK_LEN,
    IBM_MAX_PIN_LEN,
    PIN_BLOCK_FORMAT,
    PVKI,
    arc_for,
    ibm_validation_template,
)
from cardswitch.issuer_sim.checks import (
    CAN_ARQC,
    CAN_CVV,
    CAN_PIN,
    ArqcCheck,
    ArqcResult,
    CvvCheck,
    PinCheck,
    Verdict,
)

log = logging.getLogger("cardswitch.issuer_sim")

KQ_VERIFY_AND_ARPC = 1
KQ_ARPC_ONLY = 2
KQ_SCHEME_EMV_CSK = 1

# HSM errors meaning "the PIN block itself is bad", not "the HSM failed".
_PIN_BLOCK_ERRORS = frozenset({"20", "24"})


def under_lmk(key: Key | None, key_type: str, lmk: Lmk | None = None) -> str | None:
    """A key as the HSM takes it: a clear test key goes under the (test) LMK."""
    if key is None:
        return None
    if key.is_clear:
        return encrypt_under_lmk(key.clear_bytes(), key_type, lmk)
    return key.text


@dataclass(slots=True, frozen=True)
class BankKeys:
    """A bank's keys under the LMK (``None``: the bank has no such key)."""

    zpk: str | None = None
    pvk: str | None = None
    cvk: str | None = None
    mk_ac: str | None = None

    @classmethod
    def from_bank(cls, bank: Bank, lmk: Lmk | None = None) -> BankKeys:
        return cls(zpk=under_lmk(bank.zpk, ZPK, lmk), pvk=under_lmk(bank.pvk, PVK, lmk),
                   cvk=under_lmk(bank.cvk, CVK, lmk), mk_ac=under_lmk(bank.mk_ac, MK_AC, lmk))

    @property
    def capabilities(self) -> frozenset[str]:
        can = set()
        if self.zpk and self.pvk:
            can.add(CAN_PIN)
        if self.cvk:
            can.add(CAN_CVV)
        if self.mk_ac:
            can.add(CAN_ARQC)
        return frozenset(can)

    def __repr__(self) -> str:
        return ("BankKeys(" + ", ".join(f"{n}={'yes' if getattr(self, n) else 'no'}"
                                        for n in ("zpk", "pvk", "cvk", "mk_ac")) + ")")


class HsmVerifier:
    """The bank's :class:`~cardswitch.issuer_sim.checks.Verifier` over an ``HsmClient``.

    ``client`` None: no HSM configured; every check is ``unavailable``.
    """

    def __init__(self, bank_id: str, keys: BankKeys, client: HsmClient | None) -> None:
        self.bank_id = bank_id
        self.keys = keys
        self.client = client
        self.capabilities = keys.capabilities
        # counters, for tests and operators
        self.calls = 0
        self.failures = 0

    def _failed(self, command: str, e: Exception) -> str:
        self.failures += 1
        log.warning("%s: HSM %s failed (%s): cannot verify, answered as issuer unavailable",
                    self.bank_id, command, e)
        return Verdict.UNAVAILABLE

    async def verify_pin(self, check: PinCheck) -> str:
        k, client = self.keys, self.client
        if client is None or not (k.zpk and k.pvk):
            return Verdict.UNAVAILABLE
        command = "EA" if check.method == "ibm" else "EC"
        self.calls += 1
        try:
            acct = account12(check.pan)
            if check.method == "ibm":
                ok = await client.verify_pin_ibm_zpk(
                    k.zpk, k.pvk, IBM_MAX_PIN_LEN, check.pin_block, PIN_BLOCK_FORMAT, IBM_CHECK_LEN,
                    acct, DECIMALISATION, ibm_validation_template(check.pan), check.pin_offset)
            else:
                ok = await client.verify_pin_pvv_zpk(k.zpk, k.pvk, check.pin_block, PIN_BLOCK_FORMAT,
                                                     acct, PVKI, check.pvv)
        except HsmRequestError as e:
            log.info("%s: PIN block cannot form the %s command (%s)", self.bank_id, command, e)
            return Verdict.BAD_INPUT
        except HsmError as e:
            if e.code in _PIN_BLOCK_ERRORS:
                log.info("%s: HSM %s: %s", self.bank_id, command, e.meaning)
                return Verdict.BAD_INPUT
            return self._failed(command, e)
        except HsmFailure as e:
            return self._failed(command, e)
        return Verdict.OK if ok else Verdict.WRONG

    async def verify_cvv(self, check: CvvCheck) -> str:
        client = self.client
        if client is None or not self.keys.cvk:
            return Verdict.UNAVAILABLE
        self.calls += 1
        try:
            ok = await client.verify_cvv(self.keys.cvk, check.cvv, check.pan, check.expiry,
                                         check.service_code)
        except HsmRequestError as e:
            log.info("%s: track data cannot form the CY command (%s)", self.bank_id, e)
            return Verdict.BAD_INPUT
        except HsmFailure as e:
            return self._failed("CY", e)
        return Verdict.OK if ok else Verdict.WRONG

    async def _kq(self, mode: int, check: ArqcCheck, arc: bytes) -> bytes | bool:
        return await self.client.verify_arqc(mode, KQ_SCHEME_EMV_CSK, self.keys.mk_ac, check.pan_psn,
                                             check.atc, check.un, check.data, check.arqc, arc)

    async def verify_arqc(self, check: ArqcCheck) -> ArqcResult:
        if self.client is None or not self.keys.mk_ac:
            return ArqcResult(Verdict.UNAVAILABLE)
        self.calls += 1
        try:
            got = await self._kq(KQ_VERIFY_AND_ARPC, check, arc_for("00"))
        except HsmRequestError as e:
            log.info("%s: chip data cannot form the KQ command (%s)", self.bank_id, e)
            return ArqcResult(Verdict.BAD_INPUT)
        except HsmFailure as e:
            return ArqcResult(self._failed("KQ", e))
        if got is False:
            return ArqcResult(Verdict.WRONG)
        return ArqcResult(Verdict.OK, bytes(got))

    async def arpc(self, check: ArqcCheck, arc: bytes) -> bytes | None:
        if self.client is None or not self.keys.mk_ac:
            return None
        self.calls += 1
        try:
            got = await self._kq(KQ_ARPC_ONLY, check, arc)
        except HsmFailure as e:
            self._failed("KQ", e)
            return None
        return bytes(got) if isinstance(got, (bytes, bytearray)) else None
