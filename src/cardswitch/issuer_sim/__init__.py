"""cardswitch.issuer_sim: simulated issuing bank hosts.

``IssuerLogic`` (ledger.py) decides requests without I/O; ``IssuerHost`` and
``run_banks`` (server.py) serve them over TCP; store.py persists each bank
under ``<data_dir>/banks/<BANK_ID>.db``; ``export_day`` (export.py) writes a
bank's own record of a business day for reconciliation.

Security: a bank verifies PINs (PVV or IBM offset), track 2 CVVs and EMV
ARQCs through the HSM (hsmverifier.py) behind the ``Verifier`` interface of
checks.py; cards.py holds card issuance (PVV/offset at load) and the test
helpers that make a genuine track 2 or field 55 for a test card.
"""

from cardswitch.issuer_sim.cards import PinRef, icc_data_for, pin_ref_for, track2_for
from cardswitch.issuer_sim.checks import Checks, Results, Verdict, Verifier
from cardswitch.issuer_sim.export import ExportError, export_day
from cardswitch.issuer_sim.hsmverifier import BankKeys, HsmVerifier
from cardswitch.issuer_sim.server import IssuerHost, run_banks
from cardswitch.issuer_sim.ledger import Account, IssuerLogic, Outcome, Txn

__all__ = ["Account", "BankKeys", "Checks", "ExportError", "HsmVerifier", "IssuerHost", "IssuerLogic",
           "Outcome", "PinRef", "Results", "Txn", "Verdict", "Verifier", "export_day", "icc_data_for",
           "pin_ref_for", "run_banks", "track2_for"]
