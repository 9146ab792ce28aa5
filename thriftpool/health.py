"""The health of one instance: a pure state machine with a clock argument.

States::

    HEALTHY --connect_failed / failure_threshold call errors--> EJECTED
    EJECTED --start_probe(now), once the backoff has passed----> PROBING
    PROBING --connected------------------------------------------> HEALTHY
    PROBING --connect_failed (a longer backoff)------------------> EJECTED

A healthy instance takes checkouts; an ejected one takes none, and nobody connects to it
before ``next_attempt_at``; a probing one has its one probe connect in flight.  A
successful connect restores the instance but keeps its backoff: only a successful *call*
(:meth:`Health.call_succeeded`) resets it, so a server that accepts connections and then
fails every call is ejected again, each time for longer.

No method does I/O, takes a lock or reads a clock: the caller holds the pool's state lock
and passes ``now``, so every transition can be driven with a fake clock.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Optional

from .backoff import Backoff

__all__ = ["Health", "HealthState", "Ejection"]


class HealthState(enum.Enum):
    """Where an instance stands."""

    HEALTHY = "healthy"
    EJECTED = "ejected"
    PROBING = "probing"


@dataclass(frozen=True)
class Ejection:
    """What an ejection did, for the log line and the listener (reported after the lock)."""

    was_healthy: bool
    delay: float
    failures: int
    error: Optional[BaseException]
    why: str


class Health:
    """The health of one instance; mutated only under the pool's state lock."""

    __slots__ = ("state", "backoff", "threshold", "errors", "next_attempt_at",
                 "last_failure_at", "last_attempt_at", "last_error", "probe_floor",
                 "needs_call")

    def __init__(self, backoff: Backoff, failure_threshold: int, probe_floor: float) -> None:
        self.state = HealthState.HEALTHY
        self.backoff = backoff
        self.threshold = failure_threshold
        self.errors = 0                 # consecutive calls that failed
        self.next_attempt_at = 0.0      # no connect before this while ejected
        self.last_failure_at = 0.0
        self.last_attempt_at = 0.0
        self.last_error: Optional[BaseException] = None
        self.probe_floor = probe_floor  # panic mode: at most one probe this often
        # A call, not a connect, failed as a connect does (a TLS session refused at its
        # first read): a connect alone proves nothing, so the watchdog's probe makes a
        # trial call before the instance is restored.
        self.needs_call = False

    @property
    def serving(self) -> bool:
        return self.state is HealthState.HEALTHY

    # -- transitions -------------------------------------------------------------------

    def eject(self, now: float, error: Optional[BaseException], why: str) -> Ejection:
        """Any state -> EJECTED, with the next backoff delay."""
        was_healthy = self.state is HealthState.HEALTHY
        delay = self.backoff.next_delay()
        self.state = HealthState.EJECTED
        self.next_attempt_at = now + delay
        self.last_failure_at = now
        self.last_error = error
        self.errors = 0
        return Ejection(was_healthy, delay, self.backoff.failures, error, why)

    def connect_failed(self, now: float, error: BaseException) -> Ejection:
        """A connect (a checkout's, a background one or a probe) failed.  It was an
        attempt: panic mode waits ``probe_floor`` before the next one."""
        self.last_attempt_at = now
        return self.eject(now, error, "connect failed")

    def call_failed(self, now: float, error: Optional[BaseException],
                    may_eject: bool = True) -> Optional[Ejection]:
        """A call failed in a way that counts against the instance; ejects after
        ``failure_threshold`` in a row while healthy, unless ``may_eject`` is False (the
        pool's ejection cap is reached: the streak starts over instead)."""
        self.errors += 1
        if self.state is HealthState.HEALTHY and self.errors >= self.threshold:
            if not may_eject:
                self.errors = 0
                return None
            return self.eject(now, error,
                              f"{self.errors} calls in a row failed")
        return None

    def call_refused(self, now: float, error: BaseException) -> Ejection:
        """A call on a fresh connection was refused as a failed connect is (a TLS
        session the server rejected): eject as :meth:`connect_failed` does, and let only
        a successful (trial) call restore the instance."""
        self.needs_call = True
        return self.connect_failed(now, error)

    def call_succeeded(self) -> None:
        """A call was answered: forget the failure streak and the backoff."""
        self.errors = 0
        self.needs_call = False
        self.backoff.reset()

    def connected(self) -> bool:
        """A connect succeeded.  Returns True when this restored the instance."""
        if self.state is HealthState.HEALTHY:
            return False
        self.state = HealthState.HEALTHY
        self.next_attempt_at = 0.0
        self.needs_call = False  # (the watchdog made its trial call first)
        return True

    def may_probe(self, now: float, panic: bool = False) -> bool:
        """An ejected instance whose backoff has passed (in panic mode: whose last attempt
        is at least ``probe_floor`` old) may get one probe."""
        if self.state is not HealthState.EJECTED:
            return False
        if now >= self.next_attempt_at:
            return True
        return panic and now - self.last_attempt_at >= self.probe_floor

    def start_probe(self, now: float) -> None:
        """EJECTED -> PROBING: the caller opens the one probe connection."""
        self.state = HealthState.PROBING
        self.last_attempt_at = now

    def probe_abandoned(self) -> None:
        """PROBING -> EJECTED without a verdict (the probe was interrupted, or the
        instance went away): the next probe may come once the same backoff has passed."""
        if self.state is HealthState.PROBING:
            self.state = HealthState.EJECTED
