"""Merchant/terminal registry: 03 checks, allowed transactions by kind (58) and MCC (12)."""

from __future__ import annotations

import pytest

from cardswitch.config import Bank, Endpoint, HsmConfig, Merchant, Network, SwitchConfig, Terminal
from cardswitch.iso8583.constants import RC
from cardswitch.merchants.fees import FeePlan
from cardswitch.merchants.registry import (
    ALLOWED_BY_KIND,
    Registry,
    RegistryError,
    acceptor_name_location,
    allowed,
    check_transaction,
    mcc_allows,
)
from cardswitch.switch.records import Kind

ALL_KINDS = [v for k, v in vars(Kind).items() if k.isupper()]


def bank(bid: str) -> Bank:
    return Bank(bid, bid + "1", f"Bank {bid}", (Endpoint("127.0.0.1", 9101),))


def network(*merchants: Merchant, banks=("BANKA", "BANKB")) -> Network:
    return Network(SwitchConfig(), HsmConfig(), tuple(bank(b) for b in banks), merchants)


COFFEE = Merchant("898440154110001", "BANKA", "Shanghai Coffee", "Shanghai", "5812", 60, 2000, 5,
                  terminals=(Terminal("POS00001", "pos", "898440154110001"),
                             Terminal("POS00002", "pos", "898440154110001", enabled=False)))
ATM_OWNER = Merchant("898440160110001", "BANKB", "Bank B ATMs", "Beijing", "6011",
                     terminals=(Terminal("ATM00001", "atm", "898440160110001"),
                                Terminal("ATM2", "atm", "898440160110001")))
SHOP_ATM = Merchant("898440170110001", "BANKA", "Mall kiosk", mcc="5411",
                    terminals=(Terminal("ATM00003", "atm", "898440170110001"),))
CLOSED = Merchant("898440180110001", "BANKB", "Closed shop", enabled=False,
                  terminals=(Terminal("POS00009", "pos", "898440180110001"),))

REG = Registry.from_network(network(COFFEE, ATM_OWNER, SHOP_ATM, CLOSED))


def test_terminal_info_is_precomputed():
    info = REG.terminal("POS00001")
    assert info.terminal.id == "POS00001" and info.terminal_id == "POS00001"
    assert info.merchant is COFFEE and info.merchant_id == COFFEE.id
    assert info.acquirer.id == "BANKA" and info.acquirer.institution_id == "BANKA1"
    assert info.kind == "pos" and info.mcc == "5812"
    assert info.fee_plan == FeePlan(60, 2000, 5)
    assert info.acceptor == "Shanghai Coffee".ljust(25) + "Shanghai".ljust(13) + "  "
    assert len(REG) == 6
    assert REG.terminal("POS00001") is info   # the same object every time


def test_unknown_terminal():
    assert REG.terminal("NOPE0001") is None
    assert "NOPE0001" not in REG and "POS00001" in REG


def test_space_padded_field_41_and_42():
    info, rc = REG.check_terminal("ATM2    ", "898440160110001")
    assert rc == RC.APPROVED and info.terminal_id == "ATM2"
    assert REG.merchant("898440160110001") is ATM_OWNER


def test_check_terminal_ok():
    info, rc = REG.check_terminal("POS00001", "898440154110001")
    assert rc == RC.APPROVED == "00" and info.merchant is COFFEE


def test_unknown_tid_is_03_without_info():
    assert REG.check_terminal("XXX00001", "898440154110001") == (None, RC.INVALID_MERCHANT)


def test_tid_of_another_mid_is_03_with_info():
    info, rc = REG.check_terminal("POS00001", "898440160110001")
    assert rc == RC.INVALID_MERCHANT == "03"
    assert info.terminal_id == "POS00001"  # known terminal: the response can still be MACed


def test_unknown_mid_is_03():
    info, rc = REG.check_terminal("POS00001", "999999999999999")
    assert rc == RC.INVALID_MERCHANT
    assert REG.merchant("999999999999999") is None


def test_disabled_merchant_is_03():
    info, rc = REG.check_terminal("POS00009", "898440180110001")
    assert rc == RC.INVALID_MERCHANT and not info.usable


def test_disabled_terminal_is_03():
    info, rc = REG.check_terminal("POS00002", "898440154110001")
    assert rc == RC.INVALID_MERCHANT and not info.usable


def test_from_network_refuses_unknown_acquirer():
    bad = Merchant("1", "NOBANK", "x", terminals=(Terminal("T1", "pos", "1"),))
    with pytest.raises(RegistryError, match="NOBANK"):
        Registry.from_network(network(bad))


