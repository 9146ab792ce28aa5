"""The watchdog's work on one instance: planned under the state lock, carried out after it.

One pass over an instance, in order:

1. **Liveness** (:func:`check_idle`): the idle sockets are polled together, outside the
   lock and without leaving the idle stack (a checkout may take one meanwhile; a socket
   that was checked out during the poll is left alone, since its readability then means
   nothing).  A readable idle socket was hung up on: it is closed, so ``min_size`` counts
   live connections.  A readable TLS socket may hold only a session ticket; it is taken
   aside (``busy``) for a non-blocking read and put back at its place if it is fine.
2. **Plan** (:func:`plan`, under the lock, no I/O): idle sockets past ``max_lifetime``,
   drained or above a lowered cap, and those above ``min_size`` idle longer than
   ``idle_timeout`` go to ``closing``; sockets due a heartbeat go to ``busy``.
3. **Carry out** (:func:`run`): close, heartbeat, then reserve (in ``opening``, under the
   lock, once the closes freed their slots) and open the connections to open: up to the
   fill target while healthy, or one probe while ejected, past the backoff, and only while
   checkouts want the pool (no reconnects without demand).  Every step gives back what it
   reserved in a ``finally``, so an exception at any line leaves the counts exact.

Heartbeats keep a connection's ``idle_since`` and its place in the stack (reaping goes on
as if the heartbeat had not happened) and never count as call successes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, List, Tuple

from . import _compat
from .connection import Connection, readable
from .state import Closing, PoolState

if TYPE_CHECKING:
    from .events import Emitter
    from .instance import InstancePool

__all__ = ["Plan", "check_idle", "close_all", "plan", "report_ejection", "report_restored", "run"]

logger = logging.getLogger(__name__)


@dataclass
class Plan:
    """What one pass does to one instance, decided under the lock."""

    inst: "InstancePool"
    closing: List[Closing] = field(default_factory=list)
    heartbeats: List[Connection] = field(default_factory=list)
    now: float = 0.0
    demand: bool = False


def check_idle(state: PoolState, inst: "InstancePool", events: "Emitter") -> None:
    """Close the idle sockets of ``inst`` that the server hung up on (step 1)."""
    with state.lock:
        if inst.retired or not inst.idle:
            return
        snapshot: List[Tuple[Connection, int]] = [(c, c.uses) for c in inst.idle]
    found = readable([c for c, _ in snapshot])
    if not found:
        return
    closing: List[Closing] = []
    tls_check: List[Connection] = []
    with state.lock:
        if inst.retired:
            return
        for conn, uses in snapshot:
            # Still idle, and not checked out even briefly while we polled.
            if conn in found and conn.uses == uses and conn in inst.idle:
                inst.idle.remove(conn)
                if conn.tls and conn.fileno >= 0:
                    inst.busy.add(conn)
                    tls_check.append(conn)
                else:
                    inst.closing += 1
                    closing.append((inst, conn, "peer_closed"))
    try:
        for conn in tls_check:
            # A non-blocking read of TLS records: only the watchdog holds the socket now.
            dead = conn.peer_closed()
            with state.lock:
                inst.busy.discard(conn)
                if dead or inst.retired or state.closed or conn.gen < state.generation:
                    inst.closing += 1
                    closing.append((inst, conn, "peer_closed" if dead else
                                    "drained" if conn.gen < state.generation else "removed"))
                else:
                    state._push_idle_locked(inst, conn)
                    if state.waiters:
                        state._assign_locked(inst)
    finally:
        leftover = [c for c in tls_check if c in inst.busy]
        if leftover:  # interrupted: close what was taken aside
            with state.lock:
                for conn in leftover:
                    inst.busy.discard(conn)
                    inst.closing += 1
                    closing.append((inst, conn, "peer_closed"))
        close_all(state, closing, events)


def plan(state: PoolState, inst: "InstancePool", now: float, demand: bool) -> Plan:
    """Decide step 2 for ``inst`` under the lock; reserves what it plans (see module doc)."""
    out = Plan(inst)
    with state.lock:
        config = state.config  # resize() replaces it under the lock
        if inst.retired or state.closed:
            return out
        total = inst.size()
        if inst.idle:
            keep: List[Connection] = []
            idle_timeout = config.idle_timeout
            generation = state.generation
            # The bottom of the stack holds the connections idle the longest.
            for conn in inst.idle:
                if conn.gen < generation:  # opened before a drain(); busy during it
                    out.closing.append((inst, conn, "drained"))
                    total -= 1
                elif total > inst.max_size:  # above a cap that resize() lowered
                    out.closing.append((inst, conn, "resized"))
                    total -= 1
                elif now >= conn.expires_at:
                    out.closing.append((inst, conn, "expired"))
                    total -= 1
                elif (idle_timeout is not None and total > config.min_size
                        and now - conn.idle_since >= idle_timeout):
                    out.closing.append((inst, conn, "idle"))
                    total -= 1
                else:
                    keep.append(conn)
            if out.closing:
                inst.idle[:] = keep
                inst.closing += len(out.closing)
        if not inst.member and inst.healthy:
            # Outside the subset: no connections kept; idle ones go (in use at checkin).
            for conn in inst.idle:
                out.closing.append((inst, conn, "subset"))
            inst.closing += len(inst.idle)
            inst.idle = []
        out.now = now
        out.demand = demand
        if config.heartbeat is not None and inst.healthy and inst.idle:
            interval = config.heartbeat_interval
            keep = []
            for conn in inst.idle:
                if now - max(conn.idle_since, conn.last_beat) >= interval:
                    out.heartbeats.append(conn)
                    inst.busy.add(conn)
                else:
                    keep.append(conn)
            inst.idle[:] = keep
    return out


def run(state: PoolState, p: Plan, events: "Emitter", heartbeat: Any) -> None:
    """Carry out a :class:`Plan` (step 3), outside the lock.

    :param heartbeat: ``heartbeat(conn)`` makes the heartbeat call, raising on failure.
    """
    inst = p.inst
    close_all(state, p.closing, events)
    if p.closing:
        logger.debug("pool %r: closed %d idle connections to %s", state.name,
                     len(p.closing), inst.key)
    for conn in p.heartbeats:
        _beat(state, inst, conn, events, heartbeat)
    # The connections to open are reserved only now, once the closes above freed their
    # slots: reserving them in plan() would count both for a moment, above max_size.
    to_open, probe = _reserve_opens(state, inst, p.now, p.demand)
    _open(state, inst, to_open, probe, events)
    inst.first_fill_done = True


def _reserve_opens(state: PoolState, inst: "InstancePool", now: float, demand: bool
                   ) -> Tuple[int, bool]:
    """Reserve (in ``opening``) the connections to open: up to the fill target while
    healthy (a member of the subset), or one probe while ejected, past the backoff, and only
    while checkouts want the pool (no reconnects without demand)."""
    with state.lock:
        config = state.config
        if inst.retired or state.closed:
            return 0, False
        total = inst.size()
        target = min(max(inst.fill_target, config.min_size), inst.max_size)
        if inst.healthy:
            to_open = max(0, target - total) if inst.member else 0
            inst.opening += to_open
            return to_open, False
        if (demand and inst.candidate and total < inst.max_size
                and inst.health.may_probe(now)):
            inst.health.start_probe(now)
            inst.opening += 1
            return 1, True
        return 0, False


def _beat(state: PoolState, inst: "InstancePool", conn: Connection, events: "Emitter",
          heartbeat: Any) -> None:
    ok = False
    error: BaseException = RuntimeError("heartbeat interrupted")
    try:
        heartbeat(conn)
        ok = True
    except BaseException as exc:
        error = exc
        if not isinstance(exc, Exception):
            raise
        logger.info("pool %r: heartbeat %s() to %s failed: %s", state.name,
                    state.config.heartbeat, inst.key, exc)
    finally:
        closing: List[Closing] = []
        with state.lock:
            inst.busy.discard(conn)
            if ok and not inst.retired and not state.closed and conn.gen >= state.generation:
                conn.last_beat = _compat.monotonic()
                state._push_idle_locked(inst, conn)   # idle_since unchanged: its old place
                if state.waiters:
                    state._assign_locked(inst)
            else:
                inst.closing += 1
                closing.append((inst, conn, "heartbeat" if not ok else
                                "drained" if conn.gen < state.generation else "removed"))
        close_all(state, closing, events)
    if not ok and isinstance(error, Exception):
        report_ejection(state, inst, state.call_failed(inst, error), events)


def _open(state: PoolState, inst: "InstancePool", to_open: int, probe: bool,
          events: "Emitter") -> None:
    """Open ``to_open`` reserved connections; give back the reservations not used."""
    config = state.config
    left = to_open
    try:
        while left:
            started = _compat.monotonic()
            try:
                conn = state.connect(inst.address, config, inst.tls)
                if probe and inst.health.needs_call:
                    _trial(state, conn)
            except Exception as exc:
                left -= 1
                report_ejection(state, inst, state.open_failed(
                    inst, exc, probe, _compat.monotonic() - started), events)
                return
            left -= 1
            kept, restored, closing = state.opened(inst, conn, probe, for_checkout=False,
                                                   took=_compat.monotonic() - started)
            if events:
                events.emit("connection_opened", inst.key)
            if closing:
                close_all(state, closing, events)
                return
            if restored:
                report_restored(state, inst, events)
        if to_open and inst.fill_target > config.min_size:
            inst.fill_target = config.min_size
    finally:
        if left:  # a failure or an interruption: free the unused reservations
            with state.lock:
                inst.opening -= left
                if probe:
                    inst.health.probe_abandoned()
                state._after_capacity_change_locked(inst)


def _trial(state: PoolState, conn: Connection) -> None:
    """Before an instance that refused calls (not connects) is restored: one trial call
    on the probe's connection, bounded like a connect.  A failure closes it and raises."""
    spec = state.config.spec
    if spec is None:
        return
    client = spec.make_client(conn)
    try:
        client._trial(state.config.connect_timeout)
    except BaseException:
        conn.close()
        raise
    finally:
        client._conn = None


