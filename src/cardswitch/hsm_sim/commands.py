"""payShield host commands (hsm.md 3): pure handlers, bytes in, bytes out.

``Hsm.handle(request)`` takes one command as it follows the message header
(command code, then fields) and returns the response that follows the
header (response code, error code, fields). It never raises: a malformed
request gets an error code (15 invalid input, 80 data length, ...), an
unexpected failure gets 41, an unknown or disabled command 68, a request too
short to hold a command code ``ZZ15``.

Fields stay bytes: KQ and M6/M8 with binary input carry raw binary, so only
the small text fields a handler needs are decoded, one at a time.

Key fields (``K`` in hsm.md) are 16 hex (``Z`` + 16 hex too), ``U`` + 32 hex or
``T`` + 48 hex. A CVK or PVK pair (CW, CY, DC, EC) may also be 32 hex with no
scheme letter: two single-length keys each under the LMK, as payShield takes
them. Decrypted keys are kept in an LRU per (key text, key type) so the hot
path (CA, M6) does no LMK decryption.

Where hsm.md leaves the error code open: a key whose length does not suit
the operation (a single-length key for MAC algorithm 3, a BDK, MK-AC, CVK or
PVK pair that is not double length) is ``02``; two fields whose lengths
disagree (BU's length flag and its key, A0's export scheme and the key
generated) ``27``; a source key with bad parity ``10``, the destination key
(ZPK out of CA/CC/CI/FA, PVK in DC/EC/DA/EA) ``11``; a PIN longer than the
request's maximum, or a block whose length nibble is outside 4..12, ``24``;
any other block that does not decode ``20``. Codes ``12`` and ``13`` come
only from fault injection (the server's ``fail`` option).

Nothing here logs or returns a clear key or a clear PIN.
"""

from __future__ import annotations

import hmac
import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Iterable

from cardswitch.crypto import cvv as cvv_mod
from cardswitch.crypto import dukpt, emv, ibm3624, pvv as pvv_mod
from cardswitch.crypto.des import (
    check_odd_parity, fix_parity, kcv, tdes_ecb_decrypt, tdes_ecb_encrypt,
)
from cardswitch.crypto.mac import mac_alg1, mac_alg3
from cardswitch.crypto.pinblock import HSM_FORMATS, account_pan, make_pin_block, pin_from_block
from cardswitch.hsm_sim.lmk import (
    BDK, CVK, KEY_TYPES, MK_AC, PVK, TMK, TPK, ZMK, ZPK, HsmError, Lmk, decrypt_under_kek,
    encrypt_under_kek, split_key_text,
)

log = logging.getLogger("cardswitch.hsm_sim")

# Error codes (hsm.md 4).
OK = "00"
E_VERIFY = "01"
E_KEY_LENGTH = "02"
E_KEY_TYPE = "04"
E_LENGTH_FLAG = "05"
E_SRC_PARITY = "10"
E_DST_PARITY = "11"
E_NO_KEYS = "12"
E_LMK = "13"
E_INPUT = "15"
E_PIN_BLOCK = "20"
E_FORMAT = "23"
E_PIN_LENGTH = "24"
E_SCHEME = "26"
E_INCOMPATIBLE = "27"
E_INTERNAL = "41"
E_DISABLED = "68"
E_DATA_LENGTH = "80"

ERROR_CODES = frozenset((OK, E_VERIFY, E_KEY_LENGTH, E_KEY_TYPE, E_LENGTH_FLAG, E_SRC_PARITY,
                         E_DST_PARITY, E_NO_KEYS, E_LMK, E_INPUT, E_PIN_BLOCK, E_FORMAT,
                         E_PIN_LENGTH, E_SCHEME, E_INCOMPATIBLE, E_INTERNAL, E_DISABLED,
                         E_DATA_LENGTH))

SHORT_FRAME = b"ZZ15"
FIRMWARE = b"CSWHSM001"          # 9A, the simulator's "firmware version" in ND

