"""The core pool against real echo servers, checked from the server side.

Each server reports ``{"open", "accepted", "calls", "peak"}``: connections open now,
accepted in all, calls served and the most connections open at once.  A pool that leaks,
over-opens or hands out a stale socket shows up there, whatever its own counters say.
"""

from __future__ import annotations

import threading
import time
from typing import List

import pytest

import thriftpool
from servers import echo_thrift, wait_for

pytestmark = pytest.mark.usefixtures("no_thread_leak")


def run_threads(n, target, *args):
    threads = [threading.Thread(target=target, args=args + (i,), daemon=True)
               for i in range(n)]
    for t in threads:
        t.start()
    return threads


def join_all(threads, timeout=30.0):
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
        assert not t.is_alive(), f"{t.name} still running"


class Holder:
    """Holds ``n`` checkouts open in a background thread until released."""

    def __init__(self, pool, n=1, wait=True):
        self.pool = pool
        self.n = n
        self.ready = threading.Event()
        self.release = threading.Event()
        self.error: List[BaseException] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        if wait:
            assert self.ready.wait(10), f"holder could not check out: {self.error}"

    def _run(self):
        cms = []
        try:
            for _ in range(self.n):
                cm = self.pool.checkout()
                client = cm.__enter__()
                client.ping()
                cms.append(cm)
            self.ready.set()
            self.release.wait(30)
        except BaseException as exc:  # pragma: no cover - shown by the assertion above
            self.error.append(exc)
        finally:
            for cm in reversed(cms):
                cm.__exit__(None, None, None)

    def stop(self):
        self.release.set()
        self.thread.join(10)
        assert not self.thread.is_alive()


# -- sizes -----------------------------------------------------------------------------

@pytest.mark.timeout(20)
def test_initial_size_is_opened_in_the_background(farm, make_pool):
    server = farm.one()
    started = time.monotonic()
    pool = make_pool([server.address], min_size=1, initial_size=3, max_size=5)
    # The constructor does not connect: it returns before the connections exist (the
    # watchdog opens them), so it is fast even when there are many.
    assert time.monotonic() - started < 1.0
    wait_for(lambda: server.open_connections() == 3, 10, message="3 connections")
    wait_for(lambda: pool.stats()["idle"] == 3, 10, message="3 idle in the pool")
    s = pool.stats()
    assert (s["size"], s["in_use"], s["opening"], s["waiting"]) == (3, 0, 0, 0)
    # Using them opens nothing new.
    for i in range(20):
        assert pool.client().echo(str(i)) == str(i)
    # (the server counts a call just after replying: wait for the count to settle)
    wait_for(lambda: server.stats()["calls"] == 20, 5, message="20 calls")
    stats = server.stats()
    assert stats["accepted"] == 3 and stats["open"] == 3


@pytest.mark.timeout(20)
def test_initial_size_zero_connects_lazily(farm, make_pool):
    server = farm.one()
    pool = make_pool([server.address], min_size=0, initial_size=0, watchdog_interval=0.02)
    time.sleep(0.2)  # ten watchdog passes: none may open anything
    assert server.stats()["accepted"] == 0
    assert pool.stats()["size"] == 0
    assert pool.client().echo("x") == "x"
    assert server.stats()["accepted"] == 1


@pytest.mark.timeout(20)
def test_checkout_opens_a_connection_while_below_max_size(farm, make_pool):
    server = farm.one()
    pool = make_pool([server.address], min_size=0, max_size=3)
    with pool.checkout() as a:
        assert a.echo("a") == "a"
        assert server.stats()["accepted"] == 1
        with pool.checkout() as b:
            assert b.echo("b") == "b"
            assert server.stats()["accepted"] == 2
            with pool.checkout() as c:
                assert c.echo("c") == "c"
                stats = server.stats()
                assert (stats["open"], stats["accepted"], stats["peak"]) == (3, 3, 3)
                s = pool.stats()
                assert (s["size"], s["in_use"], s["idle"]) == (3, 3, 0)
    s = pool.stats()
    assert (s["size"], s["in_use"], s["idle"]) == (3, 0, 3)
    # An idle connection is reused rather than a new one opened.
    with pool.checkout() as d:
        assert d.echo("d") == "d"
    assert server.stats()["accepted"] == 3


