"""Property tests: the key locator against random TOML documents rendered in
random styles, and dump/parse round trips of random networks."""

from __future__ import annotations

import json
import re
import tomllib

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cardswitch.config import (
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
from cardswitch.netfile import KeyLocator, dump_network, parse_network
from cardswitch.pan import luhn_check_digit

# ---------------------------------------------------------------------------
# random documents

KEYS = st.sampled_from(["a", "b", "c-d", "e_1", "7", "q k", "dot.key", "Ω", "x'y", 'say "hi"', "#", "[t]"])
TEXT = st.text(alphabet=st.sampled_from(list("ab #=[]{},.'\"\\\n\t") + ["银"]), max_size=10)
SCALARS = st.one_of(st.integers(-10**6, 10**6), st.booleans(), TEXT)
TREES = st.recursive(
    st.dictionaries(KEYS, SCALARS, max_size=3),
    lambda children: st.dictionaries(
        KEYS,
        st.one_of(SCALARS, children, st.lists(children, min_size=1, max_size=3),
                  st.lists(SCALARS, max_size=3)),
        max_size=4),
    max_leaves=25,
)


def _is_aot(v: object) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)


def _key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else json.dumps(k, ensure_ascii=False)


class Renderer:
    """Writes a tree as TOML in styles drawn by hypothesis, noting the line
    each key path should be found on."""

    def __init__(self, draw) -> None:
        self.draw = draw
        self.lines: list[str] = []
        self.expect: dict[tuple, int] = {}

    @property
    def next_line(self) -> int:
        return len(self.lines) + 1

    def start(self) -> int:
        """Maybe a comment line; the line the next text goes on."""
        if self.draw(st.booleans()):
            self.lines.append("# [x] = { \"y\" = ' }  [[z]]")
        return self.next_line

    def put(self, text: str) -> None:
        comment = self.draw(st.sampled_from(["", "  # a = 1", " #[[b]]"]))
        self.lines.extend((text + comment).split("\n"))

    def emit(self, text: str) -> int:
        n = self.start()
        self.put(text)
        return n

    def scalar(self, v: object) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int):
            return str(v)
        assert isinstance(v, str)
        styles = ["basic"]
        if "'" not in v and "\n" not in v and "\t" not in v:
            styles.append("literal")
        if not v.startswith("\n"):
            styles.append("multi")
        style = self.draw(st.sampled_from(styles))
        if style == "literal":
            return f"'{v}'"
        if style == "multi":
            body = v.replace("\\", "\\\\").replace('"', '\\"')
            return f'"""{body}"""'
        return json.dumps(v, ensure_ascii=False)

    def inline(self, v: object, path: tuple, line: int) -> str:
        """One-line text of any value; every path inside is on ``line``."""
        if isinstance(v, dict):
            parts = []
            for k, x in v.items():
                self.expect[path + (k,)] = line
                parts.append(f"{_key(k)} = {self.inline(x, path + (k,), line)}")
            return "{ " + ", ".join(parts) + " }" if parts else "{}"
        if isinstance(v, list):
            for i in range(len(v)):
                self.expect[path + (i,)] = line
            return "[" + ", ".join(self.inline(x, path + (i,), line) for i, x in enumerate(v)) + "]"
        return self.scalar(v).replace("\n", "\\n") if isinstance(v, str) else self.scalar(v)

    def value_line(self, prefix: str, v: object, path: tuple) -> None:
        """``prefix = value`` for a scalar, array or inline table."""
        if isinstance(v, list) and v and self.draw(st.booleans()):  # multi-line array
            self.expect[path] = self.emit(f"{prefix} = [")
            for i, x in enumerate(v):
                line = self.next_line
                self.expect[path + (i,)] = line
                self.lines.append("    " + self.inline(x, path + (i,), line) + ",")
            self.lines.append("]")
        elif isinstance(v, (dict, list)):
            n = self.start()
            self.expect[path] = n
            self.put(f"{prefix} = " + self.inline(v, path, n))
        else:
            self.expect[path] = self.emit(f"{prefix} = {self.scalar(v)}")

    def dotted(self, keys: list[str], v: dict, path: tuple) -> None:
        for k, x in v.items():
            if isinstance(x, dict) and x and self.draw(st.booleans()):
                self.dotted(keys + [k], x, path + (k,))
            else:
                self.value_line(".".join(_key(s) for s in keys + [k]), x, path + (k,))

    def body(self, d: dict, path: tuple, header: list[str]) -> None:
        later = []
        for k, v in d.items():
            p = path + (k,)
            if isinstance(v, dict):
                style = self.draw(st.sampled_from(["header", "inline", "dotted"] if v else ["header", "inline"]))
                if style == "header":
                    later.append(("table", k, v))
                elif style == "dotted":
                    self.dotted([k], v, p)
                else:
                    self.value_line(_key(k), v, p)
            elif _is_aot(v) and self.draw(st.booleans()):
                later.append(("aot", k, v))
            else:
                self.value_line(_key(k), v, p)
        for kind, k, v in later:
            h = ".".join(_key(s) for s in header + [k])
            if kind == "table":
                self.lines.append("")
                self.expect[path + (k,)] = self.emit(f"[{h}]")
                self.body(v, path + (k,), header + [k])
            else:
                for i, e in enumerate(v):
                    self.lines.append("")
                    self.expect[path + (k, i)] = self.emit(f"[[ {h} ]]" if i % 2 else f"[[{h}]]")
                    self.body(e, path + (k, i), header + [k])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(TREES, st.data())
