"""Operator controls against real servers: drain, resize, max_waiting, leak_timeout, the
per-call events and the cumulative counters of stats()/pop_stats()."""

from __future__ import annotations

import logging
import threading
import time

import pytest

import thriftpool
from consistency import assert_consistent
from servers import echo_thrift, free_port, wait_for

pytestmark = pytest.mark.usefixtures("no_thread_leak")


def local_ports(pool):
    """Client-side ports of every connection the pool holds."""
    state = pool._state
    with state.lock:
        conns = [c for i in state.instances.values() for c in (*i.idle, *i.in_use, *i.busy)]
    return {c.socket.sock.getsockname()[1] for c in conns if c.socket.sock is not None}


class Recorder(thriftpool.PoolListener):
    def __init__(self):
        self.lock = threading.Lock()
        self.closed = []
        self.leaks = []

    def connection_closed(self, pool, address, reason):
        with self.lock:
            self.closed.append(reason)

    def connection_leaked(self, pool, holder):
        with self.lock:
            self.leaks.append(holder)


class CallRecorder(thriftpool.PoolListener):
    def __init__(self):
        self.lock = threading.Lock()
        self.started = []
        self.finished = []

    def call_started(self, pool, address, method, headers):
        with self.lock:
            self.started.append((address, method))

    def call_finished(self, pool, address, method, duration, error, sent):
        assert duration >= 0
        with self.lock:
            self.finished.append((address, method, error, sent))


def run_threads(n, target, duration):
    """``n`` threads running ``target()`` in a loop for ``duration`` seconds; returns the
    errors they raised."""
    errors = []
    stop = time.monotonic() + duration

    def loop():
        while time.monotonic() < stop:
            try:
                target()
            except Exception as exc:  # noqa: BLE001 - collected for the assertion
                errors.append(exc)

    threads = [threading.Thread(target=loop, name=f"load-{i}") for i in range(n)]
    for t in threads:
        t.start()
    return threads, errors


# -- drain ---------------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_drain_under_load_replaces_every_connection_with_no_failed_call(farm, make_pool):
    servers = farm.start(2)
    recorder = Recorder()
    pool = make_pool([s.address for s in servers], min_size=2, max_size=4,
                     watchdog_interval=0.05, listeners=[recorder])
    pool.wait()
    proxy = pool.client()
    threads, errors = run_threads(8, lambda: proxy.sleep(2), duration=2.0)
    wait_for(lambda: pool.stats()["in_use"] > 0, 5, message="load running")
    old = local_ports(pool)
    assert len(old) >= 4
    started = time.monotonic()
    pool.drain(wait=True, timeout=10)
    assert time.monotonic() - started < 10
    # Server side: none of the connections opened before the call is open any more.
    for server in servers:
        assert not old & set(server.peers()), server.address
    assert "drained" in recorder.closed
    for t in threads:
        t.join(10)
    assert errors == []
    assert_consistent(pool, servers=servers)
    # New connections were opened as needed: every instance holds min_size again.
    wait_for(lambda: all(i["size"] >= 2 for i in pool.stats()["instances"].values()), 5,
             message="min_size refilled after the drain")
    assert not old & local_ports(pool)


@pytest.mark.timeout(30)
def test_drain_closes_idle_now_in_use_at_checkin_and_wait_has_a_deadline(farm, make_pool):
    server = farm.one()
    recorder = Recorder()
    pool = make_pool([server.address], min_size=0, max_size=4, listeners=[recorder])
    with pool.checkout() as held:
        with pool.checkout():
            pass  # one idle connection, one in use
        assert pool.stats()["idle"] == 1
        started = time.monotonic()
        pool.drain()  # returns at once
        assert time.monotonic() - started < 0.5
        wait_for(lambda: server.open_connections() == 1, 5, message="the idle one closed")
        assert recorder.closed == ["drained"]
        started = time.monotonic()
        with pytest.raises(TimeoutError, match="1 connections opened before drain"):
            pool.drain(wait=True, timeout=0.3)
        assert 0.25 <= time.monotonic() - started < 3
        assert pool._state.drain_waits == []
        assert held.echo("still mine") == "still mine"  # never taken from its holder
    wait_for(lambda: server.open_connections() == 0, 5, message="closed at checkin")
    assert recorder.closed == ["drained", "drained"]
    pool.drain(wait=True, timeout=1)  # nothing old left: returns at once
    with pool.checkout() as client:
        assert client.echo("new") == "new"
    assert_consistent(pool, servers=[server])


