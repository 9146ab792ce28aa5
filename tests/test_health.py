"""Instance health against real servers and a fault proxy: ejection, backoff, probes,
laziness, heartbeat and panic mode.

Connection attempts are counted where they can be seen: by the fault proxy when they
reach a listener, by the ``connect_log`` fixture (this process's ``connect()`` calls)
when they are refused or hang.
"""

from __future__ import annotations

import threading
import time

import pytest
from thriftpy2.transport import TTransportException

import thriftpool.pool
from thriftpool import NoAvailableInstance
from servers import start_servers, wait_for

pytestmark = pytest.mark.usefixtures("no_thread_leak")


def instance(pool, address):
    return pool.stats()["instances"][address]


def checkout_call(pool, method="ping", *args):
    with pool.checkout() as client:
        return getattr(client, method)(*args)


@pytest.mark.timeout(20)
def test_connect_failure_ejects_and_the_instance_is_not_tried_again(
        farm, make_pool, fault_proxy, connect_log):
    (server,) = start_servers(farm, 1)
    bad = fault_proxy(server.address)
    bad.refuse()
    connect_log.watch(bad.port)
    pool = make_pool([bad.address, server.address], balancer="round_robin", min_size=0,
                     backoff_initial=30.0, backoff_max=60.0)
    assert instance(pool, bad.address)["healthy"]
    checkout_call(pool)  # round robin starts at the refusing one, fails over
    assert connect_log.count(bad.port) == 1
    state = instance(pool, bad.address)
    assert not state["healthy"] and state["failures"] == 1
    for _ in range(20):
        checkout_call(pool)
    assert connect_log.count(bad.port) == 1  # ejected: nobody tried it again
    assert server.stats()["calls"] == 21


@pytest.mark.timeout(20)
def test_consecutive_transport_errors_eject_after_failure_threshold(
        farm, make_pool, fault_proxy):
    """Calls that fail with transport errors eject the instance after
    ``failure_threshold`` in a row; a clean call in between starts the count again."""
    server = farm.one()
    proxy = fault_proxy(server.address)
    pool = make_pool([proxy.address], min_size=0, failure_threshold=3,
                     backoff_initial=30.0, backoff_max=60.0)

    def failing_call():
        # reset: the connect succeeds (the kernel completes it), the call dies on a RST
        with pytest.raises((TTransportException, OSError)):
            checkout_call(pool, "echo", "x")

    checkout_call(pool)
    proxy.reset()
    proxy.cut()  # the pooled connection goes too
    failing_call()
    failing_call()
    assert instance(pool, proxy.address)["healthy"]
    proxy.passthrough()
    assert checkout_call(pool, "echo", "ok") == "ok"  # resets the count
    proxy.reset()
    proxy.cut()
    failing_call()
    failing_call()
    assert instance(pool, proxy.address)["healthy"]
    failing_call()
    state = instance(pool, proxy.address)
    assert not state["healthy"] and state["failures"] == 1
    assert state["size"] == 0  # every failed connection was discarded


@pytest.mark.timeout(20)
def test_stale_idle_connections_do_not_reset_the_error_count(
        farm, make_pool, fault_proxy):
    """A server that drops its connections and fails every call is ejected after
    ``failure_threshold`` failed calls even while the watchdog keeps refilling
    ``min_size``: a checkout finding the refilled socket closed is no successful call."""
    server = farm.one()
    proxy = fault_proxy(server.address)
    pool = make_pool([proxy.address], min_size=1, failure_threshold=2,
                     watchdog_interval=0.3, backoff_initial=30.0, backoff_max=60.0)
    wait_for(lambda: instance(pool, proxy.address)["idle"] == 1, message="min_size")
    proxy.reset()  # new connections: the request gets a RST
    for _ in range(2):
        proxy.cut()  # the idle socket: closed by the server while in the pool
        accepted = proxy.accepted
        with pytest.raises((TTransportException, OSError)):
            checkout_call(pool, "echo", "x")  # stale socket dropped, new one fails
        assert proxy.accepted == accepted + 1
        # the watchdog refills min_size before the next call
        wait_for(lambda: instance(pool, proxy.address)["idle"] == 1 or
                 not instance(pool, proxy.address)["healthy"], timeout=5,
                 message="a refill")
    assert not instance(pool, proxy.address)["healthy"]