_HEX = frozenset(b"0123456789ABCDEFabcdef")
_DIGITS = frozenset(b"0123456789")
# First byte of a key field -> length of the whole field.
_KEY_FIELD_LEN = {**{c: 16 for c in b"0123456789ABCDEFabcdef"},
                  **{c: 33 for c in b"UXux"}, **{c: 49 for c in b"TYty"}, ord("Z"): 17, ord("z"): 17}
_ISO_CONTROL = {"ISO0": 0, "ISO1": 1, "ISO3": 3}


def response_code(cmd: bytes) -> bytes:
    """The response code of a 2-byte command code: second character advanced by one."""
    return bytes((cmd[0], (cmd[1] + 1) & 0xFF))


def error_response(cmd: bytes, code: str) -> bytes:
    """Response code + error code, no fields (what an error answer is)."""
    if len(cmd) < 2:
        return SHORT_FRAME
    return response_code(cmd[:2]) + code.encode("ascii")


class Fields:
    """A cursor over a request's fields; every short or malformed field is HsmError 15."""

    __slots__ = ("buf", "pos")

    def __init__(self, buf: bytes, pos: int = 0) -> None:
        self.buf = buf
        self.pos = pos

    @property
    def remaining(self) -> int:
        return len(self.buf) - self.pos

    def take(self, n: int) -> bytes:
        p = self.pos
        end = p + n
        if end > len(self.buf):
            raise HsmError(E_INPUT, "request too short")
        self.pos = end
        return self.buf[p:end]

    def text(self, n: int) -> str:
        return self.take(n).decode("latin-1")

    def num(self, n: int) -> str:
        b = self.take(n)
        if not _DIGITS.issuperset(b):
            raise HsmError(E_INPUT, "numeric field is not digits")
        return b.decode("ascii")

    def hex(self, n: int) -> str:
        b = self.take(n)
        if not _HEX.issuperset(b):
            raise HsmError(E_INPUT, "hex field is not hex")
        return b.decode("ascii").upper()

    def expect(self, token: bytes) -> None:
        if self.take(len(token)) != token:
            raise HsmError(E_INPUT, "delimiter missing")

    def until(self, delim: bytes) -> bytes:
        """The bytes up to ``delim`` (consumed, not returned)."""
        i = self.buf.find(delim, self.pos)
        if i < 0:
            raise HsmError(E_INPUT, "delimiter missing")
        out = self.buf[self.pos:i]
        self.pos = i + len(delim)
        return out

    def key(self) -> bytes:
        """A key field (K): 16 hex, Z + 16 hex, U/X + 32 hex or T/Y + 48 hex."""
        if self.pos >= len(self.buf):
            raise HsmError(E_INPUT, "request too short")
        c = self.buf[self.pos]
        n = _KEY_FIELD_LEN.get(c)
        if n is None:
            raise HsmError(E_SCHEME if 0x41 <= (c & 0xDF) <= 0x5A else E_INPUT, "key field")
        return self.take(n)

    def key_pair(self) -> bytes:
        """A CVK/PVK pair: U + 32 hex, or 32 hex (two single-length keys)."""
        if self.pos < len(self.buf) and self.buf[self.pos] in _HEX:
            return self.take(32)
        return self.key()

    def end(self, code: str = E_INPUT) -> None:
        """Nothing may follow: trailing bytes give ``code``."""
        if self.pos != len(self.buf):
            raise HsmError(code, "unexpected data after the last field")


def _ksn_descriptor_ok(desc: str) -> bool:
    return sum(int(c, 16) for c in desc) <= 20


