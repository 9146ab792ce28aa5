"""Every transition of a pool's connections, under one lock, with the I/O left to the caller.

:class:`PoolState` owns the one state lock of a :class:`~thriftpool.ThriftPool`, the map of
instances, the ring the balancers read, and the queue of waiting checkouts.  Each method
takes the lock, changes counts, and returns what must happen next (connections to close,
events to report); the caller does that after the lock is released.  No method does socket
I/O, calls a listener or logs while it holds the lock.

Why one lock for the whole pool and not one per instance: a waiting checkout is served by
whichever healthy instance frees a connection first (first come, first served across the
pool), so a check-in on one instance and a waiter queued for the pool must be decided
together.  The lock is held for a few dictionary and list operations, never across I/O.

Transitions of a connection (see :mod:`thriftpool.instance` for the slots)::

    (slot)  --grant_open / a waiter's permit-->  opening
    opening --opened------------------------->  in_use (the checkout that opened it)
    opening --opened_idle (watchdog)--------->  idle, or straight to the first waiter
    opening --open_failed-------------------->  (slot free; the instance is ejected)
    idle    --take_idle / route / assign----->  in_use
    in_use  --checkin, reusable-------------->  idle, or straight to the first waiter
    in_use  --checkin, discard/expired/retired->  closing --closed--> (slot free)
    idle    --maintenance: reap/expire/dead--->  closing --closed--> (slot free)
    idle    --maintenance: heartbeat---------->  busy --back to its place--> idle

A freed slot goes to the first waiter as a permit to open a connection.  Waiters leave the
queue only under the lock (a hand-off, a failure, or their own cancel), so a hand-off can
never go to a checkout that gave up: :meth:`finish_wait` tells the giving-up checkout what
it was handed meanwhile, and it gives that back.
"""

from __future__ import annotations

import bisect
import dataclasses
import traceback
from collections import deque
from typing import (TYPE_CHECKING, Any, Callable, Deque, Dict, Iterable, List, Optional,
                    Sequence, Set, Tuple)

from . import _compat
from .address import Address, Endpoint
from .errors import PoolClosed, ThriftPoolError, TooManyWaiters
from .events import ExhaustedEvent, Holder
from .health import Ejection
from .instance import InstancePool
from .subset import Subsetter

if TYPE_CHECKING:
    from .config import PoolConfig
    from .connection import Connection

__all__ = ["Counters", "Grant", "PoolState", "Reroute", "Waiter", "format_holder"]


def _open_connection(*args: Any, **kwargs: Any) -> "Connection":
    from .connection import Connection

    return Connection.open(*args, **kwargs)


def _refused(error: BaseException) -> bool:
    from .connection import is_connect_error

    return is_connect_error(error)


class Reroute(ThriftPoolError):
    """Internal: what this checkout waited for went away; route it again."""


#: A connection to close and why (for the listeners), done by the caller after the lock.
Closing = Tuple[InstancePool, "Connection", str]

#: Close reasons that mean the pool found the connection broken (``connections_lost``).
_LOST = frozenset({"error", "peer_closed", "heartbeat"})

#: A checkout holding a connection, as recorded with ``leak_timeout``: (address, age,
#: thread name, stack); the stack is formatted after the lock is released.
RawHolder = Tuple[str, float, str, Any]


class Counters:
    """Cumulative counts since the pool started (or since the last ``pop_stats()``),
    changed only under the state lock: plain integer and float additions on paths that
    hold it anyway."""

    __slots__ = ("checkouts", "checkouts_waited", "wait_s", "exhausted", "too_many_waiters",
                 "connections_opened", "connect_errors", "connections_lost", "calls",
                 "call_errors", "in_use_s", "connect_s")

    def __init__(self) -> None:
        self.checkouts = 0           # checkouts given back (counted at checkin)
        self.checkouts_waited = 0    # checkouts that queued for a connection
        self.wait_s = 0.0            # their time in the queue
        self.exhausted = 0           # PoolExhausted after waiting (not TooManyWaiters)
        self.too_many_waiters = 0    # TooManyWaiters
        self.connections_opened = 0
        self.connect_errors = 0      # connects that failed (or ran out of time)
        self.connections_lost = 0    # closed because found broken (_LOST)
        self.calls = 0               # calls made on checked-out clients (counted at checkin)
        self.call_errors = 0         # of those, calls that raised
        self.in_use_s = 0.0          # time connections spent checked out
        self.connect_s = 0.0         # time spent connecting

    def as_dict(self) -> Dict[str, Any]:
        return {
            "checkouts": self.checkouts,
            "checkouts_waited": self.checkouts_waited,
            "wait_ms": round(self.wait_s * 1000.0, 3),
            "exhausted": self.exhausted,
            "too_many_waiters": self.too_many_waiters,
            "connections_opened": self.connections_opened,
            "connect_errors": self.connect_errors,
            "connections_lost": self.connections_lost,
            "calls": self.calls,
            "call_errors": self.call_errors,
            "in_use_ms": round(self.in_use_s * 1000.0, 3),
            "connect_ms": round(self.connect_s * 1000.0, 3),
        }