def close_all(state: PoolState, closing: List[Closing], events: "Emitter") -> None:
    """Close connections already taken out of the pool (never under the lock), then free
    their slots.  The slots are freed even if a close or a listener is interrupted."""
    if not closing:
        return
    done = 0
    try:
        for inst, conn, reason in closing:
            done += 1
            conn.close()
            if reason and events:
                events.emit("connection_closed", inst.key, reason)
    finally:
        # Interrupted (a listener, a gevent.Timeout): the others are still closed, quietly.
        for _, conn, _ in closing[done:]:
            conn.close()
        state.closed_conns(closing)


def report_ejection(state: PoolState, inst: "InstancePool", ejection: Any,
                    events: "Emitter") -> None:
    """Log an ejection and tell the listeners (after the lock)."""
    if ejection is None:
        return
    if ejection.was_healthy:
        logger.warning("pool %r: instance %s ejected: %s (%s); next attempt in %.2fs",
                       state.name, inst.key, ejection.why, ejection.error, ejection.delay)
        if events:
            why = ejection.why if ejection.error is None else \
                f"{ejection.why} ({ejection.error})"
            events.emit("instance_ejected", inst.key, why, ejection.delay)
    else:
        logger.info("pool %r: instance %s still failing (%d in a row): %s (%s); next "
                    "attempt in %.2fs", state.name, inst.key, ejection.failures,
                    ejection.why, ejection.error, ejection.delay)


def report_restored(state: PoolState, inst: "InstancePool", events: "Emitter") -> None:
    logger.info("pool %r: instance %s restored: a connect succeeded", state.name, inst.key)
    if events:
        events.emit("instance_restored", inst.key)


