"""Routing a checkout under one deadline, and the ``with pool.checkout()`` object.

:class:`Router` holds what a checkout needs (the state, the balancer, the events) and
runs the routing loop of :meth:`Router.checkout`:

1. **Fast path**: the balancer's pick has an idle connection; a non-blocking liveness
   check, and it is the caller's.
2. **Routing loop**, every step bounded by the one deadline of the checkout
   (``checkout(timeout)`` or ``checkout_timeout``): :meth:`PoolState.route` hands out an
   idle connection of any healthy instance, a permit to open one (the connect gets
   ``min(connect_timeout, time left)``; a failed connect ejects its instance and the loop
   fails over to another), a panic probe (at most one per instance per checkout), or a place
   in the pool's queue, where the first healthy instance to free a connection serves it.
3. **Exits**: past the deadline, :class:`PoolExhausted` (waiting on full instances; the
   ``on_exhausted`` hook fires) or :class:`NoAvailableInstance` (connects failing, or no
   instance at all).  Any exception at any step, ``BaseException`` included, gives back
   what the checkout held: its place in the queue, a connection or permit handed to it
   meanwhile, or a connection whose liveness check was cut short (closed, since its state
   is unknown).
"""

from __future__ import annotations

import logging
import threading
import traceback
import weakref
from collections import deque
from types import TracebackType
from typing import TYPE_CHECKING, Any, Callable, Deque, List, Optional, Set, Tuple, Type

from . import _compat
from .connection import APPLICATION_ERRORS, Connection, is_connect_error, should_discard
from .deadlines import _CURRENT as _CURRENT_DEADLINE
from .deadlines import clamp
from .errors import NoAvailableInstance, PoolClosed, PoolExhausted
from .calls import call_client_factory
from .events import CALL_EVENTS, Emitter, ExhaustedEvent
from .maintenance import close_all, report_ejection, report_restored
from .health import Ejection
from .state import CONN, NONE, PERMIT, PROBE, WAIT, Closing, Grant, PoolState, Reroute

if TYPE_CHECKING:
    from .balancer import Balancer
    from .config import PoolConfig
    from .instance import InstancePool
    from .service import ServiceSpec

__all__ = ["Checkout", "Router"]

logger = logging.getLogger(__name__)