class Hsm:
    """The simulated HSM: an LMK, a cache of decrypted keys, the command table.

    ``disabled`` holds command codes answered with error 68. ``rand`` is the
    random source for key generation and PIN block fill (``os.urandom``).
    """

    def __init__(self, lmk: Lmk | None = None, *, key_cache: int = 4096,
                 rand: Callable[[int], bytes] = os.urandom, disabled: Iterable[str] = ()) -> None:
        self.lmk = lmk or Lmk.test()
        self.rand = rand
        self.disabled: set[str] = set(disabled)
        self._cache: OrderedDict[tuple[bytes, str], bytes | None] = OrderedDict()
        self._cache_size = max(0, key_cache)
        self._lmk_check = self.lmk.check_value().encode("ascii")

    # -- keys -------------------------------------------------------------------

    def key(self, text: bytes, key_type: str, *, dest: bool = False) -> bytes:
        """The clear key of ``text`` (cached); HsmError 10/11 on bad parity, 15/26 if malformed."""
        ck = (text, key_type)
        cache = self._cache
        try:
            clear = cache[ck]
        except KeyError:
            try:
                clear = self.lmk.decrypt(text, key_type)
            except HsmError as e:
                if e.code != E_SRC_PARITY:
                    raise
                clear = None
            if self._cache_size:
                cache[ck] = clear
                if len(cache) > self._cache_size:
                    cache.popitem(last=False)
        else:
            cache.move_to_end(ck)
        if clear is None:
            raise HsmError(E_DST_PARITY if dest else E_SRC_PARITY, "key parity")
        return clear

    def key_pair(self, text: bytes, key_type: str, *, dest: bool = False) -> bytes:
        """A double-length CVK/PVK from ``U`` + 32 hex or two single keys (32 hex)."""
        if len(text) == 32:
            return self.key(text[:16], key_type, dest=dest) + self.key(text[16:], key_type, dest=dest)
        clear = self.key(text, key_type, dest=dest)
        if len(clear) != 16:
            raise HsmError(E_KEY_LENGTH, "a double-length key is needed")
        return clear

    def lmk_check_value(self) -> bytes:
        return self._lmk_check

    # -- dispatch ---------------------------------------------------------------

    def handle(self, request: bytes) -> bytes:
        """The response (response code onward) to one request (command code onward)."""
        if len(request) < 2:
            return SHORT_FRAME
        cmd = request[:2]
        rc = response_code(cmd)
        name = cmd.decode("latin-1")
        handler = HANDLERS.get(name)
        if handler is None or name in self.disabled:
            return rc + b"68"
        try:
            return rc + b"00" + handler(self, Fields(request, 2))
        except HsmError as e:
            return rc + e.code.encode("ascii")
        except Exception as e:   # never crash the server; never log request data
            log.warning("HSM command %s: internal error (%s)", name, e.__class__.__name__)
            return rc + b"41"


# -- PIN helpers ----------------------------------------------------------------

def _pin_format(code: bytes) -> str:
    fmt = HSM_FORMATS.get(code.decode("latin-1"))
    if fmt is None:
        raise HsmError(E_FORMAT, "unknown PIN block format code")
    return fmt


def _pin_max(f: Fields) -> int:
    n = int(f.num(2))
    if not 4 <= n <= 12:
        raise HsmError(E_INPUT, "maximum PIN length is 04-12")
    return n


def _extract_pin(key: bytes, block_hex: str, fmt: str, pan: str, max_len: int = 12) -> str:
    """The PIN in an encrypted block; HsmError 20 (not a valid block) or 24 (length)."""
    clear = tdes_ecb_decrypt(key, bytes.fromhex(block_hex))
    try:
        pin = pin_from_block(fmt, clear, pan)
    except ValueError:
        ctl = _ISO_CONTROL.get(fmt)
        if ctl is not None and clear[0] >> 4 == ctl and not 4 <= clear[0] & 0x0F <= 12:
            raise HsmError(E_PIN_LENGTH, "PIN length") from None
        raise HsmError(E_PIN_BLOCK, "PIN block") from None
    if len(pin) > max_len:
        raise HsmError(E_PIN_LENGTH, "PIN longer than the maximum")
    return pin


