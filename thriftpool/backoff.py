"""Reconnect backoff: exponential with jitter, gRPC's shape, via tenacity.

The watchdog never sleeps for one instance's backoff.  Each failing instance keeps a
:class:`Backoff`; a failure computes the monotonic time before which nobody may try that
instance again, and the watchdog and checkouts simply skip it until then.
"""

from __future__ import annotations

import random
from typing import Any

import tenacity

__all__ = ["Backoff"]


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
