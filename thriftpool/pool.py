"""ThriftPool: pooled thriftpy2 clients over a fleet of instances."""

from __future__ import annotations

import logging
import os
import ssl
import weakref
from types import ModuleType, TracebackType
from typing import Any, Dict, Iterable, List, Mapping, Optional, Set, Tuple, Type, Union

from thriftpy2.thrift import TApplicationException

from . import _compat
from .address import Address, AddressLike, Endpoint
from .balancer import Balancer, make_balancer
from .config import DEFAULT_MAX_MESSAGE_SIZE, UNSET, PoolConfig, _check_seconds
from .connection import Connection, PooledClient, client_class, is_connect_error, should_discard
from .discovery.base import Discovery
from .discovery.static import StaticDiscovery
from .errors import NoAvailableInstance, PoolClosed, PoolExhausted
from .events import Emitter, ExhaustedCallback, ExhaustedEvent, PoolListener
from .instance import InstancePool, Reroute
from .backoff import RetryBudget
from .watchdog import Watchdog

__all__ = ["Checkout", "ThriftPool"]

logger = logging.getLogger(__name__)

#: Without min_size, an unhealthy instance is probed in the background only if the pool
#: served a checkout this recently (no reconnects while nothing needs the instance).
_DEMAND_WINDOW = 60.0

_LISTENER_METHODS = [m for m in vars(PoolListener) if not m.startswith("_")]

