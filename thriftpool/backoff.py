"""Reconnect backoff (exponential with jitter, gRPC's shape, via tenacity) and the retry budget.

The watchdog never sleeps for one instance's backoff.  Each failing instance keeps a
:class:`Backoff`; a failure computes the monotonic time before which nobody may try that
instance again, and the watchdog and checkouts simply skip it until then.
"""

from __future__ import annotations

import random
import time
from typing import Any

import tenacity

__all__ = ["Backoff", "RetryBudget"]


class Backoff:
    """Delay schedule for one instance's reconnect attempts.

    The n-th consecutive failure waits ``initial * multiplier ** (n - 1)`` seconds, capped at
    ``maximum``, then multiplied by a uniform factor in ``[1 - jitter, 1 + jitter]`` so that
    many clients that lost the same server do not come back in lockstep.
    """

    __slots__ = ("_wait", "_jitter", "_state", "failures")

    def __init__(self, initial: float, multiplier: float, maximum: float, jitter: float) -> None:
        self._wait = tenacity.wait_exponential(multiplier=initial, exp_base=multiplier,
                                               max=maximum)
        self._jitter = jitter
        self._state: Any = tenacity.RetryCallState(
            retry_object=None, fn=None, args=(), kwargs={})  # type: ignore[arg-type]
        self.failures = 0

    def next_delay(self) -> float:
        """Count one more consecutive failure and return the seconds to wait before the next try."""
        self.failures += 1
        self._state.attempt_number = self.failures
        delay = float(self._wait(self._state))
        if self._jitter:
            delay *= random.uniform(1.0 - self._jitter, 1.0 + self._jitter)
        return delay

    def reset(self) -> None:
        """Forget the failures after a success."""
        self.failures = 0


class RetryBudget:
    """Caps retries at a fraction of recent calls, as Finagle's retry budget does.

    Each call deposits ``ratio`` of a token (the balance is capped, so quiet periods do not
    bank an unbounded burst); each retry withdraws a whole token.  A small reserve of
    ``min_per_second`` tokens a second lets a low-traffic client still retry.  When every
    instance fails at once, retries stop multiplying the load on the survivors.

    Updates are lock-free: a lost deposit under a race only makes the budget a little
    stricter.
    """

    __slots__ = ("_ratio", "_balance", "_cap", "_reserve", "_min_per_second", "_refilled_at")

    def __init__(self, ratio: float, min_per_second: float = 10.0, cap: float = 100.0) -> None:
        self._ratio = ratio
        self._balance = 0.0
        self._cap = cap
        self._min_per_second = min_per_second
        self._reserve = min_per_second
        self._refilled_at = time.monotonic()

    def deposit(self) -> None:
        """Count one call."""
        balance = self._balance + self._ratio
        self._balance = balance if balance < self._cap else self._cap

    def withdraw(self) -> bool:
        """Take the token for one retry; ``False`` when the budget is spent."""
        if self._balance >= 1.0:
            self._balance -= 1.0
            return True
        now = time.monotonic()
        self._reserve = min(self._min_per_second,
                            self._reserve + (now - self._refilled_at) * self._min_per_second)
        self._refilled_at = now
        if self._reserve >= 1.0:
            self._reserve -= 1.0
            return True
        return False
