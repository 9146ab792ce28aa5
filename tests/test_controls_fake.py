"""drain, resize, max_waiting, leak_timeout and the counters on the socket-free layer
(tests/fakes.py): every exit path, an interruption included, leaves the counts exact."""

from __future__ import annotations

import threading

import pytest

import thriftpool
from thriftpool import _compat

from fakes import Interrupted
from servers import wait_for

pytestmark = pytest.mark.timeout(20)


def hold(w, n):
    held = [w.pool.checkout() for _ in range(n)]
    for h in held:
        h.__enter__()
    return held


def release(held):
    for h in held:
        h.__exit__(None, None, None)


class Leaks(thriftpool.PoolListener):
    def __init__(self):
        self.leaks = []
        self.closed = []

    def connection_leaked(self, pool, holder):
        self.leaks.append(holder)

    def connection_closed(self, pool, address, reason):
        self.closed.append(reason)


# -- drain ---------------------------------------------------------------------------------

def test_drain_closes_idle_at_once_and_in_use_at_checkin(world):
    w = world(addresses=("127.0.0.1:1",), max_size=3)
    held = hold(w, 3)
    release(held[:2])
    old = list(w.conns)
    w.pool.drain()
    assert [c.closes for c in old].count(1) == 2
    w.check(held=1)
    release(held[2:])
    assert all(c.closes == 1 for c in old)
    w.check(held=0)
    with w.pool.checkout():
        pass
    assert len(w.conns) == 4  # a new connection, of the new generation
    w.check(held=0)


@pytest.mark.parametrize("point", ["connection_closed"])
def test_drain_interrupted_while_closing_leaves_counts_exact(world, point):
    w = world(addresses=("127.0.0.1:1",), max_size=3)
    release(hold(w, 2))
    w.hooks.raise_at(point)
    with pytest.raises(Interrupted):
        w.pool.drain()
    # The close was interrupted after the first socket: the other is still closed, and
    # both slots are free.
    w.maintain()
    assert w.counts()["closing"] == 0
    assert w.counts()["idle"] == 0
    w.check(held=0)


def test_drain_wait_times_out_and_leaves_no_registration(world):
    w = world(addresses=("127.0.0.1:1",))
    held = hold(w, 1)
    with pytest.raises(TimeoutError):
        w.pool.drain(wait=True, timeout=0.05)
    assert w.state.drain_waits == []
    release(held)
    w.check(held=0)


def test_drain_wait_interrupted_leaves_no_registration(world, monkeypatch):
    w = world(addresses=("127.0.0.1:1",))
    held = hold(w, 1)

    class Boom:
        def set(self):
            pass

        def wait(self, timeout):
            raise Interrupted("drain wait")

    monkeypatch.setattr(_compat, "Event", Boom)
    with pytest.raises(Interrupted):
        w.pool.drain(wait=True, timeout=5)
    assert w.state.drain_waits == []
    release(held)
    w.check(held=0)


def test_drain_wait_returns_when_the_last_old_connection_closes(world):
    w = world(addresses=("127.0.0.1:1",))
    held = hold(w, 1)
    done = []
    t = threading.Thread(target=lambda: done.append(w.pool.drain(wait=True, timeout=10)))
    t.start()
    wait_for(lambda: w.state.drain_waits, 5, message="drain waiting")
    release(held)
    t.join(5)
    assert done == [None] and w.state.drain_waits == []
    w.check(held=0)


def test_a_connection_busy_in_a_heartbeat_is_drained_when_it_comes_back(world):
    w = world(addresses=("127.0.0.1:1",), heartbeat="ping", heartbeat_interval=1)
    release(hold(w, 1))
    beats = []

    def heartbeat(conn):
        beats.append(conn)
        w.pool.drain()  # the drain happens while the connection is busy

    w.pool._heartbeat = heartbeat
    w.clock.advance(2)
    w.maintain()
    assert beats and beats[0].closes == 1
    w.check(held=0)


# -- resize --------------------------------------------------------------------------------

