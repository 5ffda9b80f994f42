"""cardswitch.issuer_sim: simulated issuing bank hosts.

``IssuerLogic`` (ledger.py) decides requests without I/O; ``IssuerHost`` and
``run_banks`` (server.py) serve them over TCP; store.py persists each bank
under ``<data_dir>/banks/<BANK_ID>.db``; ``export_day`` (export.py) writes a
bank's own record of a business day for reconciliation.
"""

from cardswitch.issuer_sim.export import ExportError, export_day
from cardswitch.issuer_sim.server import IssuerHost, run_banks
from cardswitch.issuer_sim.ledger import Account, IssuerLogic, Outcome, Txn

__all__ = ["Account", "ExportError", "IssuerHost", "IssuerLogic", "Outcome", "Txn",
           "export_day", "run_banks"]
