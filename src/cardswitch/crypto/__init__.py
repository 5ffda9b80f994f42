"""cardswitch.crypto: in-process payment cryptography over ``cryptography``.

DES/TDES primitives and check values (``des``), ISO 9564 format 0 PIN blocks
and PIN translation (``pinblock``), ISO 9797-1 MACs (``mac``).
"""

from cardswitch.crypto.des import (
    check_odd_parity,
    fix_parity,
    kcv,
    tdes_cbc_encrypt,
    tdes_ecb_decrypt,
    tdes_ecb_encrypt,
)
from cardswitch.crypto.mac import mac_alg1, mac_alg3, pad
from cardswitch.crypto.pinblock import (
    decrypt_pin_block,
    encrypt_pin_block,
    make_pin_block_iso0,
    pin_from_block_iso0,
    translate_pin_block,
)

__all__ = [
    "check_odd_parity", "fix_parity", "kcv", "tdes_cbc_encrypt", "tdes_ecb_decrypt",
    "tdes_ecb_encrypt", "mac_alg1", "mac_alg3", "pad", "decrypt_pin_block",
    "encrypt_pin_block", "make_pin_block_iso0", "pin_from_block_iso0", "translate_pin_block",
]
