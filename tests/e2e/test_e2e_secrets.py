"""End to end: after a business day, no secret is in anything the network wrote.

One day on the default network (plus a chip card and a stripe card): PIN
transactions at POS terminals and ATMs (right and wrong PINs), MAC'd
terminals, a MAC'd reversal, a key change and transactions under the new
keys, chip transactions (good and forged ARQC), track 2 transactions (right
and wrong CVV), a transfer, a refund, balance inquiries and a batch close.
Then `up` stops and everything the switch, the HSM and the banks wrote is
searched: every file under data_dir (recursively: SQLite databases, their WAL
and SHM files, anything else), a copy of data_dir taken while the network was
still running (so WAL contents that a clean stop folds away are searched
too), and the captured stdout and stderr of `up` (every part logs there).

What may not be found (DEVELOPERS.md, README "Security"), each in every form
a file could hold it:

- every card's full PAN (digits, and packed BCD);
- every PIN block sent (hex in either case, raw bytes), and the same PIN
  blocks as the switch sends them on under each issuer's ZPK;
- every clear key of the network file (TMK, TPK, TAK, ZPK, ZAK, PVK, CVK,
  MK-AC; hex in either case, raw bytes, and each 8-byte half) and the new
  TPK and TAK issued by the key change;
- every track 2 sent (the whole string, `=` or `D` separator): the CVV as it
  appears there. Clear PINs are not searched for: four digits are everywhere.
"""

from __future__ import annotations

import re
import shutil
from types import SimpleNamespace

import psec.pinblock
import pytest

from cardswitch.config import Card
from cardswitch.netfile import dump_network

from e2e_support import (
    BALANCE, PURCHASE, REFUND, TRANSFER, WITHDRAWAL, Driver, add_mac, batch_close, default_test_network,
    files_under, find_secrets, hex_secret, make_pan, network_mgmt, open_issued_keys, pan_secret, reversal,
    tdes_ecb, text_secret, with_cards,
)

pytestmark = [pytest.mark.e2e, pytest.mark.filterwarnings("ignore:.*TripleDES.*")]

A_DEBIT = "6221260000000018"
A_CREDIT = "6221280000000016"     # PIN 123456
B_DEBIT = "6228480000000015"
B_CREDIT_IBM = "5200480000000019"  # IBM 3624 offset
C_DEBIT = "6217000000000014"
C_CHIP = make_pan("621700", 8101)
B_STRIPE = make_pan("622848", 8102)
KC_TID = "POS00021"


@pytest.fixture(scope="module")
def net(workdir):
    net = default_test_network(workdir / "var")
    net = with_cards(net, "BANKC", Card(pan=C_CHIP, expiry="3012", pin="5678", balance=5_000_000))
    return with_cards(net, "BANKB", Card(pan=B_STRIPE, expiry="3012", pin="8765", balance=5_000_000))


def _card(net, pan):
    bank = next(b for b in net.banks if any(c.pan == pan for c in b.cards))
    return next(c for c in bank.cards if c.pan == pan), bank


def _wrong(pin: str) -> str:
    return "".join(str((int(c) + 1) % 10) for c in pin)


