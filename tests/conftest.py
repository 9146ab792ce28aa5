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
def make_pool(request):
    """Builds ``ThriftPool``s (``make_pool(addresses, **options)``, the echo service of
    thriftpy2 unless ``service=`` names another); closes them all at teardown.

    In a test marked ``consistent`` (every chaos, leak and failure test), each pool still
    open at the end must pass :func:`consistency.assert_consistent` first.
    """
    import thriftpool
    from consistency import assert_consistent

    pools = []

    def make(discovery, service=None, **options):
        options.setdefault("name", "test")
        p = thriftpool.ThriftPool(service or echo_thrift.Echo, discovery, **options)
        pools.append(p)
        return p

    check = request.node.get_closest_marker("consistent") is not None
    try:
        yield make
        if check:
            for p in pools:
                if not p.closed:
                    assert_consistent(p)
    finally:
        for p in pools:
            p.close()

# Real ZooKeeper servers (tests/zkharness.py): fixtures, and the hook marking their tests.
from zkharness import pytest_zkharness_mark_items, zk, zk_ensemble  # noqa: E402,F401
from zkharness import zk_private, zk_server  # noqa: E402,F401

# A real DNS server (tests/dnsharness.py): the fixture, and the hook marking its tests.
from dnsharness import dns_server, pytest_dnsharness_mark_items  # noqa: E402,F401


@pytest.fixture
def world(monkeypatch):
    """Builds socket-free pools (tests/fakes.py ``FakeWorld``: fake connections, connect
    and clock, no watchdog thread): ``world(**options)``; closes them at teardown."""
    from fakes import FakeWorld

    worlds = []

    def make(**options):
        w = FakeWorld(monkeypatch, **options)
        worlds.append(w)
        return w

    try:
        yield make
    finally:
        for w in worlds:
            w.pool.close()


@pytest.fixture
def liar():
    """Starts in-process raw-socket servers whose replies lie (tests/liars.py):
    ``liar(transport="buffered", protocol="binary", **options)``; stopped at teardown."""
    from liars import LiarServer

    servers = []

    def make(transport: str = "buffered", protocol: str = "binary", **kwargs):
        s = LiarServer(transport, protocol, **kwargs)
        servers.append(s)
        return s

    try:
        yield make
    finally:
        for s in servers:
            s.stop()


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


#: Markers of tests whose dependency CI must have: their skips fail there.
CI_REQUIRED_MARKERS = ("zookeeper", "gevent", "dns", "apache", "promtool")


# -- the Apache Thrift stack (tests/stacks.py) ------------------------------------------

@pytest.fixture(scope="session")
def apache_gen(tmp_path_factory):
    """A directory holding ``thrift --gen py`` output for ``idl/echo.thrift`` (generated
    once per session), put on ``sys.path``; skips (fails in CI) without the compiler or
    the ``thrift`` package."""
    import sys

    from stacks import generate_apache

    pytest.importorskip("thrift", reason="Apache Thrift's 'thrift' package is missing")
    try:
        out = generate_apache(str(tmp_path_factory.mktemp("gen-py")))
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    sys.path.insert(0, out)
    return out


@pytest.fixture(params=["thriftpy2", "apache"])
def stack(request):
    """Each parametrised scenario runs once per stack (see tests/stacks.py)."""
    from stacks import Stack

    if request.param == "apache":
        return Stack("apache", request.getfixturevalue("apache_gen"))
    return Stack("thriftpy2")


@pytest.fixture
def apache(apache_gen):
    """The Apache stack alone."""
    from stacks import Stack

    return Stack("apache", apache_gen)


def pytest_collection_modifyitems(items):
    """Mark every test that runs the Apache stack ``apache``, from its fixtures."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        params = callspec.params if callspec is not None else {}
        if "apache_gen" in getattr(item, "fixturenames", ()) or params.get("stack") == "apache":
            item.add_marker(pytest.mark.apache)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """In CI (``CI`` set), a ZooKeeper, DNS, gevent or Apache Thrift test that skips fails
    instead: a missing dependency must never pass silently."""
    outcome = yield
    report = outcome.get_result()
    if (report.skipped and os.environ.get("CI")
            and any(marker in item.keywords for marker in CI_REQUIRED_MARKERS)):
        report.outcome = "failed"
        report.longrepr = f"{item.nodeid} skipped in CI; its dependency is missing"