@pytest.mark.slow
@pytest.mark.timeout(30)
def test_server_failing_every_call_is_readmitted_with_growing_backoff(
        farm, make_pool, fault_proxy):
    """A server that accepts connections but fails every request: each probe connects,
    so the instance is readmitted, and ejected again after failure_threshold failed
    calls; the backoff keeps growing across readmissions (only a successful call resets
    it), so connection attempts thin out.  Idempotent calls never fail meanwhile."""
    good, other = start_servers(farm, 2)
    bad = fault_proxy(other.address)
    bad.reset()
    pool = make_pool([good.address, bad.address], min_size=0, idempotent=True,
                     failure_threshold=2, watchdog_interval=0.01, backoff_initial=0.1,
                     backoff_multiplier=2.0, backoff_jitter=0.0, backoff_max=10.0)
    client = pool.client()
    errors = []
    deadline = time.monotonic() + 2.5
    for _ in range(100_000):
        if time.monotonic() >= deadline:
            break
        try:
            client.echo("x")
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)
    assert errors == []
    failures = instance(pool, bad.address)["failures"]
    # 0.1, 0.2, 0.4, 0.8 s...: about four ejections in 2.5 s, not the 25 of a
    # backoff reset by every readmission
    assert 3 <= failures <= 6, failures
    assert bad.accepted <= 2 * (failures + 1), (bad.accepted, failures)
    assert other.stats()["calls"] == 0
    # The proxy sees the connects in bursts, one per readmission, further and further
    # apart.
    bursts = [bad.accept_times[0]]
    for prev, t in zip(bad.accept_times, bad.accept_times[1:]):
        if t - prev > 0.08:
            bursts.append(t)
    gaps = [b - a for a, b in zip(bursts, bursts[1:])]
    assert len(gaps) >= 2 and all(g2 > g1 for g1, g2 in zip(gaps, gaps[1:])), gaps


@pytest.mark.slow
@pytest.mark.timeout(30)
def test_backoff_between_reconnect_attempts_grows(make_pool, fault_proxy, connect_log):
    """A refusing instance that checkouts want is retried at growing intervals
    (initial 0.05 s, x2, no jitter: 0.05, 0.1, 0.2, 0.4, 0.8 s)."""
    proxy = fault_proxy("127.0.0.1:9")  # never forwards: it refuses throughout
    proxy.refuse()
    connect_log.watch(proxy.port)
    pool = make_pool([proxy.address], min_size=0, watchdog_interval=0.01,
                     backoff_initial=0.05, backoff_multiplier=2.0, backoff_jitter=0.0,
                     backoff_max=10.0)
    with pytest.raises(NoAvailableInstance):
        checkout_call(pool)  # the demand that makes the watchdog probe
    wait_for(lambda: connect_log.count(proxy.port) >= 6, timeout=10,
             message="six connection attempts")
    starts = [a.start for a in connect_log.of(proxy.port)][:6]
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert all(g2 > g1 for g1, g2 in zip(gaps, gaps[1:])), gaps
    assert gaps[0] >= 0.04 and gaps[-1] >= 0.7, gaps
    assert gaps[-1] >= 4 * gaps[0], gaps
    assert all(a.error is not None for a in connect_log.of(proxy.port))


