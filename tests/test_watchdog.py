"""The watchdog: idle reaping, lifetime recycling, refilling, backoff; checked on the server."""

from __future__ import annotations

import contextlib
import logging
import threading
import time

import pytest

import thriftpool
from servers import echo_thrift, free_port, wait_for

pytestmark = pytest.mark.usefixtures("no_thread_leak")


def hold(pool, n):
    """Check out ``n`` connections at once (each makes a call), then return them all."""
    with contextlib.ExitStack() as stack:
        for _ in range(n):
            stack.enter_context(pool.checkout()).ping()


def instance_stats(pool, server):
    return pool.stats()["instances"][server.address]


@pytest.mark.timeout(20)
def test_idle_connections_are_reaped_down_to_min_size(farm, make_pool):
    server = farm.one()
    pool = make_pool([server.address], min_size=2, max_size=5, idle_timeout=0.3,
                     watchdog_interval=0.05)
    wait_for(lambda: server.open_connections() == 2, 10, message="min_size connections")
    hold(pool, 5)
    assert server.open_connections() == 5
    started = time.monotonic()
    wait_for(lambda: server.open_connections() == 2, 10, message="reaped to min_size")
    assert time.monotonic() - started >= 0.2  # not before idle_timeout
    inst = instance_stats(pool, server)
    assert (inst["size"], inst["idle"], inst["closed"]) == (2, 2, 3)
    # Never below min_size, however long they stay idle.
    time.sleep(0.5)
    assert server.stats()["open"] == 2 and server.stats()["accepted"] == 5
    assert instance_stats(pool, server)["size"] == 2


@pytest.mark.timeout(20)
def test_in_use_connections_count_towards_min_size_when_reaping(farm, make_pool):
    server = farm.one()
    pool = make_pool([server.address], min_size=2, max_size=4, idle_timeout=0.2,
                     watchdog_interval=0.05)
    hold(pool, 4)
    with pool.checkout() as client:
        client.ping()
        wait_for(lambda: server.open_connections() == 2, 10, message="reaped")
        inst = instance_stats(pool, server)
        assert (inst["in_use"], inst["idle"]) == (1, 1)
    assert instance_stats(pool, server)["idle"] == 2


@pytest.mark.timeout(20)
def test_idle_timeout_none_never_reaps(farm, make_pool):
    server = farm.one()
    pool = make_pool([server.address], min_size=0, max_size=3, idle_timeout=None,
                     watchdog_interval=0.02)
    hold(pool, 3)
    time.sleep(0.3)  # fifteen passes
    assert server.open_connections() == 3
    assert instance_stats(pool, server)["idle"] == 3


@pytest.mark.timeout(20)
def test_idle_connections_past_max_lifetime_are_replaced(farm, make_pool):
    server = farm.one()
    pool = make_pool([server.address], min_size=2, max_size=2, max_lifetime=0.3,
                     lifetime_jitter=0, watchdog_interval=0.05)
    wait_for(lambda: server.open_connections() == 2, 10, message="min_size connections")
    # Each lifetime the watchdog closes both and opens two new ones.
    wait_for(lambda: server.stats()["accepted"] >= 6, 10, message="two recycles")
    wait_for(lambda: server.open_connections() == 2, 5, message="old ones closed")
    assert instance_stats(pool, server)["closed"] >= 4
    assert pool.client().echo("fresh") == "fresh"


@pytest.mark.timeout(20)
def test_in_use_connection_past_max_lifetime_is_closed_at_checkin(farm, make_pool):
    server = farm.one()
    # A slow watchdog: only the checkin can be what closes the connection.
    pool = make_pool([server.address], min_size=0, max_size=1, max_lifetime=0.3,
                     lifetime_jitter=0, watchdog_interval=30)
    with pool.checkout() as client:
        assert client.sleep(400) == 400  # outlives its lifetime while checked out
        assert client.echo("still mine") == "still mine"  # never closed under the caller
        assert server.open_connections() == 1
    inst = instance_stats(pool, server)
    assert (inst["size"], inst["closed"]) == (0, 1)
    wait_for(lambda: server.open_connections() == 0, 5, message="closed at checkin")
    assert pool.client().echo("new") == "new"
    assert server.stats()["accepted"] == 2


