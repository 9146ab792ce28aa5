"""Real interruptions against real servers: a KeyboardInterrupt from a signal timer while
waiting, during the liveness check and in a listener; each followed by a full round of
checkouts.  And the deadline of a checkout against hung instances, and a waiter served by
another instance as soon as it frees a connection.  (gevent.Timeout and late gevent
patching: test_gevent.py.)"""

from __future__ import annotations

import signal
import threading
import time
from contextlib import contextmanager
from typing import Iterator, List

import pytest

import thriftpool
from thriftpool.connection import Connection

from consistency import assert_consistent
from servers import wait_for

pytestmark = [pytest.mark.usefixtures("no_thread_leak"), pytest.mark.timeout(30)]


@contextmanager
def keyboard_interrupt_after(seconds: float) -> Iterator[None]:
    """A real SIGALRM whose handler raises KeyboardInterrupt in the main thread, as Ctrl-C
    does, wherever the main thread happens to be."""
    def handler(signum, frame):
        raise KeyboardInterrupt("timer")

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def full_round(pool, threads: int = 8, calls: int = 20) -> None:
    errors: List[BaseException] = []

    def work() -> None:
        try:
            for i in range(calls):
                with pool.checkout() as client:
                    assert client.echo(str(i)) == str(i)
        except BaseException as exc:  # reported below
            errors.append(exc)

    ts = [threading.Thread(target=work) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(20)
    assert not errors, errors[:3]


class Holder:
    """Holds one checkout in another thread until released."""

    def __init__(self, pool) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(pool,))
        self.thread.start()
        assert self.entered.wait(10)

    def _run(self, pool) -> None:
        with pool.checkout():
            self.entered.set()
            self.release.wait(20)

    def stop(self) -> None:
        self.release.set()
        self.thread.join(10)


def test_keyboard_interrupt_while_waiting(farm, make_pool):
    server = farm.one()
    pool = make_pool([server.address], max_size=1, checkout_timeout=10)
    holder = Holder(pool)
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        with keyboard_interrupt_after(0.2):
            with pool.checkout():
                pass
    assert time.monotonic() - started < 5
    assert_consistent(pool, in_use=1)
    holder.stop()
    assert_consistent(pool, in_use=0)
    full_round(pool)
    assert_consistent(pool, servers=[server])


@pytest.mark.parametrize("check", ["poll", "peer_closed"])
def test_keyboard_interrupt_during_the_liveness_check(farm, make_pool, monkeypatch, check):
    # A plain socket's check is its poll(0), called by the checkout itself; TLS sockets
    # and platforms without poll take Connection.peer_closed().
    server = farm.one()
    pool = make_pool([server.address], max_size=2, min_size=0)
    with pool.checkout() as client:
        client.echo("warm")
    slow = threading.Event()

    def slowly(check):
        def slow_check(*args):
            if slow.is_set() and threading.current_thread() is threading.main_thread():
                time.sleep(1.0)  # the timer's KeyboardInterrupt lands in here
            return check(*args)
        return slow_check

    (inst,) = pool._state.instances.values()
    (conn,) = inst.idle
    if check == "poll":
        assert conn.idle_poll is not None
        conn.idle_poll = slowly(conn.idle_poll)
    else:
        conn.idle_poll = None
        monkeypatch.setattr(Connection, "peer_closed", slowly(Connection.peer_closed))
    slow.set()
    with pytest.raises(KeyboardInterrupt):
        with keyboard_interrupt_after(0.1):
            with pool.checkout():
                pass
    slow.clear()
    # Its check was cut short, so its state is unknown: that socket was closed.
    assert_consistent(pool)
    assert pool.stats()["instances"][server.address]["closed"] == 1
    full_round(pool)
    assert_consistent(pool, servers=[server])


def test_keyboard_interrupt_in_a_listener(farm, make_pool):
    class SlowListener(thriftpool.PoolListener):
        armed = False

        def checkout(self, pool, address, waited):
            if self.armed and threading.current_thread() is threading.main_thread():
                self.armed = False
                time.sleep(1.0)

    listener = SlowListener()
    server = farm.one()
    pool = make_pool([server.address], max_size=2, listeners=[listener])
    listener.armed = True
    with pytest.raises(KeyboardInterrupt):
        with keyboard_interrupt_after(0.1):
            with pool.checkout():
                pass
    assert_consistent(pool)
    full_round(pool)
    assert_consistent(pool, servers=[server])


def test_checkout_against_hung_instances_ends_on_its_deadline(make_pool, fault_proxy):
    """Four instances whose connects hang: a 0.1 s checkout fails in about 0.1 s, not
    (2n+4) x connect_timeout."""
    proxies = [fault_proxy("127.0.0.1:9") for _ in range(4)]
    for p in proxies:
        p.deaf()
    pool = make_pool([p.address for p in proxies], min_size=0, connect_timeout=0.5)
    for timeout in (0.1, 0.3):
        started = time.monotonic()
        with pytest.raises(thriftpool.NoAvailableInstance):
            with pool.checkout(timeout=timeout):
                pass
        elapsed = time.monotonic() - started
        assert timeout * 0.9 <= elapsed < timeout + 0.15, (timeout, elapsed)
    # A connect cut short by the checkout's deadline proves nothing about the server.
    assert all(i["healthy"] for i in pool.stats()["instances"].values())
    assert_consistent(pool)


def test_a_waiter_is_served_by_another_instance_as_soon_as_it_frees_one(farm, make_pool):
    a, b = farm.start(2)
    pool = make_pool([a.address, b.address], max_size=1, min_size=0, checkout_timeout=5,
                     balancer="round_robin")
    holders = [Holder(pool), Holder(pool)]
    held = {h for h in pool.stats()["instances"] if pool.stats()["instances"][h]["in_use"]}
    assert held == {a.address, b.address}
    got = []

    def waiter() -> None:
        with pool.checkout() as client:
            got.append((time.monotonic(), client.whoami()))

    t = threading.Thread(target=waiter)
    t.start()
    wait_for(lambda: pool.stats()["waiting"] == 1, 5, message="one waiter")
    # Whichever instance frees a connection first serves it: release the one the
    # waiter did not pick, here simply the second holder.
    released_at = time.monotonic()
    holders[1].stop()
    t.join(5)
    assert got, "the waiter was not served"
    served_at, who = got[0]
    assert served_at - released_at < 0.05, served_at - released_at
    holders[0].stop()
    assert who in (a.address, b.address)
    assert_consistent(pool)
