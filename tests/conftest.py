"""Shared fixtures: real echo servers in subprocesses, and leak checks."""

from __future__ import annotations

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
