"""The connections of one server instance: its slots, its idle stack, its health.

An :class:`InstancePool` is plain state.  It has no lock of its own and does no I/O: the
pool's :class:`~thriftpool.state.PoolState` mutates it under the one state lock and
carries out socket work after releasing it.

Slots: every connection of an instance is in exactly one of

- ``idle``: the stack of checked-in connections, most recently used on top (LIFO, so
  surplus connections really go idle and get reaped), ordered by ``idle_since``;
- ``in_use``: checked out by a caller (``len(in_use)`` is the number of checkouts held);
- ``busy``: taken out of the stack by the watchdog for a heartbeat or a TLS liveness
  read; it goes back to its place in the stack afterwards;
- ``opening``: a connect in flight (a count: the connection does not exist yet);
- ``closing``: taken out to be closed, and still counted until its socket is closed, so
  ``idle + in_use + busy + opening + closing <= max_size`` holds at every instant.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Set

from .address import Address, Endpoint
from .backoff import Backoff
from .health import Health

if TYPE_CHECKING:
    from .config import PoolConfig
    from .connection import Connection

__all__ = ["InstancePool"]


class InstancePool:
    """The slots, idle stack and health of one instance (state only; see module docstring)."""

    __slots__ = ("address", "key", "endpoint", "weight", "tls", "max_size", "idle", "in_use",
                 "busy", "opening", "closing", "retired", "healthy", "health", "fill_target",
                 "first_fill_done", "opened_total", "closed_total", "member", "candidate",
                 "__weakref__")

    def __init__(self, endpoint: Endpoint, config: "PoolConfig") -> None:
        self.address: Address = endpoint.address
        self.key = str(endpoint.address)
        self.endpoint = endpoint
        self.weight = endpoint.weight
        self.tls = endpoint.tls
        self.max_size = config.max_size
        self.idle: List["Connection"] = []
        self.in_use: Set["Connection"] = set()
        self.busy: Set["Connection"] = set()
        self.opening = 0
        self.closing = 0
        self.retired = False   # discovery dropped it, or the pool closed
        # ``healthy`` mirrors ``health.serving`` for the balancers, which read it without
        # the lock on every checkout; PoolState updates both together.
        self.healthy = True
        self.health = Health(
            Backoff(config.backoff_initial, config.backoff_multiplier, config.backoff_max,
                    config.backoff_jitter),
            config.failure_threshold, config.backoff_initial)
        self.fill_target = config.initial_size  # initial_size first, min_size after
        self.first_fill_done = False
        self.opened_total = 0
        self.closed_total = 0
        # Subsetting (PoolState._resubset_locked): in the ring; may be probed.  Both stay
        # True without subsetting.
        self.member = True
        self.candidate = True

    # -- read under the state lock ------------------------------------------------------

    def size(self) -> int:
        """Every connection counted against ``max_size``."""
        return (len(self.idle) + len(self.in_use) + len(self.busy) + self.opening
                + self.closing)

    def can_open(self) -> bool:
        """A new connection may be opened now: below ``max_size``, and not while the very
        first connect is still in flight (no connect storm at a server that may be down;
        the checkouts behind it wait for it instead)."""
        if self.size() >= self.max_size:
            return False
        return not (self.opening and not (self.idle or self.in_use or self.busy))

    @property
    def serving(self) -> bool:
        """Takes checkouts: healthy and not retired."""
        return self.healthy and not self.retired

    # -- read without the lock (hints for balancers and routing) ------------------------

    @property
    def in_use_count(self) -> int:
        return len(self.in_use)

    def has_capacity(self) -> bool:
        """A hint, read without the lock: an idle connection or a free slot exists."""
        return bool(self.idle) or self.can_open()

    def stats_locked(self) -> Dict[str, Any]:
        health = self.health
        return {
            "size": self.size(),
            "idle": len(self.idle),
            "in_use": len(self.in_use),
            "opening": self.opening,
            "closing": self.closing,
            "healthy": self.healthy,
            "state": health.state.value,
            "weight": self.weight,
            "failures": health.backoff.failures,
            "opened": self.opened_total,
            "closed": self.closed_total,
        }

    def __repr__(self) -> str:
        state = "retired" if self.retired else self.health.state.value
        return (f"<InstancePool {self.key} {state} idle={len(self.idle)} "
                f"in_use={len(self.in_use)} opening={self.opening} closing={self.closing}>")