def test_drain_checks_its_timeout_and_refuses_a_closed_pool(make_pool):
    pool = make_pool([f"127.0.0.1:{free_port()}"], min_size=0)
    for bad in (-1, "1", None, float("nan")):
        with pytest.raises(ValueError, match="timeout"):
            pool.drain(wait=True, timeout=bad)
    pool.close()
    with pytest.raises(thriftpool.PoolClosed):
        pool.drain()


@pytest.mark.timeout(30)
def test_close_while_drain_waits_raises_pool_closed(farm, make_pool):
    server = farm.one()
    pool = make_pool([server.address], min_size=0)
    outcome = []
    checkout = pool.checkout()
    checkout.__enter__()

    def drain():
        try:
            pool.drain(wait=True, timeout=20)
        except BaseException as exc:  # noqa: B036 - the outcome is the assertion
            outcome.append(exc)

    t = threading.Thread(target=drain)
    t.start()
    wait_for(lambda: pool._state.drain_waits, 5, message="drain waiting")
    pool.close()
    t.join(5)
    assert isinstance(outcome[0], thriftpool.PoolClosed)
    checkout.__exit__(None, None, None)


# -- resize --------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(90)
def test_resize_up_and_down_under_32_threads_keeps_the_cap_at_every_instant(farm, make_pool):
    server = farm.one()
    pool = make_pool([server.address], min_size=0, max_size=8, checkout_timeout=10,
                     watchdog_interval=0.05)
    state = pool._state
    violations = []
    samples = [0]
    stop = threading.Event()

    def sample():
        last = None
        while not stop.is_set():
            with state.lock:
                cap = state.config.max_size
                sizes = [(i.size(), i.opening, i.max_size) for i in state.instances.values()]
            for size, opening, inst_cap in sizes:
                samples[0] += 1
                if inst_cap != cap:
                    violations.append(("instance cap", inst_cap, cap))
                # Above the cap only right after a shrink, and then never opening more.
                if size > cap and opening:
                    violations.append(("opening above the cap", size, opening, cap))
                if last is not None and size > cap and size > last[0] and last[1] == cap:
                    violations.append(("grew above the cap", last[0], size, cap))
                last = (size, cap)
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    proxy = pool.client()
    threads, errors = run_threads(32, lambda: proxy.sleep(3), duration=8.0)
    try:
        for new_max in (2, 6, 1, 8, 3):
            pool.resize(max_size=new_max)
            assert pool.config.max_size == new_max == pool.stats()["max_size"]
            wait_for(lambda n=new_max: server.open_connections() <= n and
                     pool.stats()["size"] <= n, 10,
                     message=f"at most {new_max} connections after resize")
            wait_for(lambda n=new_max: pool.stats()["size"] == n, 10,
                     message=f"the 32 threads use all {new_max} connections")
            time.sleep(0.3)
    finally:
        for t in threads:
            t.join(20)
        stop.set()
        sampler.join(5)
    assert errors == []
    assert samples[0] > 100
    assert violations == []
    assert server.stats()["peak"] <= 8
    assert_consistent(pool, servers=[server])


@pytest.mark.timeout(30)
def test_growing_admits_a_waiter_at_once(farm, make_pool):
    server = farm.one()
    pool = make_pool([server.address], min_size=0, max_size=1, checkout_timeout=10)
    got = []
    with pool.checkout():
        def waiter():
            started = time.monotonic()
            with pool.checkout() as client:
                got.append((time.monotonic() - started, client.echo("in")))

        t = threading.Thread(target=waiter)
        t.start()
        wait_for(lambda: pool.stats()["waiting"] == 1, 5, message="one waiter")
        time.sleep(0.2)
        resized_at = time.monotonic()
        pool.resize(max_size=2)
        t.join(5)
        assert got and got[0][1] == "in"
        assert got[0][0] < (time.monotonic() - resized_at) + 0.3 + 1.0  # not its 10 s
        assert got[0][0] < 3
    assert_consistent(pool, servers=[server])