@pytest.mark.timeout(40)
def test_max_size_is_never_exceeded_under_32_threads(farm, make_pool):
    server = farm.one()
    max_size = 4
    pool = make_pool([server.address], min_size=0, max_size=max_size, checkout_timeout=20)
    errors: List[BaseException] = []
    sizes: List[int] = []
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            inst = pool.stats()["instances"][server.address]
            sizes.append(inst["size"])
            time.sleep(0.001)

    def work(i):
        try:
            for j in range(25):
                with pool.checkout() as client:
                    if j % 5 == 0:
                        assert client.sleep(2) == 2
                    assert client.echo(f"{i}-{j}") == f"{i}-{j}"
        except BaseException as exc:
            errors.append(exc)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    join_all(run_threads(32, work))
    stop.set()
    sampler.join(5)
    assert not errors, errors[:3]
    assert max(sizes) <= max_size
    wait_for(lambda: server.stats()["calls"] == 32 * 30, 5, message="every call counted")
    stats = server.stats()
    assert stats["peak"] <= max_size
    assert stats["accepted"] <= max_size  # nothing failed, so nothing was replaced
    s = pool.stats()
    assert s["in_use"] == 0 and s["waiting"] == 0 and s["opening"] == 0
    assert s["size"] == stats["open"] <= max_size


@pytest.mark.timeout(20)
def test_idle_connections_are_reused_most_recently_used_first(farm, make_pool):
    """LIFO reuse: under light sequential traffic one connection does all the work, so
    the surplus goes idle and is reaped even while calls keep coming (a FIFO pool would
    rotate through all four and reap none)."""
    server = farm.one()
    pool = make_pool([server.address], min_size=0, max_size=4, idle_timeout=0.3,
                     watchdog_interval=0.05)
    holder = Holder(pool, 4)
    holder.stop()
    assert server.open_connections() == 4
    deadline = time.monotonic() + 10
    while server.open_connections() > 1:
        assert time.monotonic() < deadline, "surplus connections were never reaped"
        assert pool.client().echo("x") == "x"
        time.sleep(0.02)
    assert server.stats()["accepted"] == 4


# -- exhaustion and fairness -------------------------------------------------------------

@pytest.mark.timeout(20)
def test_pool_exhausted_after_about_checkout_timeout(farm, make_pool):
    server = farm.one()
    events: List[thriftpool.ExhaustedEvent] = []
    pool = make_pool([server.address], name="exh", min_size=0, max_size=2,
                     checkout_timeout=0.3, on_exhausted=events.append)
    holder = Holder(pool, 2)
    try:
        started = time.monotonic()
        with pytest.raises(thriftpool.PoolExhausted) as info:
            with pool.checkout():
                pytest.fail("a third connection was handed out")
        elapsed = time.monotonic() - started
        assert 0.25 <= elapsed < 2.0
        assert isinstance(info.value, thriftpool.ThriftPoolError)
        assert info.value.address == server.address
        assert info.value.timeout == 0.3
        assert "exh" in str(info.value) and server.address in str(info.value)
        assert len(events) == 1
        event = events[0]
        assert event.pool == "exh"
        assert event.address == server.address
        assert event.max_size == 2
        assert event.in_use == 2
        assert event.idle == 0 and event.opening == 0 and event.waiting == 0
        assert event.timeout == 0.3
        assert server.stats()["accepted"] == 2  # no third connection was even tried
    finally:
        holder.stop()
    assert pool.client().echo("after") == "after"


@pytest.mark.timeout(20)
def test_exhausted_event_counts_other_waiters(farm, make_pool):
    server = farm.one()
    events: List[thriftpool.ExhaustedEvent] = []
    pool = make_pool([server.address], min_size=0, max_size=1, checkout_timeout=5,
                     on_exhausted=events.append)
    holder = Holder(pool, 1)
    results: List[str] = []

    def patient(i):
        with pool.checkout(timeout=10) as client:
            results.append(client.echo("patient"))

    threads = run_threads(1, patient)
    wait_for(lambda: pool.stats()["waiting"] == 1, 5, message="one waiter")
    with pytest.raises(thriftpool.PoolExhausted):
        pool.checkout(timeout=0.1).__enter__()
    assert len(events) == 1
    assert events[0].waiting == 1 and events[0].in_use == 1
    holder.stop()
    join_all(threads)
    assert results == ["patient"]