def _encrypt_pin(hsm: Hsm, key: bytes, fmt: str, pin: str, pan: str) -> bytes:
    return tdes_ecb_encrypt(key, make_pin_block(fmt, pin, pan, hsm.rand)).hex().upper().encode()


# -- commands -------------------------------------------------------------------

def cmd_nc(hsm: Hsm, f: Fields) -> bytes:
    """NC: diagnostics. -> LMK check value 16H, firmware version 9A."""
    return hsm.lmk_check_value() + FIRMWARE


def cmd_b2(hsm: Hsm, f: Fields) -> bytes:
    """B2: echo. length 4H, data -> data."""
    n = int(f.hex(4), 16)
    if f.remaining != n:
        raise HsmError(E_DATA_LENGTH, "echo length")
    return f.take(n)


_LMK_SCHEMES = {b"Z": 8, b"U": 16, b"T": 24}
_EXPORT_SCHEMES = {b"Z": 8, b"U": 16, b"X": 16, b"T": 24, b"Y": 24}


def cmd_a0(hsm: Hsm, f: Fields) -> bytes:
    """A0: generate a key (mode 0), and export it under a ZMK/TMK (mode 1).

    -> key under LMK, [key under ZMK/TMK], check value 6H.
    """
    mode = f.take(1)
    if mode not in (b"0", b"1"):
        raise HsmError(E_INPUT, "mode")
    key_type = f.text(3)
    scheme = f.take(1)
    if key_type not in KEY_TYPES:
        raise HsmError(E_KEY_TYPE, "key type")
    length = _LMK_SCHEMES.get(scheme)
    if length is None:
        raise HsmError(E_SCHEME, "key scheme")
    exported = b""
    if mode == b"1":
        f.expect(b";")
        flag = f.take(1)
        if flag not in (b"0", b"1"):
            raise HsmError(E_INPUT, "ZMK/TMK flag")
        kek = hsm.key(f.key(), ZMK if flag == b"0" else TMK)
        exp_scheme = f.take(1)
        exp_len = _EXPORT_SCHEMES.get(exp_scheme)
        if exp_len is None:
            raise HsmError(E_SCHEME, "export key scheme")
        if exp_len != length:
            raise HsmError(E_INCOMPATIBLE, "export scheme does not fit the key length")
    clear = fix_parity(hsm.rand(length))
    under_lmk = hsm.lmk.encrypt(clear, key_type).encode()
    if mode == b"1":
        exported = encrypt_under_kek(_kek16(kek), clear, exp_scheme.decode()).encode()
    return under_lmk + exported + kcv(clear).encode()


def _kek16(kek: bytes) -> bytes:
    # A single-length ZMK/TMK acts as the double-length key K|K (same TDES), so
    # the scheme variants on byte 8 apply to a copy of it.
    return kek * 2 if len(kek) == 8 else kek


_BU_TYPES = {b"00": ZMK, b"01": ZPK, b"02": TPK, b"03": "003", b"08": "008", b"09": BDK}
_LENGTH_FLAGS = {b"0": 8, b"1": 16, b"2": 24}


def cmd_bu(hsm: Hsm, f: Fields) -> bytes:
    """BU: key check value. type 2H, length flag 1N, K -> check value 16H."""
    key_type = _BU_TYPES.get(f.take(2))
    if key_type is None:
        raise HsmError(E_KEY_TYPE, "key type code")
    length = _LENGTH_FLAGS.get(f.take(1))
    if length is None:
        raise HsmError(E_LENGTH_FLAG, "key length flag")
    clear = hsm.key(f.key(), key_type)
    if len(clear) != length:
        raise HsmError(E_INCOMPATIBLE, "key length does not match the flag")
    return tdes_ecb_encrypt(clear, bytes(8)).hex().upper().encode()