@pytest.mark.timeout(30)
def test_shrinking_closes_idle_now_and_in_use_at_checkin(farm, make_pool):
    server = farm.one()
    recorder = Recorder()
    pool = make_pool([server.address], min_size=0, max_size=4, listeners=[recorder],
                     idle_timeout=None)
    checkouts = [pool.checkout() for _ in range(4)]
    for c in checkouts:
        c.__enter__()
    checkouts[0].__exit__(None, None, None)
    checkouts[1].__exit__(None, None, None)  # 2 idle, 2 in use
    pool.resize(max_size=1)
    wait_for(lambda: server.open_connections() == 2, 5, message="idle ones closed now")
    assert recorder.closed == ["resized", "resized"]
    checkouts[2].__exit__(None, None, None)
    checkouts[3].__exit__(None, None, None)  # the last one may stay: 1 is the cap
    wait_for(lambda: server.open_connections() == 1, 5, message="in-use one closed")
    assert recorder.closed == ["resized"] * 3
    pool.resize(min_size=1, max_size=3)
    assert (pool.config.min_size, pool.config.max_size) == (1, 3)
    assert_consistent(pool, servers=[server])


def test_resize_is_checked_like_the_constructor(make_pool):
    pool = make_pool([f"127.0.0.1:{free_port()}"], min_size=1, max_size=4)
    cases = [({"max_size": 0}, "max_size"), ({"max_size": True}, "max_size"),
             ({"min_size": -1}, "min_size"), ({"min_size": 5}, "min_size"),
             ({"min_size": "2"}, "min_size"), ({"max_size": 2.5}, "max_size")]
    for kwargs, option in cases:
        with pytest.raises(ValueError, match=option):
            pool.resize(**kwargs)
        assert (pool.config.min_size, pool.config.max_size) == (1, 4)
    pool.close()
    with pytest.raises(thriftpool.PoolClosed):
        pool.resize(max_size=2)


