"""Leak tests: thousands of calls from many threads with random failures, then nothing
may be left checked out, no instance may be above max_size, and the servers must see
exactly the connections the pool thinks it has."""

from __future__ import annotations

import random
import socket
import threading
import time
from collections import Counter
from typing import List

import pytest
from thriftpy2.transport import TTransportException

import thriftpool
from servers import echo_thrift, wait_for

#: Every pool these tests build must end consistent (tests/consistency.py).
pytestmark = [pytest.mark.usefixtures("no_thread_leak"), pytest.mark.consistent]


class CallerBug(Exception):
    """Raised by the test's own code between calls."""


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_random_failures_leak_nothing(farm, make_pool):
    servers = farm.start(2)
    max_size = 4
    pool = make_pool([s.address for s in servers], min_size=1, max_size=max_size,
                     socket_timeout=0.1, checkout_timeout=5, watchdog_interval=0.05,
                     backoff_initial=0.05, backoff_max=0.2)
    outcomes: Counter = Counter()
    unexpected: List[BaseException] = []
    over: List[dict] = []
    stop = threading.Event()
    lock = threading.Lock()
    deadline = time.monotonic() + 4.0

    def record(kind):
        with lock:
            outcomes[kind] += 1

    def work(seed):
        rng = random.Random(seed)
        n = 0
        while time.monotonic() < deadline and n < 400:
            n += 1
            payload = f"{seed}-{n}"
            roll = rng.random()
            try:
                with pool.checkout() as client:
                    if roll < 0.04:
                        # Longer than socket_timeout; it may still succeed when this
                        # thread was not scheduled until the reply had arrived.
                        assert client.sleep(250) == 250
                        record("slept")
                    elif roll < 0.12:
                        client.fail(payload)
                    elif roll < 0.17:
                        assert client.echo(payload) == payload
                        raise CallerBug(payload)
                    elif roll < 0.19:
                        pass  # checked out, nothing called
                    else:
                        # Every reply must be this call's own, never a late one.
                        assert client.echo(payload) == payload
                        assert client.echo(payload + "!") == payload + "!"
                        record("ok")
            except echo_thrift.EchoError as exc:
                assert exc.message == payload
                record("idl")
            except CallerBug:
                record("caller")
            except socket.timeout:
                record("timeout")
            except (TTransportException, OSError):
                record("transport")  # a drop hit the call
            except thriftpool.NoAvailableInstance:
                record("no instance")  # both instances briefly ejected after drops
            except BaseException as exc:
                unexpected.append(exc)
                return

    def dropper():
        rng = random.Random(0)
        while not stop.wait(0.25):
            rng.choice(servers).drop()
            record("drops")

    def sampler():
        while not stop.is_set():
            for key, inst in pool.stats()["instances"].items():
                if inst["size"] > max_size:
                    over.append({key: inst})
            time.sleep(0.002)

    helpers = [threading.Thread(target=dropper, daemon=True),
               threading.Thread(target=sampler, daemon=True)]
    workers = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(16)]
    for t in helpers + workers:
        t.start()
    for t in workers:
        t.join(max(1.0, deadline - time.monotonic() + 20))
        assert not t.is_alive(), "a worker hung"
    stop.set()
    for t in helpers:
        t.join(5)

    assert not unexpected, unexpected[:5]
    assert not over, over[:3]
    # NoAvailableInstance fails fast, so a short ejection of both instances can add many;
    # they say nothing about leaks and are left out of the counts.
    total = sum(v for k, v in outcomes.items() if k not in ("drops", "no instance"))
    assert total >= 2000, outcomes
    for kind in ("ok", "idl", "caller", "timeout"):
        assert outcomes[kind] > 0, outcomes
    assert outcomes["drops"] >= 5
    assert outcomes["ok"] > total / 2, outcomes

    # Nothing left checked out, waiting or half-open.
    s = pool.stats()
    assert (s["in_use"], s["waiting"]) == (0, 0), s
    wait_for(lambda: pool.stats()["opening"] == 0, 5, message="no connect in flight")
    for server in servers:
        inst = pool.stats()["instances"][server.address]
        assert inst["size"] <= max_size, inst
        # The server sees exactly the pool's connections once closes have landed.
        wait_for(lambda server=server: server.open_connections()
                 == pool.stats()["instances"][server.address]["size"], 10,
                 message=f"server {server.address} agrees with the pool")
        assert server.open_connections() <= max_size
    # Ejected instances come back (the watchdog probes them after their backoff), and
    # every socket still pooled is live and usable.
    wait_for(lambda: all(i["healthy"] for i in pool.stats()["instances"].values()), 10,
             message="both instances healthy")
    proxy = pool.client()
    for i in range(20):
        assert proxy.echo(str(i)) == str(i)
    pool.close()
    for server in servers:
        wait_for(lambda server=server: server.open_connections() == 0, 5,
                 message="everything closed")


@pytest.mark.timeout(30)
def test_close_while_busy_leaks_nothing(farm):
    servers = farm.start(2)
    pool = thriftpool.ThriftPool(echo_thrift.Echo, [s.address for s in servers],
                                 name="busy", min_size=1, max_size=3, checkout_timeout=5)
    results: Counter = Counter()
    unexpected: List[BaseException] = []
    lock = threading.Lock()
    running = threading.Barrier(13)

    def work(i):
        running.wait(5)
        n = 0
        while True:
            n += 1
            try:
                with pool.checkout() as client:
                    assert client.echo(f"{i}.{n}") == f"{i}.{n}"
                    if n % 7 == 0:
                        client.sleep(5)
                kind = "ok"
            except thriftpool.PoolClosed:
                with lock:
                    results["closed"] += 1
                return
            except BaseException as exc:
                unexpected.append(exc)
                return
            with lock:
                results[kind] += 1

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(12)]
    for t in threads:
        t.start()
    running.wait(5)
    wait_for(lambda: results["ok"] >= 200, 10, message="traffic")
    pool.close()
    for t in threads:
        t.join(10)
        assert not t.is_alive()
    assert not unexpected, unexpected[:5]
    assert results["closed"] == 12  # every thread ended on PoolClosed
    s = pool.stats()
    assert s["size"] == 0 and s["closed"]
    for server in servers:
        wait_for(lambda server=server: server.open_connections() == 0, 5,
                 message="every socket closed, including those in use at close()")
        assert server.stats()["peak"] <= 3


@pytest.mark.timeout(30)
def test_many_short_checkouts_reuse_a_few_connections(farm, make_pool):
    """No churn: thousands of checkouts from 8 threads open at most max_size sockets."""
    server = farm.one()
    pool = make_pool([server.address], min_size=0, max_size=3, checkout_timeout=10)
    errors: List[BaseException] = []

    def work(i):
        try:
            for j in range(300):
                with pool.checkout() as client:
                    if j % 50 == 0:
                        assert client.echo(str(j)) == str(j)
        except BaseException as exc:  # pragma: no cover
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert not errors, errors[:3]
    s = pool.stats()
    assert s["in_use"] == 0 and s["waiting"] == 0 and s["size"] <= 3
    stats = server.stats()
    assert stats["accepted"] <= 3 and stats["peak"] <= 3
