"""The failover proxy, ``pool.client()``, against real servers and a fault proxy: what is
retried where, what is never retried, and the retry budget."""

from __future__ import annotations

import threading
import time

import pytest
from thriftpy2.transport import TTransportException

import thriftpool
from servers import echo_thrift, start_servers, wait_for

pytestmark = pytest.mark.usefixtures("no_thread_leak")

TRANSPORT_ERRORS = (TTransportException, OSError)


def calls(*servers):
    return [s.stats()["calls"] for s in servers]


@pytest.mark.timeout(20)
def test_refused_connect_is_retried_on_another_instance(
        farm, make_pool, fault_proxy, connect_log):
    (good,) = start_servers(farm, 1)
    bad = fault_proxy(good.address)
    bad.refuse()
    connect_log.watch(bad.port)
    pool = make_pool([bad.address, good.address], balancer="round_robin", min_size=0)
    client = pool.client()
    assert client.whoami() == good.address  # round robin tried the refusing one first
    assert connect_log.count(bad.port) == 1
    for i in range(10):
        assert client.echo(str(i)) == str(i)
    wait_for(lambda: calls(good) == [11], message="11 calls on the good server")


@pytest.mark.timeout(20)
def test_failed_send_is_retried_on_another_instance(farm, make_pool, fault_proxy):
    """The request could not be sent in full (the server stopped reading, the send
    timed out): it cannot have been executed, so even a non-idempotent call moves on."""
    a, b = start_servers(farm, 2)
    stuck = fault_proxy(a.address)
    pool = make_pool([stuck.address, b.address], balancer="round_robin", min_size=1,
                     socket_timeout=0.5)
    wait_for(lambda: pool.stats()["idle"] == 2, message="min_size connections")
    stuck.blackhole()  # reads nothing: a large request fills the buffers and blocks
    message = "x" * (8 << 20)
    started = time.monotonic()
    assert pool.client().echo(message) == message
    took = time.monotonic() - started
    assert took >= 0.5  # it did try the stuck instance first
    wait_for(lambda: calls(b) == [1], message="the call on the second server")
    assert calls(a) == [0]
    assert pool.stats()["instances"][stuck.address]["closed"] == 1  # the stuck socket


@pytest.mark.timeout(20)
def test_pooled_socket_closed_by_the_server_is_replaced_before_sending(farm, make_pool):
    """Idle sockets the server closed (a restart) are never used: no call fails."""
    server = farm.one()
    pool = make_pool([server.address], min_size=4, max_size=4, watchdog_interval=60.0)
    wait_for(lambda: pool.stats()["idle"] == 4, message="four idle connections")
    client = pool.client()
    client.ping()
    assert server.drop() == 4
    for _ in range(10):
        client.ping()  # would fail on a dead socket: ping is not idempotent here
    assert server.stats()["calls"] == 11


def _kill_mid_call(farm, make_pool, idempotent):
    a, b = start_servers(farm, 2)
    pool = make_pool([a.address, b.address], balancer="round_robin", min_size=1,
                     idempotent=idempotent)
    wait_for(lambda: pool.stats()["idle"] == 2, message="min_size connections")
    result = {}

    def call():
        started = time.monotonic()
        try:
            result["value"] = pool.client().sleep(1500)
        except Exception as exc:
            result["error"] = exc
        result["took"] = time.monotonic() - started

    t = threading.Thread(target=call)
    t.start()
    busy = wait_for(lambda: [k for k, v in pool.stats()["instances"].items()
                             if v["in_use"]], timeout=5, message="the call in flight")
    time.sleep(0.1)  # the request is on the server, which is sleeping
    victim, survivor = (a, b) if busy == [a.address] else (b, a)
    victim.kill()
    t.join(10)
    return result, survivor


@pytest.mark.timeout(20)
def test_non_idempotent_call_is_not_retried_once_sent(farm, make_pool):
    result, survivor = _kill_mid_call(farm, make_pool, idempotent=())
    assert isinstance(result.get("error"), TRANSPORT_ERRORS), result
    assert result["took"] < 1.0  # it failed when the server died, without a retry
    time.sleep(0.2)
    assert calls(survivor) == [0]