def test_locator_finds_every_key_on_its_line(tree, data):
    r = Renderer(data.draw)
    r.body(tree, (), [])
    text = "\n".join(r.lines) + "\n"
    assert tomllib.loads(text) == tree  # the renderer wrote what it meant
    loc = KeyLocator(text)
    for path, line in r.expect.items():
        assert loc.exact(path) == line, (path, line, text)


def test_locator_fixed_cases():
    text = (
        '[switch]\nmode = "test" # [x]\n'
        'note = """\nline = 1\n[[banks]]\n"""\n'
        '[[banks]]\nid = "A"\n  [[banks.bins]]\n  range = "1"\n  [[banks.bins]]\n  range = "2"\n'
        '[banks.stand_in]\nmax_amount = 5\n'
        '[[banks]]\nid = "B"\nhosts = [\n  "h:1",\n  "h:2", # c\n]\nstand_in.max_amount = 1\n'
        '  [[banks.bins]]\n  range = "3"\n'
    )
    loc = KeyLocator(text)
    lines = text.split("\n")

    def at(path):
        return lines[loc.exact(path) - 1]

    assert at(("switch", "note")).startswith("note = ")
    assert at(("banks", 0)) == "[[banks]]" and loc.exact(("banks", 0)) == 7
    assert at(("banks", 0, "bins", 1, "range")) == '  range = "2"'
    assert at(("banks", 0, "stand_in", "max_amount")) == "max_amount = 5"
    assert at(("banks", 1, "hosts", 1)) == '  "h:2", # c'
    assert at(("banks", 1, "stand_in", "max_amount")) == "stand_in.max_amount = 1"
    assert at(("banks", 1, "bins", 0, "range")) == '  range = "3"'
    assert loc.line(("banks", 1, "cards", 3, "pan")) == loc.exact(("banks", 1))
    assert loc.line(("nothing",)) == 0


# ---------------------------------------------------------------------------
# random networks round trip through dump_network / parse_network

IDS = st.text(alphabet="ABCDEFGHJKLMNPQRSTUVWXYZ0123456789_-", min_size=1, max_size=8)
NAMES = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=12).filter(str.strip)
MONEY = st.integers(0, 10**12)


def _odd(b: int) -> int:
    return b if bin(b).count("1") % 2 else b ^ 1


@st.composite
def keys(draw, allow_none=True, lengths=(8, 16, 24)):
    if allow_none and draw(st.booleans()):
        return None
    n = draw(st.sampled_from(lengths))
    raw = bytes(_odd(x) for x in draw(st.binary(min_size=n, max_size=n)))
    return Key("clear:" + raw.hex().upper())


@st.composite
def links(draw):
    framing = draw(st.sampled_from(["2byte", "4ascii"]))
    return LinkOptions(
        dialect=draw(st.sampled_from(["ascii", "binary"])),
        framing=framing,
        header=draw(st.sampled_from(["", "6000010000", "ab"])),
        max_frame=draw(st.integers(1, 9999)),
        read_timeout_ms=draw(st.integers(1, 10**6)),
    )