def test_shrink_then_checkin_keeps_the_cap(world):
    w = world(addresses=("127.0.0.1:1",), max_size=4)
    held = hold(w, 4)
    w.pool.resize(max_size=2)
    for h in held:
        h.__exit__(None, None, None)
        with w.state.lock:
            (inst,) = w.state.instances.values()
            assert inst.size() <= 4 and inst.opening == 0
    assert w.counts()["idle"] == 2
    w.maintain()
    assert not w.state.oversize
    w.check(held=0)


def test_growing_serves_a_queued_waiter(world):
    w = world(addresses=("127.0.0.1:1",), max_size=1, checkout_timeout=10)
    held = hold(w, 1)
    got = []

    def waiter():
        with w.pool.checkout():
            got.append(True)

    t = threading.Thread(target=waiter)
    t.start()
    wait_for(lambda: w.counts()["waiting"] == 1, 5, message="queued")
    w.pool.resize(max_size=2)
    t.join(5)
    assert got == [True]
    release(held)
    w.check(held=0)


def test_resize_interrupted_while_closing_leaves_counts_exact(world):
    w = world(addresses=("127.0.0.1:1",), max_size=3)
    release(hold(w, 3))
    w.hooks.raise_at("connection_closed")
    with pytest.raises(Interrupted):
        w.pool.resize(max_size=1)
    assert w.pool.config.max_size == 1
    w.maintain()
    assert w.counts()["idle"] <= 1
    w.check(held=0)


def test_resize_with_a_bad_value_changes_nothing(world):
    w = world(addresses=("127.0.0.1:1",), max_size=3)
    with pytest.raises(ValueError, match="min_size"):
        w.pool.resize(min_size=4)
    assert w.state.config.max_size == 3
    assert all(i.max_size == 3 for i in w.state.instances.values())


# -- max_waiting ---------------------------------------------------------------------------

def test_max_waiting_refuses_without_queueing_or_reserving(world):
    w = world(addresses=("127.0.0.1:1",), max_size=1, max_waiting=1, checkout_timeout=10)
    held = hold(w, 1)
    queued = w.pool.checkout()
    t = threading.Thread(target=queued.__enter__)
    t.start()
    wait_for(lambda: w.counts()["waiting"] == 1, 5, message="one waiter")
    with pytest.raises(thriftpool.TooManyWaiters) as info:
        with w.pool.checkout():
            pass
    assert info.value.waiting == 1 and isinstance(info.value, thriftpool.PoolExhausted)
    assert w.counts()["waiting"] == 1 and w.counts()["opening"] == 0
    release(held)
    t.join(5)
    assert w.pool.stats()["too_many_waiters"] == 1
    import pickle

    copy = pickle.loads(pickle.dumps(info.value))
    assert (copy.waiting, copy.max_waiting, str(copy)) == (1, 1, str(info.value))
    w.check(held=1)  # the queued checkout got the connection
    queued.__exit__(None, None, None)
    w.check(held=0)


# -- leak_timeout --------------------------------------------------------------------------

def test_a_leak_is_reported_once_per_checkout(world):
    w = world(addresses=("127.0.0.1:1",), leak_timeout=5)
    leaks = Leaks()
    w.pool._events._listeners += (leaks,)  # beside the fake world's own listener
    held = hold(w, 1)
    w.maintain()
    assert leaks.leaks == []
    w.clock.advance(6)
    w.maintain()
    w.maintain()
    assert len(leaks.leaks) == 1 and leaks.leaks[0].age >= 5
    release(held)
    held = hold(w, 1)  # a new checkout of the same connection: reported anew
    w.clock.advance(6)
    w.maintain()
    assert len(leaks.leaks) == 2
    release(held)
    w.check(held=0)


# -- counters ------------------------------------------------------------------------------

@pytest.mark.parametrize("point", ["checkout", "peer_closed"])
def test_an_interrupted_checkout_is_not_counted(world, point):
    w = world(addresses=("127.0.0.1:1",))
    release(hold(w, 1))
    w.hooks.raise_at(point)
    with pytest.raises(Interrupted):
        with w.pool.checkout():
            pass
    assert w.pool.stats()["checkouts"] == 1
    release(hold(w, 1))
    assert w.pool.stats()["checkouts"] == 2
    w.check(held=0)