@pytest.mark.timeout(20)
def test_idempotent_call_is_retried_on_another_instance_after_a_transport_error(
        farm, make_pool):
    result, survivor = _kill_mid_call(farm, make_pool, idempotent=["sleep"])
    assert result.get("value") == 1500, result
    wait_for(lambda: calls(survivor) == [1], message="the retry on the survivor")


@pytest.mark.timeout(20)
def test_idempotent_true_retries_every_method(farm, make_pool):
    result, survivor = _kill_mid_call(farm, make_pool, idempotent=True)
    assert result.get("value") == 1500, result


@pytest.mark.timeout(20)
def test_idl_exceptions_are_never_retried(farm, make_pool):
    servers = start_servers(farm, 3)
    pool = make_pool([s.address for s in servers], idempotent=True, retries=5)
    client = pool.client()
    with pytest.raises(echo_thrift.EchoError) as info:
        client.fail("boom")
    assert info.value.message == "boom"
    time.sleep(0.1)
    assert sum(calls(*servers)) == 1
    stats = pool.stats()
    assert stats["in_use"] == 0 and stats["idle"] >= 1
    assert all(i["healthy"] and i["closed"] == 0 for i in stats["instances"].values())


@pytest.mark.timeout(20)
def test_retries_option_bounds_the_attempts(farm, make_pool, fault_proxy):
    """Three instances that fail every request: an idempotent call makes 1 + retries
    attempts, each on a different instance, then the last error propagates."""
    (server,) = start_servers(farm, 1)
    proxies = [fault_proxy(server.address) for _ in range(3)]
    for p in proxies:
        p.reset()
    pool = make_pool([p.address for p in proxies], min_size=0, idempotent=True,
                     retries=2, failure_threshold=100)
    with pytest.raises(TRANSPORT_ERRORS):
        pool.client().echo("x")
    assert [p.accepted for p in proxies] == [1, 1, 1]
    pool2 = make_pool([p.address for p in proxies], name="one-retry", min_size=0,
                      idempotent=True, retries=1, failure_threshold=100)
    with pytest.raises(TRANSPORT_ERRORS):
        pool2.client().echo("x")
    assert sum(p.accepted for p in proxies) == 5
    assert server.stats()["accepted"] == 0


@pytest.mark.timeout(30)
def test_retry_budget_caps_retries_in_a_full_outage(farm, make_pool, fault_proxy):
    """Every instance fails every request (connects succeed, so only the budget limits
    retries: ejection is switched off with a huge failure_threshold).  Without a budget
    each call would take 1 + 2 connection attempts; with 20 %, about 1.2 plus a small
    reserve (10 retries, refilled at 10 a second)."""
    (server,) = start_servers(farm, 1)
    proxies = [fault_proxy(server.address) for _ in range(3)]
    for p in proxies:
        p.reset()
    pool = make_pool([p.address for p in proxies], min_size=0, idempotent=True,
                     retries=2, retry_budget=0.2, failure_threshold=10 ** 6)
    client = pool.client()
    n = 200
    started = time.monotonic()
    failures = 0
    for _ in range(n):
        try:
            client.echo("x")
        except TRANSPORT_ERRORS:
            failures += 1
    elapsed = time.monotonic() - started
    attempts = sum(p.accepted for p in proxies)
    assert failures == n
    retries = attempts - n
    assert retries > 0  # the budget does allow some
    assert retries <= 0.2 * n + 10 + 10 * elapsed + 2, (attempts, elapsed)
    assert attempts < 2 * n  # far from the 3 * n without a budget


@pytest.mark.timeout(20)
def test_proxy_has_only_the_service_methods(farm, make_pool):
    server = farm.one()
    pool = make_pool([server.address])
    client = pool.client()
    assert isinstance(client, thriftpool.ClientProxy)
    assert sorted(dir(client)) == sorted(echo_thrift.Echo.thrift_services)
    assert client.echo("hi") == "hi"