@st.composite
def networks(draw):
    switch_link = draw(links())
    n_banks = draw(st.integers(0, 3))
    banks = []
    for bi in range(n_banks):
        # disjoint BINs: bank bi owns prefixes starting with its own digit
        lead = str(bi + 1)
        bins = [BinRange(lead + "00", lead + "00", draw(st.sampled_from(["debit", "credit"])),
                         draw(st.integers(-3, 3)))]
        if draw(st.booleans()):
            bins.append(BinRange(lead + "1000", lead + "1999", "credit", draw(st.integers(-3, 3))))
        cards = []
        for ci in range(draw(st.integers(0, 3))):
            body = lead + "00" + f"{ci:04d}" + draw(st.text(alphabet="0123456789", min_size=5, max_size=11))
            method = draw(st.sampled_from(["pvv", "ibm"]))
            # a PIN (the bank computes its PVV/offset), or the PVV/offset alone
            given = draw(st.booleans())
            pin = None if given else draw(st.text(alphabet="0123456789", min_size=4, max_size=12))
            pvv = draw(st.text(alphabet="0123456789", min_size=4, max_size=4)) if given and method == "pvv" else ""
            offset = (draw(st.text(alphabet="0123456789", min_size=4, max_size=12))
                      if given and method == "ibm" else "")
            cards.append(Card(
                pan=body + luhn_check_digit(body),
                expiry=f"{draw(st.integers(0, 99)):02d}{draw(st.integers(1, 12)):02d}",
                pin=pin, pin_method=method, pvv=pvv, pin_offset=offset,
                balance=draw(MONEY),
                currency=draw(st.sampled_from(["156", "840"])),
                status=draw(st.sampled_from(["active", "lost", "stolen", "blocked"])),
                daily_withdrawal_limit=draw(MONEY),
                delay_ms=draw(st.integers(0, 10000)),
            ))
        hosts = tuple(Endpoint(draw(st.sampled_from(["127.0.0.1", "::1", "bank.example"])),
                               draw(st.integers(1, 65535))) for _ in range(draw(st.integers(1, 3))))
        banks.append(Bank(
            id=f"B{bi}" + draw(IDS), institution_id=f"{bi + 1}{draw(st.integers(0, 10**9))}",
            name=draw(NAMES), hosts=hosts, simulate=draw(st.booleans()),
            zpk=draw(keys()), zak=draw(keys()),
            pvk=draw(keys(lengths=(16,))), cvk=draw(keys(lengths=(16,))), mk_ac=draw(keys(lengths=(16,))),
            interchange_bps=draw(st.integers(0, 10000)), debit_cap=draw(MONEY), atm_fee=draw(MONEY),
            stand_in=StandIn(draw(MONEY)), bins=tuple(bins), cards=tuple(cards),
            link=draw(st.one_of(st.just(switch_link), links())),
        ))
    merchants = []
    if banks:
        for mi in range(draw(st.integers(0, 3))):
            mid = f"M{mi:02d}" + "0" * 12
            terms = tuple(Terminal(
                id=f"T{mi}{ti:06d}", kind=draw(st.sampled_from(["pos", "atm"])), merchant_id=mid,
                tmk=draw(keys()), tpk=draw(keys()), tak=draw(keys()), enabled=draw(st.booleans()),
            ) for ti in range(draw(st.integers(0, 3))))
            merchants.append(Merchant(
                id=mid, acquirer=draw(st.sampled_from(banks)).id, name=draw(NAMES),
                city=draw(st.one_of(st.just(""), NAMES)), mcc=f"{draw(st.integers(0, 9999)):04d}",
                mdr_bps=draw(st.integers(0, 10000)), debit_cap=draw(MONEY), min_fee=draw(MONEY),
                currency="156", enabled=draw(st.booleans()), terminals=terms,
            ))
    data_dir = draw(st.sampled_from(["var", "/srv/cardswitch", "data dir/x"]))
    switch = SwitchConfig(
        institution_id="0" + draw(st.text(alphabet="0123456789", max_size=10)),
        listen=Endpoint("0.0.0.0", draw(st.integers(1, 65535))),
        admin=Endpoint("127.0.0.1", draw(st.integers(1, 65535))),
        data_dir=data_dir,
        journal=draw(st.sampled_from(["sqlite:///" + data_dir + "/journal.db", "postgresql://u@h/db"])),
        redis=draw(st.sampled_from(["", "redis://127.0.0.1:6379/0"])),
        mqtt=draw(st.sampled_from(["", "mqtt://127.0.0.1:1883"])),
        issuer_timeout_ms=draw(st.integers(1, 10**6)),
        cutover=f"{draw(st.integers(0, 23)):02d}:{draw(st.integers(0, 59)):02d}",
        timezone=draw(st.sampled_from(["UTC", "Asia/Shanghai", "America/New_York"])),
        mode="test",
        switch_fee=draw(MONEY),
        echo_interval_ms=draw(st.integers(1, 10**6)),
        token_key=draw(st.one_of(st.just(""), NAMES)),
        link=switch_link,
    )
    hsm = HsmConfig(Endpoint("127.0.0.1", draw(st.integers(1, 65535))), draw(st.booleans()),
                    draw(st.sampled_from(["", "lmk.txt"])))
    return Network(switch, hsm, tuple(banks), tuple(merchants), source="rand.toml")


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(networks())
def test_random_networks_round_trip(network):
    text = dump_network(network)
    back = parse_network(text, "rand.toml")
    assert back == network
    # and the recorded BIN lines point at their range
    lines = text.split("\n")
    for b in back.banks:
        for x in b.bins:
            assert lines[x.line - 1].strip().startswith(f'range = "{x.low}')