@pytest.mark.timeout(20)
def test_expired_idle_connection_is_not_handed_out_before_the_watchdog_runs(farm, make_pool):
    server = farm.one()
    pool = make_pool([server.address], min_size=0, max_size=1, max_lifetime=0.2,
                     lifetime_jitter=0, watchdog_interval=30)
    assert pool.client().echo("a") == "a"
    time.sleep(0.25)  # the idle connection expires
    assert pool.client().echo("b") == "b"
    assert server.stats()["accepted"] == 2
    wait_for(lambda: server.open_connections() == 1, 5, message="expired one closed")


@pytest.mark.timeout(20)
def test_lifetime_jitter_spreads_expiry(farm, make_pool):
    """Connections opened together do not all expire together."""
    server = farm.one()
    pool = make_pool([server.address], min_size=0, max_size=8, max_lifetime=1.0,
                     lifetime_jitter=0.5, watchdog_interval=0.01, idle_timeout=None)
    hold(pool, 8)
    # Jittered lifetimes fall in [0.5, 1.0] s: sample the open count meanwhile.
    seen = set()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        n = instance_stats(pool, server)["size"]
        seen.add(n)
        if n == 0:
            break
        time.sleep(0.005)
    assert 0 in seen
    assert len(seen - {0, 8}) >= 1, seen  # some expired while others lived on


@pytest.mark.timeout(20)
def test_watchdog_refills_to_min_size_after_a_discard(farm, make_pool):
    server = farm.one()
    pool = make_pool([server.address], min_size=2, max_size=2, socket_timeout=0.1,
                     watchdog_interval=0.05)
    wait_for(lambda: server.stats()["accepted"] == 2, 10, message="min_size connections")
    with pytest.raises(OSError):
        pool.client().sleep(300)
    assert instance_stats(pool, server)["size"] in (1, 2)
    wait_for(lambda: server.stats()["accepted"] == 3, 10, message="refilled")
    wait_for(lambda: instance_stats(pool, server)["idle"] == 2, 10, message="2 idle again")
    wait_for(lambda: server.open_connections() == 2, 5, message="server sees 2")


@pytest.mark.timeout(20)
def test_watchdog_replaces_idle_connections_the_server_dropped(farm, make_pool):
    """min_size means live connections: the watchdog notices idle sockets the peer closed
    and opens new ones, without waiting for a checkout to stumble on them."""
    server = farm.one()
    pool = make_pool([server.address], min_size=2, max_size=4, watchdog_interval=0.05)
    wait_for(lambda: server.open_connections() == 2, 10, message="min_size connections")
    assert server.drop() == 2
    wait_for(lambda: server.stats()["accepted"] == 4, 10, message="replacements opened")
    wait_for(lambda: server.open_connections() == 2, 5, message="server sees 2 live")
    inst = instance_stats(pool, server)
    assert (inst["size"], inst["idle"], inst["closed"]) == (2, 2, 2)


@pytest.mark.timeout(30)
def test_watchdog_notices_a_killed_server_without_traffic(farm, make_pool):
    server = farm.one()
    pool = make_pool([server.address], min_size=2, max_size=4, watchdog_interval=0.05,
                     backoff_initial=0.2, backoff_jitter=0)
    wait_for(lambda: server.open_connections() == 2, 10, message="min_size connections")
    server.kill()
    # No checkout happens: the watchdog finds the idle sockets dead, fails to replace
    # them and marks the instance unhealthy.
    wait_for(lambda: not instance_stats(pool, server)["healthy"], 10, message="unhealthy")
    inst = instance_stats(pool, server)
    assert inst["idle"] == 0 and inst["closed"] == 2
    server.restart()
    proxy = pool.client()

    def served():
        try:
            return proxy.echo("back") == "back"
        except thriftpool.NoAvailableInstance:
            return False  # any other error (a stale socket) fails the test

    wait_for(served, 10, interval=0.05, message="instance back")
    wait_for(lambda: server.open_connections() == 2, 10, message="refilled to min_size")
    assert instance_stats(pool, server)["healthy"] is True