def cmd_fa(hsm: Hsm, f: Fields) -> bytes:
    """FA: ZPK from ZMK to LMK. ZMK (K), ZPK under ZMK -> ZPK under LMK, check value 6H."""
    zmk = hsm.key(f.key(), ZMK)
    scheme, enc = split_key_text(f.key())
    clear = decrypt_under_kek(_kek16(zmk), scheme, enc)
    if not check_odd_parity(clear):
        raise HsmError(E_DST_PARITY, "ZPK parity")
    return hsm.lmk.encrypt(clear, ZPK).encode() + kcv(clear).encode()


def _translate(hsm: Hsm, f: Fields, src_type: str) -> bytes:
    src_text = f.key()
    dst_text = f.key()
    max_len = _pin_max(f)
    block = f.hex(16)
    src_code = f.take(2)
    dst_code = f.take(2)
    account = f.num(12)
    src = hsm.key(src_text, src_type)
    dst = hsm.key(dst_text, ZPK, dest=True)
    src_fmt = _pin_format(src_code)
    dst_fmt = _pin_format(dst_code)
    pan = account_pan(account)
    pin = _extract_pin(src, block, src_fmt, pan, max_len)
    return b"%02d" % len(pin) + _encrypt_pin(hsm, dst, dst_fmt, pin, pan) + dst_code


def cmd_ca(hsm: Hsm, f: Fields) -> bytes:
    """CA: translate a PIN from TPK to ZPK -> PIN length 2N, PIN block 16H, format 2N."""
    return _translate(hsm, f, TPK)


def cmd_cc(hsm: Hsm, f: Fields) -> bytes:
    """CC: translate a PIN from ZPK to ZPK -> as CA."""
    return _translate(hsm, f, ZPK)


def cmd_ci(hsm: Hsm, f: Fields) -> bytes:
    """CI: translate a PIN from DUKPT (TDES, ISO format 0) to a ZPK -> as CA."""
    bdk_text = f.key()
    zpk_text = f.key()
    desc = f.hex(3)
    ksn = f.hex(20)
    block = f.hex(16)
    dst_code = f.take(2)
    account = f.num(12)
    if not _ksn_descriptor_ok(desc):
        raise HsmError(E_INPUT, "KSN descriptor")
    bdk = hsm.key(bdk_text, BDK)
    if len(bdk) != 16:
        raise HsmError(E_KEY_LENGTH, "TDES DUKPT needs a double-length BDK")
    dst = hsm.key(zpk_text, ZPK, dest=True)
    dst_fmt = _pin_format(dst_code)
    pan = account_pan(account)
    pin_key = dukpt.tdes_pin_key(dukpt.tdes_transaction_key(bdk, bytes.fromhex(ksn)))
    pin = _extract_pin(pin_key, block, "ISO0", pan)
    return b"%02d" % len(pin) + _encrypt_pin(hsm, dst, dst_fmt, pin, pan) + dst_code


def _verify_pvv(hsm: Hsm, f: Fields, src_type: str) -> bytes:
    src_text = f.key()
    pvk_text = f.key_pair()
    block = f.hex(16)
    code = f.take(2)
    account = f.num(12)
    pvki = f.num(1)
    pvv = f.num(4)
    src = hsm.key(src_text, src_type)
    pvk = hsm.key_pair(pvk_text, PVK, dest=True)
    fmt = _pin_format(code)
    pan = account_pan(account)
    pin = _extract_pin(src, block, fmt, pan)
    if not pvv_mod.verify_pvv(pvk, pvki, pin, pan, pvv):
        raise HsmError(E_VERIFY, "PVV")
    return b""


def cmd_dc(hsm: Hsm, f: Fields) -> bytes:
    """DC: verify a terminal PIN (TPK) with the Visa PVV method -> 00 / 01."""
    return _verify_pvv(hsm, f, TPK)


def cmd_ec(hsm: Hsm, f: Fields) -> bytes:
    """EC: verify an interchange PIN (ZPK) with the Visa PVV method -> 00 / 01."""
    return _verify_pvv(hsm, f, ZPK)