class Router:
    """Runs checkouts and checkins for one pool (see the module docstring).

    Built by :class:`~thriftpool.ThriftPool`; not public API.
    """

    def __init__(self, config: "PoolConfig", state: PoolState, balancer: "Balancer",
                 events: Emitter, spec: "ServiceSpec", restart: Callable[[], None]) -> None:
        self.config = config
        self.state = state
        self.balancer = balancer
        self.events = events
        self.spec = spec
        self.make_client: Callable[[Connection], Any] = spec.make_client
        calls = events.only(CALL_EVENTS)
        if calls:  # only then: a call costs nothing more when nobody listens to calls
            self.make_client = call_client_factory(spec, calls)
        self.service = config.service
        self.name = config.name
        self.last_checkout = 0.0
        # Set after fork(); and threading.Lock changes when gevent patches the process
        # after the pool was built.  Either way the pool restarts before the next checkout.
        self.stale = False
        self.lock_type: Any = threading.Lock
        self._restart = weakref.WeakMethod(restart)  # type: ignore[arg-type]
        # Connections of checkouts dropped without __exit__, reclaimed by the watchdog
        # (a finalizer may run anywhere, even where this thread holds the state lock).
        self.abandoned: Deque[Tuple["InstancePool", Connection]] = deque()
        self.wake: Callable[[], None] = lambda: None  # the watchdog's, set by the pool
        self.classifier = config.failure_classifier
        # The fast path reports a checkout (events, leak_timeout's stack) only if needed.
        self.report_checkouts = bool(events) or config.leak_timeout is not None

    # -- checkout ----------------------------------------------------------------------

    def checkout(self, timeout: Optional[float], exclude: Optional[Set["InstancePool"]] = None,
                 picked: Optional["InstancePool"] = None, now: Optional[float] = None
                 ) -> Tuple["InstancePool", Connection]:
        """Get a connection, within ``timeout`` seconds (default ``checkout_timeout``): the
        routing loop, after :meth:`Checkout.__enter__`'s fast path found none (``picked``:
        the balancer's pick it tried, so the balancer sees one pick per checkout).

        :raises PoolExhausted: every healthy instance stayed full until the deadline.
        :raises NoAvailableInstance: no instance is known, or none could be connected to.
        :raises PoolClosed: the pool is closed.
        """
        state = self.state
        if self.stale or threading.Lock is not self.lock_type:
            restart = self._restart()
            if restart is not None:
                restart()
            picked = None  # a pick from before the restart
        if now is None:
            now = _compat.monotonic()
            self.last_checkout = now
        if state.closed:
            raise PoolClosed(f"pool {self.name!r} is closed")
        wait = self.config.checkout_timeout if timeout is None else timeout
        if _CURRENT_DEADLINE.get() is None:
            return self._route(picked, exclude, now, wait)
        # Inside thriftpool.deadline(): the whole checkout (waiting, connects, failover)
        # takes at most the time left, and running out of it is DeadlineExceeded.
        wait_left, binding = clamp(wait, "checkout")
        assert wait_left is not None
        try:
            return self._route(picked, exclude, now, wait_left)
        except (PoolExhausted, NoAvailableInstance) as exc:
            if binding is not None and binding.expired():
                raise binding.exceeded("checkout", f"({exc})") from exc
            raise

    def _route(self, picked: Optional["InstancePool"], exclude: Optional[Set["InstancePool"]],
               start: float, wait: float) -> Tuple["InstancePool", Connection]:
        state = self.state
        config = self.config
        deadline = start + wait
        probed: Set["InstancePool"] = set()
        last_error: Optional[BaseException] = None
        pending: Optional[Grant] = None
        first = True
        while True:
            now = _compat.monotonic()
            left = deadline - now
            if left <= 0 and not first and pending is None:
                raise self._no_instance(f"no instance could serve the checkout within "
                                        f"{wait:g}s", last_error)
            first = False
            grant = pending if pending is not None else state.route(picked, exclude, probed, now)
            pending = None
            picked = None
            kind = grant.kind
            if kind is CONN:
                inst, conn = grant.inst, grant.conn
                assert inst is not None and conn is not None
                if self._usable(inst, conn):
                    self._checked_out(inst, conn, start, _compat.monotonic())
                    return inst, conn
                continue
            if kind is PERMIT or kind is PROBE:
                inst = grant.inst
                assert inst is not None
                probe = kind is PROBE
                if probe:
                    probed.add(inst)
                if left <= 0:
                    state.open_abandoned(inst, probe)
                    raise self._no_instance(f"no instance could serve the checkout within "
                                            f"{wait:g}s", last_error)
                try:
                    conn = self._open(inst, probe, min(config.connect_timeout, left))
                except Reroute:
                    continue
                except Exception as exc:
                    if not is_connect_error(exc):
                        raise
                    last_error = exc  # the request never left: try another instance
                    probed.add(inst)
                    continue
                self._checked_out(inst, conn, start, _compat.monotonic())
                return inst, conn
            if kind is WAIT:
                waiter = grant.waiter
                assert waiter is not None
                try:
                    waiter.wait(max(0.0, left))
                except BaseException:
                    if state.finish_wait(waiter):
                        close_all(state, state.give_back(waiter), self.events)
                    raise
                if not state.finish_wait(waiter):
                    self._exhausted(state.exhausted_event(waiter, wait))
                if waiter.error is not None:
                    if isinstance(waiter.error, Reroute):
                        continue
                    raise waiter.error
                inst = waiter.inst
                assert inst is not None
                if waiter.conn is not None:
                    pending = Grant(CONN, inst, waiter.conn)
                else:
                    pending = Grant(PERMIT, inst)
                waiter.conn = None
                waiter.permit = False
                continue
            assert kind is NONE
            if grant.reason == "discovery has not answered yet":
                if left > 0 and state.first_answer.wait(left):
                    continue
                raise NoAvailableInstance(
                    f"pool {self.name!r}: discovery gave no list of instances within "
                    f"{wait:g}s")
            cause = last_error
            if cause is None and grant.inst is not None:
                cause = grant.inst.health.last_error
            raise self._no_instance(grant.reason, cause)

    def _no_instance(self, what: str, cause: Optional[BaseException]) -> NoAvailableInstance:
        if self.state.closed:
            return PoolClosed(f"pool {self.name!r} is closed")  # type: ignore[return-value]
        err = NoAvailableInstance(f"pool {self.name!r}: {what}"
                                  + (f" (last error: {cause})" if cause is not None else ""))
        err.__cause__ = cause
        return err

    def _usable(self, inst: "InstancePool", conn: Connection) -> bool:
        """Check a connection just taken from an idle stack, outside the lock: one the peer
        closed, or past its lifetime, is closed instead.  If the check itself is cut short
        (a ``gevent.Timeout`` in the poll), the connection is closed too."""
        reason = "interrupted"
        try:
            if conn.peer_closed():
                reason = "peer_closed"
            elif conn.is_expired(_compat.monotonic()):
                reason = "expired"
            else:
                return True
        except BaseException:
            self.checkin_discard(inst, conn, reason)
            raise
        self.checkin_discard(inst, conn, reason)
        return False

    def _checked_out(self, inst: "InstancePool", conn: Connection, start: float,
                     now: float) -> None:
        """Report the checkout; a listener that raises anything gives the connection back.
        Then the connection is the caller's (``out_at``: counted at checkin), and with
        ``leak_timeout`` the caller's stack is recorded."""
        if self.events:
            try:
                self.events.emit("checkout", inst.key, _compat.monotonic() - start)
            except BaseException:
                self.checkin(inst, conn, reuse=True, used=False)
                raise
        if self.config.leak_timeout is not None:
            conn.out_stack = traceback.extract_stack()
            conn.out_thread = threading.current_thread().name
            conn.leak_reported = False
        conn.out_at = now

    def _open(self, inst: "InstancePool", probe: bool, timeout: float) -> Connection:
        """Open a connection for a checkout; the slot is already counted in ``opening``."""
        state = self.state
        started = _compat.monotonic()
        try:
            conn = state.connect(inst.address, self.config, inst.tls, timeout=timeout)
        except Exception as exc:
            # A connect cut short by this checkout's own deadline proves nothing about
            # the server: free the slot without ejecting the instance.
            took = _compat.monotonic() - started
            trimmed = timeout < self.config.connect_timeout and took >= 0.9 * timeout
            if trimmed:
                state.open_abandoned(inst, probe, failed=True, took=took)
            else:
                report_ejection(state, inst, state.open_failed(inst, exc, probe, took),
                                self.events)
            raise
        except BaseException:
            state.open_abandoned(inst, probe)
            raise
        kept, restored, closing = state.opened(inst, conn, probe, for_checkout=True,
                                               took=_compat.monotonic() - started)
        try:
            if self.events:
                self.events.emit("connection_opened", inst.key)
            if not kept:
                close_all(state, closing, self.events)
                raise Reroute(inst.key)
            if restored:
                report_restored(state, inst, self.events)
        except BaseException as exc:
            if kept:
                self.checkin_discard(inst, conn, "interrupted")
            if isinstance(exc, Reroute):
                raise
            raise
        return conn

    def _exhausted(self, event: ExhaustedEvent) -> None:
        """The wait timed out: tell the listeners and ``on_exhausted``, then raise."""
        err = PoolExhausted(
            f"pool {event.pool!r}: no connection became free within {event.timeout:g}s "
            f"(max_size={event.max_size} per instance; {event.address}: in_use="
            f"{event.in_use}, opening={event.opening}; other waiters={event.waiting})",
            address=event.address, timeout=event.timeout)
        err.event = event  # type: ignore[attr-defined]
        if self.events:
            self.events.emit("exhausted", event)
        callback = self.config.on_exhausted
        if callback is not None:
            try:
                callback(event)
            except Exception:
                logger.exception("pool %r: on_exhausted callback failed", self.name)
        raise err from None

    # -- checkin -----------------------------------------------------------------------

    def checkin(self, inst: "InstancePool", conn: Connection, reuse: bool, used: bool = True,
                failure: Optional[BaseException] = None, reason: str = "error",
                calls: int = 0, call_errors: int = 0) -> None:
        """Give a connection back; close it (outside the lock) when it must not be reused."""
        result = self.state.checkin(inst, conn, reuse, used, failure, reason, calls,
                                    call_errors)
        if result is not None:
            self.report_checkin(inst, result)

    def report_checkin(self, inst: "InstancePool",
                       result: Tuple[List[Closing], Optional[Ejection]]) -> None:
        """After a checkin that closes a connection or ejects: close it, report it."""
        closing, ejection = result
        try:
            report_ejection(self.state, inst, ejection, self.events)
        finally:
            close_all(self.state, closing, self.events)

    def checkin_discard(self, inst: "InstancePool", conn: Connection, reason: str) -> None:
        self.checkin(inst, conn, reuse=False, used=False, reason=reason)

    def classify(self, exc: BaseException, default: bool) -> bool:
        """``failure_classifier(exc)``; its own errors are logged and the default used."""
        assert self.classifier is not None
        try:
            return bool(self.classifier(exc))
        except Exception:
            logger.exception("pool %r: failure_classifier failed on %r", self.name, exc)
            return default

    def reclaim_abandoned(self) -> None:
        """Check in the connections of checkouts dropped without ``__exit__`` (watchdog)."""
        abandoned = self.abandoned
        while abandoned:
            try:
                inst, conn = abandoned.popleft()
            except IndexError:  # pragma: no cover - emptied by a concurrent pass
                return
            logger.warning("pool %r: a checkout of %s was dropped without leaving its "
                           "with block; its connection is closed", self.name, inst.key)
            self.checkin_discard(inst, conn, "abandoned")


