"""Shared fixtures: real echo servers in subprocesses, and leak checks."""

from __future__ import annotations

import os
import threading
from typing import Iterator

import pytest

from servers import ServerFarm, echo_thrift


@pytest.fixture
def farm() -> Iterator[ServerFarm]:
    """Starts echo servers on demand (``farm.start(3)``); kills them all at teardown."""
    f = ServerFarm()
    try:
        yield f
    finally:
        f.stop_all()


@pytest.fixture
def service():
    """The Echo service from ``idl/echo.thrift``."""
    return echo_thrift.Echo


@pytest.fixture
def no_thread_leak() -> Iterator[None]:
    """Fails the test if it leaves a thriftpool thread running."""
    yield
    leftover = [t.name for t in threading.enumerate()
                if t.name.startswith("thriftpool-") and t.is_alive()]
    assert not leftover, f"threads left running: {leftover}"


@pytest.fixture
def make_pool():
    """Builds ``ThriftPool``s (``make_pool(addresses, **options)``); closes them all at teardown."""
    import thriftpool

    pools = []

    def make(discovery, **options):
        options.setdefault("name", "test")
        p = thriftpool.ThriftPool(echo_thrift.Echo, discovery, **options)
        pools.append(p)
        return p

    try:
        yield make
    finally:
        for p in pools:
            p.close()

# Real ZooKeeper servers (tests/zkharness.py): fixtures, and the hook marking their tests.
from zkharness import pytest_zkharness_mark_items, zk, zk_ensemble  # noqa: E402,F401
from zkharness import zk_private, zk_server  # noqa: E402,F401


@pytest.fixture
def fault_proxy():
    """Starts :class:`faultproxy.FaultProxy` threads (``fault_proxy(server.address)``),
    in pass-through mode; stops and joins them all at teardown."""
    from faultproxy import FaultProxy

    proxies = []

    def make(target):
        p = FaultProxy(target)
        proxies.append(p)
        return p.start()

    try:
        yield make
    finally:
        for p in proxies:
            p.stop()


@pytest.fixture
def connect_log(monkeypatch):
    """A :class:`faultproxy.ConnectLog` recording this process's connects to the ports
    it watches (``connect_log.watch(port)``): the attempts no listener can see."""
    from faultproxy import ConnectLog

    return ConnectLog().install(monkeypatch)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """In CI (``CI`` set), a ZooKeeper, gevent or Apache Thrift test that skips fails
    instead: a missing dependency must never pass silently."""
    outcome = yield
    report = outcome.get_result()
    if (report.skipped and os.environ.get("CI")
            and any(m in item.keywords for m in ("zookeeper", "gevent", "apache"))):
        report.outcome = "failed"
        report.longrepr = f"{item.nodeid} skipped in CI; its dependency is missing"