def test_from_network_refuses_duplicate_ids():
    m2 = Merchant("2", "BANKA", "y", terminals=(Terminal("POS00001", "pos", "2"),))
    with pytest.raises(RegistryError, match="POS00001"):
        Registry.from_network(network(COFFEE, m2))
    with pytest.raises(RegistryError, match="898440154110001"):
        Registry.from_network(network(COFFEE, Merchant(COFFEE.id, "BANKB", "dup")))


# -- allowed by terminal kind (wire.md 3) ----------------------------------------

POS_ALLOWED = {Kind.PREAUTH, Kind.PURCHASE, Kind.COMPLETION, Kind.VOID, Kind.REFUND, Kind.BALANCE,
               Kind.TRANSFER, Kind.BILL_PAYMENT, Kind.REVERSAL, Kind.BATCH_CLOSE,
               Kind.BATCH_UPLOAD, Kind.NETWORK}
ATM_ALLOWED = {Kind.WITHDRAWAL, Kind.DEPOSIT, Kind.BALANCE, Kind.TRANSFER, Kind.BILL_PAYMENT,
               Kind.REVERSAL, Kind.BATCH_CLOSE, Kind.BATCH_UPLOAD, Kind.NETWORK}


def test_kind_table_covers_every_record_kind():
    assert len(ALL_KINDS) == 14
    assert set(ALLOWED_BY_KIND) == {"pos", "atm"}


@pytest.mark.parametrize("txn", ALL_KINDS)
def test_allowed_pos(txn):
    assert allowed("pos", txn) == (txn in POS_ALLOWED)


@pytest.mark.parametrize("txn", ALL_KINDS)
def test_allowed_atm(txn):
    assert allowed("atm", txn) == (txn in ATM_ALLOWED)


def test_unknown_kind_or_txn():
    assert not allowed("kiosk", Kind.PURCHASE)
    assert allowed("kiosk", Kind.NETWORK)
    assert not allowed("pos", "teleport")


def test_mcc_rule():
    assert mcc_allows("6011", Kind.WITHDRAWAL) and mcc_allows("6011", Kind.DEPOSIT)
    assert not mcc_allows("5411", Kind.WITHDRAWAL) and not mcc_allows("5411", Kind.DEPOSIT)
    assert mcc_allows("5411", Kind.PURCHASE) and mcc_allows("6011", Kind.BALANCE)


def test_check_transaction_codes():
    pos, atm, shop_atm = REG.terminal("POS00001"), REG.terminal("ATM00001"), REG.terminal("ATM00003")
    assert check_transaction(pos, Kind.PURCHASE) == RC.APPROVED
    assert check_transaction(pos, Kind.WITHDRAWAL) == RC.NOT_PERMITTED_TERMINAL == "58"
    assert check_transaction(atm, Kind.PURCHASE) == RC.NOT_PERMITTED_TERMINAL
    assert check_transaction(atm, Kind.WITHDRAWAL) == RC.APPROVED
    assert check_transaction(atm, Kind.DEPOSIT) == RC.APPROVED
    # kind allows it, MCC forbids it
    assert check_transaction(shop_atm, Kind.WITHDRAWAL) == RC.INVALID_TRANSACTION == "12"
    assert check_transaction(shop_atm, Kind.BALANCE) == RC.APPROVED
    # an explicit MCC (field 18) overrides the merchant's
    assert check_transaction(shop_atm, Kind.WITHDRAWAL, mcc="6011") == RC.APPROVED
    assert check_transaction(atm, Kind.WITHDRAWAL, mcc="5411") == RC.INVALID_TRANSACTION
    assert pos.allows(Kind.VOID) and not atm.allows(Kind.VOID)


def test_acceptor_field_43_is_40_printable_ascii():
    m = Merchant("1", "BANKA", "上海咖啡 Very Long Coffee Shop Name Ltd", "Shanghai Pudong New Area")
    text = acceptor_name_location(m)
    assert len(text) == 40 and text.isascii() and text.isprintable()
    assert text.startswith("???? Very Long Coffee Sho")


@pytest.mark.parametrize("tid,mid", [("", ""), (None, None), ("POS00001", None), ("POS00001", "")])
def test_missing_ids_are_03_not_a_crash(tid, mid):
    assert REG.check_terminal(tid, mid)[1] == RC.INVALID_MERCHANT
