"""Ejection never takes the whole pool down (max_ejection_percent), and opt-in failure
accrual (failure_classifier), against real servers behind fault proxies."""

from __future__ import annotations

import pytest
from thriftpy2.thrift import TApplicationException

import thriftpool

from consistency import assert_consistent
from servers import free_ports, wait_for

pytestmark = [pytest.mark.usefixtures("no_thread_leak"), pytest.mark.timeout(40),
              pytest.mark.consistent]


def unhealthy(pool):
    return sorted(k for k, i in pool.stats()["instances"].items() if not i["healthy"])


@pytest.mark.parametrize("percent, cap", [(50, 1), (100, 3), (0, 1)])
def test_failing_calls_eject_at_most_max_ejection_percent(farm, make_pool, fault_proxy,
                                                          percent, cap):
    servers = farm.start(3)
    proxies = [fault_proxy(s.address) for s in servers]
    pool = make_pool([p.address for p in proxies], min_size=0, socket_timeout=0.05,
                     failure_threshold=1, max_ejection_percent=percent,
                     backoff_initial=30, retries=0)
    for p in proxies:
        p.blackhole()  # calls time out: transport failures, with connects that succeed
    proxy = pool.client()
    for _ in range(12):
        try:
            proxy.echo("x")
        except Exception:
            pass
    assert len(unhealthy(pool)) == cap, pool.stats()
    for p in proxies:
        p.passthrough()
    if cap < 3:
        # The ones left in rotation serve at once: no NoAvailableInstance.
        for _ in range(10):
            assert proxy.echo("back") == "back"


def test_connect_failures_are_not_capped(make_pool):
    addresses = [f"127.0.0.1:{port}" for port in free_ports(3)]
    pool = make_pool(addresses, min_size=0, max_ejection_percent=50, backoff_initial=30)
    with pytest.raises(thriftpool.NoAvailableInstance):
        pool.client().echo("x")
    assert len(unhealthy(pool)) == 3


def test_a_classifier_ejects_an_instance_answering_internal_error(farm, make_pool):
    bad, good = farm.start(2)

    def internal_errors_count(exc):
        return (isinstance(exc, TApplicationException)
                and exc.type == TApplicationException.INTERNAL_ERROR)

    pool = make_pool([bad.address, good.address], min_size=1, failure_threshold=2,
                     failure_classifier=internal_errors_count, backoff_initial=30,
                     balancer="round_robin")
    wait_for(lambda: pool.stats()["size"] == 2, 10, message="both connected")
    for _ in range(8):
        with pytest.raises(TApplicationException):
            with pool.checkout() as client:
                client.fail("internal")
        if unhealthy(pool):
            break
    # Both answered INTERNAL_ERROR to fail("internal"); whichever got two in a row first
    # is ejected (at most one: max_ejection_percent=50 of 2), and its connection was kept
    # (the answer was complete).
    assert len(unhealthy(pool)) == 1
    assert pool.stats()["instances"][unhealthy(pool)[0]]["closed"] == 0
    assert_consistent(pool)


def test_by_default_internal_error_answers_never_eject(farm, make_pool):
    server = farm.one()
    pool = make_pool([server.address], failure_threshold=1)
    for _ in range(5):
        with pytest.raises(TApplicationException):
            pool.client().fail("internal")
    assert unhealthy(pool) == []
    assert pool.client().echo("ok") == "ok"


def test_a_failing_classifier_is_logged_and_the_default_used(farm, make_pool, caplog):
    server = farm.one()

    def broken(exc):
        raise ValueError("classifier bug")

    pool = make_pool([server.address], failure_threshold=1, failure_classifier=broken)
    with pytest.raises(TApplicationException):
        pool.client().fail("internal")
    assert "failure_classifier failed" in caplog.text
    assert unhealthy(pool) == []


@pytest.mark.parametrize("options, option", [
    ({"max_ejection_percent": 101}, "max_ejection_percent"),
    ({"max_ejection_percent": -1}, "max_ejection_percent"),
    ({"max_ejection_percent": 50.0}, "max_ejection_percent"),
    ({"failure_classifier": 3}, "failure_classifier"),
])
def test_ejection_options_are_validated(make_pool, options, option):
    with pytest.raises(ValueError, match=option):
        make_pool(["127.0.0.1:1"], **options)