#: The names of the counters in ``stats()``.
COUNTER_NAMES = tuple(Counters().as_dict())

#: Frames of this package, left out of a recorded checkout stack.
_PACKAGE_DIR = __file__.rsplit("/", 1)[0] + "/"


def format_holder(raw: RawHolder) -> Holder:
    """A :class:`Holder` from what the lock-held scan recorded (formatting is CPU work,
    done after the lock)."""
    address, age, thread, stack = raw
    frames = [f for f in (stack or ()) if not f.filename.startswith(_PACKAGE_DIR)]
    return Holder(address=address, age=age, thread=thread or "?",
                  stack="".join(traceback.format_list(frames)))

# Kinds of grant a checkout can get.
CONN = "conn"        # an idle connection, now counted in_use
PERMIT = "permit"    # the right to open one (counted in opening)
PROBE = "probe"      # a permit that is also the instance's one probe (panic mode)
WAIT = "wait"        # queued: wait on the waiter
NONE = "none"        # no instance can serve: see reason


class Grant:
    """What :meth:`PoolState.route` decided for one checkout."""

    __slots__ = ("kind", "inst", "conn", "waiter", "reason")

    def __init__(self, kind: str, inst: Optional[InstancePool] = None,
                 conn: Optional["Connection"] = None, waiter: Optional["Waiter"] = None,
                 reason: str = "") -> None:
        self.kind = kind
        self.inst = inst
        self.conn = conn
        self.waiter = waiter
        self.reason = reason


class Waiter:
    """One checkout waiting for a connection, or for the right to open one, from any
    healthy instance.  Its fields change only under the state lock."""

    __slots__ = ("_event", "inst", "conn", "permit", "error", "done", "picked", "since")

    def __init__(self, picked: Optional[InstancePool], since: float = 0.0) -> None:
        self._event = _compat.Event()   # made now: gevent's Event once gevent patched
        self.inst: Optional[InstancePool] = None
        self.conn: Optional["Connection"] = None
        self.permit = False
        self.error: Optional[BaseException] = None
        self.done = False
        self.picked = picked            # the balancer's choice, for the exhausted report
        self.since = since              # when it queued (the wait_ms counter)

    def _give(self, inst: InstancePool, conn: Optional["Connection"]) -> None:
        self.inst = inst
        self.conn = conn
        self.permit = conn is None
        self.done = True
        self._event.set()

    def _fail(self, error: BaseException) -> None:
        self.error = error
        self.done = True
        self._event.set()

    def wait(self, timeout: float) -> bool:
        """Block until handed something or failed, up to ``timeout`` seconds."""
        return bool(self._event.wait(timeout))


