"""Reading and checking the network file (TOML) into ``cardswitch.config``.

``load_network(path)`` reads a file (``None``: the packaged default network,
``cardswitch/data/default_network.toml``); ``parse_network(text, source)``
does the work. Anything wrong raises ``NetworkFileError`` with one line that
names the file, the line and the key::

    network.toml:42: banks[1].cards[3].pan: fails the Luhn check

Array indices in key paths count from 0 (``banks[0]`` is the first
``[[banks]]``). tomllib gives no line numbers, so ``KeyLocator`` scans the
text once to map key paths to the line that declares them; a key that is
missing is reported at the line of the table that should hold it.

Meaning of a few values, where the file leaves something implicit:

- ``data_dir`` is used as written; a relative path is relative to the
  current directory of the process that reads the file (``cardswitch up`` run
  from the project directory keeps its data in ``./var``).
- ``journal`` defaults to ``sqlite:///<data_dir>/journal.db`` (three slashes
  then the path: relative stays relative, ``/abs`` gives four slashes).
- Link options (``dialect``, ``framing``, ``header``, ``max_frame``,
  ``read_timeout_ms``) in ``[switch]`` are the terminal listener's; a bank
  link uses the same unless its ``[[banks]]`` entry sets its own (wire.md 8).
- BIN ranges: ``"622126"`` is a prefix (low = high); ``"62212600-62212699"``
  matches PANs whose first 8 digits fall in it. The longest match wins, then
  the higher ``priority``; so only ranges of the same length and the same
  priority that share a number are refused as overlapping. A card must route
  to its own bank by those rules.
- Cards are kept for banks with ``simulate = false`` too (load generators
  take PANs from them); only the simulator gives them balances.
- Issuer keys of a bank (``pvk``, ``cvk``, ``mk_ac``) are double length:
  ``"clear:"`` + 32 hex (mode ``test``) or ``"U"`` + 32 hex under the LMK.
- A card's PIN: ``pin_method`` ``"pvv"`` (default) or ``"ibm"``. The bank
  verifies with the card's PVV / IBM offset, computed from ``pin`` at load
  with a clear PVK, or given as ``pvv`` / ``pin_offset``. In live mode the
  PVK is under the LMK, so a card must give ``pvv`` (or ``pin_offset``);
  ``pin`` is then optional (load generators use it). A card that gives both
  under a clear PVK must be consistent.

Also here: ``describe`` (what ``cardswitch check`` prints), ``dump_network``
(a Network back to TOML text that reads back equal), ``with_ports`` and
``free_ports`` (a copy of a network on free loopback ports, for tests and the
demo).
"""

from __future__ import annotations

import bisect
import dataclasses
import datetime as _dt
import difflib
import posixpath
import re
import socket
import tomllib
import zoneinfo
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from importlib import resources
from typing import Any, NoReturn

from cardswitch.config import (
    PIN_METHODS,
    Bank,
    BinRange,
    Card,
    Endpoint,
    HsmConfig,
    Key,
    LinkOptions,
    Merchant,
    Network,
    StandIn,
    SwitchConfig,
    Terminal,
)
from cardswitch.pan import luhn_ok, mask_pan

__all__ = [
    "DEFAULT_SOURCE",
    "KeyLocator",
    "NetworkFileError",
    "default_journal",
    "describe",
    "dump_network",
    "free_ports",
    "hide_password",
    "load_network",
    "parse_network",
    "path_text",
    "with_ports",
]

DEFAULT_SOURCE = "<default>"
_DEFAULT_RESOURCE = ("data", "default_network.toml")

KeyPath = tuple[str | int, ...]


class NetworkFileError(ValueError):
    """A network file that cannot be used; ``str(e)`` is the one-line message."""

    def __init__(self, message: str, *, source: str = "", line: int = 0, key: str = "") -> None:
        super().__init__(message)
        self.source = source
        self.line = line
        self.key = key


# --------------------------------------------------------------------------
# Where keys are: a small scanner over (already valid) TOML text.

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def path_text(path: Iterable[str | int]) -> str:
    """``("banks", 1, "cards", 3, "pan")`` -> ``banks[1].cards[3].pan``."""
    out = ""
    for p in path:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            k = p if _BARE_KEY.fullmatch(p) else _toml_str(p)
            out += f".{k}" if out else k
    return out


