"""The network file: one TOML file describes the switch, its HSM, the member
banks (issuers, possibly acquirers), merchants, terminals and simulated cards.

This module holds the typed model only. ``cardswitch.netfile`` reads and
validates a file into it, naming the key and line of anything wrong.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cardswitch.pan import mask_pan


@dataclass(slots=True, frozen=True)
class Endpoint:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(slots=True, frozen=True)
class Key:
    """A key as written in the network file.

    ``clear:HEX`` is a clear key (allowed only with mode = "test");
    ``U...``/``T...``/16 hex is a key under the HSM's LMK.
    """

    text: str

    @property
    def is_clear(self) -> bool:
        return self.text.startswith("clear:")

    def clear_bytes(self) -> bytes:
        if not self.is_clear:
            raise ValueError("key is under the LMK, not clear")
        return bytes.fromhex(self.text[6:])

    def __repr__(self) -> str:  # never print key material
        return "Key(clear:***)" if self.is_clear else f"Key({self.text[:1]}***)"


@dataclass(slots=True, frozen=True)
class LinkOptions:
    """Wire options shared by listeners and bank links."""

    dialect: str = "ascii"          # "ascii" (default_ascii) | "binary" (default)
    framing: str = "2byte"          # "2byte" | "4ascii"
    header: str = ""                # fixed header (hex) after the length, e.g. a 5-byte TPDU
    max_frame: int = 4096
    read_timeout_ms: int = 10000    # a frame started must arrive whole within this


@dataclass(slots=True, frozen=True)
class StandIn:
    """When the switch may approve on a bank's behalf while it is unreachable
    (``cardswitch.switch.standin`` applies it; docs/operations.md)."""

    max_amount: int = 0             # 0 = no stand-in for this bank
    daily_count: int = 0            # stand-in approvals per card per business date; 0 = no limit
    daily_amount: int = 0           # their total amount per card per business date; 0 = no limit
    allowed: str = "00"             # transaction types (field 3 positions 1-2), comma-separated


@dataclass(slots=True, frozen=True)
class SwitchConfig:
    institution_id: str = "99900001"
    listen: Endpoint = Endpoint("127.0.0.1", 8583)
    admin: Endpoint = Endpoint("127.0.0.1", 8580)
    data_dir: str = "var"
    journal: str = "sqlite:///var/journal.db"
    redis: str = ""
    mqtt: str = ""
    issuer_timeout_ms: int = 3000
    cutover: str = "23:00"
    timezone: str = "UTC"
    mode: str = "test"              # "test" | "live"
    switch_fee: int = 0
    echo_interval_ms: int = 30000   # idle time before an echo test on a bank link
    saf_max_age_s: int = 86400      # a store-and-forward advice undelivered this long is parked (alert)
    token_key: str = ""             # secret for PAN tokens; generated under data_dir when empty
    node_id: int = 0                # 0-9: this switch node's number when several share a journal (RRN range)
    admin_token: str = ""           # bearer token for state-changing admin calls; generated under data_dir when empty
    link: LinkOptions = LinkOptions()


@dataclass(slots=True, frozen=True)
class HsmConfig:
    listen: Endpoint = Endpoint("127.0.0.1", 1500)
    simulate: bool = True
    lmk_file: str = ""              # another LMK set for the simulator; "" = the Thales test LMK


@dataclass(slots=True, frozen=True)
class BinRange:
    low: str                        # inclusive, digits
    high: str                       # inclusive, digits, same length as low
    card_type: str = "debit"        # debit | credit
    priority: int = 0               # higher wins among equally long matches
    # where it was declared, for messages; not part of the value (a range is
    # the same range wherever the file declares it, so round trips compare equal)
    line: int = field(default=0, compare=False)


PIN_METHODS = ("pvv", "ibm")        # Visa PVV | IBM 3624 offset


@dataclass(slots=True, frozen=True)
class Card:
    """A card of a simulated bank, as the network file describes it.

    ``pin`` is what the cardholder types (test networks and load generators
    use it to build PIN blocks); the bank itself keeps only the PVV or IBM
    offset computed from it at load. A live network gives ``pvv`` (method
    ``pvv``) or ``pin_offset`` (method ``ibm``) instead: the PVK is under the
    LMK there, so nothing can be computed from a PIN.
    """

    pan: str
    expiry: str                     # YYMM
    pin: str | None                 # None: not in the file (live mode: pvv / pin_offset instead)
    balance: int
    currency: str = "156"
    status: str = "active"          # active | lost | stolen | blocked
    daily_withdrawal_limit: int = 0  # 0 = no limit
    delay_ms: int = 0
    pin_method: str = "pvv"         # "pvv" (Visa PVV, HSM EC) | "ibm" (IBM 3624 offset, HSM EA)
    pvv: str = ""                   # 4 digits, PVKI 1; "" = computed from pin at load
    pin_offset: str = ""            # 4-12 digits; "" = computed from pin at load

    def __repr__(self) -> str:      # never print a full PAN, a PIN or a PVV
        return (f"Card(pan={mask_pan(self.pan)}, expiry={self.expiry}, pin={'***' if self.pin else None}, "
                f"balance={self.balance}, currency={self.currency}, status={self.status}, "
                f"pin_method={self.pin_method})")


@dataclass(slots=True, frozen=True)
class Bank:
    id: str
    institution_id: str
    name: str
    hosts: tuple[Endpoint, ...]     # first is primary
    simulate: bool = True
    zpk: Key | None = None
    zak: Key | None = None
    interchange_bps: int = 0
    debit_cap: int = 0
    atm_fee: int = 0
    stand_in: StandIn = StandIn()
    bins: tuple[BinRange, ...] = ()
    cards: tuple[Card, ...] = ()
    link: LinkOptions = LinkOptions()
    # Issuer keys, held by the bank only (never by the switch); same forms as zpk/zak.
    pvk: Key | None = None          # PIN verification key (double length; HSM key type 002)
    cvk: Key | None = None          # card verification key pair (double length; 402)
    mk_ac: Key | None = None        # EMV issuer master key for application cryptograms (109)

    @property
    def host(self) -> Endpoint:
        return self.hosts[0]


@dataclass(slots=True, frozen=True)
class Terminal:
    id: str                         # field 41
    kind: str                       # pos | atm
    merchant_id: str
    tmk: Key | None = None
    tpk: Key | None = None
    tak: Key | None = None
    enabled: bool = True


@dataclass(slots=True, frozen=True)
class Merchant:
    id: str                         # field 42
    acquirer: str                   # bank id
    name: str
    city: str = ""
    mcc: str = "5999"
    mdr_bps: int = 0
    debit_cap: int = 0
    min_fee: int = 0
    currency: str = "156"
    enabled: bool = True
    terminals: tuple[Terminal, ...] = ()


@dataclass(slots=True, frozen=True)
class Network:
    switch: SwitchConfig
    hsm: HsmConfig
    banks: tuple[Bank, ...]
    merchants: tuple[Merchant, ...]
    source: str = "<default>"       # the file it was read from

    def bank(self, bank_id: str) -> Bank:
        for b in self.banks:
            if b.id == bank_id:
                return b
        raise KeyError(bank_id)

    def terminals(self) -> list[Terminal]:
        return [t for m in self.merchants for t in m.terminals]