@pytest.mark.timeout(20)
def test_checkout_timeout_argument_overrides_the_option(farm, make_pool):
    server = farm.one()
    events: List[thriftpool.ExhaustedEvent] = []
    pool = make_pool([server.address], min_size=0, max_size=1, checkout_timeout=10,
                     on_exhausted=events.append)
    holder = Holder(pool, 1)
    try:
        started = time.monotonic()
        with pytest.raises(thriftpool.PoolExhausted) as info:
            pool.checkout(timeout=0.2).__enter__()
        assert 0.15 <= time.monotonic() - started < 2.0
        # The error and the event report the wait this caller actually had.
        assert info.value.timeout == 0.2
        assert events[0].timeout == 0.2
        # timeout=0: fail at once
        started = time.monotonic()
        with pytest.raises(thriftpool.PoolExhausted):
            pool.checkout(timeout=0).__enter__()
        assert time.monotonic() - started < 0.5
    finally:
        holder.stop()


@pytest.mark.timeout(20)
def test_a_failing_on_exhausted_never_breaks_the_pool(farm, make_pool, caplog):
    server = farm.one()
    calls = []

    def broken(event):
        calls.append(event)
        raise RuntimeError("alerting is down")

    pool = make_pool([server.address], min_size=0, max_size=1, checkout_timeout=0.1,
                     on_exhausted=broken)
    holder = Holder(pool, 1)
    for _ in range(3):
        # The pool's own error, not the callback's
        with pytest.raises(thriftpool.PoolExhausted):
            with pool.checkout():
                pass
    assert len(calls) == 3
    assert "on_exhausted" in caplog.text and "alerting is down" in caplog.text
    holder.stop()
    s = pool.stats()
    assert (s["in_use"], s["waiting"], s["idle"]) == (0, 0, 1)
    assert pool.client().echo("fine") == "fine"
    assert server.stats()["accepted"] == 1


@pytest.mark.timeout(20)
def test_waiters_are_served_in_arrival_order(farm, make_pool):
    server = farm.one()
    pool = make_pool([server.address], min_size=0, max_size=1, checkout_timeout=10)
    holder = Holder(pool, 1)
    order: List[int] = []
    errors: List[BaseException] = []

    def waiter(i):
        try:
            with pool.checkout() as client:
                order.append(i)
                assert client.echo(str(i)) == str(i)
        except BaseException as exc:  # pragma: no cover
            errors.append(exc)

    threads = []
    for i in range(8):
        # Start each waiter only once the previous one is queued: arrival order is known.
        threads += run_threads(1, lambda _, i=i: waiter(i))
        wait_for(lambda i=i: pool.stats()["waiting"] == i + 1, 5, message=f"waiter {i} queued")
    holder.stop()
    join_all(threads)
    assert not errors
    assert order == list(range(8))
    assert server.stats()["accepted"] == 1


