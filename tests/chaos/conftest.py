"""The chaos suite: the `chaos` marker, and this folder's helpers on sys.path."""

from __future__ import annotations


def pytest_configure(config) -> None:
    config.addinivalue_line(
        "markers", "chaos: faults injected under load (bank, switch, HSM processes), then the "
                   "money is checked to the minor unit; minutes, not seconds")
