"""The switch's security path: everything secret goes through the HSM.

PIN blocks are translated from a terminal's TPK to the issuer's ZPK (CA),
terminal MACs are checked (M8) and responses MAC'd (M6) with the terminal's
TAK, bank-link messages with the bank's ZAK, and key change (0800/101) makes
a new TPK and TAK under the terminal's TMK (A0). The switch only ever holds
keys under the HSM's LMK.

With ``mode = "test"`` the network file may hold clear test keys: they are
put under the Thales test LMK when the file is read (the HSM simulator's
default LMK), so a test network runs unchanged against the simulator. In
``mode = "live"`` the file must already hold keys under the LMK.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import orjson

from cardswitch.config import Bank, Key, Network
from cardswitch.hsm_sim.client import HsmClient, HsmError, HsmFailure, account12
from cardswitch.iso8583.constants import RC

log = logging.getLogger("cardswitch.security")

# Key type codes (hsm.md 2).
ZPK, TMK_TPK, TAK, ZAK = "001", "002", "003", "008"

# HSM error codes that mean "the PIN block itself is bad", not "the HSM failed".
_PIN_BLOCK_ERRORS = frozenset({"20", "24"})

STATE_PREFIX = "terminal_keys:"


class SecurityError(Exception):
    """A security step failed; ``rc`` is what the terminal gets."""

    def __init__(self, rc: str, why: str = "") -> None:
        super().__init__(why or rc)
        self.rc = rc


def under_lmk(key: Key | None, key_type: str) -> str | None:
    """The key as the HSM wants it: clear test keys go under the test LMK."""
    if key is None:
        return None
    if key.is_clear:
        from cardswitch.hsm_sim.lmk import encrypt_under_lmk

        return encrypt_under_lmk(key.clear_bytes(), key_type)
    return key.text


@dataclass(slots=True)
class TerminalKeys:
    tmk: str | None
    tpk: str | None
    tak: str | None


class KeyStore:
    """Current keys under the LMK, per terminal and per bank."""

    def __init__(self, network: Network) -> None:
        self.terminals: dict[str, TerminalKeys] = {
            t.id: TerminalKeys(under_lmk(t.tmk, TMK_TPK), under_lmk(t.tpk, TMK_TPK), under_lmk(t.tak, TAK))
            for t in network.terminals()
        }
        self.zpk: dict[str, str | None] = {b.id: under_lmk(b.zpk, ZPK) for b in network.banks}
        self.zak: dict[str, str | None] = {b.id: under_lmk(b.zak, ZAK) for b in network.banks}

    def restore(self, saved: dict[str, str]) -> None:
        """Keys changed by key change before a restart (journal state, under the LMK)."""
        for key, value in saved.items():
            tid = key[len(STATE_PREFIX):]
            keys = self.terminals.get(tid)
            if keys is None:
                continue
            d = orjson.loads(value)
            keys.tpk, keys.tak = d.get("tpk") or keys.tpk, d.get("tak") or keys.tak

    def has_tak(self, tid: str) -> bool:
        k = self.terminals.get(tid)
        return k is not None and k.tak is not None


class Security:
    """The HSM calls of a transaction, with the response codes they lead to."""

    def __init__(self, hsm: HsmClient, keys: KeyStore, mac_len: int = 16) -> None:
        self.hsm = hsm
        self.keys = keys

    # -- PIN -----------------------------------------------------------------

    async def translate_pin(self, block: str, terminal_id: str, bank: Bank, pan: str) -> str:
        tk = self.keys.terminals.get(terminal_id)
        zpk = self.keys.zpk.get(bank.id)
        if tk is None or tk.tpk is None or zpk is None:
            raise SecurityError(RC.SYSTEM_MALFUNCTION, f"no PIN keys for {terminal_id} -> {bank.id}")
        try:
            return await self.hsm.translate_pin(tk.tpk, zpk, block, account12(pan))
        except HsmError as e:
            if e.code in _PIN_BLOCK_ERRORS:
                raise SecurityError(RC.INCORRECT_PIN, "PIN block does not decode") from None
            raise SecurityError(RC.SYSTEM_MALFUNCTION, f"HSM error {e.code} on CA") from None
        except HsmFailure as e:
            raise SecurityError(RC.SYSTEM_MALFUNCTION, f"HSM: {type(e).__name__}") from None

    # -- MACs ----------------------------------------------------------------

    async def verify_terminal_mac(self, terminal_id: str, data: bytes, mac: str) -> None:
        """Raise SecurityError(63) for a wrong MAC, (96) when the HSM cannot say."""
        tk = self.keys.terminals.get(terminal_id)
        if tk is None or tk.tak is None:
            return
        if not mac:
            raise SecurityError(RC.SECURITY_VIOLATION, "MAC missing")
        ok = await self._verify(TAK, tk.tak, data, mac)
        if not ok:
            raise SecurityError(RC.SECURITY_VIOLATION, "MAC wrong")

    async def terminal_mac(self, terminal_id: str, data: bytes) -> str | None:
        tk = self.keys.terminals.get(terminal_id)
        if tk is None or tk.tak is None:
            return None
        return await self._generate(TAK, tk.tak, data)

    async def link_mac(self, bank_id: str, data: bytes) -> str | None:
        zak = self.keys.zak.get(bank_id)
        return None if zak is None else await self._generate(ZAK, zak, data)

    async def verify_link_mac(self, bank_id: str, data: bytes, mac: str) -> bool:
        zak = self.keys.zak.get(bank_id)
        if zak is None:
            return True
        return bool(mac) and await self._verify(ZAK, zak, data, mac)

    async def _verify(self, key_type: str, key: str, data: bytes, mac: str) -> bool:
        try:
            return await self.hsm.verify_mac(key_type, key, data, mac)
        except HsmFailure as e:
            raise SecurityError(RC.SYSTEM_MALFUNCTION, f"HSM: {type(e).__name__}") from None

    async def _generate(self, key_type: str, key: str, data: bytes) -> str:
        try:
            return await self.hsm.generate_mac(key_type, key, data)
        except HsmFailure as e:
            raise SecurityError(RC.SYSTEM_MALFUNCTION, f"HSM: {type(e).__name__}") from None

    # -- key change (wire.md 7) ------------------------------------------------

    async def key_change(self, terminal_id: str) -> tuple[str, TerminalKeys]:
        """New TPK and TAK under the terminal's TMK: field 48 and the keys under the LMK.

        The caller persists the new keys and only then switches to them, so a
        terminal that never got the answer can still use its old keys... until
        the answer is sent (the switch adopts them as it answers).
        """
        tk = self.keys.terminals.get(terminal_id)
        if tk is None or tk.tmk is None:
            raise SecurityError(RC.INVALID_TRANSACTION, f"terminal {terminal_id} has no TMK")
        try:
            # Exported as "X": plain TDES ECB halves under the TMK, which a
            # terminal opens with its TMK (not the Thales variant scheme "U").
            tpk = await self.hsm.generate_key(TMK_TPK, export_under=tk.tmk, export_flag="1", export_scheme="X")
            tak = await self.hsm.generate_key(TAK, export_under=tk.tmk, export_flag="1", export_scheme="X")
        except HsmFailure as e:
            raise SecurityError(RC.SYSTEM_MALFUNCTION, f"HSM: {type(e).__name__}") from None
        field48 = (_bare(tpk.under_zmk_or_tmk) + tpk.check_value[:6]
                   + _bare(tak.under_zmk_or_tmk) + tak.check_value[:6])
        return field48, TerminalKeys(tk.tmk, tpk.under_lmk, tak.under_lmk)

    def adopt(self, terminal_id: str, new: TerminalKeys) -> str:
        """Use the new keys from now on; the journal state value to persist."""
        self.keys.terminals[terminal_id] = new
        return orjson.dumps({"tpk": new.tpk, "tak": new.tak}).decode()


def _bare(key: str | None) -> str:
    """A double-length key without its scheme letter (field 48 carries 32 hex)."""
    if not key:
        raise SecurityError(RC.SYSTEM_MALFUNCTION, "HSM gave no exported key")
    return key[1:] if key[:1] in ("U", "X", "T", "Y") else key