def _verify_ibm(hsm: Hsm, f: Fields, src_type: str) -> bytes:
    src_text = f.key()
    pvk_text = f.key()
    max_len = _pin_max(f)
    block = f.hex(16)
    code = f.take(2)
    check_len = int(f.num(2))
    account = f.num(12)
    dectab = f.num(16)
    template = f.take(12)
    offset = f.hex(12)
    if not 4 <= check_len <= 12:
        raise HsmError(E_INPUT, "check length is 04-12")
    src = hsm.key(src_text, src_type)
    pvk = hsm.key(pvk_text, PVK, dest=True)
    fmt = _pin_format(code)
    pan = account_pan(account)
    try:
        data = ibm3624.validation_data(template.decode("latin-1"), account)
    except ValueError:
        raise HsmError(E_INPUT, "PIN validation data") from None
    pin = _extract_pin(src, block, fmt, pan, max_len)
    try:
        ok = ibm3624.verify_offset(pvk, data, dectab, pin, offset, check_len)
    except ValueError:
        raise HsmError(E_INPUT, "offset or check length") from None
    if not ok:
        raise HsmError(E_VERIFY, "IBM offset")
    return b""


def cmd_da(hsm: Hsm, f: Fields) -> bytes:
    """DA: verify a terminal PIN (TPK) with the IBM 3624 offset method -> 00 / 01."""
    return _verify_ibm(hsm, f, TPK)


def cmd_ea(hsm: Hsm, f: Fields) -> bytes:
    """EA: verify an interchange PIN (ZPK) with the IBM 3624 offset method -> 00 / 01."""
    return _verify_ibm(hsm, f, ZPK)


def _card_fields(f: Fields) -> tuple[str, str, str]:
    pan = f.until(b";")
    if not 1 <= len(pan) <= 19 or not _DIGITS.issuperset(pan):
        raise HsmError(E_INPUT, "PAN")
    return pan.decode("ascii"), f.num(4), f.num(3)


def cmd_cw(hsm: Hsm, f: Fields) -> bytes:
    """CW: generate a CVV. CVK, PAN, ';', expiry, service code -> CVV 3N."""
    cvk_text = f.key_pair()
    pan, expiry, service = _card_fields(f)
    cvk = hsm.key_pair(cvk_text, CVK)
    return cvv_mod.cvv(cvk, pan, expiry, service).encode()


def cmd_cy(hsm: Hsm, f: Fields) -> bytes:
    """CY: verify a CVV. CVK, CVV, PAN, ';', expiry, service code -> 00 / 01."""
    cvk_text = f.key_pair()
    value = f.num(3)
    pan, expiry, service = _card_fields(f)
    cvk = hsm.key_pair(cvk_text, CVK)
    if not cvv_mod.verify_cvv(cvk, pan, expiry, service, value):
        raise HsmError(E_VERIFY, "CVV")
    return b""


_MAC_KEY_TYPES = {b"003": "003", b"008": "008"}
_MAC_SIZES = {b"0": 4, b"1": 8}