class PoolState:
    """The lock, the instances, the ring and the waiters of one pool (module docstring)."""

    def __init__(self, config: "PoolConfig", name: str) -> None:
        self.config = config
        self.name = name
        self.lock = _compat.Lock()
        self.instances: Dict[Address, InstancePool] = {}
        self.ring: Tuple[InstancePool, ...] = ()
        self.waiters: Deque[Waiter] = deque()
        self.closed = False
        self.discovered = False    # discovery delivered its first list
        self.first_answer = _compat.Event()
        # Subsetting: every known instance, best first; the ring holds only the members.
        self.subsetter: Optional[Subsetter] = None
        if config.subset_size is not None:
            self.subsetter = Subsetter(config.subset_size, config.subset_key)
        self.ranked: Tuple[InstancePool, ...] = ()
        # How connections are opened: Connection.open; the socket-free tests swap it.
        self.connect: Callable[..., "Connection"] = _open_connection
        self.counters = Counters()
        # drain(): connections opened under an older generation are replaced.  A drain
        # that waits holds (generation, event) here until no older connection is left.
        self.generation = 0
        self.drain_waits: List[Tuple[int, Any]] = []
        # resize() shrank max_size: checkins close connections above the new cap.
        self.oversize = False

    def renew_primitives(self) -> None:
        """After fork or late gevent patching: fresh lock and event (nobody holds them)."""
        self.lock = _compat.Lock()
        answered = self.first_answer.is_set()
        self.first_answer = _compat.Event()
        if answered:
            self.first_answer.set()

    # -- checkout ----------------------------------------------------------------------

    def take_idle(self, inst: InstancePool) -> Optional["Connection"]:
        """The fast path: the top of ``inst``'s idle stack, now in use; or ``None``."""
        with self.lock:
            if not inst.idle or inst.retired or self.closed:
                return None
            conn = inst.idle.pop()
            conn.uses += 1
            inst.in_use.add(conn)
            return conn

    def route(self, picked: Optional[InstancePool], exclude: Optional[Set[InstancePool]],
              probed: Set[InstancePool], now: float) -> Grant:
        """Decide one step of a checkout: a connection, a permit, a probe, a wait or none.

        Order: the balancer's pick if it can serve now; any other healthy instance that
        can; else wait in the pool's queue for whichever healthy instance frees a
        connection first.  Instances in ``exclude`` (a retry's failed ones) are avoided
        while another healthy one exists.  With no healthy instance at all, probe one
        ejected instance not yet probed by this checkout (panic mode), or give up.
        """
        with self.lock:
            if self.closed:
                raise PoolClosed(f"pool {self.name!r} is closed")
            ring = self.ring
            serving = [i for i in ring if i.healthy and not i.retired]
            if exclude:
                others = [i for i in serving if i not in exclude]
                serving = others or serving
            if serving:
                # The balancer's pick, if it can serve now (an idle connection or a free
                # slot): its choice spreads the load.  Else any idle connection, else any
                # free slot, else wait for the first one freed anywhere.
                if picked is not None and picked in serving:
                    if picked.idle:
                        return self._grant_idle_locked(picked)
                    if picked.can_open():
                        picked.opening += 1
                        return Grant(PERMIT, picked)
                for inst in serving:
                    if inst.idle:
                        return self._grant_idle_locked(inst)
                for inst in serving:
                    if inst.can_open():
                        inst.opening += 1
                        return Grant(PERMIT, inst)
                max_waiting = self.config.max_waiting
                if max_waiting and len(self.waiters) >= max_waiting:
                    self.counters.too_many_waiters += 1
                    raise TooManyWaiters(
                        f"pool {self.name!r}: {len(self.waiters)} checkouts are already "
                        f"waiting (max_waiting={max_waiting}); failing at once",
                        waiting=len(self.waiters), max_waiting=max_waiting)
                waiter = Waiter(picked if picked in serving else serving[0], now)
                self.waiters.append(waiter)
                return Grant(WAIT, waiter=waiter)
            if not ring:
                if not self.discovered:
                    return Grant(NONE, reason="discovery has not answered yet")
                return Grant(NONE, reason="discovery reports no instances")
            # Panic mode: every instance is failing.  Rather than fail without a try, probe
            # the one that failed longest ago (one probe per instance at a time, and at
            # most one per instance per checkout).
            for inst in sorted(ring, key=lambda i: i.health.last_failure_at):
                if (inst not in probed and not inst.retired and inst.size() < inst.max_size
                        and inst.health.may_probe(now, panic=True)):
                    inst.health.start_probe(now)
                    inst.opening += 1
                    return Grant(PROBE, inst)
            soonest = min(ring, key=lambda i: i.health.next_attempt_at)
            return Grant(NONE, soonest, reason=(
                f"all {len(ring)} instances are failing; next attempt to {soonest.key} in "
                f"{max(0.0, soonest.health.next_attempt_at - now):.2f}s"))

    def _grant_idle_locked(self, inst: InstancePool) -> Grant:
        conn = inst.idle.pop()
        conn.uses += 1
        inst.in_use.add(conn)
        return Grant(CONN, inst, conn)

    def finish_wait(self, waiter: Waiter) -> bool:
        """The waiting checkout woke up, timed out or was interrupted: leave the queue.

        Returns False when nothing was handed over (the waiter is gone from the queue);
        True when it was: the caller must use or give back ``waiter.inst``/``conn``/
        ``permit``, or raise ``waiter.error``.
        """
        with self.lock:
            counters = self.counters
            counters.checkouts_waited += 1
            counters.wait_s += _compat.monotonic() - waiter.since
            if waiter.done:
                return True
            waiter.done = True
            try:
                self.waiters.remove(waiter)
            except ValueError:  # pragma: no cover - a queued waiter is always in the queue
                pass
            return False

    def give_back(self, waiter: Waiter) -> List[Closing]:
        """Return what a waiter was handed but will not use (it gave up, or was interrupted
        before it could take it): the connection goes back unused, the permit is freed."""
        inst = waiter.inst
        if inst is None:
            return []
        if waiter.conn is not None:
            conn, waiter.conn = waiter.conn, None
            result = self.checkin(inst, conn, reuse=True, used=False)
            return result[0] if result is not None else []
        if waiter.permit:
            waiter.permit = False
            return self.open_abandoned(inst, probe=False)
        return []

    def exhausted_event(self, waiter: Optional[Waiter], timeout: float) -> ExhaustedEvent:
        now = _compat.monotonic()
        with self.lock:
            self.counters.exhausted += 1
            inst = waiter.picked if waiter is not None else None
            if inst is None and self.ring:
                inst = self.ring[0]
            raw: List[RawHolder] = []
            if inst is not None and self.config.leak_timeout is not None:
                raw = self._holders_locked(inst, now, 5)
            event = ExhaustedEvent(
                pool=self.name, address=inst.key if inst is not None else "",
                timeout=timeout, max_size=self.config.max_size,
                in_use=len(inst.in_use) if inst is not None else 0,
                idle=len(inst.idle) if inst is not None else 0,
                opening=inst.opening if inst is not None else 0,
                waiting=len(self.waiters))
        if raw:
            return dataclasses.replace(event, holders=tuple(format_holder(h) for h in raw))
        return event

    # -- leak detection (leak_timeout) -------------------------------------------------

    @staticmethod
    def _holders_locked(inst: InstancePool, now: float, limit: int) -> List[RawHolder]:
        """The oldest ``limit`` checkouts of ``inst`` (their stacks unformatted)."""
        held = sorted((c for c in inst.in_use if c.out_at), key=lambda c: c.out_at)[:limit]
        return [(inst.key, now - c.out_at, c.out_thread, c.out_stack) for c in held]

    def leaks(self, now: float) -> List[RawHolder]:
        """Checkouts held longer than ``leak_timeout`` and not reported yet; each one is
        marked reported (the watchdog logs them after the lock)."""
        limit = self.config.leak_timeout
        if limit is None:
            return []
        found: List[RawHolder] = []
        with self.lock:
            for inst in self.instances.values():
                for conn in inst.in_use:
                    out_at = conn.out_at
                    if out_at and not conn.leak_reported and now - out_at >= limit:
                        conn.leak_reported = True
                        found.append((inst.key, now - out_at, conn.out_thread,
                                      conn.out_stack))
        return found

    # -- opening -----------------------------------------------------------------------

    def opened(self, inst: InstancePool, conn: "Connection", probe: bool, for_checkout: bool,
               took: float = 0.0) -> Tuple[bool, bool, List[Closing]]:
        """A connect of ``inst`` succeeded.  With ``for_checkout`` the connection is the
        caller's (in use); otherwise it goes to the first waiter or the idle stack.

        Returns ``(kept, restored, closing)``: ``kept`` is False when the instance was
        retired or the pool closed meanwhile (the connection is in ``closing``).
        """
        with self.lock:
            inst.opening -= 1
            inst.opened_total += 1
            counters = self.counters
            counters.connections_opened += 1
            counters.connect_s += took
            conn.gen = self.generation
            if inst.retired or self.closed:
                inst.closing += 1
                return False, False, [(inst, conn, "removed" if not self.closed
                                       else "pool_closed")]
            restored = inst.health.connected()
            inst.healthy = inst.health.serving
            if restored and self.subsetter is not None:
                self._resubset_locked()
            if for_checkout:
                conn.uses += 1
                inst.in_use.add(conn)
            else:
                self._push_idle_locked(inst, conn)
            if self.waiters:
                self._assign_locked(inst)
            return True, restored, []

    def open_failed(self, inst: InstancePool, error: BaseException, probe: bool,
                    took: float = 0.0) -> Optional[Ejection]:
        """A connect of ``inst`` failed (an ``Exception``): eject it, free the slot."""
        now = _compat.monotonic()
        with self.lock:
            inst.opening -= 1
            self.counters.connect_errors += 1
            self.counters.connect_s += took
            ejection = inst.health.connect_failed(now, error)
            inst.healthy = inst.health.serving
            if self.subsetter is not None:
                self._resubset_locked()
            self._after_capacity_change_locked(inst)
            return ejection

    def open_abandoned(self, inst: InstancePool, probe: bool, failed: bool = False,
                       took: float = 0.0) -> List[Closing]:
        """A connect was interrupted (not the server's fault) or a permit given back: free
        the slot and let the next waiter have it; the instance's health is unchanged.
        ``failed``: a connect that ran out of the checkout's time (a connect error)."""
        with self.lock:
            inst.opening -= 1
            if failed:
                self.counters.connect_errors += 1
                self.counters.connect_s += took
            if probe:
                inst.health.probe_abandoned()
            inst.health.last_attempt_at = _compat.monotonic()
            self._after_capacity_change_locked(inst)
        return []

    # -- checkin -----------------------------------------------------------------------

    def checkin_clean(self, inst: InstancePool, conn: "Connection", calls: int,
                      call_errors: int) -> bool:
        """The common checkin, after a block that raised nothing and left no call in
        flight: back on top of the idle stack (or to a waiter), the stats counted.

        :returns: ``False``, having changed nothing, when :meth:`checkin` must decide
            (the connection expired, was drained or resized away, its instance retired,
            the pool closed, or a success would end the instance's failure streak).
        """
        now = _compat.monotonic()
        with self.lock:
            health = inst.health
            if (self.closed or self.oversize or inst.retired or now >= conn.expires_at
                    or conn.gen < self.generation
                    or (calls and (health.errors or health.backoff.failures))):
                return False
            try:
                inst.in_use.remove(conn)
            except KeyError:
                return True  # not ours (any more): checked out before a fork
            counters = self.counters
            counters.checkouts += 1
            counters.in_use_s += now - conn.out_at
            conn.out_at = 0.0
            if calls:
                counters.calls += calls
                counters.call_errors += call_errors
            conn.idle_since = now
            inst.idle.append(conn)
            if self.waiters and inst.healthy:
                self._assign_locked(inst)
        return True

    def checkin(self, inst: InstancePool, conn: "Connection", reuse: bool, used: bool = True,
                failure: Optional[BaseException] = None, reason: str = "error",
                calls: int = 0, call_errors: int = 0
                ) -> Optional[Tuple[List[Closing], Optional[Ejection]]]:
        """Take back a checked-out connection.

        :param reuse: the stream is intact; keep the connection unless it expired or its
            instance is retired.  Otherwise it is closed (``reason``).
        :param used: a call was answered on it (resets the instance's failure streak).
        :param failure: the call failed in a way that counts against the instance.
        :param calls: calls made during the checkout; ``call_errors`` of them raised.
        :returns: ``None`` on the common path (kept, nothing to report); otherwise the
            connections to close and the ejection to report.
        """
        now = _compat.monotonic()
        ejection: Optional[Ejection] = None
        with self.lock:
            try:
                inst.in_use.remove(conn)
            except KeyError:
                # Not ours (any more): checked out before a fork and detached since.
                return None
            out_at = conn.out_at
            if out_at:  # handed to a caller (not one discarded before that)
                conn.out_at = 0.0
                counters = self.counters
                counters.checkouts += 1
                counters.in_use_s += now - out_at
                if calls:
                    counters.calls += calls
                    counters.call_errors += call_errors
            health = inst.health
            if failure is not None and _refused(failure):
                # Refused before the server's application read it (TLS): a failed
                # connect, not subject to the ejection cap.
                ejection = health.call_refused(now, failure)
                inst.healthy = health.serving
                if self.subsetter is not None:
                    self._resubset_locked()
                self._note_ejection_locked(inst, ejection)
            elif failure is not None:
                ejection = health.call_failed(now, failure, self._may_eject_locked(inst))
                if ejection is not None:
                    inst.healthy = health.serving
                    self._note_ejection_locked(inst, ejection)
            elif used and reuse and (health.errors or health.backoff.failures):
                health.call_succeeded()
            if not reuse or inst.retired or self.closed or now >= conn.expires_at:
                if reuse:
                    reason = ("pool_closed" if self.closed else
                              "removed" if inst.retired else "expired")
                inst.closing += 1
                return [(inst, conn, reason)], ejection
            if conn.gen < self.generation or (self.oversize and inst.size() >= inst.max_size):
                # Drained, or above the cap that resize() lowered (this one not counted
                # any more: size() >= max_size means it would make one too many).
                inst.closing += 1
                return [(inst, conn, "drained" if conn.gen < self.generation
                         else "resized")], ejection
            conn.idle_since = now
            inst.idle.append(conn)
            if self.waiters and inst.healthy:
                self._assign_locked(inst)
        return None if ejection is None else ([], ejection)

    def closed_conns(self, closing: Iterable[Closing]) -> None:
        """The sockets of ``closing`` are closed: free their slots for waiters."""
        touched: List[InstancePool] = []
        with self.lock:
            for inst, _conn, reason in closing:
                if not reason:
                    continue
                inst.closing -= 1
                inst.closed_total += 1
                if reason in _LOST:
                    self.counters.connections_lost += 1
                if inst not in touched:
                    touched.append(inst)
            if self.waiters:
                for inst in touched:
                    self._after_capacity_change_locked(inst)
            if self.drain_waits:
                self._check_drains_locked()

    # -- hand-offs ---------------------------------------------------------------------

    def _push_idle_locked(self, inst: InstancePool, conn: "Connection") -> None:
        """Put a connection on ``inst``'s idle stack at its place by ``idle_since`` (the
        top for a fresh one; its old place for one coming back from the watchdog)."""
        idle = inst.idle
        if not idle or idle[-1].idle_since <= conn.idle_since:
            idle.append(conn)
            return
        keys = [c.idle_since for c in idle]
        idle.insert(bisect.bisect_right(keys, conn.idle_since), conn)

    def _assign_locked(self, inst: InstancePool) -> None:
        """Hand ``inst``'s idle connections, then its free slots, to waiters in order."""
        waiters = self.waiters
        while waiters and inst.healthy and not inst.retired and not self.closed:
            if inst.idle:
                conn = inst.idle.pop()
                conn.uses += 1
                inst.in_use.add(conn)
                waiters.popleft()._give(inst, conn)
            elif inst.can_open():
                inst.opening += 1
                waiters.popleft()._give(inst, None)
            else:
                return

    def _after_capacity_change_locked(self, inst: InstancePool) -> None:
        """A slot of ``inst`` was freed or its health changed: serve waiters from it, or,
        when no instance can serve any more, send every waiter back to routing (which
        probes or fails them within their own deadlines)."""
        if not self.waiters:
            return
        if inst.healthy and not inst.retired:
            self._assign_locked(inst)
        elif not any(i.healthy and not i.retired for i in self.ring):
            self._reroute_waiters_locked()

    def _note_ejection_locked(self, inst: InstancePool, ejection: Ejection) -> None:
        if self.subsetter is not None:
            self._resubset_locked()
        if self.waiters and not any(i.healthy and not i.retired for i in self.ring):
            self._reroute_waiters_locked()

    def _may_eject_locked(self, inst: InstancePool) -> bool:
        """The ejection cap (``max_ejection_percent``, at least one): may ``inst`` be
        ejected for failing calls now?  Ejected instances of the ring count, whatever
        ejected them; connect failures themselves are never capped."""
        ring = self.ring if self.subsetter is None else self.ranked
        if inst.health.errors + 1 < inst.health.threshold:
            return True  # not at the threshold: nothing to decide
        ejected = sum(1 for i in ring if not i.healthy and not i.retired)
        cap = max(1, len(ring) * self.config.max_ejection_percent // 100)
        return ejected < cap

    def _resubset_locked(self) -> None:
        """Members: the first ``subset_size`` healthy instances in rank (an ejected member
        is replaced by the next one while it is out); with none healthy, the first
        ``subset_size`` in rank, so that panic mode probes them.  Candidates (the first
        ``subset_size`` in rank, healthy or not) are the ones the watchdog probes."""
        assert self.subsetter is not None
        size = self.subsetter.size
        members: List[InstancePool] = []
        for position, inst in enumerate(self.ranked):
            inst.candidate = position < size
            if inst.healthy and len(members) < size:
                members.append(inst)
        if not members:
            members = list(self.ranked[:size])
        for inst in self.ranked:
            inst.member = False
        for inst in members:
            inst.member = True
        if tuple(members) != self.ring:
            self.ring = tuple(members)
            if self.waiters:
                for inst in members:
                    if inst.healthy and not inst.retired:
                        self._assign_locked(inst)

    def _reroute_waiters_locked(self) -> None:
        waiters = list(self.waiters)
        self.waiters.clear()
        for w in waiters:
            w._fail(Reroute(self.name))

    def assign_all(self) -> None:
        """Serve waiters from every instance (after discovery or health changed)."""
        with self.lock:
            if not self.waiters:
                return
            for inst in self.ring:
                if not self.waiters:
                    break
                if inst.healthy and not inst.retired:
                    self._assign_locked(inst)
            if self.waiters and not any(i.healthy and not i.retired for i in self.ring):
                self._reroute_waiters_locked()

    # -- health ------------------------------------------------------------------------

    def eject(self, inst: InstancePool, error: Optional[BaseException], why: str) -> Ejection:
        with self.lock:
            ejection = inst.health.eject(_compat.monotonic(), error, why)
            inst.healthy = inst.health.serving
            self._note_ejection_locked(inst, ejection)
            return ejection

    def call_failed(self, inst: InstancePool, error: BaseException) -> Optional[Ejection]:
        """A failure that counts against ``inst`` without a connection to check in (a
        heartbeat's, already handled as a discard)."""
        with self.lock:
            ejection = inst.health.call_failed(_compat.monotonic(), error,
                                               self._may_eject_locked(inst))
            if ejection is not None:
                inst.healthy = inst.health.serving
                self._note_ejection_locked(inst, ejection)
            return ejection

    # -- discovery ---------------------------------------------------------------------

    def apply(self, endpoints: Sequence[Endpoint]
              ) -> Tuple[List[str], List[InstancePool], List[Closing]]:
        """Apply a full snapshot as a diff.  Returns ``(added keys, removed instances,
        idle connections of removed instances to close)``."""
        wanted: Dict[Address, Endpoint] = {}
        for endpoint in endpoints:
            wanted.setdefault(endpoint.address, endpoint)
        if self.subsetter is not None:
            # Hashing every address is pure CPU: done before taking the lock.
            wanted = {e.address: e for e in self.subsetter.ranked(wanted.values())}
        added: List[str] = []
        removed: List[InstancePool] = []
        closing: List[Closing] = []
        with self.lock:
            if self.closed:
                return [], [], []
            first = not self.discovered
            self.discovered = True
            instances = dict(self.instances)
            for address in list(instances):
                if address not in wanted:
                    inst = instances.pop(address)
                    inst.retired = True
                    inst.healthy = False
                    removed.append(inst)
                    idle, inst.idle = inst.idle, []
                    inst.closing += len(idle)
                    closing.extend((inst, c, "removed") for c in idle)
            for address, endpoint in wanted.items():
                known = instances.get(address)
                if known is None:
                    instances[address] = InstancePool(endpoint, self.config)
                    added.append(str(address))
                else:
                    known.endpoint = endpoint
                    known.weight = endpoint.weight
                    known.tls = endpoint.tls
            self.instances = instances
            if self.subsetter is None:
                self.ring = tuple(instances[a] for a in wanted)
            else:
                self.ranked = tuple(instances[a] for a in wanted)
                self._resubset_locked()
            # Waiters may now be served by a new instance, or be left with none at all.
            if self.waiters:
                for inst in self.ring:
                    if not self.waiters:
                        break
                    if inst.healthy:
                        self._assign_locked(inst)
                if self.waiters and not any(i.healthy for i in self.ring):
                    self._reroute_waiters_locked()
        if first:
            self.first_answer.set()
        return added, removed, closing

    # -- operator controls: drain, resize ----------------------------------------------

    def drain(self) -> Tuple[int, List[Closing]]:
        """Start a new generation: every connection opened before is replaced (idle ones
        returned here to close now, in-use ones closed at checkin, busy ones when they come
        back).  Returns ``(generation, closing)``."""
        with self.lock:
            self.generation += 1
            generation = self.generation
            closing: List[Closing] = []
            for inst in self.instances.values():
                old = [c for c in inst.idle if c.gen < generation]
                if old:
                    inst.idle = [c for c in inst.idle if c.gen >= generation]
                    inst.closing += len(old)
                    closing.extend((inst, c, "drained") for c in old)
            return generation, closing

    def old_connections(self, generation: int) -> int:
        """Connections opened before ``generation`` still open (or being closed)."""
        with self.lock:
            return self._old_left_locked(generation)

    def _old_left_locked(self, generation: int) -> int:
        left = 0
        for inst in self.instances.values():
            for group in (inst.idle, inst.in_use, inst.busy):
                for conn in group:
                    if conn.gen < generation:
                        left += 1
        # Connections on their way to being closed: the socket is not closed yet.  (Counted
        # without their generation: a drain waits for every close in flight, a bounded few.)
        return left + sum(inst.closing for inst in self.instances.values())

    def wait_drain(self, generation: int, event: Any) -> bool:
        """Register ``event`` to be set when no connection older than ``generation`` is
        left; False (nothing registered) when that is already so."""
        with self.lock:
            if self.closed or not self._old_left_locked(generation):
                return False
            self.drain_waits.append((generation, event))
            return True

    def cancel_drain_wait(self, event: Any) -> None:
        with self.lock:
            self.drain_waits = [(g, e) for g, e in self.drain_waits if e is not event]

    def _check_drains_locked(self) -> None:
        keep: List[Tuple[int, Any]] = []
        for generation, event in self.drain_waits:
            if self.closed or not self._old_left_locked(generation):
                event.set()
            else:
                keep.append((generation, event))
        self.drain_waits = keep

    def resize(self, min_size: Any, max_size: Any) -> Tuple["PoolConfig", List[Closing]]:
        """Apply new sizes (checked by :meth:`PoolConfig.resized`, ``UNSET`` keeps one):
        idle connections above a lower cap are returned to close now, in-use ones close at
        checkin; a higher cap serves waiters at once.  Returns the new config.

        :raises ValueError: naming the invalid option (nothing changed).
        """
        closing: List[Closing] = []
        with self.lock:
            if self.closed:
                raise PoolClosed(f"pool {self.name!r} is closed")
            # Under the lock, so that two resizes at once cannot lose one's change.
            config = self.config.resized(min_size, max_size)
            self.config = config
            max_size = config.max_size
            oversize = False
            for inst in self.instances.values():
                inst.max_size = max_size
                # The oldest idle connections go first (the bottom of the stack).
                while inst.idle and inst.size() > max_size:
                    conn = inst.idle.pop(0)
                    inst.closing += 1
                    closing.append((inst, conn, "resized"))
                if inst.size() - inst.closing > max_size:
                    oversize = True
            self.oversize = oversize
            if self.waiters:
                for inst in self.ring:
                    if inst.healthy and not inst.retired:
                        self._assign_locked(inst)
        return config, closing

    def check_oversize_locked(self) -> None:
        """Clear the resize flag once no instance holds more than the cap (watchdog)."""
        if self.oversize and all(i.size() - i.closing <= i.max_size
                                 for i in self.instances.values()):
            self.oversize = False

    def pop_counters(self, reset: bool) -> Dict[str, Any]:
        with self.lock:
            counters = self.counters
            if reset:
                self.counters = Counters()
        return counters.as_dict()

    # -- lifecycle ---------------------------------------------------------------------

    def close(self) -> Tuple[List[Waiter], List[Closing]]:
        """Mark closed; take every idle connection and every waiter out (idempotent)."""
        with self.lock:
            if self.closed:
                return [], []
            self.closed = True
            closing: List[Closing] = []
            for inst in self.instances.values():
                inst.retired = True
                idle, inst.idle = inst.idle, []
                inst.closing += len(idle)
                closing.extend((inst, c, "pool_closed") for c in idle)
            waiters = list(self.waiters)
            self.waiters.clear()
            for w in waiters:
                w._fail(PoolClosed(f"pool {self.name!r} is closed"))
            # Checkouts still out hold their instance; their checkins close the sockets.
            self.instances = {}
            self.ring = ()
            drains, self.drain_waits = self.drain_waits, []
        for _, event in drains:
            event.set()
        self.first_answer.set()  # wake checkouts waiting for discovery's first answer
        return waiters, closing

    def drop_everything(self) -> List["Connection"]:
        """After fork or late patching: forget every connection (the caller detaches or
        closes them), reset counts and waiters, keep instances and their health."""
        conns: List["Connection"] = []
        for inst in self.instances.values():
            conns.extend(inst.idle)
            conns.extend(inst.in_use)
            conns.extend(inst.busy)
            inst.idle = []
            inst.in_use = set()
            inst.busy = set()
            inst.opening = 0
            inst.closing = 0
            inst.health.probe_abandoned()
        self.waiters = deque()
        return conns

    def snapshot(self) -> Tuple[List[InstancePool], List[Dict[str, Any]], int]:
        with self.lock:
            instances = list(self.instances.values())
            return instances, [i.stats_locked() for i in instances], len(self.waiters)

    def counts(self) -> Dict[str, int]:
        """Totals over every instance, read under the lock (for tests and invariants)."""
        with self.lock:
            insts = list(self.instances.values())
            return {
                "idle": sum(len(i.idle) for i in insts),
                "in_use": sum(len(i.in_use) for i in insts),
                "busy": sum(len(i.busy) for i in insts),
                "opening": sum(i.opening for i in insts),
                "closing": sum(i.closing for i in insts),
                "waiting": len(self.waiters),
            }
