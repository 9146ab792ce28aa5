"""Every exit path restores the pool: the socket-free layer (tests/fakes.py).

Each test raises a BaseException (standing for ``gevent.Timeout`` or
``KeyboardInterrupt``) at one point of a checkout or checkin, then checks the invariants:
the cap holds, in_use equals the checkouts held, nothing is left opening, closing or
waiting, and every connection is closed exactly once; then a full round of checkouts
succeeds.  The real-interruption tests (signals, gevent) are in test_real_interruptions.py.
"""

from __future__ import annotations

import gc

import pytest

import thriftpool
from thriftpool.state import Waiter

from fakes import FakeWorld, Interrupted

pytestmark = pytest.mark.timeout(20)


@pytest.fixture
def fake_wait(monkeypatch):
    """Replace the blocking wait of a queued checkout: run ``during()`` (another caller's
    step, or a raise) and return at once, advancing the fake clock by what was left if
    nothing was handed over."""
    steps = []
    original = Waiter.wait

    def wait(self, timeout):
        if steps:
            steps.pop(0)()
        if not self.done:
            clock = thriftpool._compat.monotonic
            clock.advance(timeout)  # type: ignore[attr-defined]
        return original(self, 0)

    monkeypatch.setattr(Waiter, "wait", wait)
    return steps


def full_round(w: FakeWorld, n: int = 4) -> None:
    """n checkouts in a row, each checked in: all succeed."""
    for _ in range(n):
        with w.pool.checkout():
            pass
    w.check(held=0)


def warm(w: FakeWorld) -> None:
    """One idle connection on each instance."""
    holders = [w.pool.checkout() for _ in range(len(w.state.ring))]
    for h in holders:
        h.__enter__()
    for h in holders:
        h.__exit__(None, None, None)
    assert w.counts()["idle"] == len(w.state.ring)


# -- interruptions of a checkout, at each point ------------------------------------------

@pytest.mark.parametrize("point", ["peer_closed", "checkout"])
def test_interrupt_after_taking_an_idle_connection(world, point):
    w = world(addresses=["127.0.0.1:1"])
    warm(w)
    w.hooks.raise_at(point)
    with pytest.raises(Interrupted):
        with w.pool.checkout():
            pass
    w.check(held=0)
    closed = [c for c in w.conns if c.closes]
    if point == "peer_closed":
        assert len(closed) == 1  # its liveness check was cut short: state unknown
    else:
        assert closed == []      # the listener failed after a good check: kept
    full_round(w)


@pytest.mark.parametrize("point", ["connect", "connection_opened", "checkout"])
def test_interrupt_while_opening_a_connection(world, point):
    w = world(addresses=["127.0.0.1:1"])
    w.hooks.raise_at(point)
    with pytest.raises(Interrupted):
        with w.pool.checkout():
            pass
    w.check(held=0)
    inst = w.pool.stats()["instances"]["127.0.0.1:1"]
    assert inst["healthy"] is True  # an interruption is not the server's fault
    full_round(w)


def test_interrupt_while_waiting_leaves_the_queue(world, fake_wait):
    w = world(addresses=["127.0.0.1:1"], max_size=1)
    held = w.pool.checkout()
    held.__enter__()

    def interrupt():
        raise Interrupted("wait")

    fake_wait.append(interrupt)
    with pytest.raises(Interrupted):
        with w.pool.checkout():
            pass
    w.check(held=1)
    held.__exit__(None, None, None)
    w.check(held=0)
    full_round(w)


@pytest.mark.parametrize("discard", [False, True])
def test_interrupt_after_a_hand_off_gives_it_back(world, fake_wait, discard):
    """The holder checks in while we wait (a connection, or after a discard the right to
    open one, is handed to us), and then we are interrupted: it must go back."""
    w = world(addresses=["127.0.0.1:1"], max_size=1)
    held = w.pool.checkout()
    client = held.__enter__()

    def checkin_then_interrupt():
        if discard:
            client._conn.in_call = True  # a call cut short: the socket is discarded
            held.__exit__(Interrupted, Interrupted(), None)
        else:
            held.__exit__(None, None, None)
        raise Interrupted("wait")

    fake_wait.append(checkin_then_interrupt)
    with pytest.raises(Interrupted):
        with w.pool.checkout():
            pass
    w.check(held=0)
    assert w.counts()["idle"] == (0 if discard else 1)
    full_round(w)


