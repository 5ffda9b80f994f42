"""Clearing, settlement and reconciliation of closed business dates (docs/settlement.md).

- ``counting``: which journal rows count on a date, and as what (pure)
- ``positions``: fees, merchant settlement, interbank positions (pure)
- ``batches``: batch close exceptions for the report (pure)
- ``recon``: an issuer's own record against the switch's (pure)
- ``report``: report.html (pure)
- ``source``: reading the journal (one snapshot, rows streamed)
- ``files``: the output files, the date's lock
- ``run``: the settle and reconcile jobs
- ``commands``: `cardswitch settle` and `cardswitch reconcile`
"""