@pytest.mark.timeout(20)
def test_close_wakes_a_sleeping_watchdog_at_once(farm):
    server = farm.one()
    pool = thriftpool.ThriftPool(echo_thrift.Echo, [server.address], name="slow-dog",
                                 watchdog_interval=60)
    wait_for(lambda: server.open_connections() == 1, 10, message="min_size connection")
    thread = next(t for t in threading.enumerate() if t.name == "thriftpool-slow-dog-watchdog")
    started = time.monotonic()
    pool.close()
    assert time.monotonic() - started < 2.0
    assert not thread.is_alive()


@pytest.mark.timeout(20)
def test_watchdog_survives_a_failing_pass(farm, make_pool, monkeypatch, caplog):
    """A pass that raises is logged and the next one runs.  (The failure is injected:
    nothing real makes a pass raise on purpose.)"""
    from thriftpool import pool as pool_module

    original = pool_module.plan
    failures = []

    def flaky(*args, **kwargs):
        if len(failures) < 3:
            failures.append(1)
            raise RuntimeError("injected maintenance failure")
        return original(*args, **kwargs)

    monkeypatch.setattr(pool_module, "plan", flaky)
    server = farm.one()
    make_pool([server.address], min_size=2, watchdog_interval=0.02)
    wait_for(lambda: server.open_connections() == 2, 10, message="filled despite failures")
    assert len(failures) == 3
    assert "injected maintenance failure" in caplog.text


@pytest.mark.timeout(20)
def test_reconnect_attempts_back_off_exponentially(make_pool, caplog):
    caplog.set_level(logging.INFO, logger="thriftpool")
    address = f"127.0.0.1:{free_port()}"
    pool = make_pool([address], min_size=0, backoff_initial=0.1, backoff_multiplier=2.0,
                     backoff_max=10, backoff_jitter=0, watchdog_interval=0.01)
    # A checkout shows demand; from then on the watchdog probes the dead instance.
    with pytest.raises(thriftpool.NoAvailableInstance):
        pool.client().ping()

    def attempts():
        return [r.created for r in caplog.records
                if r.name.startswith("thriftpool") and "next attempt" in r.getMessage()]

    wait_for(lambda: len(attempts()) >= 4, 10, message="4 failed attempts")
    times = attempts()[:4]
    gaps = [b - a for a, b in zip(times, times[1:])]
    for gap, expected in zip(gaps, (0.1, 0.2, 0.4)):
        # never before the backoff; the upper bound only allows for a slow machine
        assert expected * 0.9 <= gap < expected + 1.0, gaps
    assert gaps[2] > gaps[0]
    assert pool.stats()["instances"][address]["healthy"] is False


@pytest.mark.timeout(20)
def test_watchdog_survives_a_base_exception_from_a_listener(farm, make_pool, caplog):
    """A listener raising SystemExit on the watchdog thread (a background connect's
    connection_opened) is logged once with its traceback; the thread goes on, and one
    instance's failure does not stop the pass over the others."""
    class Exiting(thriftpool.PoolListener):
        raised = 0

        def connection_opened(self, pool, address):
            if threading.current_thread().name.endswith("-watchdog") and self.raised < 3:
                self.raised += 1
                raise SystemExit("listener")

    listener = Exiting()
    a, b = farm.start(2)
    pool = make_pool([a.address, b.address], min_size=2, watchdog_interval=0.02,
                     listeners=[listener])
    wait_for(lambda: a.open_connections() == 2 and b.open_connections() == 2, 10,
             message="both filled despite the failures")
    assert listener.raised == 3
    assert pool.stats()["watchdog_alive"] is True
    logged = [r for r in caplog.records if "maintenance pass failed" in r.getMessage()]
    assert len(logged) == 1 and logged[0].exc_info is not None
    s = pool.stats()
    assert all(i["opening"] == 0 and i["size"] == 2 for i in s["instances"].values()), s