@pytest.mark.parametrize("point", ["exhausted"])
def test_interrupt_in_the_exhausted_listener(world, fake_wait, point):
    w = world(addresses=["127.0.0.1:1"], max_size=1, checkout_timeout=0.5)
    held = w.pool.checkout()
    held.__enter__()
    w.hooks.raise_at(point)
    with pytest.raises(Interrupted):
        with w.pool.checkout():
            pass
    w.check(held=1)
    held.__exit__(None, None, None)
    full_round(w)


def test_on_exhausted_raising_a_base_exception(world, fake_wait):
    def alert(event):
        raise Interrupted("alert")

    w = world(addresses=["127.0.0.1:1"], max_size=1, on_exhausted=alert)
    held = w.pool.checkout()
    held.__enter__()
    with pytest.raises(Interrupted):
        with w.pool.checkout():
            pass
    w.check(held=1)
    held.__exit__(None, None, None)
    full_round(w)


def test_interrupt_in_a_listener_during_checkin_discard(world):
    w = world(addresses=["127.0.0.1:1"])
    checkout = w.pool.checkout()
    client = checkout.__enter__()
    client._conn.in_call = True
    w.hooks.raise_at("connection_closed")
    with pytest.raises(Interrupted):
        checkout.__exit__(Interrupted, Interrupted(), None)
    w.check(held=0)
    assert [c.closes for c in w.conns] == [1]
    full_round(w)


# -- hand-offs ---------------------------------------------------------------------------

def test_waiter_is_served_by_whichever_instance_frees_a_connection(world, fake_wait):
    w = world(addresses=["127.0.0.1:1", "127.0.0.2:1"], max_size=1)
    a, b = w.pool.checkout(), w.pool.checkout()
    a.__enter__()
    b.__enter__()
    keys = {a.instance.key, b.instance.key}
    assert keys == {"127.0.0.1:1", "127.0.0.2:1"}
    fake_wait.append(lambda: b.__exit__(None, None, None))
    with w.pool.checkout() as client:
        assert client._conn.address == b.instance.address
    a.__exit__(None, None, None)
    w.check(held=0)


def test_a_discarded_socket_is_closed_before_its_slot_is_reused(world, fake_wait):
    w = world(addresses=["127.0.0.1:1"], max_size=1)
    held = w.pool.checkout()
    client = held.__enter__()
    order = []
    first = client._conn
    original_close = first.close

    def close():
        c = w.counts()
        order.append(("close", c["closing"] + c["in_use"] + c["idle"] + c["opening"]))
        original_close()

    first.close = close
    w.hooks.actions["connect"] = lambda: order.append(("connect", None))

    def discard():
        client._conn.in_call = True
        held.__exit__(Interrupted, Interrupted(), None)

    fake_wait.append(discard)
    with w.pool.checkout():
        pass
    assert order[0] == ("close", 1)  # still counted while closing: the cap held
    assert order[1][0] == "connect"  # only then the waiter's own connect
    w.check(held=0)


def test_a_dropped_checkout_gives_its_slot_back(world):
    w = world(addresses=["127.0.0.1:1"], max_size=1)
    checkout = w.pool.checkout()
    checkout.__enter__()
    del checkout
    gc.collect()
    w.maintain()  # the watchdog's pass (its finalizer woke it) reclaims it
    w.check(held=0)
    assert [c.closes for c in w.conns] == [1]  # its state was unknown: closed
    full_round(w)


# -- one deadline ------------------------------------------------------------------------

