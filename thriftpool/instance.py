"""The pool of connections to one server instance.

Each :class:`InstancePool` guards its own counters, idle stack and waiter queue with its
own lock; the :class:`~thriftpool.ThriftPool` lock guards only the map of instances.  No
socket is opened, probed or closed while the lock is held: decisions are made under it,
I/O happens after it is released.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import TYPE_CHECKING, Any, Deque, Dict, List, Optional, Set, Tuple, Union

from . import _compat
from .address import Address, Endpoint
from .backoff import Backoff
from .connection import Connection, client_class
from .errors import PoolClosed, PoolExhausted, ThriftPoolError
from .events import Emitter, ExhaustedEvent

if TYPE_CHECKING:
    from .config import PoolConfig

__all__ = ["InstancePool", "Reroute"]

logger = logging.getLogger(__name__)


class Reroute(ThriftPoolError):
    """Internal: this instance cannot serve the checkout after all; pick another one."""


class _Waiter:
    """One checkout waiting for a connection, or for the right to open one."""

    __slots__ = ("_event", "conn", "permit", "error", "done")

    def __init__(self) -> None:
        self._event = _compat.Event()
        self.conn: Optional[Connection] = None
        self.permit = False
        self.error: Optional[BaseException] = None
        self.done = False

    # The three hand-offs are called with the instance lock held.  They fail (return
    # False) when the waiter already gave up, so the caller offers the item to the next.
    def give(self, conn: Connection) -> bool:
        if self.done:
            return False
        self.conn = conn
        self.done = True
        self._event.set()
        return True

    def give_permit(self) -> bool:
        if self.done:
            return False
        self.permit = True
        self.done = True
        self._event.set()
        return True

    def fail(self, error: BaseException) -> bool:
        if self.done:
            return False
        self.error = error
        self.done = True
        self._event.set()
        return True

    def wait(self, timeout: float) -> bool:
        return self._event.wait(timeout)


class InstancePool:
    """Connections to one instance: at most ``max_size`` idle + in use + opening.

    Thread-safe.  Built and driven by :class:`~thriftpool.ThriftPool`; not public API.
    """

    def __init__(self, endpoint: Endpoint, config: "PoolConfig", pool_name: str,
                 events: Optional[Emitter] = None) -> None:
        self.address: Address = endpoint.address
        self.key = str(endpoint.address)
        self.weight = endpoint.weight
        self.tls = endpoint.tls
        self._config = config
        self._pool_name = pool_name
        self._lock = _compat.Lock()
        self._idle: List[Connection] = []      # a stack: the most recently used on top
        self._in_use: Set[Connection] = set()
        self._opening = 0
        self._waiters: Deque[_Waiter] = deque()
        self._closed = False
        self._close_reason = "pool_closed"
        self._events = events if events is not None else Emitter(pool_name)
        # Health: a failed connect marks the instance unhealthy; nobody connects to it
        # again before next_attempt_at, and then only one probe at a time.
        self.healthy = True
        self._backoff = Backoff(config.backoff_initial, config.backoff_multiplier,
                                config.backoff_max, config.backoff_jitter)
        self.next_attempt_at = 0.0
        self.last_failure_at = 0.0
        self.last_attempt_at = 0.0
        self.last_error: Optional[BaseException] = None
        self._probing = False
        self._errors = 0  # consecutive calls that failed with a transport error
        # The first fill opens initial_size connections; later fills keep min_size.
        self._fill_target = config.initial_size
        self.first_fill_done = False  # set by the first watchdog pass (see ThriftPool.wait)
        self.opened_total = 0
        self.closed_total = 0

    # -- checkout / checkin ------------------------------------------------------------

    def acquire(self, deadline: float, probe: bool = False,
                wait: Optional[float] = None) -> Connection:
        """Take an idle connection, open one, or wait for one until ``deadline``.

        :param probe: the instance is unhealthy and this checkout was picked to probe it
            (panic mode); the caller already reserved the probe with :meth:`try_probe`.
        :param wait: the caller's whole wait in seconds, reported by :class:`PoolExhausted`
            (default ``checkout_timeout``).
        :raises PoolExhausted: nothing became free before ``deadline``.
        :raises Reroute: the instance was removed, or failed, while we waited.
        :raises TTransportException: the connect failed (the instance is now unhealthy).
        """
        if probe:
            return self._open_for_checkout(probe=True)
        while True:
            conn: Optional[Connection] = None
            permit = False
            waiter: Optional[_Waiter] = None
            exhausted: Optional[ExhaustedEvent] = None
            with self._lock:
                if self._closed:
                    raise Reroute(self.key)
                if self._idle:
                    conn = self._idle.pop()
                    self._in_use.add(conn)
                elif (len(self._in_use) + self._opening < self._config.max_size
                      and not (self._opening and not self._in_use)):
                    # (With no connection established yet and one already being opened,
                    # wait for that one instead of racing more connects at a server
                    # that may be down: no connect storms.)
                    self._opening += 1
                    permit = True
                else:
                    remaining = deadline - _compat.monotonic()
                    if remaining > 0:
                        waiter = _Waiter()
                        self._waiters.append(waiter)
                    else:
                        exhausted = self._exhausted_event_locked(wait)
            if conn is not None:
                if self._usable(conn):
                    return conn
                continue
            if permit:
                return self._open_for_checkout()
            if exhausted is not None:
                raise self._exhausted_error(exhausted)
            assert waiter is not None
            conn = self._wait(waiter, deadline, wait)
            if conn is None:
                if waiter.permit:
                    return self._open_for_checkout()
                continue  # pragma: no cover - a woken waiter carries a conn, permit or error
            if self._usable(conn):
                return conn

    def take_idle(self) -> Optional[Connection]:
        """The most recently used idle connection, alive and not expired, or ``None``.

        The fast path of a checkout: no waiting, no connecting.  A dead or expired
        connection is closed and ``None`` returned; :meth:`acquire` does the rest.
        """
        with self._lock:
            if self._closed or not self._idle:
                return None
            conn = self._idle.pop()
            self._in_use.add(conn)
        return conn if self._usable(conn) else None

    def _usable(self, conn: Connection) -> bool:
        """Check a connection just taken from the idle stack (or handed over), outside the
        lock: a socket the peer closed, or one past its lifetime, is closed instead."""
        if conn.peer_closed():
            self.release(conn, discard=True, reason="peer_closed")
            return False
        if conn.is_expired(_compat.monotonic()):
            self.release(conn, discard=True, reason="expired")
            return False
        return True

    def _wait(self, waiter: _Waiter, deadline: float,
              wait: Optional[float] = None) -> Optional[Connection]:
        waiter.wait(max(0.0, deadline - _compat.monotonic()))
        exhausted = None
        with self._lock:
            if not waiter.done:
                # Timed out: leave the queue so no hand-off is lost on us.
                waiter.done = True
                try:
                    self._waiters.remove(waiter)
                except ValueError:  # pragma: no cover
                    pass
                exhausted = self._exhausted_event_locked(wait)
        if exhausted is not None:
            raise self._exhausted_error(exhausted)
        if waiter.error is not None:
            raise waiter.error
        return waiter.conn

    def _exhausted_event_locked(self, wait: Optional[float] = None) -> ExhaustedEvent:
        return ExhaustedEvent(
            pool=self._pool_name, address=self.key,
            timeout=self._config.checkout_timeout if wait is None else wait,
            max_size=self._config.max_size, in_use=len(self._in_use), idle=len(self._idle),
            opening=self._opening, waiting=len(self._waiters))

    def _exhausted_error(self, event: ExhaustedEvent) -> PoolExhausted:
        err = PoolExhausted(
            f"pool {event.pool!r}: no connection to {event.address} became free within "
            f"{event.timeout:g}s (max_size={event.max_size}, in_use={event.in_use}, "
            f"opening={event.opening}, other waiters={event.waiting})",
            address=event.address, timeout=event.timeout)
        err.event = event  # type: ignore[attr-defined]
        return err

    def release(self, conn: Connection, discard: bool = False,
                failed: Union[bool, BaseException] = False,
                reason: Optional[str] = None) -> None:
        """Check a connection back in; close it instead when it must not be reused.

        A connection is closed when ``discard`` is set (the call failed mid-stream), when it
        outlived ``max_lifetime``, or when the instance was removed or the pool closed.
        Otherwise it goes to the longest waiter, or on top of the idle stack.

        :param failed: the call failed with a transport error (pass the exception, or
            True): it counts towards ejecting the instance after ``failure_threshold`` in a
            row; a clean checkin resets that.
        :param reason: why a discarded connection is closed, for listeners (default
            ``"error"``).
        """
        now = _compat.monotonic()
        to_close: Optional[Connection] = None
        if failed is not False:
            self._call_failed(now, failed if isinstance(failed, BaseException) else None)
        elif not discard and (self._errors or self._backoff.failures):
            # (A discard is no success: an interrupted call, a dead idle socket.)
            self._call_succeeded()
        with self._lock:
            if conn not in self._in_use:
                # Not ours (any more): checked out before a fork and detached since.
                to_close = conn
                reason = None
            else:
                self._in_use.remove(conn)
                if discard or self._closed or now >= conn.expires_at:
                    to_close = conn
                    if discard:
                        reason = reason or "error"
                    elif self._closed:
                        reason = self._close_reason
                    else:
                        reason = "expired"
                    self.closed_total += 1
                    # The freed slot goes to the first waiter still waiting, as a permit.
                    while self._waiters and not self._closed:
                        if self._waiters.popleft().give_permit():
                            self._opening += 1
                            break
                else:
                    conn.idle_since = now
                    while self._waiters:
                        if self._waiters.popleft().give(conn):
                            self._in_use.add(conn)
                            break
                    else:
                        self._idle.append(conn)
        if to_close is not None:
            to_close.close()
            if reason is not None and self._events:
                self._events.emit("connection_closed", self.key, reason)

    def _open_for_checkout(self, probe: bool = False) -> Connection:
        """Open a connection for a checkout; the caller already counted it in ``_opening``."""
        try:
            conn = Connection.open(self.address, self._config, self.tls)
        except BaseException as exc:
            self._open_failed(exc, probe)
            raise
        with self._lock:
            self._opening -= 1
            self.opened_total += 1
            if probe:
                self._probing = False
            if self._closed:
                self.closed_total += 1
                closed = True
            else:
                self._in_use.add(conn)
                self._admit_waiters_locked()
                closed = False
        if self._events:
            self._events.emit("connection_opened", self.key)
        if closed:
            self._close_all([conn], self._close_reason)
            raise Reroute(self.key)
        self._record_success()
        return conn

    def _admit_waiters_locked(self) -> None:
        """Give waiters permits to open their own connections while there is room.

        Checkouts queue while the first connect is in flight (no connect storm at a server
        that may be down); once it is done, nothing else would wake them while the
        connection they queued behind stays checked out.
        """
        max_size = self._config.max_size
        while (self._waiters and not self._idle
               and len(self._in_use) + self._opening < max_size
               and not (self._opening and not self._in_use)):
            if self._waiters.popleft().give_permit():
                self._opening += 1

    def _open_failed(self, exc: BaseException, probe: bool) -> None:
        with self._lock:
            self._opening -= 1
            if probe:
                self._probing = False
            # A failed connect is an attempt: without this, the checkout whose connect just
            # failed would panic-probe the same dead instance again at once.
            self.last_attempt_at = _compat.monotonic()
            if not isinstance(exc, Exception):
                self._admit_waiters_locked()  # interrupted: nobody else will wake them
        if isinstance(exc, Exception):  # not KeyboardInterrupt, gevent.Timeout: not the server
            self.eject(exc, "connect failed")

    def eject(self, exc: Optional[BaseException], why: str) -> None:
        """Mark the instance unhealthy: the balancer skips it until a probe succeeds.

        The next attempt is allowed after an exponential backoff with jitter that grows
        with each consecutive failure; waiters go to other instances.
        """
        now = _compat.monotonic()
        with self._lock:
            was_healthy = self.healthy
            self.healthy = False
            self.last_failure_at = now
            self.last_error = exc
            delay = self._backoff.next_delay()
            self.next_attempt_at = now + delay
            failures = self._backoff.failures
            self._errors = 0
            # Nobody should wait on a failing instance: send every waiter elsewhere.
            waiters = list(self._waiters)
            self._waiters.clear()
            for w in waiters:
                w.fail(Reroute(self.key))
        if was_healthy:
            logger.warning("pool %r: instance %s ejected: %s (%s); next attempt in %.2fs",
                           self._pool_name, self.key, why, exc, delay)
            if self._events:
                self._events.emit("instance_ejected", self.key,
                                  f"{why} ({exc})" if exc is not None else why, delay)
        else:
            logger.info("pool %r: instance %s still failing (%d in a row): %s (%s); next "
                        "attempt in %.2fs", self._pool_name, self.key, failures, why, exc,
                        delay)

    def _call_failed(self, now: float, exc: Optional[BaseException]) -> None:
        with self._lock:
            self._errors += 1
            eject = self.healthy and self._errors >= self._config.failure_threshold
            count = self._errors
        if eject:
            self.eject(exc, f"{count} calls in a row failed with transport errors")

    def _call_succeeded(self) -> None:
        with self._lock:
            self._errors = 0
            self._backoff.reset()

    def _record_success(self) -> None:
        """A connect succeeded: an ejected instance takes traffic again.

        Its backoff is kept until a call succeeds too, so a server that accepts but does not
        answer is ejected again with a longer delay each time.
        """
        if self.healthy:
            return
        with self._lock:
            was_healthy = self.healthy
            self.healthy = True
            self.next_attempt_at = 0.0
        if not was_healthy:
            logger.info("pool %r: instance %s restored: a probe connected", self._pool_name,
                        self.key)
            if self._events:
                self._events.emit("instance_restored", self.key)

    def try_probe(self, now: float, panic: bool = False) -> bool:
        """Reserve the one probe connection of an unhealthy instance.

        Allowed once the backoff has passed; in panic mode (every instance is unhealthy and
        a caller is waiting) also when the last attempt is at least ``backoff_initial`` old,
        so a full outage ends about as soon as a server is back, without a connect storm.
        """
        with self._lock:
            # Idle connections count too: an ejected instance may keep some (the call that
            # ejected it may not even have returned its own socket yet).
            if (self._closed or self._probing
                    or len(self._idle) + len(self._in_use) + self._opening
                    >= self._config.max_size):
                return False
            if now < self.next_attempt_at and not (
                    panic and now - self.last_attempt_at >= self._config.backoff_initial):
                return False
            self._probing = True
            self._opening += 1
            self.last_attempt_at = now
            return True

    # -- watchdog --------------------------------------------------------------------

    def maintain(self, now: float, demand: bool) -> None:
        """One watchdog pass over this instance (called from the watchdog thread only).

        Closes idle connections above ``min_size`` idle for longer than ``idle_timeout``
        and idle ones past ``max_lifetime`` or closed by the server; then opens connections
        up to the fill target (``initial_size`` the first time, ``min_size`` after), or,
        while the instance is unhealthy, one probe once its backoff has passed and
        something needs it.
        """
        config = self._config
        to_close: List[Connection] = []
        expired: List[Connection] = []
        dead: List[Connection] = []
        to_open = 0
        probe = False
        with self._lock:
            if self._closed:
                return
            total = len(self._idle) + len(self._in_use) + self._opening
            if self._idle:
                keep: List[Connection] = []
                idle_timeout = config.idle_timeout
                # The stack's bottom holds the connections idle the longest.
                for conn in self._idle:
                    if conn.peer_closed():
                        # The server hung up on an idle socket (a restart, its own idle
                        # timeout): replace it now, so min_size counts live connections.
                        # A zero-timeout poll never blocks, and nobody else can poll a
                        # socket while it sits in the idle stack.
                        dead.append(conn)
                        total -= 1
                    elif now >= conn.expires_at:
                        expired.append(conn)
                        total -= 1
                    elif (idle_timeout is not None and total > config.min_size
                            and now - conn.idle_since >= idle_timeout):
                        to_close.append(conn)
                        total -= 1
                    else:
                        keep.append(conn)
                if to_close or expired or dead:
                    self._idle[:] = keep
                    self.closed_total += len(to_close) + len(expired) + len(dead)
            target = min(max(self._fill_target, config.min_size), config.max_size)
            if self.healthy:
                to_open = max(0, target - total)
            elif demand and not self._probing and now >= self.next_attempt_at \
                    and total < config.max_size:
                # Unhealthy: one probe once the backoff has passed, and only while checkouts
                # want this pool (no reconnects with no demand).
                to_open = 1
                probe = True
                self._probing = True
                self.last_attempt_at = now
            self._opening += to_open
            beat: List[Connection] = []
            if config.heartbeat is not None and self.healthy and self._idle:
                interval = config.heartbeat_interval
                keep = []
                for conn in self._idle:
                    if now - conn.idle_since >= interval:
                        beat.append(conn)
                        self._in_use.add(conn)
                    else:
                        keep.append(conn)
                self._idle[:] = keep
        if to_close or expired or dead:
            self._close_all(dead, "peer_closed")
            self._close_all(to_close, "idle")
            self._close_all(expired, "expired")
            logger.debug("pool %r: closed %d idle and %d expired connections to %s",
                         self._pool_name, len(to_close), len(expired), self.key)
        for conn in beat:
            self._heartbeat(conn)
        for i in range(to_open):
            if not self._open_idle(probe):
                with self._lock:
                    self._opening -= to_open - i - 1  # give back the unused reservations
                break
        else:
            if to_open and self._fill_target > config.min_size:
                self._fill_target = config.min_size
        self.first_fill_done = True  # the first pass opened what it could, or failed

    def _heartbeat(self, conn: Connection) -> None:
        """Call the ``heartbeat`` method on an idle connection; a failure discards it."""
        config = self._config
        client = client_class(config.service)(config.service, conn)
        # The pool's one watchdog thread must not wait on a hung server for socket_timeout
        # (None: forever, and close() could not stop the thread): a ping on an idle
        # connection is one round trip with no work, like a connect, so it gets at most
        # connect_timeout, for the whole call.
        beat_timeout = config.connect_timeout if config.socket_timeout is None \
            else min(config.socket_timeout, config.connect_timeout)
        try:
            with conn.call_timeout(beat_timeout):
                client._req(config.heartbeat)  # type: ignore[arg-type]
        except Exception as exc:
            logger.info("pool %r: heartbeat %s() to %s failed: %s", self._pool_name,
                        self._config.heartbeat, self.key, exc)
            self.release(conn, discard=True, failed=exc, reason="heartbeat")
        else:
            self.release(conn)
        finally:
            client._conn = None

    def _open_idle(self, probe: bool) -> bool:
        """Open one connection in the background and hand it to a waiter or the idle stack."""
        try:
            conn = Connection.open(self.address, self._config, self.tls)
        except Exception as exc:
            self._open_failed(exc, probe)
            return False
        with self._lock:
            self._opening -= 1
            self.opened_total += 1
            if probe:
                self._probing = False
            closed = self._closed
            if closed:
                self.closed_total += 1
            else:
                for_waiter = False
                while self._waiters:
                    if self._waiters.popleft().give(conn):
                        self._in_use.add(conn)
                        for_waiter = True
                        break
                if not for_waiter:
                    self._idle.append(conn)
                self._admit_waiters_locked()
        if self._events:
            self._events.emit("connection_opened", self.key)
        if closed:
            self._close_all([conn], self._close_reason)
            return False
        self._record_success()
        return True

    # -- lifecycle -------------------------------------------------------------------

    def close(self, error: BaseException) -> List[Connection]:
        """Stop serving: fail waiters with ``error`` and return the idle connections to close.

        In-use connections are closed when they are checked in.  Idempotent.
        """
        with self._lock:
            if self._closed:
                return []
            self._closed = True
            self._close_reason = "removed" if isinstance(error, Reroute) else "pool_closed"
            idle, self._idle = self._idle, []
            self.closed_total += len(idle)
            waiters = list(self._waiters)
            self._waiters.clear()
            for w in waiters:
                # One exception object per waiter: each is raised in its own thread.
                w.fail(type(error)(*error.args))
        return idle

    def retire(self) -> None:
        """Discovery removed this instance: waiters go elsewhere, idle sockets close now."""
        self._close_all(self.close(Reroute(self.key)), "removed")

    def shutdown(self) -> None:
        """The pool is closing: waiters get :class:`PoolClosed`, idle sockets close now."""
        self._close_all(self.close(PoolClosed(f"pool {self._pool_name!r} is closed")),
                        "pool_closed")

    def _close_all(self, conns: List[Connection], reason: str) -> None:
        """Close connections already taken out of the pool (never under the lock)."""
        for conn in conns:
            conn.close()
            if self._events:
                self._events.emit("connection_closed", self.key, reason)

    def detach_all(self) -> None:
        """After ``fork()``: forget every inherited socket without touching the parent's."""
        # Only the forking thread exists in the child; another thread may have held the
        # lock at fork time, so take none and start with a fresh one.
        self._lock = _compat.Lock()
        conns = self._idle + list(self._in_use)
        self._idle = []
        self._in_use = set()
        self._opening = 0
        self._probing = False
        self._waiters = deque()
        for conn in conns:
            conn.detach()

    def has_capacity(self) -> bool:
        """A hint, read without the lock: an idle connection or a free slot exists."""
        if self._idle:
            return True
        in_use, opening = len(self._in_use), self._opening
        return in_use + opening < self._config.max_size and not (opening and not in_use)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def in_use(self) -> int:
        return len(self._in_use)

    def stats(self) -> Dict[str, Any]:
        """Live counts for :meth:`ThriftPool.stats`."""
        with self._lock:
            idle = len(self._idle)
            in_use = len(self._in_use)
            opening = self._opening
            waiting = len(self._waiters)
        return {
            "size": idle + in_use + opening,
            "idle": idle,
            "in_use": in_use,
            "opening": opening,
            "waiting": waiting,
            "healthy": self.healthy,
            "weight": self.weight,
            "failures": self._backoff.failures,
            "opened": self.opened_total,
            "closed": self.closed_total,
        }

    def counts(self) -> Tuple[int, int, int, int]:
        with self._lock:
            return len(self._idle), len(self._in_use), self._opening, len(self._waiters)

    def __repr__(self) -> str:
        idle, in_use, opening, waiting = self.counts()
        state = "closed" if self._closed else ("healthy" if self.healthy else "unhealthy")
        return (f"<InstancePool {self.key} {state} idle={idle} in_use={in_use} "
                f"opening={opening} waiting={waiting}>")
