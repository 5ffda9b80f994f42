"""cardswitch.merchants: the merchant/terminal registry and merchant fee plans."""

from cardswitch.merchants.fees import FeePlan, bps_fee, interchange_fee, merchant_fee
from cardswitch.merchants.registry import (
    Registry,
    RegistryError,
    TerminalInfo,
    allowed,
    check_transaction,
    mcc_allows,
)

__all__ = [
    "FeePlan", "bps_fee", "interchange_fee", "merchant_fee", "Registry", "RegistryError",
    "TerminalInfo", "allowed", "check_transaction", "mcc_allows",
]