def _mac(hsm: Hsm, f: Fields, verify: bool) -> bytes:
    if f.take(1) != b"0":
        raise HsmError(E_INPUT, "only mode 0 (whole message) is supported")
    in_fmt = f.take(1)
    if in_fmt not in (b"0", b"1", b"2"):
        raise HsmError(E_INPUT, "input format")
    size = _MAC_SIZES.get(f.take(1))
    if size is None:
        raise HsmError(E_INPUT, "MAC size")
    alg = f.take(1)
    if alg not in (b"1", b"3"):
        raise HsmError(E_INPUT, "MAC algorithm")
    padding = f.take(1)
    if padding not in (b"0", b"1", b"2"):
        raise HsmError(E_INPUT, "padding method")
    key_type = _MAC_KEY_TYPES.get(f.take(3))
    if key_type is None:
        raise HsmError(E_KEY_TYPE, "MAC key type")
    key_text = f.key()
    n = int(f.hex(4), 16)
    mac_hex = 2 * size
    if f.remaining != n + (mac_hex if verify else 0):
        raise HsmError(E_DATA_LENGTH, "message length")
    msg = f.take(n)
    given = f.hex(mac_hex) if verify else ""
    key = hsm.key(key_text, key_type)
    if alg == b"3" and len(key) != 16:
        raise HsmError(E_KEY_LENGTH, "algorithm 3 needs a double-length key")
    if in_fmt == b"1":
        if n % 2 or not _HEX.issuperset(msg):
            raise HsmError(E_INPUT, "hex message")
        msg = bytes.fromhex(msg.decode("ascii"))
    if padding == b"0":
        if not msg or len(msg) % 8:
            raise HsmError(E_DATA_LENGTH, "no padding needs whole blocks")
        pad = 1     # method 1 leaves whole blocks as they are
    else:
        pad = 1 if padding == b"1" else 2
    mac = (mac_alg3 if alg == b"3" else mac_alg1)(key, msg, pad)[:size].hex().upper()
    if verify:
        if not hmac.compare_digest(mac, given):
            raise HsmError(E_VERIFY, "MAC")
        return b""
    return mac.encode()


def cmd_m6(hsm: Hsm, f: Fields) -> bytes:
    """M6: generate a MAC (ISO 9797-1 alg 1 or 3) over the message -> MAC 8H/16H."""
    return _mac(hsm, f, verify=False)


def cmd_m8(hsm: Hsm, f: Fields) -> bytes:
    """M8: verify a MAC -> 00 / 01."""
    return _mac(hsm, f, verify=True)


def cmd_kq(hsm: Hsm, f: Fields) -> bytes:
    """KQ: verify an ARQC and/or generate an ARPC (method 1) -> ARPC 8B (modes 1, 2).

    Scheme 0 (Visa): the ARQC and ARPC are under the ICC master key (option
    A), the data padded with zeros. Scheme 1 (EMV common session key): both
    under the session key from the ATC, the data padded 80 00...
    """
    mode = f.take(1)
    if mode not in (b"0", b"1", b"2"):
        raise HsmError(E_INPUT, "mode")
    scheme = f.take(1)
    if scheme not in (b"0", b"1"):
        raise HsmError(E_INPUT, "scheme")
    mk_text = f.key()
    pan_psn = f.take(8)
    atc = f.take(2)
    f.take(4)      # unpredictable number: inside the transaction data already
    n = int(f.hex(2), 16)
    data = f.take(n)
    f.expect(b";")
    arqc = f.take(8)
    arc = f.take(2)
    imk = hsm.key(mk_text, MK_AC)
    if len(imk) != 16:
        raise HsmError(E_KEY_LENGTH, "MK-AC must be double length")
    mk = emv.icc_master_key_from_data(imk, pan_psn)
    if scheme == b"1":
        key, padding = emv.session_key_common(mk, atc), "emv"
    else:
        key, padding = mk, "visa"
    if mode != b"2" and not hmac.compare_digest(emv.arqc(key, data, padding), arqc):
        raise HsmError(E_VERIFY, "ARQC")
    if mode == b"0":
        return b""
    return emv.arpc_method1(key, arqc, arc)


HANDLERS: dict[str, Callable[[Hsm, Fields], bytes]] = {
    "NC": cmd_nc, "B2": cmd_b2, "A0": cmd_a0, "BU": cmd_bu, "FA": cmd_fa,
    "CA": cmd_ca, "CC": cmd_cc, "CI": cmd_ci, "DC": cmd_dc, "EC": cmd_ec,
    "DA": cmd_da, "EA": cmd_ea, "CW": cmd_cw, "CY": cmd_cy, "M6": cmd_m6,
    "M8": cmd_m8, "KQ": cmd_kq,
}
COMMANDS = frozenset(HANDLERS)