class GatedTransportFactory:
    """The buffered transport, whose ``open()`` (the TCP connect) first waits for a gate:
    a slow connect, with the test deciding when it completes."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.interrupt = None  # raised by the next open() once the gate opens

    def get_transport(self, tsocket):
        from thriftpy2.transport.buffered.cybuffered import TCyBufferedTransport

        factory = self

        class Transport(TCyBufferedTransport):
            def open(self):
                factory.entered.set()
                assert factory.gate.wait(10)
                interrupt, factory.interrupt = factory.interrupt, None
                if interrupt is not None:
                    raise interrupt
                return super().open()

        return Transport(tsocket)


@pytest.mark.timeout(20)
def test_waiters_queued_behind_a_slow_first_connect_may_open_their_own(farm, make_pool):
    """Checkouts that queue while the very first connect is in flight must not stay
    queued once it succeeded: there is room for their own connections, so they get
    them rather than PoolExhausted while the first caller holds its connection."""
    server = farm.one()
    factory = GatedTransportFactory()
    factory.gate.clear()
    pool = make_pool([server.address], min_size=0, max_size=4, checkout_timeout=3,
                     transport=factory)
    first = Holder(pool, 1, wait=False)  # its checkout blocks in the connect
    assert factory.entered.wait(5)
    done: List[float] = []
    errors: List[BaseException] = []

    def follower(i):
        try:
            with pool.checkout() as client:
                client.echo(str(i))
                done.append(time.monotonic())
        except BaseException as exc:
            errors.append(exc)

    threads = run_threads(2, follower)
    # Whether they queue or open their own connections behind the gate, nothing is
    # served before the gate opens.
    time.sleep(0.1)
    assert not done and not errors
    released = time.monotonic()
    factory.gate.set()
    assert first.ready.wait(5)
    join_all(threads, 10)
    assert not errors, errors
    assert all(t - released < 1.5 for t in done)  # not after checkout_timeout
    assert server.stats()["accepted"] == 3
    first.stop()


class Interrupted(BaseException):
    """Stands for gevent.Timeout or KeyboardInterrupt."""


@pytest.mark.timeout(20)
def test_an_interrupted_first_connect_does_not_strand_queued_checkouts(farm, make_pool):
    server = farm.one()
    factory = GatedTransportFactory()
    factory.gate.clear()
    factory.interrupt = Interrupted()
    pool = make_pool([server.address], min_size=0, max_size=2, checkout_timeout=3,
                     transport=factory)
    outcome: List[BaseException] = []

    def first(i):
        try:
            with pool.checkout():
                pass
        except BaseException as exc:
            outcome.append(exc)

    threads = run_threads(1, first)
    assert factory.entered.wait(5)
    got: List[str] = []
    threads += run_threads(1, lambda i: got.append(pool.client().echo("queued")))
    wait_for(lambda: pool.stats()["waiting"] == 1, 5, message="a queued checkout")
    started = time.monotonic()
    factory.gate.set()
    join_all(threads, 10)
    assert len(outcome) == 1 and isinstance(outcome[0], Interrupted)
    assert got == ["queued"]
    assert time.monotonic() - started < 1.5  # not after checkout_timeout
    inst = pool.stats()["instances"][server.address]
    assert inst["healthy"] is True  # an interrupt is not the server's fault
    assert (inst["in_use"], inst["opening"], pool.stats()["waiting"]) == (0, 0, 0)


@pytest.mark.timeout(20)
def test_a_discarded_connection_frees_its_slot_for_a_waiter(farm, make_pool):
    """When the holder's call times out, its socket is closed and the waiter opens a new
    one instead of waiting for the full checkout_timeout."""
    server = farm.one()
    pool = make_pool([server.address], min_size=0, max_size=1, checkout_timeout=5,
                     socket_timeout=0.3)
    got = []

    def waiter(i):
        started = time.monotonic()
        with pool.checkout() as client:
            got.append((client.echo("w"), time.monotonic() - started))

    with pytest.raises(OSError):
        with pool.checkout() as client:
            threads = run_threads(1, waiter)
            wait_for(lambda: pool.stats()["waiting"] == 1, 5, message="waiter queued")
            client.sleep(2000)
    join_all(threads)
    assert got and got[0][0] == "w" and got[0][1] < 3
    assert server.stats()["accepted"] == 2


# -- round robin and instances -------------------------------------------------------------

@pytest.mark.timeout(20)
def test_round_robin_across_three_instances(farm, make_pool):
    servers = farm.start(3)
    pool = make_pool([s.address for s in servers], min_size=0, balancer="round_robin")
    proxy = pool.client()
    answers = [proxy.whoami() for _ in range(30)]
    assert {a: answers.count(a) for a in set(answers)} == {s.address: 10 for s in servers}
    for s in servers:
        wait_for(lambda s=s: s.stats()["calls"] == 10, 5, message="10 calls each")
        assert s.stats()["accepted"] == 1
    assert set(pool.stats()["instances"]) == {s.address for s in servers}


@pytest.mark.timeout(20)
def test_busy_instance_is_skipped_for_one_with_a_free_connection(farm, make_pool):
    a, b = farm.start(2)
    pool = make_pool([a.address, b.address], min_size=0, max_size=1, checkout_timeout=0.5)
    with pool.checkout() as first:
        held = first.whoami()
        # Every checkout goes to the other instance instead of waiting on the busy one.
        other = {a.address, b.address} - {held}
        for _ in range(4):
            with pool.checkout() as client:
                assert {client.whoami()} == other


# -- the client and the proxy ----------------------------------------------------------------

@pytest.mark.timeout(20)
def test_pooled_client_calls_every_kind_of_method(farm, make_pool):
    server = farm.one()
    pool = make_pool([server.address], min_size=0)
    with pool.checkout() as client:
        assert client.echo("hello") == "hello"
        assert client.echo(message="kw") == "kw"
        assert client.ping() is None
        assert client.sleep(1) == 1
        assert client.whoami() == server.address
        with pytest.raises(echo_thrift.EchoError) as info:
            client.fail("boom")
        assert info.value.message == "boom"
        assert "echo" in dir(client)
        assert server.address in repr(client)
        client.close()  # a no-op: the pool owns the socket
        assert client.echo("still") == "still"
        with pytest.raises(AttributeError):
            client.nonexistent  # noqa: B018
    assert "released" in repr(client)
    assert server.stats()["accepted"] == 1


@pytest.mark.timeout(20)
def test_proxy_has_the_service_methods_and_checks_out_per_call(farm, make_pool):
    server = farm.one()
    pool = make_pool([server.address], min_size=0, max_size=2)
    proxy = pool.client()
    assert isinstance(proxy, thriftpool.ClientProxy)
    assert set(dir(proxy)) == set(echo_thrift.Echo.thrift_services)
    assert proxy.echo("a") == "a"
    assert proxy.echo(message="b") == "b"
    assert proxy.ping() is None
    assert proxy.sleep(3) == 3
    assert proxy.whoami() == server.address
    with pytest.raises(echo_thrift.EchoError):
        proxy.fail("x")
    with pytest.raises(AttributeError):
        proxy.checkout  # noqa: B018  (the pool's methods are not on the proxy)
    assert "ThriftPool" in repr(proxy)
    s = pool.stats()
    assert s["in_use"] == 0 and s["idle"] == 1
    assert server.stats()["accepted"] == 1  # one connection served every call

    # Thread-safe: one proxy shared by many threads.
    errors = []

    def work(i):
        try:
            for j in range(20):
                assert proxy.echo(f"{i}/{j}") == f"{i}/{j}"
        except BaseException as exc:  # pragma: no cover
            errors.append(exc)

    join_all(run_threads(8, work))
    assert not errors
    assert server.stats()["peak"] <= 2


@pytest.mark.timeout(20)
def test_checkout_context_manager_is_single_use(farm, make_pool):
    server = farm.one()
    pool = make_pool([server.address], min_size=0)
    cm = pool.checkout()
    assert isinstance(cm, thriftpool.Checkout)
    with cm as client:
        client.ping()
    with pytest.raises(RuntimeError):
        with cm:
            pass
    assert pool.stats()["in_use"] == 0


# -- inspection -------------------------------------------------------------------------------

@pytest.mark.timeout(20)
def test_stats_shape_and_repr(farm, make_pool):
    a, b = farm.start(2)
    pool = make_pool([a.address, b.address], name="shape", min_size=1, max_size=3)
    wait_for(lambda: pool.stats()["idle"] == 2, 10, message="min_size per instance")
    s = pool.stats()
    assert {"size", "idle", "in_use", "waiting", "instances"} <= set(s)
    assert s["name"] == "shape" and s["closed"] is False
    assert set(s["instances"]) == {a.address, b.address}
    for inst in s["instances"].values():
        assert {"size", "idle", "in_use", "healthy"} <= set(inst)
        assert inst["healthy"] is True and inst["size"] == 1
    with pool.checkout():
        s = pool.stats()
        assert s["in_use"] == 1 and s["idle"] == 1 and s["size"] == 2
        assert s["size"] == sum(i["size"] for i in s["instances"].values())
        assert "in_use=1" in repr(pool)
    text = repr(pool)
    assert text.startswith("<ThriftPool 'shape'") and "2 instances" in text
    assert "idle=2" in text
    pool.close()
    assert "closed" in repr(pool)
    assert pool.stats()["closed"] is True


# -- transports and protocols -----------------------------------------------------------------

@pytest.mark.timeout(20)
@pytest.mark.parametrize("transport,protocol", [
    ("buffered", "binary"), ("framed", "binary"), ("buffered", "compact"),
    ("framed", "compact"),
])
def test_transport_and_protocol_match_the_server(farm, make_pool, transport, protocol):
    server = farm.one(transport=transport, protocol=protocol)
    pool = make_pool([server.address], min_size=1, transport=transport, protocol=protocol)
    wait_for(lambda: server.open_connections() == 1, 10, message="min_size connection")
    proxy = pool.client()
    payload = "é" * 1000
    for _ in range(5):
        assert proxy.echo(payload) == payload
    with pytest.raises(echo_thrift.EchoError):
        proxy.fail("nope")
    assert proxy.sleep(1) == 1
    wait_for(lambda: server.stats()["calls"] == 7, 5, message="7 calls")
    assert server.stats()["accepted"] == 1


# -- close -----------------------------------------------------------------------------------

@pytest.mark.timeout(20)
def test_close_closes_every_socket_and_stops_the_watchdog(farm):
    servers = farm.start(2)
    pool = thriftpool.ThriftPool(echo_thrift.Echo, [s.address for s in servers], name="cl",
                                 min_size=2, max_size=4)
    watchdog = [t for t in threading.enumerate() if t.name == "thriftpool-cl-watchdog"]
    assert len(watchdog) == 1 and watchdog[0].daemon
    for s in servers:
        wait_for(lambda s=s: s.open_connections() == 2, 10, message="min_size connections")
    with pool.checkout() as client:
        client.ping()
    pool.close()
    assert not watchdog[0].is_alive()
    for s in servers:
        wait_for(lambda s=s: s.open_connections() == 0, 5, message="server sees all closed")
    assert pool.closed
    s = pool.stats()
    assert s["size"] == 0 and s["instances"] == {}
    pool.close()  # idempotent
    pool.close()
    with pytest.raises(thriftpool.PoolClosed):
        with pool.checkout():
            pass
    with pytest.raises(thriftpool.PoolClosed):
        pool.client().echo("x")
    assert sum(s.stats()["accepted"] for s in servers) == 4


@pytest.mark.timeout(20)
def test_close_fails_blocked_waiters_with_pool_closed(farm):
    server = farm.one()
    pool = thriftpool.ThriftPool(echo_thrift.Echo, [server.address], min_size=0, max_size=1,
                                 checkout_timeout=10)
    holder = Holder(pool, 1)
    outcomes: List[BaseException] = []

    def waiter(i):
        try:
            with pool.checkout():
                pass
        except BaseException as exc:
            outcomes.append(exc)

    threads = run_threads(3, waiter)
    wait_for(lambda: pool.stats()["waiting"] == 3, 5, message="3 waiters")
    started = time.monotonic()
    pool.close()
    join_all(threads, 5)
    assert time.monotonic() - started < 3  # not after checkout_timeout
    assert len(outcomes) == 3
    assert all(isinstance(e, thriftpool.PoolClosed) for e in outcomes), outcomes
    # The connection still checked out is closed when it comes back, not reused.
    assert server.open_connections() == 1
    holder.stop()
    wait_for(lambda: server.open_connections() == 0, 5, message="checked-in socket closed")


@pytest.mark.timeout(20)
def test_pool_is_a_context_manager(farm):
    server = farm.one()
    with thriftpool.ThriftPool(echo_thrift.Echo, [server.address], min_size=1) as pool:
        assert isinstance(pool, thriftpool.ThriftPool)
        assert pool.client().echo("x") == "x"
    assert pool.closed
    wait_for(lambda: server.open_connections() == 0, 5, message="sockets closed")
    # It closes on an exception too, and lets the exception through.
    with pytest.raises(ZeroDivisionError):
        with thriftpool.ThriftPool(echo_thrift.Echo, [server.address]) as pool:
            raise ZeroDivisionError
    assert pool.closed


@pytest.mark.timeout(20)
def test_an_abandoned_pool_is_collected_and_its_sockets_closed(farm):
    import gc

    server = farm.one()
    pool = thriftpool.ThriftPool(echo_thrift.Echo, [server.address], name="gone",
                                 min_size=2, watchdog_interval=0.02)
    wait_for(lambda: server.open_connections() == 2, 10, message="min_size connections")
    with pytest.warns(ResourceWarning, match="unclosed ThriftPool 'gone'"):
        del pool
        gc.collect()
    wait_for(lambda: not any(t.name == "thriftpool-gone-watchdog"
                             for t in threading.enumerate()), 5, message="watchdog gone")
    wait_for(lambda: server.open_connections() == 0, 5, message="sockets closed")
