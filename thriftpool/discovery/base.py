"""The interface between a pool and whatever tells it which instances are live."""

from __future__ import annotations

import abc
from typing import Callable, List, Optional

from ..address import Endpoint

__all__ = ["Discovery", "DiscoveryListener"]

#: Called with the complete, current list of live instances each time it changes.
#: It must not block: the pool stores the list, applies it as a diff and returns.
DiscoveryListener = Callable[[List[Endpoint]], None]


class Discovery(abc.ABC):
    """A source of live instances for one :class:`~thriftpool.ThriftPool`.

    The pool calls :meth:`start` once with its listener and :meth:`stop` once from
    ``close()``.  An implementation calls the listener with full snapshots (never
    partial diffs), from any thread, at least once as soon as it knows the list; the pool
    computes what was added and removed.  While the source is unreachable it calls
    nothing, and the pool keeps serving the last list (fail static).
    """

    @abc.abstractmethod
    def start(self, listener: DiscoveryListener, pool_name: str) -> None:
        """Begin delivering snapshots to ``listener``; must not block on the network."""

    @abc.abstractmethod
    def stop(self) -> None:
        """Stop delivering snapshots and release resources; idempotent."""

    @property
    def alive(self) -> Optional[bool]:
        """Whether the discovery's own background thread runs; ``None`` for a discovery
        without one.  Shown by the pool's ``stats()["discovery_alive"]``."""
        return None

    def after_fork(self) -> None:  # noqa: B027 - optional hook, not abstract
        """Called in a forked child before the pool restarts discovery (default: nothing)."""