class Checkout:
    """The context manager that :meth:`ThriftPool.checkout` returns (one use only).

    Entering takes a connection (see :meth:`Router.checkout`); leaving gives it back.  A
    transport, protocol or socket error, a timeout, or anything that interrupts a call
    (``gevent.Timeout``, ``KeyboardInterrupt``) closes the socket instead.  A checkout that
    is entered and then dropped without leaving gives its slot back when collected.
    """

    __slots__ = ("_router", "_timeout", "_exclude", "_inst", "_conn", "_client", "_seqid",
                 "_failed", "sent")

    def __init__(self, router: Router, timeout: Optional[float] = None,
                 exclude: Optional[Set["InstancePool"]] = None) -> None:
        self._router = router
        self._timeout = timeout
        self._exclude = exclude
        self._inst: Optional["InstancePool"] = None
        self._conn: Optional[Connection] = None
        self.sent = True

    @property
    def instance(self) -> Optional["InstancePool"]:
        """The instance whose connection this checkout holds (or held)."""
        return self._inst

    def __enter__(self) -> Any:
        if self._inst is not None:
            raise RuntimeError("a checkout can be entered only once")
        router = self._router
        now = _compat.monotonic()
        router.last_checkout = now
        picked = conn = None
        if (self._exclude is None and not router.stale
                and threading.Lock is router.lock_type):
            # Fast path, most checkouts: the balancer's pick has an idle connection, and
            # a non-blocking liveness check passes.
            state = router.state
            picked = router.balancer.pick(state.ring)
            if picked is not None:
                conn = state.take_idle(picked)
                if conn is not None:
                    # (Router._usable, inlined: this is the hot path.)
                    try:
                        poll = conn.idle_poll
                        dead = bool(poll(0)) if poll is not None else conn.peer_closed()
                    except (OSError, ValueError):  # as peer_closed() answers them
                        dead = True
                    except BaseException:
                        router.checkin_discard(picked, conn, "interrupted")
                        raise
                    if dead or now >= conn.expires_at:
                        router.checkin_discard(picked, conn,
                                               "peer_closed" if dead else "expired")
                        conn = None
                    elif router.report_checkouts:
                        router._checked_out(picked, conn, now, now)
                    else:
                        conn.out_at = now  # the caller's now (counted at checkin)
        if conn is None or picked is None:
            inst, conn = router.checkout(self._timeout, self._exclude, picked, now)
        else:
            inst = picked
        self._inst = inst
        self._conn = conn
        self._seqid = conn.seqid
        self._failed = conn.failed_calls
        try:
            self._client = client = router.make_client(conn)
        except BaseException:
            self._conn = None
            router.checkin_discard(inst, conn, "interrupted")
            raise
        return client

    def __exit__(self, exc_type: Optional[Type[BaseException]],
                 exc: Optional[BaseException], tb: Optional[TracebackType]) -> None:
        conn = self._conn
        if conn is None:
            return
        self._conn = None
        self._client._conn = None
        self.sent = conn.sent
        router = self._router
        calls = conn.seqid - self._seqid
        if calls < 0:  # the sequence id wrapped (from 2**31 - 1 to 1)
            calls += 2 ** 31 - 1
        if exc is None and not conn.in_call:
            # The common exit: no error, nothing in flight.
            state = router.state
            call_errors = conn.failed_calls - self._failed
            if state.checkin_clean(self._inst, conn, calls,  # type: ignore[arg-type]
                                   call_errors):
                return
            result = state.checkin(self._inst, conn, True,  # type: ignore[arg-type]
                                   calls != 0, None, "error", calls, call_errors)
        else:
            # in_call: an exception (any, even KeyboardInterrupt) cut a call short, so the
            # stream holds half a request or an unread reply.  With no call in flight the
            # stream is intact: an error from the caller's own code (or from another
            # pool's client used inside this block) says nothing about this connection or
            # instance; only a server's complete TApplicationException answer may still
            # condemn it.
            in_call = conn.in_call
            failed = exc is not None and should_discard(exc) and (
                in_call or isinstance(exc, APPLICATION_ERRORS))
            discard = failed or in_call
            counts = failed and isinstance(exc, Exception)
            if (exc is not None and router.classifier is not None
                    and isinstance(exc, Exception)):
                counts = router.classify(exc, counts)
            result = router.state.checkin(
                self._inst, conn, not discard,  # type: ignore[arg-type]
                not discard and not counts and calls != 0,  # answered
                exc if counts else None,
                "error" if failed or isinstance(exc, Exception) else "interrupted",
                calls, conn.failed_calls - self._failed)
        if result is not None:
            router.report_checkin(self._inst, result)  # type: ignore[arg-type]

    def __del__(self) -> None:
        conn = getattr(self, "_conn", None)
        if conn is None:
            return
        # Entered, never left: the caller dropped the with block (a generator closed
        # mid-way, a frame torn down).  Its state is unknown; the watchdog closes it.
        client = getattr(self, "_client", None)
        if client is not None:
            client._conn = None
        self._conn = None
        router = self._router
        assert self._inst is not None
        router.abandoned.append((self._inst, conn))
        router.wake()
