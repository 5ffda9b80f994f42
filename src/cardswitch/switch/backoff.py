"""Reconnect delays: exponential backoff with jitter (sans-I/O)."""

from __future__ import annotations

import random
from typing import Callable


class Backoff:
    """0.1 s doubling up to 5 s by default, each delay jittered downwards.

    The n-th delay (from 0) is ``min(maximum, initial * factor**n)`` scaled by
    a random factor in ``[1 - jitter, 1]``, so many links that dropped at the
    same moment do not reconnect in lockstep. ``reset()`` after a success.
    """

    __slots__ = ("initial", "maximum", "factor", "jitter", "_rand", "_attempt")

    def __init__(
        self,
        initial: float = 0.1,
        maximum: float = 5.0,
        factor: float = 2.0,
        jitter: float = 0.5,
        rand: Callable[[], float] = random.random,
    ) -> None:
        if initial <= 0 or maximum < initial or factor < 1 or not 0 <= jitter <= 1:
            raise ValueError("bad backoff parameters")
        self.initial = initial
        self.maximum = maximum
        self.factor = factor
        self.jitter = jitter
        self._rand = rand
        self._attempt = 0

    @property
    def attempt(self) -> int:
        return self._attempt

    def base(self, attempt: int) -> float:
        """The un-jittered delay of attempt ``attempt``."""
        d = self.initial
        for _ in range(attempt):
            d *= self.factor
            if d >= self.maximum:
                return self.maximum
        return min(d, self.maximum)

    def next(self) -> float:
        d = self.base(self._attempt)
        self._attempt += 1
        return d * (1.0 - self.jitter * self._rand())

    def reset(self) -> None:
        self._attempt = 0
