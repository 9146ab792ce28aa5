"""Balancers against real servers: spread, weights, unhealthy instances skipped.

Every count is the servers' own (``calls`` from each echo server's control port), not
the pool's idea of where it sent calls.
"""

from __future__ import annotations

import threading

import pytest

import thriftpool
from thriftpool import Address, Endpoint, StaticDiscovery
from servers import start_servers, wait_for

pytestmark = pytest.mark.usefixtures("no_thread_leak")

BALANCERS = ["round_robin", "random", "least_loaded"]


def server_calls(servers):
    return [s.stats()["calls"] for s in servers]


def settled_calls(servers, total):
    """Server-side call counts once they add up to ``total`` (a server counts a call
    just after writing its reply, so the client can be a little ahead)."""
    return wait_for(lambda: (c := server_calls(servers)) and sum(c) >= total and c,
                    timeout=5, message=f"servers to count {total} calls")


def warmed(pool, n):
    """Wait until the watchdog opened min_size connections to each of ``n`` instances:
    while a connection is being opened, a checkout prefers an instance that can serve
    at once, which would bend a strict rotation."""
    wait_for(lambda: pool.stats()["idle"] >= n, timeout=5, message="min_size connections")
    return pool


def endpoint(server, weight=1):
    return Endpoint(Address("127.0.0.1", server.port), weight)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("balancer", BALANCERS)
def test_each_balancer_spreads_calls_over_three_servers(farm, make_pool, balancer):
    servers = start_servers(farm, 3)
    pool = warmed(make_pool([s.address for s in servers], balancer=balancer), 3)
    client = pool.client()
    for i in range(300):
        assert client.echo(str(i)) == str(i)
    counts = settled_calls(servers, 300)
    assert sum(counts) == 300
    if balancer == "round_robin":
        assert counts == [100, 100, 100]
    else:
        # Binomial(300, 1/3): mean 100, sd 8.2; 60 is about five sd away.
        assert min(counts) >= 60, counts


@pytest.mark.timeout(30)
@pytest.mark.parametrize("balancer", BALANCERS)
def test_each_balancer_honours_weights(farm, make_pool, balancer):
    heavy, light = start_servers(farm, 2)
    pool = warmed(make_pool(StaticDiscovery([endpoint(heavy, 3), endpoint(light, 1)]),
                            balancer=balancer), 2)
    client = pool.client()
    n = 400
    for _ in range(n):
        client.ping()
    h, lt = settled_calls([heavy, light], n)
    if balancer == "round_robin":
        assert (h, lt) == (300, 100)
    else:
        # Binomial(400, 3/4): sd 8.7 calls; +-40 is over four sd.
        assert 260 <= h <= 340, (h, lt)


@pytest.mark.timeout(30)
def test_least_loaded_honours_weights_under_concurrency(farm, make_pool):
    """With calls in flight, P2C compares in_use / weight: 3:1 weights give about 3:1."""
    heavy, light = start_servers(farm, 2)
    pool = make_pool(StaticDiscovery([endpoint(heavy, 3), endpoint(light, 1)]),
                     balancer="least_loaded", max_size=8)
    client = pool.client()
    errors = []

    def worker():
        try:
            for _ in range(40):
                client.sleep(2)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    h, lt = settled_calls([heavy, light], 320)
    ratio = h / (h + lt)
    assert 0.62 <= ratio <= 0.88, (h, lt)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("balancer", BALANCERS)
def test_unhealthy_instance_is_skipped_and_the_rest_share_its_traffic(
        farm, make_pool, fault_proxy, balancer):
    """An ejected instance gets no call although it answers again (its backoff has not
    passed); the healthy ones split the traffic evenly, not the ejected one's neighbour
    taking its share."""
    a, b, c = start_servers(farm, 3)
    proxy = fault_proxy(c.address)
    proxy.refuse()
    pool = make_pool([a.address, b.address, proxy.address], balancer=balancer,
                     min_size=0, backoff_initial=30.0, backoff_max=60.0)
    client = pool.client()
    client.ping()  # one checkout reaches the refusing instance sooner or later
    wait_for(lambda: not pool.stats()["instances"][proxy.address]["healthy"]
             or client.ping() or False, timeout=5, message="the refusing instance ejected")
    proxy.passthrough()  # reachable again, but ejected for 30 s
    before = server_calls([a, b])
    for _ in range(300):
        client.ping()
    after = settled_calls([a, b], sum(before) + 300)
    got = [x - y for x, y in zip(after, before)]
    assert sum(got) == 300
    assert c.stats()["calls"] == 0
    assert not pool.stats()["instances"][proxy.address]["healthy"]
    if balancer == "round_robin":
        assert got == [150, 150], got
    else:
        assert min(got) >= 110, got  # Binomial(300, 1/2): sd 8.7


@pytest.mark.timeout(20)
def test_round_robin_rotates_when_one_of_three_is_unhealthy_from_the_start(
        farm, make_pool, fault_proxy):
    """Sequences of checkouts through ``pool.checkout()`` alternate between the two
    healthy instances: whoami answers A, B, A, B..."""
    a, b = start_servers(farm, 2)
    proxy = fault_proxy(a.address)
    proxy.refuse()
    pool = make_pool([a.address, proxy.address, b.address], balancer="round_robin",
                     min_size=0, backoff_initial=30.0, backoff_max=60.0)
    names = []
    for _ in range(13):
        with pool.checkout() as client:
            names.append(client.whoami())
    # The first checkout that lands on the proxy fails over; after that, strict rotation.
    tail = names[3:]
    assert all(x != y for x, y in zip(tail, tail[1:])), names
    assert abs(tail.count(a.address) - tail.count(b.address)) <= 1, names


@pytest.mark.timeout(20)
def test_balancer_instance_can_be_passed(farm, make_pool):
    server = farm.one()
    rr = thriftpool.RoundRobin()
    pool = make_pool([server.address], balancer=rr)
    assert pool.client().echo("x") == "x"
