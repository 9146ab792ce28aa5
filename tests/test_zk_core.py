"""The core's promises that need a real ZooKeeper: the first checkouts wait for
discovery's first answer, close(timeout) holds with ZooKeeper unreachable, and a pool the
program drops is collected with its discovery."""

from __future__ import annotations

import gc
import threading
import time

import pytest

import thriftpool

from servers import echo_thrift, free_port, wait_for
from test_zookeeper import discovery, register

pytestmark = pytest.mark.timeout(40)


def test_first_checkout_right_after_construction_waits_for_the_first_list(zk, farm):
    server = farm.one()
    register(zk, server)
    pool = zk.closing(thriftpool.ThriftPool(echo_thrift.Echo, discovery(zk), name="first",
                                            checkout_timeout=10))
    # No pool.wait(): the very first line a new user runs.
    with pool.checkout() as client:
        assert client.whoami() == server.address


def test_an_empty_first_answer_fails_at_once_saying_so(zk):
    zk.client().ensure_path(zk.path)
    pool = zk.closing(thriftpool.ThriftPool(echo_thrift.Echo, discovery(zk), name="empty",
                                            checkout_timeout=10))
    started = time.monotonic()
    with pytest.raises(thriftpool.NoAvailableInstance, match="discovery reports no instances"):
        with pool.checkout():
            pass
    assert time.monotonic() - started < 8  # the answer came; not the whole timeout


def test_no_first_answer_within_the_deadline_says_so():
    hosts = f"127.0.0.1:{free_port()}"  # nothing listens: ZooKeeper unreachable
    pool = thriftpool.ThriftPool(
        echo_thrift.Echo, thriftpool.ZooKeeperDiscovery(hosts, "/svc/none"), name="mute")
    try:
        started = time.monotonic()
        with pytest.raises(thriftpool.NoAvailableInstance, match="no list of instances"):
            with pool.checkout(timeout=0.3):
                pass
        assert 0.27 <= time.monotonic() - started < 0.6
    finally:
        pool.close(timeout=1)


def test_close_with_zookeeper_unreachable_is_bounded_and_fails_waiters_first():
    hosts = f"127.0.0.1:{free_port()}"
    pool = thriftpool.ThriftPool(
        echo_thrift.Echo, thriftpool.ZooKeeperDiscovery(hosts, "/svc/none"), name="closing")
    outcome = []

    def waiter() -> None:
        try:
            with pool.checkout(timeout=20):
                pass
        except BaseException as exc:
            outcome.append((time.monotonic(), exc))

    t = threading.Thread(target=waiter)
    t.start()
    time.sleep(0.2)  # it waits for discovery's first answer
    started = time.monotonic()
    pool.close(timeout=0.2)
    took = time.monotonic() - started
    t.join(5)
    assert took < 0.6, took
    assert outcome and isinstance(outcome[0][1], thriftpool.PoolClosed)
    assert outcome[0][0] - started < 0.3  # failed at the start of close(), not its end
    wait_for(lambda: not any(th.name.startswith("thriftpool-closing") and th.is_alive()
                             for th in threading.enumerate()), 10,
             message="the pool's threads gone")


def test_an_abandoned_pool_over_zookeeper_is_collected(zk, farm):
    server = farm.one()
    register(zk, server)
    pool = thriftpool.ThriftPool(echo_thrift.Echo, discovery(zk), name="dropped",
                                 min_size=2, watchdog_interval=0.05)
    wait_for(lambda: server.open_connections() == 2, 10, message="min_size connections")
    with pytest.warns(ResourceWarning, match="unclosed ThriftPool 'dropped'"):
        del pool
        gc.collect()
    wait_for(lambda: not any(th.name.startswith("thriftpool-dropped") and th.is_alive()
                             for th in threading.enumerate()), 10,
             message="watchdog and discovery threads gone")
    wait_for(lambda: server.open_connections() == 0, 10, message="sockets closed")


def test_stats_tell_whether_the_background_threads_run(zk, farm):
    server = farm.one()
    register(zk, server)
    pool = zk.closing(thriftpool.ThriftPool(echo_thrift.Echo, discovery(zk), name="alive"))
    s = pool.stats()
    assert s["watchdog_alive"] is True and s["discovery_alive"] is True
    pool.close()
    s = pool.stats()
    assert s["watchdog_alive"] is False and s["discovery_alive"] is False
