"""ThriftPool: pooled thriftpy2 clients over a fleet of instances.

The pool wires the parts together: :class:`~thriftpool.state.PoolState` (every
transition, under one lock), :class:`~thriftpool.checkout.Router` (the routing loop and
its deadline), :mod:`~thriftpool.maintenance` run by the :class:`~thriftpool.watchdog.
Watchdog` thread, and a :class:`~thriftpool.Discovery` that it listens to weakly, so
that a pool the program drops is collected (its threads stop and its sockets close, with
a ``ResourceWarning``).
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
import warnings
import weakref
from types import ModuleType, TracebackType  # noqa: F401
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Type, Union

from . import _compat
from .address import AddressLike, Endpoint
from .balancer import Balancer, make_balancer
from .checkout import Checkout, Router
from .config import DEFAULT_MAX_MESSAGE_SIZE, UNSET, PoolConfig, _check_seconds
from .connection import Connection
from .discovery.base import Discovery
from .discovery.static import StaticDiscovery
from .errors import NoAvailableInstance, PoolClosed
from .events import Emitter, ExhaustedCallback, PoolListener
from .maintenance import Plan, check_idle, close_all, plan, run
from .retry import RetryBudget, RetryPolicy
from .service import describe_service
from .state import Closing, PoolState, format_holder
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


class _WeakListener:
    """The listener a discovery holds: a weak reference to the pool, so discovery's
    threads never keep an abandoned pool alive.  It survives any exception of the pool's
    handler (logged once), so a discovery thread never dies of one."""

    __slots__ = ("_ref", "_name", "_failed")

    def __init__(self, pool: "ThriftPool") -> None:
        self._ref = weakref.ref(pool)
        self._name = pool.name
        self._failed = False

    def __call__(self, endpoints: List[Endpoint]) -> None:
        pool = self._ref()
        if pool is None:
            return
        try:
            pool._on_discovery(endpoints)
        except BaseException as exc:  # noqa: B036 - discovery threads must outlive it
            if type(exc).__name__ == "GreenletExit":
                raise
            if not self._failed:
                self._failed = True
                logger.error("pool %r: applying a discovery list failed", self._name,
                             exc_info=exc)
            else:
                logger.debug("pool %r: applying a discovery list failed again: %s",
                             self._name, exc)


class ThriftPool:
    """A thread-safe pool of thriftpy2 clients over every instance that discovery reports.

    Each instance gets its own slots: at most ``max_size`` sockets.  A checkout picks a
    healthy instance with the balancer, hands out its most recently used idle socket after
    a non-blocking liveness check, opens a new one while below ``max_size``, or waits, first
    come first served, for whichever healthy instance frees a connection first, all within
    one deadline (``checkout_timeout``).  A named daemon watchdog thread reaps idle sockets
    above ``min_size``, recycles sockets past ``max_lifetime``, refills instances to
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
    :param checkout_timeout: seconds a whole checkout may take: waiting, connecting (each
        connect gets ``min(connect_timeout, time left)``), failing over and probing; then
        :class:`PoolExhausted` (instances full) or :class:`NoAvailableInstance` (0: do not
        wait).
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
        A heartbeat keeps the connection's idle time (reaping goes on) and is not a call
        success for the instance's health.
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
    :param subset_size: keep connections to at most this many healthy instances, chosen
        by rendezvous hashing (:mod:`thriftpool.subset`): one instance joining or leaving
        changes at most one member, an ejected member is replaced by the next in rank while
        it is out; ``None`` uses every instance.
    :param subset_key: a salt for a stable choice across restarts (default: random per
        process); needs ``subset_size``.
    :param max_waiting: at most this many checkouts wait at once across the pool; one more
        fails at once with :class:`TooManyWaiters` (a :class:`PoolExhausted`) instead of
        queueing; 0: no limit.
    :param leak_timeout: seconds after which a checkout still holding its connection is
        reported once (a WARNING with the stack that checked it out, and the listeners'
        ``connection_leaked``); the connection is never taken from its holder.  With it set
        each checkout records its stack, and :class:`ExhaustedEvent` lists the oldest
        holders; ``None`` (the default) records nothing.
    :param max_ejection_percent: at most this share of the instances may be ejected for
        failing calls at once (at least one always may), as Envoy's outlier detection
        caps it; past the cap, an instance stays in rotation.  Failed connects (nothing
        listening) are not capped.
    :param failure_classifier: ``callable(exception) -> bool``: whether a call's exception
        counts against its instance (towards ``failure_threshold``).  By default only
        transport and protocol failures do; e.g. return True for a
        ``TApplicationException`` INTERNAL_ERROR to eject a bad deploy.  It decides
        ejection only: whether the connection is reused still depends on the stream.
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
        subset_size: Optional[int] = None,
        subset_key: Union[str, bytes, None] = None,
        max_waiting: int = 0,
        leak_timeout: Optional[float] = None,
        max_ejection_percent: int = 50,
        failure_classifier: Optional[Callable[[BaseException], bool]] = None,
        method_timeouts: Optional[Mapping[str, Optional[float]]] = None,
        max_message_size: Optional[int] = DEFAULT_MAX_MESSAGE_SIZE,
    ) -> None:
        self._closed = True  # until fully built, so __del__ and close() are safe
        spec = describe_service(service)  # one stack per pool; ValueError for others
        if spec is None:
            raise ValueError("service must be a thriftpy2 service or a module generated "
                             "by thrift --gen py, got None")
        if name is None:
            name = spec.name
        self.config = config = PoolConfig.build(
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
            server_hostname=server_hostname, subset_size=subset_size, subset_key=subset_key,
            max_waiting=max_waiting, leak_timeout=leak_timeout,
            max_ejection_percent=max_ejection_percent, failure_classifier=failure_classifier,
            method_timeouts=method_timeouts, max_message_size=max_message_size)
        if discovery is None:
            raise ValueError("discovery must be a Discovery or a list of addresses")
        if not isinstance(discovery, Discovery):
            discovery = StaticDiscovery(discovery)  # type: ignore[arg-type]
        self.service = service
        self.name = name
        if isinstance(listeners, (str, bytes)) or not isinstance(listeners, Iterable):
            raise ValueError(f"listeners must be a list of PoolListener, got {listeners!r}")
        listeners = tuple(listeners)
        for listener in listeners:
            if not any(callable(getattr(listener, m, None)) for m in _LISTENER_METHODS):
                raise ValueError(f"listeners: {listener!r} has no PoolListener method")
        self._events = Emitter(name, listeners)
        self._state = PoolState(config, name)
        self._spec = spec
        self._router = Router(config, self._state, make_balancer(balancer), self._events,
                              spec, self._restart)
        self.retry_policy = RetryPolicy(config.retries, config.idempotent,
                                        RetryBudget(config.retry_budget))
        self._discovery = discovery
        # Idle sockets of removed instances: discovery's thread must not block on closing
        # them, so the watchdog does (they stay counted in ``closing`` until then).
        self._to_close: List[Closing] = []
        self._to_close_lock = _compat.Lock()
        self._watchdog = Watchdog(self, config.watchdog_interval,
                                  f"thriftpool-{name}-watchdog")
        self._router.wake = self._watchdog.wake
        self._restart_lock = _compat.Lock()
        for listener in listeners:
            attach = getattr(listener, "attach_pool", None)
            if callable(attach):
                attach(self)
        self._closed = False
        _POOLS.add(self)
        try:
            discovery.start(_WeakListener(self), name)
            self._watchdog.start()
            self._watchdog.wake()
        except BaseException:
            self.close(timeout=0)
            raise

    # -- discovery ---------------------------------------------------------------------

    def _on_discovery(self, endpoints: List[Endpoint]) -> None:
        """Apply a discovery snapshot as a diff; never blocks (called from discovery threads).

        Unchanged instances keep their connections.  Removed ones stop taking checkouts
        at once; the watchdog closes their idle sockets right after, in-use ones close at
        checkin.  Added ones take checkouts (and serve waiters) at once and get
        ``initial_size`` connections from the watchdog.
        """
        valid: List[Endpoint] = []
        for endpoint in endpoints:
            if isinstance(endpoint, Endpoint):
                valid.append(endpoint)
            else:
                logger.warning("pool %r: discovery sent %r, not an Endpoint; skipped",
                               self.name, endpoint)
        added, removed, closing = self._state.apply(valid)
        if closing:
            with self._to_close_lock:
                self._to_close.extend(closing)
        if added or removed:
            logger.info("pool %r: instances added %s, removed %s; now %d",
                        self.name, added or "none", [i.key for i in removed] or "none",
                        len(self._state.ring))
            self._watchdog.wake()
            if self._events:
                for key in added:
                    self._events.emit("instance_added", key)
                for inst in removed:
                    self._events.emit("instance_removed", inst.key)

    # -- checkout ----------------------------------------------------------------------

    def checkout(self, timeout: Optional[float] = None) -> Checkout:
        """Borrow a client for a ``with`` block::

            with pool.checkout() as client:
                client.echo("hi")

        The connection is taken on entering the block and returned on leaving it.  A
        transport, protocol or socket error, a timeout, or any exception that interrupts
        a call (``gevent.Timeout``, ``KeyboardInterrupt``) closes the socket instead of
        returning it; IDL-declared exceptions leave it pooled.  The client refuses calls
        after the block.  Entering blocks at most ``timeout`` seconds in all (waiting,
        connecting, failing over); an interruption while it blocks gives back whatever it
        held.  Right after the pool is built, a checkout waits (within the same deadline)
        for discovery's first list.

        :param timeout: seconds the whole checkout may take (default ``checkout_timeout``).
        :raises PoolExhausted: no connection became free in time (``on_exhausted`` was called).
        :raises NoAvailableInstance: no instance is known, discovery gave no list in time,
            or no instance could be connected to in time.
        :raises PoolClosed: the pool is closed.
        """
        if timeout is not None:
            timeout = _check_seconds("timeout", timeout, allow_none=False, allow_zero=True)
        return Checkout(self._router, timeout)

    def client(self) -> Any:
        """A thread-safe proxy with the service's methods; each call checks out, calls and
        checks in (see :class:`~thriftpool.proxy.ClientProxy`)."""
        from .proxy import ClientProxy

        return ClientProxy(self._router, self.retry_policy, self)

    # -- watchdog ----------------------------------------------------------------------

    def _maintain(self) -> None:
        """One watchdog pass; runs on the watchdog thread only.  One instance's failure
        is logged and does not stop the pass over the others."""
        state = self._state
        if state.closed:
            return
        router = self._router
        router.reclaim_abandoned()
        self._report_leaks()
        with state.lock:
            state.check_oversize_locked()
        with self._to_close_lock:
            to_close, self._to_close = self._to_close, []
        close_all(state, to_close, self._events)
        with state.lock:
            instances = list(state.instances.values())
        now = _compat.monotonic()
        demand = now - router.last_checkout < _DEMAND_WINDOW
        failure: Optional[BaseException] = None
        for inst in instances:
            if state.closed:
                return
            try:
                check_idle(state, inst, self._events)
                p: Plan = plan(state, inst, now, demand)
                run(state, p, self._events, self._heartbeat)
            except BaseException as exc:  # noqa: B036 - the other instances still get a pass
                if type(exc).__name__ == "GreenletExit":
                    raise
                failure = failure or exc
                logger.debug("pool %r: maintenance of %s failed: %s", self.name, inst.key, exc)
        if failure is not None:
            raise failure  # logged once by the watchdog, with its traceback

    def _report_leaks(self) -> None:
        """Log each checkout held past ``leak_timeout``, once (watchdog thread)."""
        if self.config.leak_timeout is None:
            return
        for raw in self._state.leaks(_compat.monotonic()):
            holder = format_holder(raw)
            logger.warning("pool %r: a connection to %s has been checked out for %.1fs "
                           "(leak_timeout=%gs) by thread %r, from:\n%s", self.name,
                           holder.address, holder.age, self.config.leak_timeout,
                           holder.thread, holder.stack.rstrip())
            if self._events:
                self._events.emit("connection_leaked", holder)

    def _heartbeat(self, conn: Connection) -> None:
        """Call the ``heartbeat`` method on an idle connection (watchdog thread)."""
        config = self.config
        client = self._spec.make_client(conn)
        # The pool's one watchdog thread must not wait on a hung server for socket_timeout
        # (None: forever, and close() could not stop the thread): a ping on an idle
        # connection is one round trip with no work, like a connect, so it gets at most
        # connect_timeout.
        beat_timeout = config.connect_timeout if config.socket_timeout is None \
            else min(config.socket_timeout, config.connect_timeout)
        try:
            with conn.call_timeout(beat_timeout):  # the whole call, whatever its method
                client._req(config.heartbeat)  # type: ignore[arg-type]
        finally:
            client._conn = None

    # -- fork and late gevent patching -------------------------------------------------

    def _after_fork(self) -> None:
        """In a forked child (called by ``os.register_at_fork``): drop what was inherited.

        Only the forking thread survives a fork, so the watchdog and discovery threads are
        gone and any lock may be stuck; inherited sockets are shared with the parent and
        must never carry a byte from the child.  Fresh locks, sockets released without a
        ``shutdown()`` (the parent's connections stay up), and a restart on first use.
        """
        if self._closed:
            return
        state = self._state
        state.renew_primitives()
        for conn in state.drop_everything():
            conn.detach()
        for _, conn, _ in self._to_close:
            conn.detach()
        self._to_close = []
        self._to_close_lock = _compat.Lock()
        self._restart_lock = _compat.Lock()
        self._router.abandoned.clear()
        self._watchdog.after_fork()
        try:
            self._discovery.after_fork()
        except Exception:
            logger.exception("pool %r: discovery after-fork reset failed", self.name)
        self._router.stale = True

    def _restart(self) -> None:
        """Before a checkout: restart after fork, or rebuild for gevent patched late.

        After ``gevent.monkey.patch_all()`` in a process where this pool was built first
        (gunicorn ``--preload -k gevent``), the pool's event objects, its threads and its
        sockets are the unpatched ones: a waiting greenlet would block the hub.  So the
        pool stops its threads, makes gevent's primitives, closes its idle sockets (those in
        use close at checkin) and starts greenlets instead.
        """
        router = self._router
        with self._restart_lock:
            patched_late = threading.Lock is not router.lock_type
            if not router.stale and not patched_late:
                return
            router.lock_type = threading.Lock
            forked = router.stale
            router.stale = False
            if self._closed:
                return
            if patched_late and not forked:
                logger.info("pool %r: gevent patched the process after the pool was built; "
                            "rebuilding its threads and sockets for gevent", self.name)
                if not self._watchdog.stop(timeout=2.0):
                    raise RuntimeError(
                        f"pool {self.name!r}: gevent patched this process after the pool "
                        "was built, and its watchdog thread did not stop; call "
                        "gevent.monkey.patch_all() before building pools (or before "
                        "importing thriftpool)")
                try:
                    self._discovery.stop()
                except Exception:
                    logger.exception("pool %r: stopping discovery failed", self.name)
                self._discovery.after_fork()
                state = self._state
                closing: List[Closing] = []
                with state.lock:
                    for inst in state.instances.values():
                        idle, inst.idle = inst.idle, []
                        inst.closing += len(idle)
                        closing.extend((inst, c, "expired") for c in idle)
                        for conn in inst.in_use:
                            conn.expires_at = 0.0  # closed at checkin
                state.renew_primitives()
                close_all(state, closing, self._events)
                self._watchdog.renew()
            else:
                logger.info("pool %r: restarting in forked child %d", self.name, os.getpid())
                self._state.renew_primitives()
                self._watchdog.renew()
            self._discovery.start(_WeakListener(self), self.name)
            self._watchdog.start()
            self._watchdog.wake()

    # -- inspection and lifecycle ------------------------------------------------------

    def wait(self, timeout: float = 10.0) -> None:
        """Block until discovery has reported at least one instance and the watchdog has
        opened the ``initial_size`` connections of every known instance (or failed to).

        Optional: checkouts work without it (they wait for discovery's first list and
        connect on demand).

        :raises NoAvailableInstance: no instance was reported within ``timeout`` seconds.
        :raises PoolClosed: the pool is closed.
        """
        deadline = _compat.monotonic() + timeout
        while True:
            if self._closed:
                raise PoolClosed(f"pool {self.name!r} is closed")
            ring = self._state.ring
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
        """A snapshot of the pool's counts (gauges) and cumulative counters::

            {"name", "size", "idle", "in_use", "opening", "closing", "waiting", "closed",
             "min_size", "max_size", "watchdog_alive", "discovery_alive", "subset",
             "instances": {"host:port": {"size", "idle", "in_use", "opening", "closing",
                                         "healthy", "state", "weight", "failures",
                                         "opened", "closed"}},
             # counters, since the pool started or the last pop_stats():
             "checkouts", "checkouts_waited", "wait_ms", "exhausted", "too_many_waiters",
             "connections_opened", "connect_errors", "connections_lost", "calls",
             "call_errors", "in_use_ms", "connect_ms"}

        ``watchdog_alive`` tells whether the watchdog thread runs; ``discovery_alive``
        whether discovery's own thread does (``None`` for a discovery without one).
        ``subset`` lists the instances in use, best first, with ``subset_size`` (else
        ``None``).  ``min_size``/``max_size`` are the current sizes (see :meth:`resize`).

        Counters: ``checkouts`` ended (counted when the connection is given back, with
        their ``in_use_ms``, and the ``calls`` made on their clients, ``call_errors`` of
        which raised); ``checkouts_waited`` queued for a connection, ``wait_ms`` in all;
        ``exhausted`` timed out waiting (:class:`PoolExhausted`); ``too_many_waiters`` were
        refused by ``max_waiting``; ``connections_opened``, ``connect_errors`` (failed or
        out of time) and ``connect_ms`` spent connecting; ``connections_lost``: closed
        because found broken (a failed call, a peer hang-up, a failed heartbeat).
        """
        return self._stats(reset=False)

    def pop_stats(self) -> Dict[str, Any]:
        """:meth:`stats`, and reset the counters to zero (the gauges are not counters and
        stay), so that a metrics loop can report deltas.  The Prometheus exporter reads the
        cumulative counters of :meth:`stats`: use one or the other."""
        return self._stats(reset=True)

    def _stats(self, reset: bool) -> Dict[str, Any]:
        state = self._state
        instances, per_list, waiting = state.snapshot()
        counters = state.pop_counters(reset)
        per = {inst.key: s for inst, s in zip(instances, per_list)}
        totals = {k: sum(s[k] for s in per.values())
                  for k in ("size", "idle", "in_use", "opening", "closing")}
        config = state.config
        return {"name": self.name, **totals, "waiting": waiting, "closed": self._closed,
                "min_size": config.min_size, "max_size": config.max_size,
                "watchdog_alive": self._watchdog.alive,
                "discovery_alive": getattr(self._discovery, "alive", None),
                "subset": ([i.key for i in state.ring]
                           if config.subset_size is not None else None),
                "instances": per, **counters}

    # -- operator controls -------------------------------------------------------------

    def drain(self, wait: bool = False, timeout: float = 30.0) -> None:
        """Replace every connection opened before this call (after a certificate rotation,
        a server-side fix, a configuration change): idle ones are closed now, in-use ones
        when they are checked in, and new ones are opened as needed (the watchdog refills
        ``min_size`` at once).  Checkouts go on meanwhile.

        :param wait: block until no connection opened before the call is left open.
        :param timeout: with ``wait``, the most seconds to block.
        :raises TimeoutError: with ``wait``, connections opened before the call were still
            checked out after ``timeout`` seconds (they are still replaced at checkin).
        :raises PoolClosed: the pool is closed (or was closed while waiting).
        :raises ValueError: ``timeout`` is not a number of seconds >= 0.
        """
        limit = _check_seconds("timeout", timeout, allow_none=False, allow_zero=True)
        assert limit is not None
        if self._closed:
            raise PoolClosed(f"pool {self.name!r} is closed")
        state = self._state
        generation, closing = state.drain()
        logger.info("pool %r: draining: %d idle connections closed now, the others at "
                    "checkin", self.name, len(closing))
        close_all(state, closing, self._events)
        self._watchdog.wake()
        if not wait:
            return
        done = _compat.Event()
        if state.wait_drain(generation, done):
            try:
                finished = done.wait(limit)
            finally:
                state.cancel_drain_wait(done)
            if not finished:
                left = state.old_connections(generation)
                raise TimeoutError(
                    f"pool {self.name!r}: {left} connections opened before drain() still "
                    f"open after {limit:g}s (checked out; they are replaced at checkin)")
        if self._closed:
            raise PoolClosed(f"pool {self.name!r} was closed while draining")

    def resize(self, min_size: int = UNSET, max_size: int = UNSET) -> None:
        """Change ``min_size`` and/or ``max_size`` (per instance) at run time, checked as
        the constructor checks them.  A lower ``max_size`` closes idle connections above it
        now and in-use ones at checkin (no connection is opened while an instance is at or
        above the cap); a higher one serves waiting checkouts at once.  A higher
        ``min_size`` is filled by the watchdog, a lower one lets idle connections be reaped.
        ``pool.config`` and ``stats()`` show the new sizes.

        :raises ValueError: naming the invalid option (nothing is changed).
        :raises PoolClosed: the pool is closed.
        """
        state = self._state
        config, closing = state.resize(min_size, max_size)
        self.config = self._router.config = config
        if closing:
            logger.info("pool %r: resized to min_size=%d max_size=%d; closing %d idle "
                        "connections above the cap", self.name, config.min_size,
                        config.max_size, len(closing))
        close_all(state, closing, self._events)
        self._watchdog.wake()

    @property
    def closed(self) -> bool:
        """``close()`` was called."""
        return self._closed

    def close(self, timeout: float = 5.0) -> None:
        """Close the pool: idempotent, and safe to call from any thread.

        First, at once: later checkouts raise :class:`PoolClosed`, waiting checkouts fail
        with it, and every idle socket is closed.  Then discovery and the watchdog are
        stopped, within ``timeout`` seconds in all.  Sockets still checked out are closed
        when their ``with`` block ends.
        """
        state = getattr(self, "_state", None)
        if state is None:
            self._closed = True
            return
        with state.lock:
            if self._closed and state.closed:
                return
            self._closed = True
        _POOLS.discard(self)
        deadline = _compat.monotonic() + max(0.0, timeout)
        _, closing = state.close()
        with self._to_close_lock:
            to_close, self._to_close = self._to_close, []
        close_all(state, closing + to_close, self._events)
        try:
            stop = self._discovery.stop
            try:
                stop(timeout=max(0.0, deadline - _compat.monotonic()))  # type: ignore[call-arg]
            except TypeError:
                stop()
        except Exception:
            logger.exception("pool %r: stopping discovery failed", self.name)
        self._watchdog.stop(max(0.0, deadline - _compat.monotonic()))
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
        # As an unclosed file does; after closing, so that a warnings filter turning it
        # into an error cannot keep the threads and sockets alive.
        warnings.warn(f"unclosed ThriftPool {getattr(self, 'name', '?')!r}: call close(); "
                      "its threads were stopped and its sockets closed when it was "
                      "collected", ResourceWarning, stacklevel=2, source=self)

    def __repr__(self) -> str:
        s = self.stats()
        state = "closed" if s["closed"] else f"{len(s['instances'])} instances"
        return (f"<ThriftPool {self.name!r} {state} size={s['size']} idle={s['idle']} "
                f"in_use={s['in_use']} waiting={s['waiting']}>")
