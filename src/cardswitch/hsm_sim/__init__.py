"""cardswitch.hsm_sim: a payShield-compatible software HSM (the server side).

- ``lmk``: the variant LMK (test set or a file), key types, keys under the
  LMK and under a ZMK/TMK (``encrypt_under_lmk`` / ``decrypt_under_lmk``).
- ``commands``: the host commands as pure functions, ``Hsm.handle(bytes) -> bytes``.
- ``server``: the asyncio TCP server (``HsmServer``, ``HsmOptions``, ``run_hsm``).
- ``python -m cardswitch.hsm_sim --port P``: the simulator on its own.
"""
