"""Choosing an instance for each checkout."""

from __future__ import annotations

import itertools
from typing import Optional, Sequence

from .instance import InstancePool

__all__ = ["Balancer", "RoundRobin"]


class Balancer:
    """Picks one healthy instance from the pool's current ring (thread-safe, lock-free)."""

    name = "base"

    def pick(self, ring: Sequence[InstancePool]) -> Optional[InstancePool]:
        """Return a healthy instance, or ``None`` when no instance in ``ring`` is healthy."""
        raise NotImplementedError


class RoundRobin(Balancer):
    """Each checkout takes the next healthy instance in turn; unhealthy ones are skipped.

    ``itertools.count`` hands out numbers atomically under the GIL (and under gevent),
    so concurrent checkouts spread evenly without a lock.
    """

    name = "round_robin"

    def __init__(self) -> None:
        self._counter = itertools.count()

    def pick(self, ring: Sequence[InstancePool]) -> Optional[InstancePool]:
        n = len(ring)
        if not n:
            return None
        start = next(self._counter)
        for i in range(n):
            inst = ring[(start + i) % n]
            if inst.healthy:
                return inst
        return None