@pytest.fixture(scope="module")
def day(launch, workdir, net):
    """Drive the day, snapshot data_dir while running, stop; what was sent and learnt."""
    from cardswitch.issuer_sim.cards import icc_data_for, track2_for

    run = launch(net, workdir)
    d = Driver(run)
    pins = {c.pan: c.pin for b in net.banks for c in b.cards}
    blocks: list[tuple[str, str, bytes]] = []      # (what, field 52 as sent, the clear ISO 0 block)

    def pin(req: dict, pin: str, pan: str) -> dict:
        blocks.append((f"PIN block of {req['41']} stan {req['11']}", req["52"], clear_pin_block(pin, pan)))
        return req

    # PINs: POS and ATM, every bank, right and wrong, a 6-digit PIN, an IBM-offset card.
    for tid, tt, pan in [("POS00002", PURCHASE, A_DEBIT), ("POS00012", PURCHASE, B_DEBIT),
                         ("POS00013", PURCHASE, C_DEBIT), ("POS00022", PURCHASE, A_CREDIT),
                         ("POS00012", PURCHASE, B_CREDIT_IBM), ("ATM00002", WITHDRAWAL, A_DEBIT),
                         ("ATM00011", WITHDRAWAL, B_DEBIT), ("ATM00001", WITHDRAWAL, C_DEBIT)]:
        d.ask(pin(d.fin(tid, tt, pan, 2_000, pin=pins[pan]), pins[pan], pan), "00")
        d.ask(pin(d.fin(tid, tt, pan, 2_000, pin=_wrong(pins[pan])), _wrong(pins[pan]), pan), "55")
    # MAC'd terminals, with and without PINs; a MAC'd reversal (MAC in 128).
    for tid in ("POS00001", "POS00011", "POS00031"):
        d.ask(d.fin(tid, PURCHASE, A_DEBIT, 1_500), "00")
        d.ask(pin(d.fin(tid, PURCHASE, B_DEBIT, 1_500, pin=pins[B_DEBIT]), pins[B_DEBIT], B_DEBIT), "00")
    orig = d.fin("POS00031", PURCHASE, C_DEBIT, 4_000)
    d.ask(orig, "00")
    d.ask(reversal(d.T["POS00031"], d.stan(), orig), "00")
    # Money movements of other kinds, a balance inquiry, a batch close.
    d.ask(pin(d.fin("POS00012", TRANSFER, A_DEBIT, 5_000, to_pan=C_DEBIT, pin=pins[A_DEBIT]),
              pins[A_DEBIT], A_DEBIT), "00")
    d.ask(d.fin("POS00002", REFUND, B_DEBIT, 700), "00")
    d.ask(pin(d.fin("ATM00011", BALANCE, C_DEBIT, None, pin=pins[C_DEBIT]), pins[C_DEBIT], C_DEBIT), "00")
    d.ask(d.fin("POS00013", PURCHASE, A_DEBIT, 900, batch=3), "00")
    close = d.conn.request(batch_close(d.T["POS00013"], d.stan(), 3, (0, 0), (1, 900)))
    assert close["39"] == "00", close
    # Key change, then PIN and MAC under the new keys.
    old = d.T[KC_TID]
    resp = d.conn.request(network_mgmt(old, d.stan(), "101"))
    assert resp.get("39") == "00", resp
    new = open_issued_keys(resp["48"], old.tmk)
    assert new is not None, "the key change answer opens to no keys matching its check values"
    for key, rc in ((new.tpk, "00"), (old.tpk, "55")):
        req = pin(d.fin(KC_TID, PURCHASE, C_DEBIT, 1_000, pin=pins[C_DEBIT], pin_key=key), pins[C_DEBIT], C_DEBIT)
        d.ask(add_mac(req, new.tak), rc)
    # Chip: good and forged ARQC, with and without PIN.
    card, bank = _card(net, C_CHIP)
    for atc, forged, with_pin, rc in ((1, False, False, "00"), (2, True, False, "05"), (3, False, True, "00")):
        f55 = icc_data_for(card, bank, amount=3_000, atc=atc,
                           cryptogram=bytes.fromhex("0102030405060708") if forged else None)
        req = d.fin("POS00012", PURCHASE, C_CHIP, 3_000, pin=card.pin if with_pin else None,
                    extra={"55": f55, "22": "051"})
        d.ask(pin(req, card.pin, C_CHIP) if with_pin else req, rc)
    # Magnetic stripe: right and wrong CVV.
    card, bank = _card(net, B_STRIPE)
    good = track2_for(card, bank)
    tracks = [good, track2_for(card, bank, cvv="000" if not good.endswith("000") else "001")]
    for t2, rc in zip(tracks, ("00", "05")):
        d.ask(d.fin("POS00012", PURCHASE, None, 1_200, extra={"35": t2, "22": "901"}), rc)
    d.close()
    snapshot = workdir / "data_dir_while_running"
    shutil.copytree(run.data_dir, snapshot)
    assert run.stop() == 0, "`cardswitch up` did not exit 0 on SIGTERM"
    return SimpleNamespace(run=run, d=d, new_keys=new, tracks=tracks, blocks=blocks, snapshot=snapshot)


def clear_pin_block(pin: str, pan: str) -> bytes:
    """ISO 9564 format 0, clear (psec): what every key of the path encrypts."""
    return psec.pinblock.encode_pinblock_iso_0(pin, pan)