class KeyLocator:
    """Maps key paths of a TOML document to the line (1-based) declaring them.

    Knows tables, arrays of tables (with their index), dotted keys, inline
    tables and arrays (elements get their index). The text must already be
    valid TOML (parse it with tomllib first); anything the scanner cannot
    follow just leaves later keys unmapped (they fall back to an ancestor).
    """

    def __init__(self, text: str) -> None:
        self.lines: dict[KeyPath, int] = {}
        self._s = text
        self._i = 0
        self._starts = [0] + [m.end() for m in re.finditer("\n", text)]
        self._aot: dict[KeyPath, int] = {}
        try:
            self._document()
        except (IndexError, ValueError, AttributeError, tomllib.TOMLDecodeError):
            pass  # keep what was mapped so far
        del self._s, self._starts, self._aot

    def exact(self, path: KeyPath) -> int | None:
        return self.lines.get(tuple(path))

    def line(self, path: KeyPath) -> int:
        """The line of ``path``, else of its nearest mapped ancestor, else 0."""
        p = tuple(path)
        while p:
            n = self.lines.get(p)
            if n is not None:
                return n
            p = p[:-1]
        return 0

    # -- scanner

    def _lineno(self) -> int:
        return bisect.bisect_right(self._starts, self._i)

    def _mark(self, path: KeyPath, line: int, first: int = 1) -> None:
        for k in range(first, len(path) + 1):
            self.lines.setdefault(path[:k], line)

    def _document(self) -> None:
        s = self._s
        table: KeyPath = ()
        while True:
            self._skip(newlines=True)
            if self._i >= len(s):
                return
            line = self._lineno()
            if s[self._i] == "[":
                array = s.startswith("[[", self._i)
                self._i += 2 if array else 1
                keys = self._key()
                self._skip()
                self._i += 2 if array else 1
                table = self._resolve(keys, array)
                self._mark(table, line)
            else:
                keys = self._key()
                self._skip()
                self._i += 1  # '='
                self._skip()
                path = table + tuple(keys)
                self._mark(path, line, first=len(table) + 1)
                self._value(path)

    def _resolve(self, keys: list[str], array: bool) -> KeyPath:
        path: KeyPath = ()
        for k in keys[:-1]:
            path += (k,)
            if path in self._aot:
                path += (self._aot[path] - 1,)
        path += (keys[-1],)
        if array:
            n = self._aot.get(path, 0)
            self._aot[path] = n + 1
            path += (n,)
        elif path in self._aot:  # not valid TOML, but stay sane
            path += (self._aot[path] - 1,)
        return path

    def _skip(self, newlines: bool = False) -> None:
        s, n = self._s, len(self._s)
        while self._i < n:
            c = s[self._i]
            if c in " \t" or (newlines and c in "\r\n"):
                self._i += 1
            elif c == "#":
                while self._i < n and s[self._i] != "\n":
                    self._i += 1
            else:
                return

    def _key(self) -> list[str]:
        s = self._s
        keys: list[str] = []
        while True:
            self._skip()
            c = s[self._i]
            if c in "\"'":
                start = self._i
                self._string()
                raw = s[start:self._i]
                keys.append(raw[1:-1] if c == "'" else tomllib.loads(f"k = {raw}")["k"])
            else:
                m = _BARE_KEY.match(s, self._i)
                if m is None:
                    raise ValueError("not a key")
                keys.append(m.group())
                self._i = m.end()
            self._skip()
            if self._i < len(s) and s[self._i] == ".":
                self._i += 1
                continue
            return keys

    def _string(self) -> None:
        s = self._s
        q = s[self._i]
        if s.startswith(q * 3, self._i):
            self._i += 3
            while True:
                if q == '"' and s[self._i] == "\\":
                    self._i += 2
                elif s.startswith(q * 3, self._i):
                    self._i += 3
                    extra = 0
                    while extra < 2 and self._i < len(s) and s[self._i] == q:
                        self._i += 1
                        extra += 1
                    return
                else:
                    self._i += 1
        self._i += 1
        while True:
            c = s[self._i]
            if q == '"' and c == "\\":
                self._i += 2
            elif c == q:
                self._i += 1
                return
            else:
                self._i += 1

    def _value(self, path: KeyPath) -> None:
        s = self._s
        c = s[self._i]
        if c in "\"'":
            self._string()
        elif c == "[":
            self._i += 1
            idx = 0
            while True:
                self._skip(newlines=True)
                if s[self._i] == "]":
                    self._i += 1
                    return
                self.lines.setdefault(path + (idx,), self._lineno())
                self._value(path + (idx,))
                idx += 1
                self._skip(newlines=True)
                if s[self._i] == ",":
                    self._i += 1
        elif c == "{":
            self._i += 1
            while True:
                self._skip(newlines=True)
                if s[self._i] == "}":
                    self._i += 1
                    return
                line = self._lineno()
                keys = self._key()
                self._skip()
                self._i += 1  # '='
                self._skip()
                sub = path + tuple(keys)
                self._mark(sub, line, first=len(path) + 1)
                self._value(sub)
                self._skip(newlines=True)
                if s[self._i] == ",":
                    self._i += 1
        else:  # number, boolean, date-time (which may contain a space)
            n = len(s)
            while self._i < n and s[self._i] not in ",]}#\r\n":
                self._i += 1


# --------------------------------------------------------------------------
# Reading: typed access to tables, every failure naming its key and line.

_REQUIRED: Any = object()


class _Invalid(Exception):
    """A value that is wrong; the reader adds file, line and key."""


def _type_name(v: object) -> str:
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, int):
        return "an integer"
    if isinstance(v, float):
        return "a float"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "an array"
    if isinstance(v, dict):
        return "a table"
    if isinstance(v, (_dt.datetime, _dt.date, _dt.time)):
        return "a date/time"
    return type(v).__name__


class _Reader:
    def __init__(self, source: str, locator: KeyLocator) -> None:
        self.source = source
        self.loc = locator

    def fail(self, path: KeyPath, message: str) -> NoReturn:
        line = self.loc.line(path)
        key = path_text(path)
        where = f"{self.source}:{line}" if line else self.source
        text = f"{where}: {key}: {message}" if key else f"{where}: {message}"
        raise NetworkFileError(text, source=self.source, line=line, key=key)

    def table(self, data: Any, path: KeyPath, allowed: Iterable[str]) -> _Table:
        if not isinstance(data, dict):
            self.fail(path, f"expected a table, got {_type_name(data)}")
        return _Table(self, data, path, allowed)


