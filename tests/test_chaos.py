"""Chaos against three real subprocess servers and the fault proxy: kills, restarts,
refusing, blackholed and slow servers, under sequential calls and under load.

Every test ends with a leak check: nothing left checked out, no server ever saw more
than ``max_size`` connections from the pool at once, no thriftpool thread after close.
Every load loop is bounded in calls and in time.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Dict, List

import pytest
from thriftpy2.transport import TTransportException

from thriftpool import NoAvailableInstance
from servers import start_servers, wait_for

#: Every pool these tests build must end consistent (tests/consistency.py).
pytestmark = [pytest.mark.usefixtures("no_thread_leak"), pytest.mark.consistent]

TRANSPORT_ERRORS = (TTransportException, OSError)
MAX_SIZE = 8


def thriftpool_threads() -> List[str]:
    return [t.name for t in threading.enumerate()
            if t.name.startswith("thriftpool-") and t.is_alive()]


def assert_no_leaks(pool, servers, max_size=MAX_SIZE, peaks=()):
    """Nothing checked out or being opened, no server above ``max_size`` connections at
    any time (its own ``peak``; ``peaks`` adds ones read before a kill), and no thread
    left once the pool is closed."""
    wait_for(lambda: pool.stats()["in_use"] == 0 and pool.stats()["opening"] == 0,
             timeout=5, message="every connection checked in")
    seen = list(peaks) + [s.stats()["peak"] for s in servers if s.alive]
    assert seen and max(seen) <= max_size, seen
    pool.close()
    wait_for(lambda: not thriftpool_threads(), timeout=5, message="pool threads gone")
    wait_for(lambda: all(s.stats()["open"] == 0 for s in servers if s.alive), timeout=5,
             message="servers see every pool connection closed")


def calls(server) -> int:
    return server.stats()["calls"]


class Load:
    """``threads`` threads calling ``call()`` until stopped, each at most ``max_calls``
    times and for at most ``max_seconds``; records successes and errors."""

    def __init__(self, call: Callable[[], Any], threads: int = 16, max_calls: int = 2000,
                 max_seconds: float = 10.0) -> None:
        self.call = call
        self.ok = 0
        self.errors: List[BaseException] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._max_calls = max_calls
        self._deadline = time.monotonic() + max_seconds
        self._threads = [threading.Thread(target=self._run, name=f"load-{i}")
                         for i in range(threads)]

    def _run(self) -> None:
        for _ in range(self._max_calls):
            if self._stop.is_set() or time.monotonic() >= self._deadline:
                return
            try:
                self.call()
            except Exception as exc:
                with self._lock:
                    self.errors.append(exc)
            else:
                with self._lock:
                    self.ok += 1

    def __enter__(self) -> "Load":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(15)
        assert not any(t.is_alive() for t in self._threads)

    def run_out(self) -> None:
        """Wait for every thread to reach its call or time limit."""
        for t in self._threads:
            t.join(max(0.0, self._deadline - time.monotonic()) + 15)

    def completed(self) -> int:
        return self.ok + len(self.errors)


@pytest.mark.timeout(30)
def test_sigkill_between_calls_no_call_fails(farm, make_pool):
    servers = start_servers(farm, 3)
    pool = make_pool([s.address for s in servers], min_size=2, max_size=MAX_SIZE)
    wait_for(lambda: pool.stats()["idle"] == 6, message="min_size connections")
    client = pool.client()
    for i in range(60):
        assert client.echo(str(i)) == str(i)
    victim, survivors = servers[1], [servers[0], servers[2]]
    wait_for(lambda: sum(calls(s) for s in servers) == 60, message="60 calls counted")
    victim_calls, victim_peak = calls(victim), victim.stats()["peak"]
    assert victim_calls > 0
    victim.kill()
    for i in range(90):
        assert client.echo(str(i)) == str(i)  # zero failures
    wait_for(lambda: sum(calls(s) for s in survivors) == 150 - victim_calls,
             message="every later call on the survivors")
    assert not pool.stats()["instances"][victim.address]["healthy"]
    assert_no_leaks(pool, servers, peaks=[victim_peak])


@pytest.mark.timeout(40)
@pytest.mark.parametrize("idempotent", [False, True], ids=["plain", "idempotent"])
def test_sigkill_under_load_from_16_threads(farm, make_pool, idempotent):
    """Only calls in flight on the killed server may fail, and only when the method is
    not idempotent: at most one per thread (16), in practice fewer."""
    servers = start_servers(farm, 3)
    pool = make_pool([s.address for s in servers], max_size=MAX_SIZE,
                     idempotent=["sleep"] if idempotent else ())
    client = pool.client()
    victim, survivors = servers[0], servers[1:]
    with Load(lambda: client.sleep(5), threads=16, max_seconds=8.0) as load:
        wait_for(lambda: load.completed() >= 150, timeout=10, message="load running")
        wait_for(lambda: pool.stats()["instances"][victim.address]["in_use"] >= 2,
                 timeout=5, message="calls in flight on the victim")
        victim_peak = victim.stats()["peak"]
        victim.kill()
        killed_at = load.completed()
        before = [calls(s) for s in survivors]
        wait_for(lambda: load.completed() >= killed_at + 300, timeout=10,
                 message="300 calls after the kill")
    assert load.ok >= 400
    assert all(isinstance(e, TRANSPORT_ERRORS) for e in load.errors), load.errors
    if idempotent:
        assert load.errors == []
    else:
        assert len(load.errors) <= 16, load.errors
    assert all(calls(s) > b for s, b in zip(survivors, before))
    assert not pool.stats()["instances"][victim.address]["healthy"]
    assert_no_leaks(pool, servers, peaks=[victim_peak])


@pytest.mark.timeout(40)
def test_killed_server_restarted_on_its_port_is_back_in_rotation_within_seconds(
        farm, make_pool):
    """Default backoff (1 s, x1.6, jitter 0.2) and watchdog interval (1 s)."""
    servers = start_servers(farm, 3)
    pool = make_pool([s.address for s in servers], max_size=MAX_SIZE)
    client = pool.client()
    victim = servers[2]
    with Load(lambda: client.sleep(2), threads=8, max_seconds=20.0) as load:
        wait_for(lambda: load.completed() >= 100, message="load running")
        victim_peak = victim.stats()["peak"]
        victim.kill()
        time.sleep(1.5)  # the outage
        assert not pool.stats()["instances"][victim.address]["healthy"]
        failures = pool.stats()["instances"][victim.address]["failures"]
        victim.restart()
        back = time.monotonic()
        wait_for(lambda: calls(victim) >= 10, timeout=8,
                 message="the restarted server taking calls")
        took = time.monotonic() - back
        assert pool.stats()["instances"][victim.address]["healthy"]
    assert all(isinstance(e, TRANSPORT_ERRORS) for e in load.errors), load.errors
    assert len(load.errors) <= MAX_SIZE, load.errors
    # back within a few seconds: the next probe after a short outage (1-2 failures:
    # a backoff of at most 1.6 s * 1.2, plus a watchdog pass)
    assert took <= 5.0, (took, failures)
    assert failures <= 3, failures  # the kill counted as one failure, not a burst
    assert_no_leaks(pool, servers, peaks=[victim_peak])


@pytest.mark.slow
@pytest.mark.timeout(40)
def test_refusing_port_gets_single_digit_connection_attempts_in_10s(
        farm, make_pool, fault_proxy, connect_log):
    """A port nobody listens on (connects refused), under load for 10 s with the default
    backoff: the pool tries it fewer than ten times, and no call fails."""
    a, b = start_servers(farm, 2)
    refusing = fault_proxy(a.address)
    refusing.refuse()
    connect_log.watch(refusing.port)
    pool = make_pool([a.address, refusing.address, b.address], max_size=MAX_SIZE)
    client = pool.client()
    started = time.monotonic()
    with Load(lambda: client.echo("x"), threads=4, max_calls=100_000,
              max_seconds=10.0) as load:
        load.run_out()  # its 10 s
    elapsed = time.monotonic() - started
    assert elapsed >= 9.5
    attempts = connect_log.of(refusing.port)
    assert 1 <= len(attempts) <= 9, [round(x.start - started, 2) for x in attempts]
    assert all(x.error is not None for x in attempts)
    assert load.errors == [] and load.ok >= 500
    assert_no_leaks(pool, [a, b])


@pytest.mark.timeout(30)
def test_blackholed_server_times_out_is_ejected_and_later_calls_go_elsewhere(
        farm, make_pool, fault_proxy):
    servers = start_servers(farm, 3)
    hole = fault_proxy(servers[2].address)
    addresses = [servers[0].address, servers[1].address, hole.address]
    pool = make_pool(addresses, balancer="round_robin", min_size=1, max_size=MAX_SIZE,
                     socket_timeout=0.5, failure_threshold=1, backoff_initial=30.0,
                     backoff_max=60.0)
    wait_for(lambda: pool.stats()["idle"] == 3 and hole.open_links == 1,
             message="min_size connections, through the proxy")
    client = pool.client()
    hole.blackhole()
    accepted = hole.accepted
    failures: List[Dict[str, Any]] = []
    for i in range(3):  # round robin: the third call goes to the blackholed one
        started = time.monotonic()
        try:
            client.echo(str(i))
        except Exception as exc:
            failures.append({"error": exc, "took": time.monotonic() - started})
    assert len(failures) == 1, failures
    assert isinstance(failures[0]["error"], TRANSPORT_ERRORS), failures
    assert 0.45 <= failures[0]["took"] <= 1.5, failures  # about socket_timeout
    state = pool.stats()["instances"][hole.address]
    assert not state["healthy"]
    assert state["size"] == 0 and state["closed"] == 1  # the connection was discarded
    wait_for(lambda: hole.open_links == 0, message="the discarded socket closed")
    before = [calls(s) for s in servers[:2]]
    for i in range(30):
        assert client.echo(str(i)) == str(i)
    wait_for(lambda: sum(calls(s) for s in servers[:2]) == sum(before) + 30,
             message="later calls on the other two")
    assert hole.accepted == accepted  # nothing went to the blackholed one again
    assert calls(servers[2]) == 0
    assert_no_leaks(pool, servers)


@pytest.mark.timeout(40)
def test_slow_server_gets_less_traffic_under_least_loaded(farm, make_pool, fault_proxy):
    servers = start_servers(farm, 3)
    slow = fault_proxy(servers[2].address)
    slow.slow(25)  # each chunk, either way: a call takes 50 ms or more
    pool = make_pool([servers[0].address, servers[1].address, slow.address],
                     balancer="least_loaded", max_size=MAX_SIZE)
    client = pool.client()
    with Load(lambda: client.echo("x"), threads=8, max_calls=150, max_seconds=4.0) as load:
        load.run_out()
    assert load.errors == []
    fast_a, fast_b, slow_calls = (calls(s) for s in servers)
    assert load.ok >= 300
    assert slow_calls < 0.3 * min(fast_a, fast_b), (fast_a, fast_b, slow_calls)
    assert slow_calls > 0  # slow is not dead: it still takes some
    assert_no_leaks(pool, servers)


@pytest.mark.timeout(30)
def test_vanished_host_connects_hang_callers_fail_over_after_connect_timeout(
        farm, make_pool, fault_proxy):
    """The host behind one instance vanishes: its open connections die and new connects
    hang (SYNs dropped).  Idempotent calls never fail and wait at most about
    connect_timeout for the failover."""
    servers = start_servers(farm, 3)
    gone = fault_proxy(servers[2].address)
    pool = make_pool([servers[0].address, servers[1].address, gone.address],
                     max_size=MAX_SIZE, connect_timeout=0.3, idempotent=True)
    client = pool.client()
    latencies: List[float] = []

    def call() -> None:
        started = time.monotonic()
        client.sleep(2)
        latencies.append(time.monotonic() - started)

    with Load(call, threads=8, max_seconds=3.0) as load:
        wait_for(lambda: load.completed() >= 100, message="load running")
        wait_for(lambda: gone.open_links >= 1, message="connections to the doomed one")
        victim_peak = servers[2].stats()["peak"]
        gone.deaf()
        gone.cut()
        load.run_out()
    assert load.errors == []
    assert max(latencies) <= 0.3 + 0.5, max(latencies)
    assert not pool.stats()["instances"][gone.address]["healthy"]
    assert_no_leaks(pool, servers[:2], peaks=[victim_peak])


@pytest.mark.timeout(30)
def test_full_outage_under_load_ends_soon_after_one_server_returns(
        farm, make_pool, fault_proxy):
    """Both instances go down under load from 8 threads; callers fail fast meanwhile
    (NoAvailableInstance, not hangs); one comes back and every caller is served again
    within about backoff_initial (panic probing), although backoffs grew meanwhile."""
    a, b = start_servers(farm, 2)
    pa, pb = fault_proxy(a.address), fault_proxy(b.address)
    pool = make_pool([pa.address, pb.address], max_size=MAX_SIZE, backoff_initial=0.3)
    client = pool.client()
    events: List[tuple] = []

    def call() -> None:
        try:
            client.ping()
        except Exception as exc:
            events.append((time.monotonic(), exc))
            time.sleep(0.01)
            raise
        events.append((time.monotonic(), None))

    with Load(call, threads=8, max_calls=100_000, max_seconds=4.0) as load:
        wait_for(lambda: load.completed() >= 100, message="load running")
        for p in (pa, pb):
            p.refuse()
            p.cut()
        time.sleep(1.5)
        assert min(pool.stats()["instances"][p.address]["failures"] for p in (pa, pb)) >= 2
        pb.passthrough()
        back = time.monotonic()
        load.run_out()
    outage = [e for t, e in events if t < back]
    assert any(isinstance(e, NoAvailableInstance) for e in outage)
    first_ok = min(t for t, e in events if e is None and t > back)
    assert first_ok - back <= 0.3 + 0.4, first_ok - back
    assert [e for t, e in events if t > back + 0.3 + 0.4 and e is not None] == []
    assert b.stats()["calls"] > 0
    assert_no_leaks(pool, [a, b])