def _secrets(net, day) -> list:
    out = []
    for bank in net.banks:
        for c in bank.cards:
            out.append(pan_secret(c.pan))
    # Every clear key written in the network file, whatever its name.
    text = dump_network(net)
    keys = sorted(set(re.findall(r"clear:([0-9A-Fa-f]{16,48})", text)))
    assert len(keys) >= 30, f"only {len(keys)} clear keys found in the network file"
    for i, k in enumerate(keys):
        out.append(hex_secret(f"clear key #{i + 1} of the network file", k, "clear key of the network file"))
        for j in range(0, len(k), 16):
            out.append(hex_secret(f"clear key #{i + 1}, part {j // 16 + 1}", k[j:j + 16],
                                  "8-byte part of a clear key of the network file"))
    for name, k in (("new TPK", day.new_keys.tpk), ("new TAK", day.new_keys.tak)):
        out.append(hex_secret(name, k.hex(), "key issued by the key change"))
        out += [hex_secret(f"{name}, half {i + 1}", h.hex(), "8-byte half of a key issued by the key change")
                for i, h in enumerate((k[:8], k[8:]))]
    # PIN blocks: as sent (under a TPK), and as the switch sends them on (under the issuer's ZPK).
    zpks = {b.id: b.zpk.clear_bytes() for b in net.banks if b.zpk is not None}
    sent = [req["52"] for req, _ in day.d.log if "52" in req]
    assert sorted(sent) == sorted(b for _, b, _ in day.blocks), "a PIN block sent was not recorded"
    assert len(sent) >= 20, f"only {len(sent)} PIN blocks were sent"
    for what, block, clear in day.blocks:
        out.append(hex_secret(f"{what} as sent", block, "PIN block as sent (under a TPK)"))
        for bank_id, zpk in zpks.items():
            out.append(hex_secret(f"{what} under {bank_id}'s ZPK", tdes_ecb(zpk, clear).hex(),
                                  "PIN block under an issuer's ZPK"))
    for i, t2 in enumerate(day.tracks):
        out.append(text_secret(f"track 2 #{i + 1}", t2, "track 2 (with its CVV)"))
        out.append(text_secret(f"track 2 #{i + 1} (D separator)", t2.replace("=", "D"), "track 2 (with its CVV)"))
    return out


def test_no_secret_in_any_file_or_log(day, workdir, net):
    run = day.run
    secrets = _secrets(net, day)
    files = files_under(run.data_dir, day.snapshot) + sorted(workdir.glob("*.log"))
    names = {p.name for p in files}
    assert "journal.db" in names and any(n.endswith(".db") and n != "journal.db" for n in names), names
    assert any(n.endswith("-wal") for n in names), f"no WAL file was caught while running: {sorted(names)}"
    texts = {"stdout of `up`": "\n".join(run.stdout_lines)}
    # The search finds what is there: the network file holds the PANs and clear keys,
    # and a file made here holds a PIN block (lower case) and a track 2.
    control = find_secrets(secrets, [run.netfile])
    assert len(control) >= 40, f"the search finds nothing even in the network file: {control[:5]}"
    planted = workdir / "planted.bin"
    planted.write_bytes(b"x" * 100 + day.blocks[-1][1].lower().encode() + b"\0" + day.tracks[0].encode())
    hits = {h.split(": ", 1)[1] for h in find_secrets(secrets, [planted])}
    assert {"track 2 #1", f"PAN {B_STRIPE[:6]}...{B_STRIPE[-4:]}", f"{day.blocks[-1][0]} as sent"} <= hits, hits
    planted.unlink()
    found = find_secrets(secrets, files, texts)
    total = sum(p.stat().st_size for p in files)
    print(f"\nsearched {len(files)} files ({total} bytes) and the stdout of `up` for {len(secrets)} secrets:")
    kinds: dict[str, int] = {}
    for sec in secrets:
        kinds[sec.kind] = kinds.get(sec.kind, 0) + 1
    for kind, n in sorted(kinds.items()):
        print(f"  {n:4d}  {kind}")
    for p in files:
        print(f"  file {p.relative_to(workdir)} ({p.stat().st_size} bytes)")
    assert not found, "secrets found:\n" + "\n".join(found)
