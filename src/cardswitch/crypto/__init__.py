"""cardswitch.crypto: in-process payment cryptography over ``cryptography``.

Modules: ``des`` (DES/TDES, TDES CMAC, check values), ``aes`` (AES ECB/CBC,
CMAC, AES check value), ``pinblock`` (ISO 9564 formats 0-4, Diebold/IBM,
PIN translation), ``mac`` (ISO 9797-1 MACs), ``cvv`` (Visa CVV/CVC),
``pvv`` (Visa PVV), ``ibm3624`` (IBM 3624 natural PIN and offset),
``dukpt`` (TDES and AES DUKPT), ``emv`` (ICC keys, session keys, ARQC,
ARPC), ``tr31`` (key block unwrap).

The package root re-exports the common functions. ``cvv.cvv`` and
``pvv.pvv`` are not re-exported here: a function named like its module
would shadow the module on the package.
"""

from cardswitch.crypto.aes import (
    aes_cbc_decrypt,
    aes_cbc_encrypt,
    aes_cmac,
    aes_ecb_decrypt,
    aes_ecb_encrypt,
    kcv_aes,
)
from cardswitch.crypto.des import (
    check_odd_parity,
    fix_parity,
    kcv,
    tdes_cbc_decrypt,
    tdes_cbc_encrypt,
    tdes_cmac,
    tdes_ecb_decrypt,
    tdes_ecb_encrypt,
)
from cardswitch.crypto.mac import mac_alg1, mac_alg3, pad
from cardswitch.crypto.pinblock import (
    HSM_FORMATS,
    decipher_iso4,
    decrypt_pin_block,
    encipher_iso4,
    encrypt_pin_block,
    make_pin_block,
    make_pin_block_iso0,
    pin_from_block,
    pin_from_block_iso0,
    translate_pin,
    translate_pin_block,
)

__all__ = [
    "aes_cbc_decrypt", "aes_cbc_encrypt", "aes_cmac", "aes_ecb_decrypt", "aes_ecb_encrypt",
    "kcv_aes", "check_odd_parity", "fix_parity", "kcv", "tdes_cbc_decrypt", "tdes_cbc_encrypt",
    "tdes_cmac", "tdes_ecb_decrypt", "tdes_ecb_encrypt", "mac_alg1", "mac_alg3", "pad",
    "HSM_FORMATS", "decipher_iso4", "decrypt_pin_block", "encipher_iso4", "encrypt_pin_block",
    "make_pin_block", "make_pin_block_iso0", "pin_from_block", "pin_from_block_iso0",
    "translate_pin", "translate_pin_block",
]