def test_connects_share_the_checkout_deadline(world):
    """Every instance hangs on connect: each connect gets min(connect_timeout, time left)
    and the whole checkout ends within its own timeout."""
    w = world(addresses=[f"127.0.0.{i}:1" for i in range(1, 5)], connect_timeout=0.5,
              checkout_timeout=0.1)
    timeouts = []
    original = w.connect

    def hang(address, config, tls=False, timeout=None):
        timeouts.append(timeout)
        w.clock.advance(timeout)
        from thriftpy2.transport import TTransportException
        raise TTransportException(TTransportException.NOT_OPEN, "timed out")

    w.state.connect = hang
    start = w.clock()
    with pytest.raises(thriftpool.NoAvailableInstance):
        with w.pool.checkout():
            pass
    assert w.clock() - start <= 0.1 + 1e-9
    assert timeouts == [pytest.approx(0.1)]
    w.state.connect = original
    w.check(held=0)


def test_panic_probes_at_most_once_per_instance_per_checkout(world):
    addresses = [f"127.0.0.{i}:1" for i in range(1, 4)]
    w = world(addresses=addresses, backoff_initial=0.01, backoff_jitter=0)
    w.refuse.update(addresses)
    with pytest.raises(thriftpool.NoAvailableInstance):
        with w.pool.checkout():
            pass
    first = w.hooks.seen.count("connect")
    assert first == 3  # each instance once, then ejected
    w.clock.advance(1.0)  # past every backoff: panic mode may probe again
    w.hooks.seen.clear()
    with pytest.raises(thriftpool.NoAvailableInstance):
        with w.pool.checkout():
            pass
    assert w.hooks.seen.count("connect") == 3
    w.check(held=0)


# -- heartbeats --------------------------------------------------------------------------

def test_heartbeats_keep_idle_time_and_place_and_are_not_successes(world):
    w = world(addresses=["127.0.0.1:1"], max_size=3, heartbeat="ping", heartbeat_interval=1,
              idle_timeout=5, min_size=0)
    beats = []
    w.pool._heartbeat = lambda conn: beats.append(conn)  # type: ignore[method-assign]
    holders = [w.pool.checkout() for _ in range(3)]
    for h in holders:
        h.__enter__()
    for h in holders:
        h.__exit__(None, None, None)
        w.clock.advance(0.1)
    inst = next(iter(w.state.instances.values()))
    order = list(inst.idle)
    inst.health.errors = 2  # a failure streak that only a real call may end
    for _ in range(3):
        w.clock.advance(1.2)
        w.maintain()
    assert len(beats) == 9  # each connection, every pass
    assert w.counts()["idle"] == 3
    assert list(inst.idle) == order  # same places in the stack
    assert inst.health.errors == 2
    w.clock.advance(1.5)
    w.maintain()  # idle for more than idle_timeout: reaped despite the heartbeats
    assert w.counts()["idle"] == 0
    w.check(held=0)


def test_replacing_expired_connections_never_counts_above_max_size(world):
    """The watchdog closes what expired before it reserves the replacements: at no
    instant do closing and opening together exceed max_size."""
    w = world(addresses=["127.0.0.1:1"], max_size=2, min_size=2)
    w.maintain()  # fills to min_size
    assert w.counts()["idle"] == 2
    inst = next(iter(w.state.instances.values()))
    sizes = []
    w.hooks.actions["connect"] = lambda: sizes.append(inst.size())
    for conn in w.conns:
        conn.expires_at = w.clock() + 10  # (fake connections never expire by themselves)
        original = conn.close

        def close(original=original):
            sizes.append(inst.size())
            original()

        conn.close = close
    w.clock.advance(11)
    w.maintain()
    w.hooks.actions["connect"] = lambda: sizes.append(inst.size())
    w.maintain()
    assert sizes and max(sizes) <= 2, sizes
    assert w.counts()["idle"] == 2 and len([c for c in w.conns if not c.closes]) == 2
    w.check(held=0)
