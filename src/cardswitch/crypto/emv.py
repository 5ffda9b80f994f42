"""EMV issuer cryptography: ICC master keys, session keys, ARQC and ARPC.

- ICC master key, option A (EMV Book 2 A1.4.1): Y = the right-most 16 digits
  of PAN || PSN (left-padded with 0); MK = TDES(IMK, Y) || TDES(IMK, Y xor
  FF..FF), odd parity adjusted. Option B (A1.4.2) hashes PANs longer than 16.
- Common session key (A1.3.1): SK = TDES(MK, R with byte 2 = F0) ||
  TDES(MK, R with byte 2 = 0F), parity adjusted, for an 8-byte
  diversification value R: ATC || 00 00 00 00 00 00 for the AC session key
  (EMV CSK, CVN 18/22), ATC || 00 00 || UN for Mastercard M/Chip.
- Visa CVN 10 (and the Thales KQ "Visa" scheme) uses no session key: the
  ARQC is computed under the ICC master key itself.
- ARQC/TC/AAC (A1.2): ISO 9797-1 MAC algorithm 3 under the session key,
  padding method 2 (EMV) or method 1 (Visa CVN 10), 8 bytes.
- ARPC method 1 (8.2.1): TDES(key, ARQC xor (ARC || 00..00)).
  ARPC method 2 (8.2.2): the left 4 bytes of MAC algorithm 3, padding
  method 2, over ARQC || CSU || proprietary authentication data.
"""

from __future__ import annotations

import hashlib
import hmac

from cardswitch.crypto.des import fix_parity, tdes_ecb_encrypt, xor
from cardswitch.crypto.mac import mac_alg3

_FF8 = b"\xff" * 8


def _key16(key: bytes, what: str) -> bytes:
    if len(key) != 16:
        raise ValueError(f"{what} must be 16 bytes (double-length TDES), not {len(key)}")
    return bytes(key)


def _pan_psn(pan: str, psn: str) -> tuple[str, str]:
    if not (pan.isascii() and pan.isdigit()) or not 1 <= len(pan) <= 19:
        raise ValueError("PAN must be 1 to 19 digits")
    if len(psn) != 2 or not (psn.isascii() and psn.isdigit()):
        raise ValueError("PAN sequence number must be 2 digits")
    return pan, psn


def icc_master_key_from_data(imk: bytes, y: bytes) -> bytes:
    """The ICC master key for the 8-byte derivation data ``y`` (as the Thales
    KQ "PAN/PSN 8B" field): TDES(IMK, Y) || TDES(IMK, Y xor FF..), odd parity."""
    if len(y) != 8:
        raise ValueError(f"ICC master key derivation data must be 8 bytes, not {len(y)}")
    y = bytes(y)
    return fix_parity(tdes_ecb_encrypt(_key16(imk, "issuer master key"), y + xor(y, _FF8)))


def icc_master_key_option_a(imk: bytes, pan: str, psn: str = "00") -> bytes:
    """The ICC master key, EMV option A, from the issuer master key, PAN and PSN."""
    pan, psn = _pan_psn(pan, psn)
    return icc_master_key_from_data(imk, bytes.fromhex((pan + psn)[-16:].rjust(16, "0")))


def icc_master_key_option_b(imk: bytes, pan: str, psn: str = "00") -> bytes:
    """The ICC master key, EMV option B (option A for PANs up to 16 digits)."""
    pan, psn = _pan_psn(pan, psn)
    if len(pan) <= 16:
        return icc_master_key_option_a(imk, pan, psn)
    digits = pan + psn
    digest = hashlib.sha1(bytes.fromhex(digits.rjust(len(digits) + len(digits) % 2, "0"))).hexdigest()
    dec = [c for c in digest if c <= "9"]
    dec += [str(int(c, 16) - 10) for c in digest if c > "9"]
    return icc_master_key_from_data(imk, bytes.fromhex("".join(dec[:16])))


def session_r(atc: bytes, un: bytes | None = None) -> bytes:
    """The 8-byte diversification value R: ATC || 00*6, or ATC || 00 00 || UN."""
    if len(atc) != 2:
        raise ValueError(f"ATC must be 2 bytes, not {len(atc)}")
    if un is None:
        return bytes(atc) + bytes(6)
    if len(un) != 4:
        raise ValueError(f"unpredictable number must be 4 bytes, not {len(un)}")
    return bytes(atc) + bytes(2) + bytes(un)


def session_key_common(icc_mk: bytes, atc: bytes) -> bytes:
    """The EMV common session key (parity adjusted).

    ``atc`` is the 2-byte ATC (R = ATC || 00*6) or an 8-byte R (see
    ``session_r``); byte 2 of R is replaced with F0 for the left half and
    0F for the right half.
    """
    r = session_r(atc) if len(atc) == 2 else bytes(atc)
    if len(r) != 8:
        raise ValueError(f"session key input must be a 2-byte ATC or an 8-byte R, not {len(atc)} bytes")
    left = r[:2] + b"\xf0" + r[3:]
    right = r[:2] + b"\x0f" + r[3:]
    return fix_parity(tdes_ecb_encrypt(_key16(icc_mk, "ICC master key"), left + right))


_PADDING = {"emv": 2, "visa": 1, 1: 1, 2: 2}


def arqc(session_key: bytes, data: bytes, padding: str | int = "emv") -> bytes:
    """The 8-byte application cryptogram (ARQC, TC, AAC) over ``data``.

    ``padding`` "emv" (ISO 9797-1 method 2, 80 then zeros) or "visa"
    (method 1, zeros) or the method number.
    """
    try:
        method = _PADDING[padding]
    except (KeyError, TypeError):
        raise ValueError(f"padding must be 'emv' or 'visa', not {padding!r}") from None
    return mac_alg3(_key16(session_key, "session key"), bytes(data), padding=method)


def verify_arqc(session_key: bytes, data: bytes, cryptogram: bytes, padding: str | int = "emv") -> bool:
    """True when ``cryptogram`` is the ARQC of ``data`` (constant-time comparison)."""
    return hmac.compare_digest(arqc(session_key, data, padding), bytes(cryptogram))


def arpc_method1(key: bytes, arqc: bytes, arc: bytes) -> bytes:
    """ARPC method 1: TDES(key, ARQC xor (ARC || 00*6)), 8 bytes."""
    if len(arqc) != 8:
        raise ValueError(f"ARQC must be 8 bytes, not {len(arqc)}")
    if len(arc) != 2:
        raise ValueError(f"ARC must be 2 bytes, not {len(arc)}")
    return tdes_ecb_encrypt(_key16(key, "ARPC key"), xor(bytes(arqc), bytes(arc) + bytes(6)))


def arpc_method2(key: bytes, arqc: bytes, csu: bytes, prop_auth_data: bytes = b"") -> bytes:
    """ARPC method 2: the left 4 bytes of MAC algorithm 3 (padding 2) over ARQC || CSU || data."""
    if len(arqc) != 8:
        raise ValueError(f"ARQC must be 8 bytes, not {len(arqc)}")
    if len(csu) != 4:
        raise ValueError(f"CSU must be 4 bytes, not {len(csu)}")
    if len(prop_auth_data) > 8:
        raise ValueError("proprietary authentication data is at most 8 bytes")
    msg = bytes(arqc) + bytes(csu) + bytes(prop_auth_data)
    return mac_alg3(_key16(key, "ARPC key"), msg, padding=2)[:4]