# -- max_waiting ---------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_max_waiting_fails_fast_under_64_threads(farm, make_pool):
    server = farm.one()
    pool = make_pool([server.address], min_size=0, max_size=2, max_waiting=4,
                     checkout_timeout=20)
    assert thriftpool.TooManyWaiters.__mro__[1] is thriftpool.PoolExhausted
    barrier = threading.Barrier(64)
    lock = threading.Lock()
    refused, served = [], []
    peak = [0]

    def one():
        barrier.wait()
        started = time.monotonic()
        try:
            with pool.checkout() as client:
                client.sleep(1500)
            with lock:
                served.append(time.monotonic() - started)
        except thriftpool.TooManyWaiters as exc:
            with lock:
                refused.append((time.monotonic() - started, exc))

    stop = threading.Event()

    def watch():
        while not stop.is_set():
            peak[0] = max(peak[0], pool.stats()["waiting"])
            time.sleep(0.002)

    watcher = threading.Thread(target=watch)
    watcher.start()
    threads = [threading.Thread(target=one) for _ in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    stop.set()
    watcher.join(5)
    assert len(refused) + len(served) == 64
    assert len(refused) >= 50, (len(refused), len(served))
    assert all(took < 1.0 for took, _ in refused), max(t for t, _ in refused)
    assert all(exc.max_waiting == 4 and "max_waiting=4" in str(exc) for _, exc in refused)
    assert peak[0] <= 4
    assert pool.stats()["too_many_waiters"] == len(refused)
    assert pool.stats()["exhausted"] == 0
    assert_consistent(pool, servers=[server])


# -- leak_timeout --------------------------------------------------------------------------

@pytest.mark.timeout(30)
def test_a_leaked_checkout_is_reported_once_with_its_stack(farm, make_pool, caplog):
    server = farm.one()
    recorder = Recorder()
    pool = make_pool([server.address], min_size=0, max_size=1, leak_timeout=0.2,
                     watchdog_interval=0.05, listeners=[recorder], checkout_timeout=0.1)
    release = threading.Event()
    answers = []

    def hold_it_forever():
        with pool.checkout() as client:
            release.wait(10)
            answers.append(client.echo("mine"))

    with caplog.at_level(logging.WARNING, logger="thriftpool"):
        holder = threading.Thread(target=hold_it_forever, name="leaker")
        holder.start()
        wait_for(lambda: recorder.leaks, 5, message="the leak reported")
        time.sleep(0.4)  # several watchdog passes: still reported once
        assert len(recorder.leaks) == 1
        leak = recorder.leaks[0]
        assert leak.address == server.address and leak.thread == "leaker"
        assert leak.age >= 0.2
        assert "hold_it_forever" in leak.stack and "thriftpool/" not in leak.stack
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1
        assert "hold_it_forever" in warnings[0] and "'leaker'" in warnings[0]
        # The exhausted event says who holds the pool.
        with pytest.raises(thriftpool.PoolExhausted) as info:
            with pool.checkout():
                pass
        holders = info.value.event.holders
        assert [h.thread for h in holders] == ["leaker"]
        assert "hold_it_forever" in holders[0].stack
        release.set()
        holder.join(5)
    assert answers == ["mine"]  # the connection stayed with its holder
    assert len(recorder.leaks) == 1
    assert_consistent(pool, servers=[server])


def test_without_leak_timeout_no_stack_is_recorded(farm, make_pool):
    server = farm.one()
    pool = make_pool([server.address], min_size=0, max_size=1, checkout_timeout=0.05)
    with pool.checkout():
        (conn,) = pool._state.instances[next(iter(pool._state.instances))].in_use
        assert conn.out_stack is None
        with pytest.raises(thriftpool.PoolExhausted) as info:
            with pool.checkout():
                pass
        assert info.value.event.holders == ()


# -- per-call events -----------------------------------------------------------------------

def test_call_events_cost_nothing_without_a_listener_for_them(farm, make_pool):
    server = farm.one()
    plain = make_pool([server.address], listeners=[Recorder()])
    with plain.checkout() as client:
        assert type(client) is plain._spec.client_class
    reported = make_pool([server.address], listeners=[CallRecorder()])
    with reported.checkout() as client:
        assert type(client) is not reported._spec.client_class
        assert isinstance(client, reported._spec.client_class)


@pytest.mark.timeout(60)
def test_call_finished_counts_every_call_of_checkouts_and_the_proxy(farm, make_pool):
    a, b = farm.start(2)
    calls = CallRecorder()
    pool = make_pool([a.address, b.address], min_size=1, listeners=[calls],
                     idempotent=["sleep"], retries=2)
    made = 0
    with pool.checkout() as client:
        for i in range(5):
            assert client.echo(str(i)) == str(i)
        for _ in range(2):
            with pytest.raises(echo_thrift.EchoError):
                client.fail("no")
        client.notify("one way")
        made += 8
    proxy = pool.client()
    for i in range(10):
        proxy.echo(str(i))
    made += 10
    with pytest.raises(echo_thrift.EchoError):
        proxy.fail("x")  # an answer: not retried
    made += 1
    # A retry: both servers drop every connection while the call is in flight.
    result = []
    t = threading.Thread(target=lambda: result.append(proxy.sleep(700)))
    t.start()
    wait_for(lambda: pool.stats()["in_use"] == 1, 5, message="the call in flight")
    time.sleep(0.2)
    a.drop()
    b.drop()
    t.join(10)
    assert result == [700]
    errors = [f for f in calls.finished if f[2] is not None]
    transport = [f for f in errors if not isinstance(f[2], echo_thrift.EchoError)]
    # The attempt in flight failed; a retry may meet the other server's dropped socket
    # before its hang-up is seen (a second failed attempt), then one succeeds.
    assert 1 <= len(transport) <= 2
    assert all(f[1] == "sleep" and f[3] is True for f in transport)
    made += len(transport) + 1
    assert len(calls.started) == len(calls.finished) == made
    assert len(errors) == 3 + len(transport)  # 2 + 1 EchoError
    assert {f[1] for f in calls.finished} == {"echo", "fail", "notify", "sleep"}
    stats = pool.stats()
    assert stats["calls"] == made and stats["call_errors"] == len(errors)
    assert_consistent(pool)


# -- counters ------------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_counters_add_up_to_what_the_servers_saw(farm, make_pool):
    a, b = farm.start(2)
    dead = f"127.0.0.1:{free_port()}"
    pool = make_pool([a.address, b.address], min_size=0, max_size=2, checkout_timeout=0.3,
                     watchdog_interval=0.05, balancer="round_robin")
    proxy = pool.client()
    for i in range(20):
        proxy.echo(str(i))
    with pool.checkout() as client:
        client.ping()
        with pytest.raises(echo_thrift.EchoError):
            client.fail("counted")
    # A wait, then an exhausted checkout: 4 connections held, 2 instances of max_size 2.
    held = [pool.checkout() for _ in range(4)]
    for h in held:
        h.__enter__()
    with pytest.raises(thriftpool.PoolExhausted):
        with pool.checkout():
            pass
    time.sleep(0.05)
    for h in held:
        h.__exit__(None, None, None)
    # Connections lost: the servers hang up on every idle connection.
    a.drop()
    b.drop()
    wait_for(lambda: pool.stats()["size"] == 0, 5, message="dead connections closed")
    stats = pool.stats()
    seen = [s.stats() for s in (a, b)]
    assert stats["connections_opened"] == sum(s["accepted"] for s in seen)
    assert stats["calls"] == sum(s["calls"] for s in seen) == 22
    assert stats["call_errors"] == 1
    assert stats["checkouts"] == 20 + 1 + 4
    assert stats["exhausted"] == 1 and stats["checkouts_waited"] == 1
    assert stats["wait_ms"] >= 250
    assert stats["in_use_ms"] >= 4 * 50
    assert stats["connections_lost"] == stats["connections_opened"] == 4
    assert stats["connect_errors"] == 0 and stats["connect_ms"] > 0
    # pop_stats: the same, then counters from zero; gauges are not reset.
    popped = pool.pop_stats()
    assert {k: popped[k] for k in ("checkouts", "calls")} == {"checkouts": 25, "calls": 22}
    after = pool.stats()
    assert after["checkouts"] == after["calls"] == after["connections_opened"] == 0
    assert after["wait_ms"] == 0 and after["max_size"] == 2
    # Connect errors: an instance that refuses.
    bad = make_pool([dead], min_size=0, checkout_timeout=0.5)
    with pytest.raises(thriftpool.NoAvailableInstance):
        with bad.checkout():
            pass
    assert bad.stats()["connect_errors"] == 1


@pytest.mark.timeout(60)
def test_call_events_and_counters_on_both_stacks(stack, farm):
    (server,) = stack.start(farm, 1)
    calls = CallRecorder()
    with thriftpool.ThriftPool(stack.service, [server.address], min_size=0,
                               listeners=[calls]) as pool:
        with pool.checkout() as client:
            assert client.echo("a") == "a"
            with pytest.raises(stack.EchoError):
                client.fail("no")
        assert pool.client().echo("b") == "b"
        stats = pool.stats()
    assert [f[1] for f in calls.finished] == ["echo", "fail", "echo"]
    assert [type(f[2]) for f in calls.finished] == [type(None), stack.EchoError, type(None)]
    assert (stats["calls"], stats["call_errors"], stats["checkouts"]) == (3, 1, 2)
    assert server.stats()["calls"] == 3
    with thriftpool.ThriftPool(stack.service, [server.address], min_size=0) as plain:
        with plain.checkout() as client:
            assert type(client) is plain._spec.client_class  # no call listener
            client.echo("c")
            with pytest.raises(stack.EchoError):
                client.fail("no")
        assert (plain.stats()["calls"], plain.stats()["call_errors"]) == (2, 1)