@pytest.mark.timeout(20)
def test_one_probe_at_a_time_while_many_checkouts_want_a_hanging_instance(
        farm, make_pool, fault_proxy, connect_log):
    """Sixteen threads check out from an instance whose connects hang until the connect
    timeout: at no moment is more than one connect in progress."""
    server = farm.one()
    proxy = fault_proxy(server.address)
    proxy.deaf()
    connect_log.watch(proxy.port)
    pool = make_pool([proxy.address], min_size=0, connect_timeout=0.3,
                     checkout_timeout=0.5, backoff_initial=0.1, watchdog_interval=0.02)
    errors = []
    checkouts = [0]

    def worker():
        deadline = time.monotonic() + 1.5
        for _ in range(500):
            if time.monotonic() >= deadline:
                return
            checkouts[0] += 1
            try:
                checkout_call(pool)
            except Exception as exc:
                errors.append(exc)
                time.sleep(0.01)

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    attempts = connect_log.of(proxy.port)
    assert attempts and all(a.error is not None for a in attempts)
    assert connect_log.max_concurrent(proxy.port) == 1, attempts
    # each attempt hangs 0.3 s, one at a time: at most ~6 in 1.5 s, for hundreds of
    # checkouts
    assert len(attempts) <= 8, len(attempts)
    assert checkouts[0] >= 3 * len(attempts)
    assert errors and all(isinstance(e, (NoAvailableInstance, thriftpool.PoolExhausted))
                          for e in errors), {type(e) for e in errors}


@pytest.mark.timeout(20)
def test_no_connects_while_nothing_needs_the_instance(make_pool, fault_proxy, farm):
    """min_size=0: no connection before the first checkout, and none to replace one the
    server dropped while nobody checks out."""
    server = farm.one()
    proxy = fault_proxy(server.address)
    pool = make_pool([proxy.address], min_size=0, watchdog_interval=0.02)
    time.sleep(0.5)  # 25 watchdog passes
    assert proxy.accepted == 0
    assert checkout_call(pool, "echo", "x") == "x"
    assert proxy.accepted == 1
    proxy.cut()
    wait_for(lambda: pool.stats()["size"] == 0, message="the dead idle socket reaped")
    time.sleep(0.5)
    assert proxy.accepted == 1
    assert server.stats()["open"] == 0


@pytest.mark.timeout(20)
def test_a_failing_instance_is_probed_only_while_checkouts_want_it(
        make_pool, fault_proxy, connect_log, monkeypatch):
    """Probes follow demand: they stop once no checkout came for the demand window
    (shrunk here from 60 s to 0.3 s)."""
    monkeypatch.setattr(thriftpool.pool, "_DEMAND_WINDOW", 0.3)
    proxy = fault_proxy("127.0.0.1:9")
    proxy.refuse()
    connect_log.watch(proxy.port)
    pool = make_pool([proxy.address], min_size=0, watchdog_interval=0.01,
                     backoff_initial=0.02, backoff_multiplier=1.2, backoff_jitter=0.0)
    t0 = time.monotonic()
    with pytest.raises(NoAvailableInstance):
        checkout_call(pool)
    time.sleep(0.6)
    during = connect_log.count(proxy.port)
    assert during >= 3  # probes while wanted
    assert all(a.start < t0 + 0.3 + 0.1 for a in connect_log.of(proxy.port)), \
        [a.start - t0 for a in connect_log.of(proxy.port)]
    time.sleep(0.5)
    assert connect_log.count(proxy.port) == during


@pytest.mark.timeout(20)
def test_heartbeat_pings_idle_connections(farm, make_pool):
    server = farm.one()
    pool = make_pool([server.address], min_size=2, heartbeat="ping",
                     heartbeat_interval=0.1, watchdog_interval=0.02)
    wait_for(lambda: server.stats()["calls"] >= 6, timeout=5,
             message="heartbeat calls with no user call")
    stats = pool.stats()
    assert stats["instances"][server.address]["closed"] == 0
    assert server.stats()["accepted"] == 2  # the same two connections, kept alive


@pytest.mark.timeout(20)
def test_no_heartbeat_without_the_option(farm, make_pool):
    server = farm.one()
    pool = make_pool([server.address], min_size=2, watchdog_interval=0.02)
    wait_for(lambda: server.stats()["open"] == 2, message="min_size connections")
    time.sleep(0.3)
    assert server.stats()["calls"] == 0
    assert pool.stats()["idle"] == 2


