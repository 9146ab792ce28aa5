"""Events that the pool reports to user callbacks, and the callbacks' types."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Sequence

__all__ = ["Emitter", "ExhaustedCallback", "ExhaustedEvent", "PoolListener"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExhaustedEvent:
    """A checkout gave up waiting for a connection: enough detail for an operator alert.

    :param pool: the pool's name.
    :param address: ``"host:port"`` of the instance the checkout waited on.
    :param timeout: how long the checkout waited, in seconds.
    :param max_size: the per-instance connection cap.
    :param in_use: connections of that instance checked out when it gave up.
    :param idle: idle connections of that instance (normally 0).
    :param opening: connections of that instance being opened.
    :param waiting: other checkouts still waiting on that instance.
    """

    pool: str
    address: str
    timeout: float
    max_size: int
    in_use: int
    idle: int
    opening: int
    waiting: int


ExhaustedCallback = Callable[[ExhaustedEvent], None]


class PoolListener:
    """Receives pool events; subclass it and override what you need.

    Pass listeners as ``ThriftPool(..., listeners=[...])``.  Every method gets the pool's
    name first.  They are called without any pool lock held, on the thread where the event
    happened (a caller's, the watchdog's, or discovery's), so they should be quick; an
    exception raised by a listener is logged and ignored, never breaking the pool.

    Close reasons: ``"idle"`` (reaped above min_size), ``"expired"`` (max_lifetime),
    ``"error"`` (a call failed mid-stream), ``"peer_closed"`` (found dead at checkout),
    ``"heartbeat"`` (a heartbeat failed), ``"removed"`` (discovery dropped the instance),
    ``"subset"`` (the instance left the pool's subset), ``"abandoned"`` (its checkout was
    dropped without leaving its ``with`` block), ``"interrupted"`` (a checkout was cut short),
    ``"pool_closed"``.
    """

    def attach_pool(self, pool: Any) -> None:
        """Called once by each :class:`~thriftpool.ThriftPool` the listener is given to,
        with the pool object itself (e.g. to read ``pool.stats()`` later)."""

    def connection_opened(self, pool: str, address: str) -> None:
        """A new connection to ``address`` is open."""

    def connection_closed(self, pool: str, address: str, reason: str) -> None:
        """A connection to ``address`` was closed, for ``reason``."""

    def checkout(self, pool: str, address: str, waited: float) -> None:
        """A checkout got a connection to ``address`` after ``waited`` seconds."""

    def exhausted(self, pool: str, event: ExhaustedEvent) -> None:
        """A checkout timed out waiting (as ``on_exhausted``)."""

    def instance_added(self, pool: str, address: str) -> None:
        """Discovery reported a new instance."""

    def instance_removed(self, pool: str, address: str) -> None:
        """Discovery dropped an instance."""

    def instance_ejected(self, pool: str, address: str, reason: str, retry_in: float) -> None:
        """An instance was marked unhealthy; the next attempt is in ``retry_in`` seconds."""

    def instance_restored(self, pool: str, address: str) -> None:
        """An ejected instance takes traffic again."""


class Emitter:
    """Calls every listener's method for one event, isolating their failures."""

    __slots__ = ("_pool", "_listeners")

    def __init__(self, pool: str, listeners: Sequence[object] = ()) -> None:
        self._pool = pool
        self._listeners = tuple(listeners)

    def __bool__(self) -> bool:
        return bool(self._listeners)

    def emit(self, method: str, *args: Any) -> None:
        for listener in self._listeners:
            func = getattr(listener, method, None)
            if func is None:
                continue
            try:
                func(self._pool, *args)
            except Exception:
                logger.exception("pool %r: listener %r failed on %s", self._pool, listener,
                                 method)