class _Table:
    __slots__ = ("r", "d", "path")

    def __init__(self, r: _Reader, d: dict, path: KeyPath, allowed: Iterable[str]) -> None:
        self.r, self.d, self.path = r, d, path
        allowed = list(allowed)
        for k in d:
            if k not in allowed:
                close = difflib.get_close_matches(k, allowed, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                r.fail(path + (k,), f"unknown key{hint}")

    def has(self, k: str) -> bool:
        return k in self.d

    def at(self, k: str | int) -> KeyPath:
        return self.path + (k,)

    def fail(self, k: str, message: str) -> NoReturn:
        self.r.fail(self.at(k), message)

    def _get(self, k: str, types: tuple[type, ...], what: str, default: Any) -> Any:
        if k not in self.d:
            if default is _REQUIRED:
                self.fail(k, "missing required key")
            return default
        v = self.d[k]
        if not isinstance(v, types) or (bool not in types and isinstance(v, bool)):
            self.fail(k, f"expected {what}, got {_type_name(v)}")
        return v

    def _check(self, k: str, v: Any, check: Any) -> Any:
        if check is None or k not in self.d:
            return v
        try:
            return check(v)
        except _Invalid as e:
            self.fail(k, str(e))

    def text(self, k: str, default: Any = _REQUIRED, check: Any = None) -> Any:
        return self._check(k, self._get(k, (str,), "a string", default), check)

    def integer(self, k: str, default: Any = _REQUIRED, lo: int | None = 0, hi: int | None = None) -> int:
        v = self._get(k, (int,), "an integer", default)
        if k in self.d:
            if lo is not None and v < lo:
                self.fail(k, "must not be negative" if lo == 0 else f"must be at least {lo}")
            if hi is not None and v > hi:
                self.fail(k, f"must be at most {hi}")
        return v

    def money(self, k: str, default: Any = _REQUIRED) -> int:
        if isinstance(self.d.get(k), float):
            self.fail(k, "expected an integer of minor units (e.g. 1000 for 10.00), got a float")
        return self.integer(k, default)

    def boolean(self, k: str, default: Any = _REQUIRED) -> bool:
        return self._get(k, (bool,), "a boolean (true or false)", default)

    def tables(self, k: str) -> Iterator[tuple[int, dict]]:
        """The entries of an array of tables (``[[x]]`` or ``x = [{...}]``)."""
        v = self._get(k, (list,), "an array of tables", [])
        for i, item in enumerate(v):
            if not isinstance(item, dict):
                self.r.fail(self.at(k) + (i,), f"expected a table, got {_type_name(item)}")
            yield i, item


# -- value checks (raise _Invalid with the reason; the caller adds where)

_DIGITS = re.compile(r"[0-9]+")
_HEX = re.compile(r"[0-9A-Fa-f]+")
_BANK_ID = re.compile(r"[A-Za-z0-9_-]{1,32}")
_PRINTABLE = re.compile(r"[\x20-\x7e]+")
_HHMM = re.compile(r"([01][0-9]|2[0-3]):[0-5][0-9]")

CARD_STATUSES = ("active", "lost", "stolen", "blocked")
TERMINAL_KINDS = ("pos", "atm")
CARD_TYPES = ("debit", "credit")
MODES = ("test", "live")
DIALECTS = ("ascii", "binary")
FRAMINGS = ("2byte", "4ascii")
_FRAMING_MAX = {"2byte": 0xFFFF, "4ascii": 9999}


def _one_of(choices: tuple[str, ...]) -> Any:
    def check(v: str) -> str:
        if v not in choices:
            raise _Invalid(f'"{v}" is not one of ' + ", ".join(choices))
        return v
    return check


def _digits(n_min: int, n_max: int, what: str) -> Any:
    def check(v: str) -> str:
        if not _DIGITS.fullmatch(v) or not n_min <= len(v) <= n_max:
            n = f"{n_min}" if n_min == n_max else f"{n_min}-{n_max}"
            raise _Invalid(f"{what} must be {n} digits")
        return v
    return check


def _fixed_ans(n: int, field_no: int) -> Any:
    def check(v: str) -> str:
        if len(v) != n or not _PRINTABLE.fullmatch(v):
            raise _Invalid(f'"{v}" must be exactly {n} printable characters (field {field_no} is fixed length {n})')
        return v
    return check


def _nonempty(v: str) -> str:
    if not v.strip():
        raise _Invalid("must not be empty")
    return v


def _bank_id(v: str) -> str:
    if not _BANK_ID.fullmatch(v):
        raise _Invalid(f'"{v}" must be 1-32 letters, digits, "-" or "_" (it names files and topics)')
    return v


def _endpoint(v: str) -> Endpoint:
    host, sep, port = v.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise _Invalid(f'"{v}" is not "host:port" (write an IPv6 host in brackets: "[::1]:8583")')
    if not sep or not host or not _DIGITS.fullmatch(port) or any(c.isspace() for c in host):
        raise _Invalid(f'"{v}" is not "host:port"')
    p = int(port)
    if not 1 <= p <= 65535:
        raise _Invalid(f'"{v}": port {p} is not in 1-65535')
    return Endpoint(host, p)


def _endpoint_text(ep: Endpoint) -> str:
    return f"[{ep.host}]:{ep.port}" if ":" in ep.host else f"{ep.host}:{ep.port}"


def _timezone(v: str) -> str:
    try:
        zoneinfo.ZoneInfo(v)
    except Exception:  # ZoneInfoNotFoundError, ValueError, OSError for odd names
        raise _Invalid(f'"{v}" is not a time zone known to zoneinfo (e.g. "Asia/Shanghai", "UTC")') from None
    return v


def _hhmm(v: str) -> str:
    if not _HHMM.fullmatch(v):
        raise _Invalid(f'"{v}" is not a time HH:MM (00:00-23:59)')
    return v


def _expiry(v: str) -> str:
    if not (len(v) == 4 and _DIGITS.fullmatch(v) and 1 <= int(v[2:]) <= 12):
        raise _Invalid(f'"{v}" is not an expiry date YYMM')
    return v


def _pin(v: str) -> str:
    if not (_DIGITS.fullmatch(v) and 4 <= len(v) <= 12):
        raise _Invalid("a PIN must be 4-12 digits")
    return v


def _pan(v: str) -> str:
    if not (_DIGITS.fullmatch(v) and 12 <= len(v) <= 19):
        raise _Invalid("a PAN must be 12-19 digits")
    if not luhn_ok(v):
        raise _Invalid("fails the Luhn check")
    return v


def _hex_header(v: str) -> str:
    if v and (len(v) % 2 or not _HEX.fullmatch(v)):
        raise _Invalid(f'"{v}" is not a header in hex (an even number of hex digits, e.g. "6000010000")')
    if len(v) > 64:
        raise _Invalid("a header is at most 32 bytes")
    return v


_URL_PASSWORD = re.compile(r"(://[^/@:]*:)[^/@]*@")


def hide_password(url: str) -> str:
    """``postgresql://u:secret@h/db`` -> ``postgresql://u:***@h/db``."""
    return _URL_PASSWORD.sub(r"\1***@", url)


def _url(schemes: tuple[str, ...], empty_ok: bool) -> Any:
    def check(v: str) -> str:
        if (empty_ok and v == "") or any(v.startswith(s) and len(v) > len(s) for s in schemes):
            return v
        raise _Invalid(f'"{hide_password(v)}" must start with ' + " or ".join(schemes) + (' (or be "")' if empty_ok else ""))
    return check


def _odd_parity(b: int) -> bool:
    return bin(b).count("1") % 2 == 1


def _key_check(live: bool, double: bool = False) -> Any:
    """Keys as the file writes them; ``double``: only double length (issuer keys)."""
    def check(v: str) -> Key:
        if v.startswith("clear:"):
            h = v[6:]
            if double and (len(h) != 32 or not _HEX.fullmatch(h)):
                raise _Invalid('a clear key here is "clear:" then 32 hex digits (double length)')
            if len(h) not in (16, 32, 48) or not _HEX.fullmatch(h):
                raise _Invalid('a clear key is "clear:" then 16, 32 or 48 hex digits')
            if live:
                raise _Invalid("clear keys are refused in live mode: put keys under the LMK")
            for i, b in enumerate(bytes.fromhex(h)):
                if not _odd_parity(b):
                    raise _Invalid(f"key fails the odd parity check (byte {i + 1} of {len(h) // 2})")
            return Key(v)
        body, want = (v[1:], 32) if v[:1] == "U" else (v[1:], 48) if v[:1] == "T" else (v, 16)
        if double and (v[:1] != "U" or len(body) != want or not _HEX.fullmatch(body)):
            raise _Invalid(
                'not a double-length key: "clear:" + 32 hex (mode = "test"), or under the LMK: "U" + 32 hex'
            )
        if len(body) != want or not _HEX.fullmatch(body):
            raise _Invalid(
                'not a key: "clear:" + 16/32/48 hex (mode = "test"), or a key under the LMK: '
                '16 hex, "U" + 32 hex or "T" + 48 hex'
            )
        return Key(v)
    return check


def _bin_range(v: str) -> tuple[str, str]:
    bad = f'"{v}" is not a BIN prefix ("622126") or range ("62212600-62212699")'
    lo, sep, hi = v.partition("-")
    lo, hi = lo.strip(), hi.strip()
    if not sep:
        hi = lo
    if not (_DIGITS.fullmatch(lo) and _DIGITS.fullmatch(hi)):
        raise _Invalid(bad)
    if len(lo) != len(hi):
        raise _Invalid(f'"{v}": both ends of a BIN range need the same number of digits')
    if lo > hi:
        raise _Invalid(f'"{v}": the low end is above the high end')
    if len(lo) > 19:
        raise _Invalid(f'"{v}": a BIN has at most 19 digits')
    return lo, hi


def _range_text(b: BinRange) -> str:
    return b.low if b.low == b.high else f"{b.low}-{b.high}"


# --------------------------------------------------------------------------
# The file's sections.

_LINK_KEYS = ("dialect", "framing", "header", "max_frame", "read_timeout_ms")
_SWITCH_KEYS = (
    "institution_id", "listen", "admin", "data_dir", "journal", "redis", "mqtt",
    "issuer_timeout_ms", "cutover", "timezone", "mode", "switch_fee",
    "echo_interval_ms", "token_key", "admin_token", "saf_max_age_s", "node_id",
) + _LINK_KEYS
_HSM_KEYS = ("listen", "simulate", "lmk_file")
_ISSUER_KEYS = ("pvk", "cvk", "mk_ac")     # double length, the bank's own
_BANK_KEYS = (
    "id", "institution_id", "name", "host", "hosts", "simulate", "zpk", "zak",
) + _ISSUER_KEYS + (
    "interchange_bps", "debit_cap", "atm_fee", "stand_in", "bins", "cards",
) + _LINK_KEYS
_BIN_KEYS = ("range", "card_type", "priority")
_CARD_KEYS = ("pan", "expiry", "pin", "balance", "currency", "status", "daily_withdrawal_limit", "delay_ms",
              "pin_method", "pvv", "pin_offset")
_MERCHANT_KEYS = (
    "id", "acquirer", "name", "city", "mcc", "mdr_bps", "debit_cap", "min_fee",
    "currency", "enabled", "terminals",
)
_TERMINAL_KEYS = ("id", "kind", "tmk", "tpk", "tak", "enabled")
_BPS_MAX = 10000


def default_journal(data_dir: str) -> str:
    """The journal used when the file names none: SQLite inside data_dir."""
    return "sqlite:///" + posixpath.join(data_dir, "journal.db")


def _read_link(t: _Table, base: LinkOptions) -> LinkOptions:
    dialect = t.text("dialect", base.dialect, _one_of(DIALECTS))
    framing = t.text("framing", base.framing, _one_of(FRAMINGS))
    header = t.text("header", base.header, _hex_header)
    limit = _FRAMING_MAX[framing]
    max_frame = t.integer("max_frame", base.max_frame, lo=1)
    if max_frame > limit:
        t.fail("max_frame" if t.has("max_frame") else "framing",
               f"max_frame {max_frame} is above {limit}, the most {framing} framing can carry")
    read_timeout_ms = t.integer("read_timeout_ms", base.read_timeout_ms, lo=1)
    return LinkOptions(dialect, framing, header, max_frame, read_timeout_ms)


def _read_switch(r: _Reader, data: Any) -> SwitchConfig:
    t = r.table(data, ("switch",), _SWITCH_KEYS)
    d = SwitchConfig()
    data_dir = t.text("data_dir", d.data_dir, _nonempty)
    return SwitchConfig(
        institution_id=t.text("institution_id", d.institution_id, _digits(1, 11, "an institution ID")),
        listen=t.text("listen", d.listen, _endpoint),
        admin=t.text("admin", d.admin, _endpoint),
        data_dir=data_dir,
        journal=t.text("journal", default_journal(data_dir),
                       _url(("sqlite:///", "postgresql://", "postgres://"), empty_ok=False)),
        redis=t.text("redis", d.redis, _url(("redis://", "rediss://", "unix://"), empty_ok=True)),
        mqtt=t.text("mqtt", d.mqtt, _url(("mqtt://", "mqtts://"), empty_ok=True)),
        issuer_timeout_ms=t.integer("issuer_timeout_ms", d.issuer_timeout_ms, lo=1),
        cutover=t.text("cutover", d.cutover, _hhmm),
        timezone=t.text("timezone", d.timezone, _timezone),
        mode=t.text("mode", d.mode, _one_of(MODES)),
        switch_fee=t.money("switch_fee", d.switch_fee),
        echo_interval_ms=t.integer("echo_interval_ms", d.echo_interval_ms, lo=1),
        token_key=t.text("token_key", d.token_key),
        admin_token=t.text("admin_token", d.admin_token),
        saf_max_age_s=t.integer("saf_max_age_s", d.saf_max_age_s, lo=1),
        node_id=t.integer("node_id", d.node_id, lo=0, hi=9),
        link=_read_link(t, LinkOptions()),
    )


def _read_hsm(r: _Reader, data: Any) -> HsmConfig:
    t = r.table(data, ("hsm",), _HSM_KEYS)
    d = HsmConfig()
    return HsmConfig(
        listen=t.text("listen", d.listen, _endpoint),
        simulate=t.boolean("simulate", d.simulate),
        lmk_file=t.text("lmk_file", d.lmk_file),
    )


def _read_stand_in(t: _Table) -> StandIn:
    # Generic over StandIn's fields so new stand-in limits need no code here:
    # every field is an optional key of the inline table, typed by its default.
    if not t.has("stand_in"):
        return StandIn()
    spec = {f.name: f for f in dataclasses.fields(StandIn)}
    s = t.r.table(t.d["stand_in"], t.at("stand_in"), spec)
    d = StandIn()
    values: dict[str, Any] = {}
    for name in spec:
        default = getattr(d, name)
        if isinstance(default, bool):
            values[name] = s.boolean(name, default)
        elif isinstance(default, int):
            values[name] = s.money(name, default)
        else:
            values[name] = s.text(name, default)
    return StandIn(**values)


def _read_hosts(t: _Table) -> tuple[Endpoint, ...]:
    if t.has("host") and t.has("hosts"):
        t.fail("hosts", 'give "host" or "hosts", not both')
    if t.has("host"):
        return (t.text("host", check=_endpoint),)
    if not t.has("hosts"):
        t.fail("host", 'missing required key (or "hosts", a list for failover)')
    v = t.d["hosts"]
    if not isinstance(v, list) or not v:
        t.fail("hosts", f'expected a non-empty array of "host:port" strings, got {_type_name(v)}')
    out = []
    for i, h in enumerate(v):
        if not isinstance(h, str):
            t.r.fail(t.at("hosts") + (i,), f"expected a string, got {_type_name(h)}")
        try:
            out.append(_endpoint(h))
        except _Invalid as e:
            t.r.fail(t.at("hosts") + (i,), str(e))
    return tuple(out)


def _read_bank(r: _Reader, data: Any, path: KeyPath, switch: SwitchConfig) -> Bank:
    t = r.table(data, path, _BANK_KEYS)
    keycheck = _key_check(switch.mode == "live")
    bank_id = t.text("id", check=_bank_id)
    institution_id = t.text("institution_id", check=_digits(1, 11, "an institution ID"))
    name = t.text("name", check=_nonempty)
    hosts = _read_hosts(t)
    simulate = t.boolean("simulate", True)
    zpk = t.text("zpk", None, keycheck)
    zak = t.text("zak", None, keycheck)
    double = _key_check(switch.mode == "live", double=True)
    pvk, cvk, mk_ac = (t.text(name, None, double) for name in _ISSUER_KEYS)
    interchange_bps = t.integer("interchange_bps", 0, hi=_BPS_MAX)
    debit_cap = t.money("debit_cap", 0)
    atm_fee = t.money("atm_fee", 0)
    stand_in = _read_stand_in(t)
    link = _read_link(t, switch.link)
    bins = []
    for i, bd in t.tables("bins"):
        bp = t.at("bins") + (i,)
        bt = r.table(bd, bp, _BIN_KEYS)
        low, high = bt.text("range", check=_bin_range)
        line = r.loc.exact(bp + ("range",)) or r.loc.line(bp)
        bins.append(BinRange(
            low=low, high=high,
            card_type=bt.text("card_type", "debit", _one_of(CARD_TYPES)),
            priority=bt.integer("priority", 0, lo=None),
            line=line,
        ))
    cards = []
    for i, cd in t.tables("cards"):
        ct = r.table(cd, t.at("cards") + (i,), _CARD_KEYS)
        card = Card(
            pan=ct.text("pan", check=_pan),
            expiry=ct.text("expiry", check=_expiry),
            pin=ct.text("pin", None, _pin),
            balance=ct.money("balance"),
            currency=ct.text("currency", "156", _digits(3, 3, "a currency (ISO 4217 numeric)")),
            status=ct.text("status", "active", _one_of(CARD_STATUSES)),
            daily_withdrawal_limit=ct.money("daily_withdrawal_limit", 0),
            delay_ms=ct.integer("delay_ms", 0),
            pin_method=ct.text("pin_method", "pvv", _one_of(PIN_METHODS)),
            pvv=ct.text("pvv", "", _digits(4, 4, "a PVV")),
            pin_offset=ct.text("pin_offset", "", _digits(4, 12, "an IBM PIN offset")),
        )
        _check_card_pin(ct, card, switch.mode == "live", pvk)
        cards.append(card)
    return Bank(
        id=bank_id, institution_id=institution_id, name=name, hosts=hosts,
        simulate=simulate, zpk=zpk, zak=zak, interchange_bps=interchange_bps,
        debit_cap=debit_cap, atm_fee=atm_fee, stand_in=stand_in,
        bins=tuple(bins), cards=tuple(cards), link=link, pvk=pvk, cvk=cvk, mk_ac=mk_ac,
    )


def _check_card_pin(ct: _Table, card: Card, live: bool, pvk: Key | None) -> None:
    """A card names what its bank verifies PINs with (see the module doc)."""
    ibm = card.pin_method == "ibm"
    own, other = ("pin_offset", "pvv") if ibm else ("pvv", "pin_offset")
    if ct.has(other):
        ct.fail(other, f'is for pin_method = "{"pvv" if ibm else "ibm"}"; this card\'s is "{card.pin_method}"'
                       + ("" if ibm else ' (the default)'))
    what = "IBM offset" if ibm else "PVV"
    if not ct.has(own):
        if live:
            ct.fail(own, f"missing: in live mode the PVK is under the LMK, so the {what} cannot be "
                         f"computed from a PIN; give {own}")
        if card.pin is None:
            ct.fail("pin", f'missing required key (or "{own}", the card\'s {what})')
        return
    if card.pin is not None and pvk is not None and pvk.is_clear:
        from cardswitch.issuer_sim.cards import pin_matches

        if not pin_matches(card, pvk.clear_bytes()):
            ct.fail(own, "does not match the card's pin under its bank's PVK")


def _read_merchant(r: _Reader, data: Any, path: KeyPath, switch: SwitchConfig,
                   bank_ids: list[str]) -> Merchant:
    t = r.table(data, path, _MERCHANT_KEYS)
    keycheck = _key_check(switch.mode == "live")
    mid = t.text("id", check=_fixed_ans(15, 42))

    def known_bank(v: str) -> str:
        if v not in bank_ids:
            known = ", ".join(bank_ids) or "none"
            raise _Invalid(f'"{v}" names no bank (banks: {known})')
        return v

    acquirer = t.text("acquirer", check=known_bank)
    name = t.text("name", check=_nonempty)
    city = t.text("city", "")
    mcc = t.text("mcc", "5999", _digits(4, 4, "an MCC"))
    mdr_bps = t.integer("mdr_bps", 0, hi=_BPS_MAX)
    debit_cap = t.money("debit_cap", 0)
    min_fee = t.money("min_fee", 0)
    currency = t.text("currency", "156", _digits(3, 3, "a currency (ISO 4217 numeric)"))
    enabled = t.boolean("enabled", True)
    terminals = []
    for i, td in t.tables("terminals"):
        tt = r.table(td, t.at("terminals") + (i,), _TERMINAL_KEYS)
        terminals.append(Terminal(
            id=tt.text("id", check=_fixed_ans(8, 41)),
            kind=tt.text("kind", check=_one_of(TERMINAL_KINDS)),
            merchant_id=mid,
            tmk=tt.text("tmk", None, keycheck),
            tpk=tt.text("tpk", None, keycheck),
            tak=tt.text("tak", None, keycheck),
            enabled=tt.boolean("enabled", True),
        ))
    return Merchant(
        id=mid, acquirer=acquirer, name=name, city=city, mcc=mcc, mdr_bps=mdr_bps,
        debit_cap=debit_cap, min_fee=min_fee, currency=currency, enabled=enabled,
        terminals=tuple(terminals),
    )


# -- checks across entries

def _check_unique(r: _Reader, items: Iterable[tuple[str, KeyPath]], what: str,
                  shown: Any = None) -> None:
    seen: dict[str, KeyPath] = {}
    for value, path in items:
        first = seen.get(value)
        if first is not None:
            v = shown(value) if shown else value
            r.fail(path, f"duplicate {what} {v} (first at {path_text(first[:-1])}, "
                         f"line {r.loc.line(first)})")
        seen[value] = path


@dataclass(slots=True, frozen=True)
class _Bin:
    bank: int
    index: int
    rng: BinRange

    @property
    def path(self) -> KeyPath:
        return ("banks", self.bank, "bins", self.index, "range")


def _check_bins(r: _Reader, banks: list[Bank]) -> None:
    # Longest match wins, then priority: only ranges of the same length and
    # priority can be ambiguous. Sweep each such group sorted by low end.
    groups: dict[tuple[int, int], list[_Bin]] = {}
    for bi, bank in enumerate(banks):
        for i, b in enumerate(bank.bins):
            groups.setdefault((len(b.low), b.priority), []).append(_Bin(bi, i, b))
    for group in groups.values():
        group.sort(key=lambda e: (e.rng.low, e.bank, e.index))
        widest = group[0]
        for e in group[1:]:
            if e.rng.low <= widest.rng.high:
                first, later = sorted((widest, e), key=lambda x: (x.bank, x.index))
                r.fail(later.path,
                       f"{_range_text(later.rng)} ({banks[later.bank].id}) overlaps "
                       f"{path_text(first.path)} {_range_text(first.rng)} ({banks[first.bank].id}, "
                       f"line {first.rng.line}) with the same length and priority {e.rng.priority}: "
                       "give one a higher priority or make them disjoint")
            if e.rng.high > widest.rng.high:
                widest = e


def _check_cards_route(r: _Reader, banks: list[Bank]) -> None:
    prefixes: dict[tuple[int, str], list[_Bin]] = {}
    ranges: dict[int, list[_Bin]] = {}
    for bi, bank in enumerate(banks):
        for i, b in enumerate(bank.bins):
            e = _Bin(bi, i, b)
            if b.low == b.high:
                prefixes.setdefault((len(b.low), b.low), []).append(e)
            else:
                ranges.setdefault(len(b.low), []).append(e)
    lengths = sorted({n for n, _ in prefixes} | set(ranges), reverse=True)

    def route(pan: str) -> _Bin | None:
        for n in lengths:
            if n > len(pan):
                continue
            head = pan[:n]
            found = list(prefixes.get((n, head), ()))
            found += [e for e in ranges.get(n, ()) if e.rng.low <= head <= e.rng.high]
            if found:
                return max(found, key=lambda e: e.rng.priority)
        return None

    for bi, bank in enumerate(banks):
        for ci, card in enumerate(bank.cards):
            path = ("banks", bi, "cards", ci, "pan")
            pan = card.pan
            inside = any(len(pan) >= len(b.low) and b.low <= pan[:len(b.low)] <= b.high
                         for b in bank.bins)
            if not inside:
                have = ", ".join(_range_text(b) for b in bank.bins) or "none"
                r.fail(path, f"{mask_pan(pan)} is not inside a BIN range of its bank "
                             f"{bank.id} (its ranges: {have})")
            winner = route(pan)
            if winner is not None and winner.bank != bi:
                r.fail(path, f"{mask_pan(pan)} routes to {banks[winner.bank].id} "
                             f"({path_text(winner.path)} {_range_text(winner.rng)}, "
                             f"line {winner.rng.line}), not to its own bank {bank.id}: "
                             "a longer or higher-priority range wins")


def _check_banks(r: _Reader, switch: SwitchConfig, banks: list[Bank]) -> None:
    _check_unique(r, ((b.id, ("banks", i, "id")) for i, b in enumerate(banks)), "bank id")
    for i, b in enumerate(banks):
        if b.institution_id == switch.institution_id:
            r.fail(("banks", i, "institution_id"),
                   f"{b.institution_id} is the switch's own institution_id")
    _check_unique(r, ((b.institution_id, ("banks", i, "institution_id")) for i, b in enumerate(banks)),
                  "institution_id")
    _check_unique(r, ((c.pan, ("banks", i, "cards", j, "pan"))
                      for i, b in enumerate(banks) for j, c in enumerate(b.cards)),
                  "card PAN", shown=mask_pan)
    _check_bins(r, banks)
    _check_cards_route(r, banks)


def _check_merchants(r: _Reader, merchants: list[Merchant]) -> None:
    _check_unique(r, ((m.id, ("merchants", i, "id")) for i, m in enumerate(merchants)), "merchant id")
    _check_unique(r, ((t.id, ("merchants", i, "terminals", j, "id"))
                      for i, m in enumerate(merchants) for j, t in enumerate(m.terminals)),
                  "terminal id")


# --------------------------------------------------------------------------
# Entry points.

_TOML_ERROR = re.compile(r"^(.*) \(at line (\d+), column (\d+)\)$", re.S)


def parse_network(text: str, source: str = DEFAULT_SOURCE) -> Network:
    """Read and check network file text; ``source`` names it in messages."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        msg = str(e)
        m = _TOML_ERROR.match(msg)
        if m:
            line = int(m.group(2))
            raise NetworkFileError(f"{source}:{line}: invalid TOML: {m.group(1)} (column {m.group(3)})",
                                   source=source, line=line) from None
        line = text.count("\n") + 1
        raise NetworkFileError(f"{source}:{line}: invalid TOML: {msg}", source=source, line=line) from None

    r = _Reader(source, KeyLocator(text))
    top = r.table(doc, (), ("switch", "hsm", "banks", "merchants"))
    switch = _read_switch(r, doc.get("switch", {}))
    hsm = _read_hsm(r, doc.get("hsm", {}))
    banks = [_read_bank(r, bd, ("banks", i), switch) for i, bd in top.tables("banks")]
    _check_banks(r, switch, banks)
    bank_ids = [b.id for b in banks]
    merchants = [_read_merchant(r, md, ("merchants", i), switch, bank_ids)
                 for i, md in top.tables("merchants")]
    _check_merchants(r, merchants)
    return Network(switch=switch, hsm=hsm, banks=tuple(banks), merchants=tuple(merchants),
                   source=source)


def load_network(path: str | None = None) -> Network:
    """The network file at ``path``, or the packaged default network for None."""
    if path is None:
        res = resources.files("cardswitch").joinpath(*_DEFAULT_RESOURCE)
        return parse_network(res.read_text(encoding="utf-8"), DEFAULT_SOURCE)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise NetworkFileError(f"{path}: cannot read: {e.strerror or e}", source=str(path)) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise NetworkFileError(f"{path}:{line}: not UTF-8 text", source=str(path), line=line) from None
    return parse_network(text, str(path))


# --------------------------------------------------------------------------
# What `cardswitch check` prints.

def _yes(k: Key | None) -> str:
    return "yes" if k is not None else "no"


def _link_text(link: LinkOptions) -> str:
    parts = [link.dialect, link.framing]
    if link.header:
        parts.append(f"header {len(link.header) // 2} bytes")
    return ", ".join(parts)


def describe(network: Network) -> str:
    """A readable summary of a network for an operator: no key, PIN or full PAN."""
    sw, hsm = network.switch, network.hsm
    out = [f"network file: {network.source}"]
    out.append(f"switch  institution {sw.institution_id}, mode {sw.mode}")
    out.append(f"  listen {_endpoint_text(sw.listen)} ({_link_text(sw.link)}, max frame "
               f"{sw.link.max_frame}, read timeout {sw.link.read_timeout_ms} ms)")
    out.append(f"  admin  {_endpoint_text(sw.admin)}")
    rel = "" if posixpath.isabs(sw.data_dir) else " (relative to the current directory)"
    out.append(f"  data_dir {sw.data_dir}{rel}")
    out.append(f"  journal  {hide_password(sw.journal)}")
    out.append(f"  business day: cutover {sw.cutover} {sw.timezone}")
    out.append(f"  issuer timeout {sw.issuer_timeout_ms} ms, echo after {sw.echo_interval_ms} ms idle, "
               f"switch fee {sw.switch_fee}")
    out.append(f"  redis {hide_password(sw.redis) or '-'}   mqtt {hide_password(sw.mqtt) or '-'}   "
               f"token key {'set' if sw.token_key else 'generated under data_dir'}")
    lmk = f", LMK from {hsm.lmk_file}" if hsm.lmk_file else ""
    out.append(f"hsm     {_endpoint_text(hsm.listen)} "
               f"({'simulated' if hsm.simulate else 'external'}{lmk})")
    out.append(f"banks ({len(network.banks)})")
    for b in network.banks:
        hosts = ", ".join(_endpoint_text(h) for h in b.hosts)
        out.append(f"  {b.id:<8} institution {b.institution_id}  {b.name}")
        out.append(f"    hosts {hosts} ({'simulated' if b.simulate else 'external'})"
                   + ("" if b.link == sw.link else f"  link {_link_text(b.link)}"))
        stand_in = f"stand-in up to {b.stand_in.max_amount}" if b.stand_in.max_amount else "no stand-in"
        ibm = sum(1 for c in b.cards if c.pin_method == "ibm")
        methods = f" ({ibm} IBM offset)" if ibm else ""
        out.append(f"    {len(b.bins)} BIN ranges, {len(b.cards)} cards{methods}   ZPK {_yes(b.zpk)}  "
                   f"ZAK {_yes(b.zak)}  PVK {_yes(b.pvk)}  CVK {_yes(b.cvk)}  MK-AC {_yes(b.mk_ac)}   "
                   f"{stand_in}")
        shown = b.bins[:6]
        if shown:
            more = f", ... {len(b.bins) - len(shown)} more" if len(b.bins) > len(shown) else ""
            out.append("    BINs " + ", ".join(
                f"{_range_text(x)} {x.card_type}" + (f" (priority {x.priority})" if x.priority else "")
                for x in shown) + more)
    out.append(f"merchants ({len(network.merchants)})")
    for m in network.merchants:
        where = f" ({m.city})" if m.city else ""
        off = "" if m.enabled else "  DISABLED"
        out.append(f"  {m.id}  {m.name}{where}  mcc {m.mcc}  acquirer {m.acquirer}{off}")
        for t in m.terminals:
            off = "" if t.enabled else "  DISABLED"
            out.append(f"    {t.id}  {t.kind:<3}  TMK {_yes(t.tmk)}  TPK {_yes(t.tpk)}  "
                       f"TAK {_yes(t.tak)}{off}")
    n_cards = sum(len(b.cards) for b in network.banks)
    n_bins = sum(len(b.bins) for b in network.banks)
    out.append(f"ok: {len(network.banks)} banks, {len(network.merchants)} merchants, "
               f"{len(network.terminals())} terminals, {n_cards} cards, {n_bins} BIN ranges")
    return "\n".join(out)


# --------------------------------------------------------------------------
# Writing a network back, and moving it to free ports.

_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def _toml_str(s: str) -> str:
    out = []
    for ch in s:
        e = _ESCAPES.get(ch)
        if e is not None:
            out.append(e)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, Key):
        return _toml_str(v.text)
    if isinstance(v, Endpoint):
        return _toml_str(_endpoint_text(v))
    return _toml_str(str(v))


def _link_lines(link: LinkOptions, base: LinkOptions | None) -> list[str]:
    return [f"{name} = {_toml_value(getattr(link, name))}" for name in _LINK_KEYS
            if base is None or getattr(link, name) != getattr(base, name)]


def dump_network(network: Network) -> str:
    """TOML text that ``parse_network`` reads back to an equal Network.

    Keys are written as they are held (clear keys included): the result is a
    configuration file, so treat it like one.
    """
    sw, hsm = network.switch, network.hsm
    o: list[str] = ["# network file written by cardswitch.netfile.dump_network", "", "[switch]"]
    for name in ("institution_id", "listen", "admin", "data_dir", "journal", "redis", "mqtt",
                 "issuer_timeout_ms", "cutover", "timezone", "mode", "switch_fee",
                 "echo_interval_ms", "token_key", "admin_token", "saf_max_age_s", "node_id"):
        o.append(f"{name} = {_toml_value(getattr(sw, name))}")
    o += _link_lines(sw.link, None)
    o += ["", "[hsm]", f"listen = {_toml_value(hsm.listen)}", f"simulate = {_toml_value(hsm.simulate)}"]
    if hsm.lmk_file:
        o.append(f"lmk_file = {_toml_value(hsm.lmk_file)}")
    for b in network.banks:
        o += ["", "[[banks]]"]
        o += [f"id = {_toml_value(b.id)}", f"institution_id = {_toml_value(b.institution_id)}",
              f"name = {_toml_value(b.name)}"]
        if len(b.hosts) == 1:
            o.append(f"host = {_toml_value(b.hosts[0])}")
        else:
            o.append("hosts = [" + ", ".join(_toml_value(h) for h in b.hosts) + "]")
        o.append(f"simulate = {_toml_value(b.simulate)}")
        for name in ("zpk", "zak") + _ISSUER_KEYS:
            k = getattr(b, name)
            if k is not None:
                o.append(f"{name} = {_toml_value(k)}")
        o += [f"interchange_bps = {b.interchange_bps}", f"debit_cap = {b.debit_cap}",
              f"atm_fee = {b.atm_fee}"]
        o.append("stand_in = { " + ", ".join(
            f"{f.name} = {_toml_value(getattr(b.stand_in, f.name))}"
            for f in dataclasses.fields(StandIn)) + " }")
        o += _link_lines(b.link, sw.link)
        for x in b.bins:
            o += ["  [[banks.bins]]", f"  range = {_toml_str(_range_text(x))}",
                  f"  card_type = {_toml_str(x.card_type)}"]
            if x.priority:
                o.append(f"  priority = {x.priority}")
        for c in b.cards:
            o += ["  [[banks.cards]]"]
            o += [f"  {name} = {_toml_value(getattr(c, name))}" for name in _CARD_KEYS
                  if name not in ("pin", "pin_method", "pvv", "pin_offset")]
            if c.pin is not None:
                o.append(f"  pin = {_toml_value(c.pin)}")
            if c.pin_method != "pvv":
                o.append(f"  pin_method = {_toml_value(c.pin_method)}")
            for name in ("pvv", "pin_offset"):
                if getattr(c, name):
                    o.append(f"  {name} = {_toml_value(getattr(c, name))}")
    for m in network.merchants:
        o += ["", "[[merchants]]"]
        o += [f"{name} = {_toml_value(getattr(m, name))}" for name in _MERCHANT_KEYS
              if name != "terminals"]
        for t in m.terminals:
            o += ["  [[merchants.terminals]]", f"  id = {_toml_value(t.id)}",
                  f"  kind = {_toml_value(t.kind)}"]
            for name in ("tmk", "tpk", "tak"):
                k = getattr(t, name)
                if k is not None:
                    o.append(f"  {name} = {_toml_value(k)}")
            if not t.enabled:
                o.append("  enabled = false")
    return "\n".join(o) + "\n"


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct ports free on ``host`` right now (all bound at once, then released)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(s)
            s.bind((host, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _port_names(network: Network) -> list[str]:
    names = ["listen", "admin", "hsm"]
    for b in network.banks:
        names += [b.id if i == 0 else f"{b.id}/{i}" for i in range(len(b.hosts))]
    return names


def with_ports(network: Network, ports: dict[str, int] | None = None,
               data_dir: str | None = None) -> Network:
    """A copy of ``network`` with its listening ports replaced.

    ``ports`` names: ``listen``, ``admin``, ``hsm``, a bank id for its first
    host and ``<bank id>/<i>`` for its i-th failover host (i >= 1). Every port
    not given gets a free loopback port. Hosts stay as they are. With
    ``data_dir`` the switch's data_dir changes too, and so does its journal
    when it was the default one inside the old data_dir.
    """
    ports = dict(ports or {})
    names = _port_names(network)
    unknown = sorted(set(ports) - set(names))
    if unknown:
        raise ValueError(f"with_ports: unknown port names {unknown} (known: {names})")
    missing = [n for n in names if n not in ports]
    ports.update(zip(missing, free_ports(len(missing))))

    def ep(e: Endpoint, name: str) -> Endpoint:
        return Endpoint(e.host, ports[name])

    sw = network.switch
    sw = replace(sw, listen=ep(sw.listen, "listen"), admin=ep(sw.admin, "admin"))
    if data_dir is not None:
        journal = default_journal(data_dir) if sw.journal == default_journal(sw.data_dir) else sw.journal
        sw = replace(sw, data_dir=data_dir, journal=journal)
    hsm = replace(network.hsm, listen=ep(network.hsm.listen, "hsm"))
    banks = tuple(
        replace(b, hosts=tuple(ep(h, b.id if i == 0 else f"{b.id}/{i}") for i, h in enumerate(b.hosts)))
        for b in network.banks
    )
    return replace(network, switch=sw, hsm=hsm, banks=banks)