@pytest.mark.timeout(20)
def test_failed_heartbeat_discards_the_connection_and_counts_against_the_instance(
        farm, make_pool, fault_proxy):
    server = farm.one()
    proxy = fault_proxy(server.address)
    pool = make_pool([proxy.address], min_size=1, heartbeat="ping", heartbeat_interval=0.1,
                     watchdog_interval=0.02, socket_timeout=0.3, failure_threshold=1,
                     backoff_initial=30.0, backoff_max=60.0)
    wait_for(lambda: server.stats()["calls"] >= 2, message="heartbeats")
    assert server.stats()["open"] == 1
    proxy.blackhole()  # the next ping gets no answer
    wait_for(lambda: not instance(pool, proxy.address)["healthy"], timeout=5,
             message="the instance ejected after a failed heartbeat")
    state = instance(pool, proxy.address)
    assert state["size"] == 0 and state["closed"] == 1
    # the pool closed its socket: the proxy saw it and dropped the server side too
    wait_for(lambda: proxy.open_links == 0 and server.stats()["open"] == 0,
             message="the discarded connection closed")
    assert server.stats()["accepted"] == 1


@pytest.mark.timeout(20)
def test_hung_heartbeat_does_not_stall_the_watchdog_or_close(farm, make_pool, fault_proxy):
    """socket_timeout=None (calls may wait forever) must not let a heartbeat to a hung
    server block the one watchdog thread forever: other instances keep their heartbeats,
    the hung connection is discarded, and close() stops the thread at once."""
    hung, fine = start_servers(farm, 2)
    proxy = fault_proxy(hung.address)
    pool = make_pool([proxy.address, fine.address], min_size=1, heartbeat="ping",
                     heartbeat_interval=0.1, watchdog_interval=0.02, socket_timeout=None,
                     connect_timeout=0.3, backoff_initial=30.0, backoff_max=60.0)
    wait_for(lambda: hung.stats()["calls"] >= 2 and proxy.open_links == 1,
             message="heartbeats through the proxy")
    proxy.blackhole()
    wait_for(lambda: instance(pool, proxy.address)["closed"] >= 1, timeout=5,
             message="the hung heartbeat connection discarded")
    beats = fine.stats()["calls"]
    wait_for(lambda: fine.stats()["calls"] >= beats + 3, timeout=5,
             message="heartbeats to the other instance going on")
    started = time.monotonic()
    pool.close(timeout=3.0)
    assert time.monotonic() - started < 1.0
    assert not [t for t in threading.enumerate() if t.name.startswith("thriftpool-")]


@pytest.mark.slow
@pytest.mark.timeout(30)
def test_panic_mode_ends_a_full_outage_about_backoff_initial_after_a_server_returns(
        farm, make_pool, fault_proxy, connect_log):
    a, b = start_servers(farm, 2)
    pa, pb = fault_proxy(a.address), fault_proxy(b.address)
    pa.refuse()
    pb.refuse()
    connect_log.watch(pa.port)
    connect_log.watch(pb.port)
    initial = 0.3
    pool = make_pool([pa.address, pb.address], min_size=0, watchdog_interval=0.02,
                     backoff_initial=initial, backoff_multiplier=2.0, backoff_jitter=0.0,
                     backoff_max=60.0)
    errors = []
    deadline = time.monotonic() + 1.5
    for _ in range(200):
        if time.monotonic() >= deadline:
            break
        try:
            checkout_call(pool)
        except NoAvailableInstance as exc:
            errors.append(exc)
        time.sleep(0.02)
    assert errors and len(errors) >= 20
    failures = [instance(pool, p.address)["failures"] for p in (pa, pb)]
    # Each backoff is now >= 0.3 * 2**3 = 2.4 s: only panic probes can end it quickly.
    assert min(failures) >= 4, failures
    # A full outage does not turn into a connect storm: about one attempt per instance
    # per backoff_initial, for ~75 checkouts.
    attempts = connect_log.count(pa.port) + connect_log.count(pb.port)
    assert attempts <= 2 * (1.5 / initial + 3), attempts
    pa.passthrough()
    back = time.monotonic()
    for _ in range(200):
        try:
            assert checkout_call(pool, "echo", "back") == "back"
            break
        except NoAvailableInstance:
            time.sleep(0.02)
    took = time.monotonic() - back
    assert took <= initial + 0.4, took
    assert instance(pool, pa.address)["healthy"]
    assert a.stats()["calls"] == 1
