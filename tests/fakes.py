"""A socket-free pool: fake connections, a fake connect and a fake clock.

Drives the real :class:`~thriftpool.state.PoolState`, router and maintenance code with
connections that only count what is done to them, so that every interleaving and every
interruption point can be enumerated deterministically, beside the real-server tests.
"""

from __future__ import annotations

import os
from typing import Callable, Dict, List, Optional

import thriftpool
from thriftpool import _compat
from thriftpool.checkout import Router
from thriftpool.state import PoolState
from thriftpy2.transport import TTransportException

from servers import echo_thrift


class Interrupted(BaseException):
    """Stands for gevent.Timeout or KeyboardInterrupt."""


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeConnection:
    """Counts what the pool does to it; ``dead`` makes the liveness check fail."""

    def __init__(self, address, clock: FakeClock, hooks: "Hooks") -> None:
        self.address = address
        self.hooks = hooks
        self.created_at = clock()
        self.idle_since = self.created_at
        self.last_beat = self.created_at
        self.expires_at = float("inf")
        self.uses = 0
        self.seqid = 0
        self.in_call = False
        self.sent = True
        self.detached = False
        self.tls = False
        # What Connection keeps for the pool (drain generation, checkout bookkeeping).
        self.gen = 0
        self.out_at = 0.0
        self.out_thread = ""
        self.out_stack = None
        self.leak_reported = False
        self.failed_calls = 0
        # A pipe stands for the socket: never readable, unless hang_up() writes to it, as
        # a peer's EOF makes a socket readable.
        self._r, self._w = os.pipe()
        self.fileno = self._r
        self.dead = False
        self.closes = 0
        self.protocol = None  # no call is ever made on it
        self.idle_poll = None  # the checkout calls peer_closed() (and its hook)

    def peer_closed(self) -> bool:
        self.hooks.fire("peer_closed")
        return self.dead

    def is_expired(self, now: float) -> bool:
        return now >= self.expires_at

    def hang_up(self) -> None:
        self.dead = True
        os.write(self._w, b"x")

    def close(self) -> None:
        self.closes += 1
        if self.closes == 1:
            os.close(self._r)
            os.close(self._w)
            self.fileno = -1

    def detach(self) -> None:
        self.detached = True

    def set_call_timeout(self, seconds) -> None:
        pass


class Hooks:
    """Named points where a test can make the pool's code raise (or do something)."""

    def __init__(self) -> None:
        self.actions: Dict[str, Callable[[], None]] = {}
        self.seen: List[str] = []

    def fire(self, name: str) -> None:
        self.seen.append(name)
        action = self.actions.pop(name, None)
        if action is not None:
            action()

    def raise_at(self, name: str, exc: Optional[BaseException] = None) -> None:
        def boom() -> None:
            raise exc if exc is not None else Interrupted(name)

        self.actions[name] = boom


class HookListener(thriftpool.PoolListener):
    """A listener whose every method fires a hook of the same name."""

    def __init__(self, hooks: Hooks) -> None:
        self.hooks = hooks

    def connection_opened(self, pool, address):
        self.hooks.fire("connection_opened")

    def connection_closed(self, pool, address, reason):
        self.hooks.fire("connection_closed")

    def checkout(self, pool, address, waited):
        self.hooks.fire("checkout")

    def exhausted(self, pool, event):
        self.hooks.fire("exhausted")


class FakeWorld:
    """A ThriftPool over fake instances; the watchdog never runs on its own
    (``maintain()`` runs a pass), connects are instant unless told otherwise."""

    def __init__(self, monkeypatch, addresses=("127.0.0.1:1", "127.0.0.2:1"), **options) -> None:
        self.clock = FakeClock()
        monkeypatch.setattr(_compat, "monotonic", self.clock)
        self.hooks = Hooks()
        self.conns: List[FakeConnection] = []
        self.refuse: set = set()
        options.setdefault("watchdog_interval", 3600)
        options.setdefault("min_size", 0)
        options.setdefault("max_size", 2)
        options.setdefault("checkout_timeout", 1.0)
        options.setdefault("name", "fake")
        # Every connect of this pool, its watchdog's from the very first pass included,
        # goes to the fake: nothing ever reaches the network.
        import thriftpool.state
        monkeypatch.setattr(thriftpool.state, "_open_connection", self.connect)
        self.pool = thriftpool.ThriftPool(
            echo_thrift.Echo, list(addresses), listeners=[HookListener(self.hooks)],
            **options)
        # Deterministic: no watchdog thread; a test runs a pass with maintain().
        self.pool._watchdog.stop(timeout=5)
        self.state: PoolState = self.pool._state
        self.router: Router = self.pool._router
        self.state.connect = self.connect

    def connect(self, address, config, tls=False, timeout=None):
        self.hooks.fire("connect")
        if str(address) in self.refuse:
            raise TTransportException(TTransportException.NOT_OPEN, f"refused {address}")
        conn = FakeConnection(address, self.clock, self.hooks)
        self.conns.append(conn)
        return conn

    def maintain(self) -> None:
        self.pool._maintain()

    def counts(self):
        return self.state.counts()

    def check(self, held: int) -> None:
        """The invariants: the cap holds, in_use equals the checkouts held, nothing is
        opening, closing or waiting, every closed connection was closed exactly once."""
        state = self.state
        with state.lock:
            for inst in state.instances.values():
                assert inst.size() <= inst.max_size, inst
                assert min(inst.opening, inst.closing) >= 0, inst
                for conn in inst.idle:
                    assert conn.closes == 0, conn
        c = self.counts()
        assert c["in_use"] == held, c
        assert (c["opening"], c["closing"], c["busy"], c["waiting"]) == (0, 0, 0, 0), c
        assert all(conn.closes <= 1 for conn in self.conns)
        live = [conn for conn in self.conns if conn.closes == 0]
        assert len(live) == c["idle"] + c["in_use"], (len(live), c)

    def close(self) -> None:
        self.pool.close()
        assert all(conn.closes == 1 for conn in self.conns if not conn.detached), \
            [conn.closes for conn in self.conns]
