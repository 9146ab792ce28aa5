"""Retry safety in one place: which failed calls ``pool.client()`` may send again.

The rule is urllib3's (``Retry._is_connection_error`` versus ``_is_read_error``): a call is
retried on another instance only when the request surely never reached a server (it failed
before its last byte was flushed: the connect or the send failed), or, for methods listed in
``idempotent``, after any transport error or timeout.  IDL exceptions and
``TApplicationException`` are answers, never retried.  Retries are capped by a budget, as
Finagle's are, so an outage does not multiply the load on the survivors.
"""

from __future__ import annotations

import time
from typing import FrozenSet

from .connection import should_discard

__all__ = ["RetryBudget", "RetryPolicy"]


class RetryPolicy:
    """Decides whether one failed call may be sent again (a value object per pool)."""

    __slots__ = ("retries", "idempotent", "budget")

    def __init__(self, retries: int, idempotent: FrozenSet[str], budget: "RetryBudget") -> None:
        self.retries = retries
        self.idempotent = idempotent
        self.budget = budget

    def call_started(self) -> None:
        """Count one call towards the budget."""
        self.budget.deposit()

    def may_retry(self, method: str, error: BaseException, attempt: int, sent: bool) -> bool:
        """True when call number ``attempt`` (0 for the first) of ``method``, which failed
        with ``error`` after its request was ``sent`` (or not), may be retried now; a True
        answer spends one token of the budget."""
        if attempt >= self.retries or not isinstance(error, Exception):
            return False
        if not should_discard(error):
            return False  # an answer from the server (IDL exception, TApplicationException)
        if sent and method not in self.idempotent:
            return False  # the server may have acted on it
        return self.budget.withdraw()


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
