"""cardswitch: a card payment switch and POS acquiring engine."""

__version__ = "0.1.0"
