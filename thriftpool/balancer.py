"""Choosing an instance for each checkout: round robin, random, least loaded.

Every balancer honours the weights that discovery reports and skips unhealthy instances.
``pick`` runs on every checkout without a lock: each balancer precomputes what it needs
from the pool's ring (a new tuple each time membership or weights change) and caches it
by identity; a concurrent rebuild computes the same thing, so the race is harmless.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import random
from typing import Dict, List, Optional, Sequence, Tuple, Type

from .instance import InstancePool

__all__ = ["Balancer", "LeastLoaded", "RandomBalancer", "RoundRobin", "make_balancer"]

#: Weighted schedules longer than this are scaled down (weights keep their proportions).
_MAX_SCHEDULE = 4096


class Balancer:
    """Picks one healthy instance from the pool's ring; thread-safe and lock-free."""

    name = "base"

    def pick(self, ring: Sequence[InstancePool]) -> Optional[InstancePool]:
        """Return a healthy instance, or ``None`` when no instance in ``ring`` is healthy."""
        raise NotImplementedError


def _healthy_weighted(ring: Sequence[InstancePool]) -> Optional[InstancePool]:
    """Slow path: a weighted random choice among the healthy instances."""
    healthy = [i for i in ring if i.healthy]
    if not healthy:
        return None
    return random.choices(healthy, weights=[max(1, i.weight) for i in healthy])[0]


class RoundRobin(Balancer):
    """Each checkout takes the next healthy instance in a smooth weighted round robin.

    With equal weights this is plain rotation.  With weights, the schedule interleaves
    instances (stride scheduling, like nginx's smooth weighted round robin), so a
    weight-3 instance beside a weight-1 one gets three checkouts in four, spread out.
    ``itertools.count`` hands out positions atomically under the GIL (and under gevent),
    so no lock is needed.
    """

    name = "round_robin"

    def __init__(self) -> None:
        self._counter = itertools.count()
        self._ring: Optional[Sequence[InstancePool]] = None
        self._schedule: Tuple[InstancePool, ...] = ()

    @staticmethod
    def schedule(ring: Sequence[InstancePool]) -> Tuple[InstancePool, ...]:
        weights = [max(1, i.weight) for i in ring]
        total = sum(weights)
        if len(set(weights)) <= 1:
            return tuple(ring)
        if total > _MAX_SCHEDULE:
            scale = _MAX_SCHEDULE / total
            weights = [max(1, round(w * scale)) for w in weights]
            total = sum(weights)
        # Stride scheduling: each instance is due every total/weight slots; a heap hands
        # out the earliest due one.  O(total * log n), so a fleet of thousands with mixed
        # weights is scheduled in milliseconds, on the first pick after a change.
        heap = [(total / (2 * w), k, total / w) for k, w in enumerate(weights)]
        heapq.heapify(heap)
        out: List[InstancePool] = []
        for _ in range(total):
            due, k, stride = heapq.heappop(heap)
            out.append(ring[k])
            heapq.heappush(heap, (due + stride, k, stride))
        return tuple(out)

    def pick(self, ring: Sequence[InstancePool]) -> Optional[InstancePool]:
        if ring is not self._ring:
            self._schedule = self.schedule(ring)
            self._ring = ring
        schedule = self._schedule
        n = len(schedule)
        if not n:
            return None
        start = next(self._counter)
        inst = schedule[start % n]
        if inst.healthy:
            return inst
        # Skip by drawing fresh positions, not by scanning from ``start``: a scan hands
        # an unhealthy instance's turns to its successor (A, B, C with C down gave A 2/3
        # and B 1/3); consuming positions keeps the healthy ones in their proportions.
        for _ in range(1, min(n, 64)):
            inst = schedule[next(self._counter) % n]
            if inst.healthy:
                return inst
        return _healthy_weighted(ring)


class RandomBalancer(Balancer):
    """Each checkout takes a weighted random healthy instance."""

    name = "random"

    def __init__(self) -> None:
        # (ring, cumulative weights or None when all weights are equal), replaced as one
        # object so a concurrent pick never pairs one ring with another's weights.
        self._table: Tuple[Optional[Sequence[InstancePool]], Optional[List[int]]] = (None, None)

    def _choose(self, ring: Sequence[InstancePool]) -> InstancePool:
        table_ring, cumulative = self._table
        if ring is not table_ring:
            weights = [max(1, i.weight) for i in ring]
            cumulative = (None if len(set(weights)) <= 1
                          else list(itertools.accumulate(weights)))
            self._table = (ring, cumulative)
        if cumulative is None:
            # Equal weights (the common case): an index, not a bisect, whose float-to-int
            # comparisons grow with log(len(ring)) (bench/bench_scale.py).
            return ring[int(random.random() * len(ring))]
        return ring[bisect.bisect_right(cumulative, random.random() * cumulative[-1])]

    def pick(self, ring: Sequence[InstancePool]) -> Optional[InstancePool]:
        if not ring:
            return None
        for _ in range(3):
            inst = self._choose(ring)
            if inst.healthy:
                return inst
        return _healthy_weighted(ring)


class LeastLoaded(RandomBalancer):
    """Power of two choices: of two weighted random healthy instances, the less loaded.

    Load is the number of connections in use divided by the weight, so a slow or
    overloaded instance, whose calls hold their connections longer, gets less traffic,
    while the choice stays O(1) and free of a global lock (Finagle's and Linkerd's
    default balancer, and gRPC's least_request).
    """

    name = "least_loaded"

    def pick(self, ring: Sequence[InstancePool]) -> Optional[InstancePool]:
        if not ring:
            return None
        n = len(ring)
        if n == 1:
            only = ring[0]
            return only if only.healthy else None
        table_ring, cumulative = self._table
        if ring is not table_ring or cumulative is not None:
            a = self._choose(ring)
            b = self._choose(ring)
            if b is a:
                b = self._choose(ring)
        else:
            # Equal weights (the common case): two distinct indices from one random
            # number, its integer part and its fraction (independent and uniform).
            r = random.random() * n
            i = int(r)
            j = int((r - i) * (n - 1))
            if j >= i:
                j += 1
            a = ring[i]
            b = ring[j]
            if a.healthy and b.healthy:
                return a if len(a.in_use) <= len(b.in_use) else b
        if not a.healthy:
            a = b
        if not b.healthy:
            b = a
        if not a.healthy:
            return _healthy_weighted(ring)
        if a is b:
            return a
        # in_use / weight, compared without division
        return a if (len(a.in_use) * max(1, b.weight)
                     <= len(b.in_use) * max(1, a.weight)) else b


BALANCERS: Dict[str, Type[Balancer]] = {
    RoundRobin.name: RoundRobin,
    RandomBalancer.name: RandomBalancer,
    LeastLoaded.name: LeastLoaded,
}


def make_balancer(value: object) -> Balancer:
    """Turn the ``balancer`` option into a Balancer.

    :raises ValueError: naming ``balancer`` when it is neither a known name nor a Balancer.
    """
    if isinstance(value, Balancer):
        return value
    if isinstance(value, str) and value in BALANCERS:
        return BALANCERS[value]()
    raise ValueError(f"balancer must be one of {', '.join(map(repr, BALANCERS))} or a "
                     f"Balancer, got {value!r}")
