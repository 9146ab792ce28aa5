"""Events that the pool reports to user callbacks, and the callbacks' types."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

__all__ = ["Emitter", "ExhaustedCallback", "ExhaustedEvent", "Holder", "PoolListener"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Holder:
    """One checkout that holds a connection (recorded only with ``leak_timeout`` set).

    :param address: ``"host:port"`` of the connection's instance.
    :param age: seconds since the checkout got the connection.
    :param thread: the name of the thread that checked it out.
    :param stack: the stack of that checkout, formatted as by ``traceback.format_list``
        (the pool's own frames left out).
    """

    address: str
    age: float
    thread: str
    stack: str


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
    :param holders: with ``leak_timeout`` set, the oldest checkouts holding connections of
        that instance (at most five, oldest first), so an alert says who holds the pool;
        empty otherwise.
    """

    pool: str
    address: str
    timeout: float
    max_size: int
    in_use: int
    idle: int
    opening: int
    waiting: int
    holders: Tuple[Holder, ...] = ()


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
    ``"drained"`` (replaced by :meth:`~thriftpool.ThriftPool.drain`), ``"resized"`` (above
    the cap after :meth:`~thriftpool.ThriftPool.resize`), ``"pool_closed"``.

    ``call_started`` and ``call_finished`` run around every call made through a checked-out
    client or the proxy.  A pool whose listeners do not override them makes no per-call
    work at all for events.
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

    def connection_leaked(self, pool: str, holder: Holder) -> None:
        """A checkout has held its connection longer than ``leak_timeout`` (reported once
        per checkout; the connection is left to its holder)."""

    def call_started(self, pool: str, address: str, method: str,
                     headers: Dict[str, str]) -> None:
        """A call of ``method`` to ``address`` starts.  Entries added to ``headers`` are
        sent with the request as THeader headers when the pool uses ``protocol="header"``
        (the Apache stack); otherwise they are dropped."""

    def call_finished(self, pool: str, address: str, method: str, duration: float,
                      error: Optional[BaseException], sent: bool) -> None:
        """A call of ``method`` to ``address`` ended after ``duration`` seconds: ``error``
        is what it raised (``None`` on success); ``sent`` tells whether the request was
        written in full."""


#: The per-call events: a listener that overrides neither costs calls nothing.
CALL_EVENTS = ("call_started", "call_finished")


def overrides(listener: object, method: str) -> bool:
    """``listener`` has its own ``method`` (not :class:`PoolListener`'s no-op)."""
    func = getattr(type(listener), method, None)
    if func is None:
        return callable(getattr(listener, method, None))
    return func is not getattr(PoolListener, method, None)


class Emitter:
    """Calls every listener's method for one event, isolating their failures."""

    __slots__ = ("_pool", "_listeners")

    def __init__(self, pool: str, listeners: Sequence[object] = ()) -> None:
        self._pool = pool
        self._listeners = tuple(listeners)

    def __bool__(self) -> bool:
        return bool(self._listeners)

    def only(self, methods: Sequence[str]) -> "Emitter":
        """An emitter over the listeners that override one of ``methods``."""
        picked = [li for li in self._listeners if any(overrides(li, m) for m in methods)]
        return Emitter(self._pool, picked)

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