#: Every open pool of this process, for the fork handler.
_POOLS: "weakref.WeakSet[ThriftPool]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for pool in list(_POOLS):
        try:
            pool._after_fork()
        except Exception:  # pragma: no cover - never let a pool break fork()
            logger.exception("pool %r: after-fork reset failed", pool.name)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class ThriftPool:
    """A thread-safe pool of thriftpy2 clients over every instance that discovery reports.

    Each instance gets its own pool of at most ``max_size`` sockets.  A checkout picks a
    healthy instance (round robin), hands out its most recently used idle socket after a
    non-blocking liveness check, opens a new one while below ``max_size``, or waits up to
    ``checkout_timeout`` for one to be checked in.  A named daemon watchdog thread reaps idle
    sockets above ``min_size``, recycles sockets past ``max_lifetime``, refills instances to
    ``min_size`` and probes failing instances with exponential backoff and jitter.

    :param service: the thriftpy2 service, e.g. ``thriftpy2.load("echo.thrift").Echo``.
    :param discovery: a :class:`~thriftpool.Discovery` (``StaticDiscovery``,
        ``ZooKeeperDiscovery``), or a list of ``"host:port"`` strings or ``(host, port)``
        pairs, which is wrapped in a ``StaticDiscovery``.
    :param name: names the pool in logs, errors and thread names (default: the service name).
    :param min_size: connections per instance kept open even when idle.
    :param initial_size: connections opened, in the background, when an instance is first
        seen (default: ``min_size``); 0 connects lazily.
    :param max_size: cap per instance on idle + in use + being opened connections.
    :param checkout_timeout: seconds a checkout waits for a free connection before
        :class:`PoolExhausted` (0: do not wait).
    :param idle_timeout: seconds after which an idle connection above ``min_size`` is
        closed; ``None`` never.
    :param max_lifetime: seconds after which a connection is closed and replaced (idle ones
        by the watchdog, in-use ones at checkin), so load spreads to new instances;
        ``None`` never.
    :param lifetime_jitter: each connection's lifetime is shortened by a random fraction
        up to this much, so connections opened together do not expire together.
    :param connect_timeout: seconds to wait for a TCP connect.
    :param socket_timeout: seconds a whole call may take, from its first request byte to
        the last byte of its reply, however the server spaces its bytes; ``None`` waits
        forever.  Inside a :func:`thriftpool.deadline` block a call takes the smaller of
        this and the time left.
    :param method_timeouts: ``{"method": seconds}``: the call timeout of the methods named
        (``None``: no timeout), instead of ``socket_timeout``.
    :param max_message_size: largest reply, in bytes, a call will read (default 64 MiB);
        frame, string and container lengths above it are refused before anything is
        allocated for them; ``None`` lifts the limit.
    :param transport: ``"buffered"`` or ``"framed"``, or a thriftpy2 transport factory.
    :param protocol: ``"binary"`` or ``"compact"``, or a thriftpy2 protocol factory.
    :param on_exhausted: called with an :class:`ExhaustedEvent` each time a checkout times
        out, before :class:`PoolExhausted` is raised; its errors are logged and ignored.
    :param watchdog_interval: seconds between watchdog passes.
    :param backoff_initial: seconds before the first reconnect attempt to a failing instance.
    :param backoff_multiplier: growth of the reconnect delay per consecutive failure.
    :param backoff_max: cap on the reconnect delay, in seconds.
    :param backoff_jitter: reconnect delays are multiplied by a random factor in
        ``[1 - jitter, 1 + jitter]``.
    :param balancer: ``"least_loaded"`` (power of two choices on connections in use),
        ``"round_robin"``, ``"random"``, or a :class:`Balancer` instance.
    :param failure_threshold: consecutive calls failing with transport errors that eject
        an instance (a failed connect ejects at once).
    :param heartbeat: name of a no-argument IDL method the watchdog calls on connections
        idle for ``heartbeat_interval``; a failure, or no answer within
        ``connect_timeout`` (or ``socket_timeout`` if smaller), discards the connection.
    :param heartbeat_interval: seconds of idleness before a heartbeat.
    :param retries: retries of a ``pool.client()`` call on other instances.
    :param idempotent: method names (or ``True``: all) that ``pool.client()`` may retry
        after a transport error or timeout, not only when the request was not sent.
    :param retry_budget: retries allowed as a fraction of recent calls (plus 10 a second).
    :param listeners: :class:`PoolListener` objects told of connection and instance events.
    :param ssl_context: an ``ssl.SSLContext``: connect over TLS, verifying as the context
        says (``ssl.create_default_context(cafile=...)`` verifies; load a client certificate
        into it for mutual TLS).  Building the pool never raises for a bad server
        certificate; the checkout does, and the instance is ejected.
    :param server_hostname: the name to verify the servers' certificates against
        (default: each instance's host).
    :raises ValueError: naming the option, when an option or an address is invalid.
    """

    def __init__(
        self,
        service: ModuleType,
        discovery: Union[Discovery, Iterable[AddressLike], str, None] = None,
        *,
        name: Optional[str] = None,
        min_size: int = 1,
        initial_size: int = UNSET,
        max_size: int = 8,
        checkout_timeout: float = 1.0,
        idle_timeout: Optional[float] = 60.0,
        max_lifetime: Optional[float] = 600.0,
        lifetime_jitter: float = 0.1,
        connect_timeout: float = 1.0,
        socket_timeout: Optional[float] = 5.0,
        transport: Any = "buffered",
        protocol: Any = "binary",
        on_exhausted: Optional[ExhaustedCallback] = None,
        watchdog_interval: float = 1.0,
        backoff_initial: float = 1.0,
        backoff_multiplier: float = 1.6,
        backoff_max: float = 120.0,
        backoff_jitter: float = 0.2,
        balancer: Union[str, Balancer] = "least_loaded",
        failure_threshold: int = 3,
        heartbeat: Optional[str] = None,
        heartbeat_interval: float = 30.0,
        retries: int = 2,
        idempotent: Union[Iterable[str], bool] = (),
        retry_budget: float = 0.2,
        listeners: Iterable[PoolListener] = (),
        ssl_context: Optional[ssl.SSLContext] = None,
        server_hostname: Optional[str] = None,
        method_timeouts: Optional[Mapping[str, Optional[float]]] = None,
        max_message_size: Optional[int] = DEFAULT_MAX_MESSAGE_SIZE,
    ) -> None:
        self._closed = True  # until fully built, so __del__ and close() are safe
        if not isinstance(service, type) and not isinstance(service, ModuleType) \
                or not hasattr(service, "thrift_services"):
            raise ValueError(f"service must be a thriftpy2 service, got {service!r}")
        if name is None:
            name = getattr(service, "__name__", "thrift")
        self.config = PoolConfig.build(
            service=service, name=name, min_size=min_size, initial_size=initial_size,
            max_size=max_size,
            checkout_timeout=checkout_timeout, idle_timeout=idle_timeout,
            max_lifetime=max_lifetime, lifetime_jitter=lifetime_jitter,
            connect_timeout=connect_timeout, socket_timeout=socket_timeout,
            transport=transport, protocol=protocol, on_exhausted=on_exhausted,
            watchdog_interval=watchdog_interval, backoff_initial=backoff_initial,
            backoff_multiplier=backoff_multiplier, backoff_max=backoff_max,
            backoff_jitter=backoff_jitter, failure_threshold=failure_threshold,
            heartbeat=heartbeat, heartbeat_interval=heartbeat_interval, retries=retries,
            idempotent=idempotent, retry_budget=retry_budget, ssl_context=ssl_context,
            server_hostname=server_hostname, method_timeouts=method_timeouts,
            max_message_size=max_message_size)
        if discovery is None:
            raise ValueError("discovery must be a Discovery or a list of addresses")
        if not isinstance(discovery, Discovery):
            discovery = StaticDiscovery(discovery)  # type: ignore[arg-type]
        balancer = make_balancer(balancer)
        self.service = service
        self._client_class = client_class(service)
        self.name = name
        self._balancer = balancer
        self._retry_budget = RetryBudget(self.config.retry_budget)
        if isinstance(listeners, (str, bytes)) or not isinstance(listeners, Iterable):
            raise ValueError(f"listeners must be a list of PoolListener, got {listeners!r}")
        listeners = tuple(listeners)
        for listener in listeners:
            if not any(callable(getattr(listener, m, None)) for m in _LISTENER_METHODS):
                raise ValueError(f"listeners: {listener!r} has no PoolListener method")
        self._events = Emitter(name, listeners)
        for listener in listeners:
            attach = getattr(listener, "attach_pool", None)
            if callable(attach):
                attach(self)
        self._discovery = discovery
        # The pool lock guards only the instance map, the ring and the close list; each
        # instance guards its own connections.  Built here, while single-threaded.
        self._lock = _compat.Lock()
        self._instances: Dict[Address, InstancePool] = {}
        self._ring: Tuple[InstancePool, ...] = ()
        # idle sockets of removed instances, closed by the watchdog
        self._to_close: List[Tuple[InstancePool, List[Connection]]] = []
        self._last_checkout = 0.0
        self._forked = False
        self._watchdog = Watchdog(self, self.config.watchdog_interval,
                                  f"thriftpool-{name}-watchdog")
        self._closed = False
        _POOLS.add(self)
        try:
            discovery.start(self._on_discovery, name)
            self._watchdog.start()
            self._watchdog.wake()
        except BaseException:
            self.close()
            raise

    # -- discovery ---------------------------------------------------------------------

    def _on_discovery(self, endpoints: List[Endpoint]) -> None:
        """Apply a discovery snapshot as a diff; never blocks (called from discovery threads).

        Unchanged instances keep their connections.  Removed ones stop taking checkouts
        at once; the watchdog closes their idle sockets right after, in-use ones close at
        checkin.  Added ones take checkouts at once and get ``initial_size`` connections
        from the watchdog.
        """
        wanted: Dict[Address, Endpoint] = {}
        for endpoint in endpoints:
            if not isinstance(endpoint, Endpoint):
                logger.warning("pool %r: discovery sent %r, not an Endpoint; skipped",
                               self.name, endpoint)
                continue
            wanted.setdefault(endpoint.address, endpoint)
        added: List[str] = []
        removed: List[InstancePool] = []
        with self._lock:
            if self._closed:
                return
            instances = dict(self._instances)
            for address in list(instances):
                if address not in wanted:
                    removed.append(instances.pop(address))
            for address, endpoint in wanted.items():
                inst = instances.get(address)
                if inst is None:
                    instances[address] = InstancePool(endpoint, self.config, self.name,
                                                      self._events)
                    added.append(str(address))
                else:
                    inst.weight = endpoint.weight
                    inst.tls = endpoint.tls
            self._instances = instances
            self._ring = tuple(instances[a] for a in wanted)
        closing = []
        for inst in removed:
            # No socket I/O here: the watchdog, woken below, closes the idle sockets.
            idle = inst.close(Reroute(inst.key))
            if idle:
                closing.append((inst, idle))
        if closing:
            with self._lock:
                self._to_close.extend(closing)
        if added or removed:
            logger.info("pool %r: instances added %s, removed %s; now %d",
                        self.name, added or "none", [i.key for i in removed] or "none",
                        len(wanted))
            self._watchdog.wake()
            if self._events:
                for key in added:
                    self._events.emit("instance_added", key)
                for inst in removed:
                    self._events.emit("instance_removed", inst.key)

    # -- checkout ----------------------------------------------------------------------

    def checkout(self, timeout: Optional[float] = None) -> "Checkout":
        """Borrow a client for a ``with`` block::

            with pool.checkout() as client:
                client.echo("hi")

        The connection is taken on entering the block and returned on leaving it.  A
        transport, protocol or socket error, a timeout, or any exception that interrupts
        a call (``gevent.Timeout``, ``KeyboardInterrupt``) closes the socket instead of
        returning it; IDL-declared exceptions leave it pooled.  The client refuses calls
        after the block.

        :param timeout: seconds to wait for a free connection (default ``checkout_timeout``).
        :raises PoolExhausted: no connection became free in time (``on_exhausted`` was called).
        :raises NoAvailableInstance: no instance is known, or all are failing.
        :raises PoolClosed: the pool is closed.
        """
        return Checkout(self, timeout)

    def _acquire(self, timeout: Optional[float], exclude: Optional[Set[InstancePool]] = None
                 ) -> Tuple[InstancePool, Connection]:
        if self._closed:
            raise PoolClosed(f"pool {self.name!r} is closed")
        if self._forked:
            self._restart_after_fork()
        if timeout is None:
            wait = self.config.checkout_timeout
        else:
            checked = _check_seconds("timeout", timeout, allow_none=False, allow_zero=True)
            assert checked is not None
            wait = checked
        now = _compat.monotonic()
        self._last_checkout = now
        picked: Optional[InstancePool] = None
        if not exclude:
            # Fast path, most checkouts: the picked instance's most recently used idle
            # connection, alive and not expired.  Otherwise the loop below starts from
            # the same pick, so the balancer sees one pick per checkout either way.
            picked = self._balancer.pick(self._ring)
            if picked is not None:
                conn = picked.take_idle()
                if conn is not None:
                    if self._events:
                        self._events.emit("checkout", picked.key, _compat.monotonic() - now)
                    return picked, conn
        deadline = now + wait
        last_error: Optional[BaseException] = None
        for _ in range(2 * len(self._ring) + 4):
            ring = self._ring
            inst = picked if picked is not None else self._balancer.pick(ring)
            picked = None
            probe = False
            if inst is None:
                inst = self._panic_pick(ring, last_error)
                probe = True
            elif exclude and inst in exclude:
                # A retry: another instance than the ones that already failed this call.
                inst = next((i for i in ring if i.healthy and i not in exclude
                             and i.has_capacity()), None) or next(
                    (i for i in ring if i.healthy and i not in exclude), inst)
            elif not inst.has_capacity():
                # Prefer another healthy instance that can serve now over waiting.
                inst = next((i for i in ring if i.healthy and i.has_capacity()), inst)
            try:
                conn = inst.acquire(deadline, probe, wait)
                if self._events:
                    self._events.emit("checkout", inst.key, _compat.monotonic() - now)
                return inst, conn
            except Reroute:
                continue
            except PoolExhausted as exc:
                self._fire_exhausted(getattr(exc, "event", None))
                raise
            except Exception as exc:
                if not is_connect_error(exc):
                    raise
                last_error = exc  # the request never left: try another instance
        raise NoAvailableInstance(
            f"pool {self.name!r}: no instance could serve the checkout") from last_error

    def _panic_pick(self, ring: Tuple[InstancePool, ...],
                    last_error: Optional[BaseException]) -> InstancePool:
        """Every instance is unhealthy: probe the one whose backoff ends first, if it has."""
        if self._closed:
            raise PoolClosed(f"pool {self.name!r} is closed")
        if not ring:
            raise NoAvailableInstance(f"pool {self.name!r}: discovery reports no instances")
        now = _compat.monotonic()
        # Panic mode: rather than fail without a try, probe the instance that failed
        # longest ago (one probe at a time per instance, at most one per backoff_initial).
        for inst in sorted(ring, key=lambda i: i.last_failure_at):
            if inst.try_probe(now, panic=True):
                return inst
        soonest = min(ring, key=lambda i: i.next_attempt_at)
        cause = last_error or soonest.last_error
        raise NoAvailableInstance(
            f"pool {self.name!r}: all {len(ring)} instances are failing; next attempt to "
            f"{soonest.key} in {max(0.0, soonest.next_attempt_at - now):.2f}s "
            f"(last error: {cause})") from cause

    def _fire_exhausted(self, event: Optional[ExhaustedEvent]) -> None:
        if event is None:
            return
        if self._events:
            self._events.emit("exhausted", event)
        callback = self.config.on_exhausted
        if callback is None:
            return
        try:
            callback(event)
        except Exception:
            logger.exception("pool %r: on_exhausted callback failed", self.name)

    def client(self) -> Any:
        """A thread-safe proxy with the service's methods; each call checks out, calls and
        checks in (see :class:`~thriftpool.proxy.ClientProxy`)."""
        from .proxy import ClientProxy

        return ClientProxy(self)

    # -- watchdog ----------------------------------------------------------------------

    def _maintain(self) -> None:
        """One watchdog pass; runs on the watchdog thread only."""
        with self._lock:
            if self._closed:
                return
            to_close, self._to_close = self._to_close, []
            instances = list(self._instances.values())
        for inst, conns in to_close:
            inst._close_all(conns, "removed")
        now = _compat.monotonic()
        demand = now - self._last_checkout < _DEMAND_WINDOW
        for inst in instances:
            if self._closed:
                return
            inst.maintain(now, demand)

    # -- fork --------------------------------------------------------------------------

    def _after_fork(self) -> None:
        """In a forked child (called by ``os.register_at_fork``): drop what was inherited.

        Only the forking thread survives a fork, so the watchdog and discovery threads are
        gone and any lock may be stuck; inherited sockets are shared with the parent and
        must never carry a byte from the child.  Fresh locks, sockets released without a
        ``shutdown()`` (the parent's connections stay up), and a restart on first use.
        """
        if self._closed:
            return
        self._lock = _compat.Lock()
        for inst in self._instances.values():
            inst.detach_all()
        for _, conns in self._to_close:
            for conn in conns:
                conn.detach()
        self._to_close = []
        self._watchdog.after_fork()
        try:
            self._discovery.after_fork()
        except Exception:
            logger.exception("pool %r: discovery after-fork reset failed", self.name)
        self._forked = True

    def _restart_after_fork(self) -> None:
        with self._lock:
            if not self._forked:
                return
            self._forked = False
        logger.info("pool %r: restarting in forked child %d", self.name, os.getpid())
        self._discovery.start(self._on_discovery, self.name)
        self._watchdog.start()
        self._watchdog.wake()

    # -- inspection and lifecycle ------------------------------------------------------

    def wait(self, timeout: float = 10.0) -> None:
        """Block until discovery has reported at least one instance and the watchdog has
        opened the ``initial_size`` connections of every known instance (or failed to).

        Optional: checkouts work without it (they connect on demand).  Useful at start-up
        with ZooKeeper discovery, whose first list arrives asynchronously.

        :raises NoAvailableInstance: no instance was reported within ``timeout`` seconds.
        :raises PoolClosed: the pool is closed.
        """
        deadline = _compat.monotonic() + timeout
        while True:
            if self._closed:
                raise PoolClosed(f"pool {self.name!r} is closed")
            ring = self._ring
            if ring and all(inst.first_fill_done for inst in ring):
                return
            if _compat.monotonic() >= deadline:
                if ring:
                    return  # instances are known; their connections are still opening
                raise NoAvailableInstance(
                    f"pool {self.name!r}: discovery reported no instance within {timeout:g}s")
            self._watchdog.wake()
            _compat.sleep(0.01)

    def stats(self) -> Dict[str, Any]:
        """A snapshot of the pool's counts::

            {"name", "size", "idle", "in_use", "opening", "waiting", "closed",
             "instances": {"host:port": {"size", "idle", "in_use", "opening", "waiting",
                                         "healthy", "weight", "failures", "opened",
                                         "closed"}}}
        """
        with self._lock:
            instances = list(self._instances.values())
        per = {inst.key: inst.stats() for inst in instances}
        totals = {k: sum(s[k] for s in per.values())
                  for k in ("size", "idle", "in_use", "opening", "waiting")}
        return {"name": self.name, **totals, "closed": self._closed, "instances": per}

    @property
    def closed(self) -> bool:
        """``close()`` was called."""
        return self._closed

    def close(self, timeout: float = 5.0) -> None:
        """Close the pool: idempotent, and safe to call from any thread.

        Stops discovery and the watchdog (joined, up to ``timeout``), closes every idle
        socket, fails waiting checkouts with :class:`PoolClosed`; sockets still checked out
        are closed when their ``with`` block ends.  Later checkouts raise ``PoolClosed``.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            _POOLS.discard(self)
            instances = list(self._instances.values())
            to_close, self._to_close = self._to_close, []
            self._instances = {}
            self._ring = ()
        try:
            self._discovery.stop()
        except Exception:
            logger.exception("pool %r: stopping discovery failed", self.name)
        self._watchdog.stop(timeout)
        for inst in instances:
            inst.shutdown()
        for inst, conns in to_close:
            inst._close_all(conns, "removed")
        logger.debug("pool %r closed", self.name)

    def __enter__(self) -> "ThriftPool":
        return self

    def __exit__(self, exc_type: Optional[Type[BaseException]],
                 exc: Optional[BaseException], tb: Optional[TracebackType]) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_closed", True):
            return
        try:
            self.close(timeout=0)
        except Exception:  # pragma: no cover - interpreter shutdown
            pass

    def __repr__(self) -> str:
        s = self.stats()
        state = "closed" if s["closed"] else f"{len(s['instances'])} instances"
        return (f"<ThriftPool {self.name!r} {state} size={s['size']} idle={s['idle']} "
                f"in_use={s['in_use']} waiting={s['waiting']}>")


class Checkout:
    """The context manager that :meth:`ThriftPool.checkout` returns (one use only)."""

    __slots__ = ("_pool", "_timeout", "_exclude", "_inst", "_conn", "_client", "sent")

    def __init__(self, pool: ThriftPool, timeout: Optional[float],
                 exclude: Optional[Set[InstancePool]] = None) -> None:
        self._pool = pool
        self._timeout = timeout
        self._exclude = exclude
        self._inst: Optional[InstancePool] = None
        self._conn: Optional[Connection] = None
        self.sent = True

    def __enter__(self) -> PooledClient:
        if self._conn is not None:
            raise RuntimeError("a checkout can be entered only once")
        pool = self._pool
        self._inst, conn = pool._acquire(self._timeout, self._exclude)
        self._conn = conn
        self._client = client = pool._client_class(pool.service, conn)
        return client

    def __exit__(self, exc_type: Optional[Type[BaseException]],
                 exc: Optional[BaseException], tb: Optional[TracebackType]) -> None:
        conn = self._conn
        if conn is None:
            return
        self._client._conn = None
        self.sent = conn.sent
        # in_call: an exception (any, even KeyboardInterrupt) cut a call short, so the
        # stream holds half a request or an unread reply.  With no call in flight the
        # stream is intact: an error from the caller's own code (or from another pool's
        # client used inside this block) says nothing about this connection or instance;
        # only a server's complete TApplicationException answer may still condemn it.
        in_call = conn.in_call
        failed = exc is not None and should_discard(exc) and (
            in_call or isinstance(exc, TApplicationException))
        discard = failed or in_call
        assert self._inst is not None
        self._inst.release(conn, discard, exc if failed and isinstance(exc, Exception) else False)
