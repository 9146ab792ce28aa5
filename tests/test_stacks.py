"""The pool's core, failure and proxy guarantees, each run on both Thrift stacks.

Every test takes the ``stack`` fixture (tests/conftest.py): once with a thriftpy2
service against thriftpy2 echo servers (tests/echo_server.py), once with the module
Apache Thrift's ``thrift --gen py`` generated from the same IDL against Apache's own
``TThreadedServer`` (tests/apache_server.py).  As in test_failures.py, what the pool
kept or discarded is read from the server side: ``accepted`` counts connections.
"""

from __future__ import annotations

import signal
import socket
import threading
import time

import pytest

import thriftpool
from servers import free_port, wait_for
from stacks import Stack

pytestmark = pytest.mark.usefixtures("no_thread_leak")


@pytest.fixture
def pools():
    """``pools(stack, addresses, **options)`` builds pools; all closed at teardown."""
    made = []

    def make(stack: Stack, discovery, **options):
        options.setdefault("name", "test")
        pool = thriftpool.ThriftPool(stack.service, discovery, **options)
        made.append(pool)
        return pool

    yield make
    for pool in made:
        pool.close()


def timeouts(stack: Stack):
    """What a timed-out call raises on ``stack``."""
    return (stack.TTransportException, socket.timeout)


def instance(pool, server):
    return pool.stats()["instances"][server.address]


# -- core ----------------------------------------------------------------------------------

@pytest.mark.timeout(30)
def test_checkout_yields_the_stacks_own_client_and_every_kind_of_method_works(
        stack, farm, pools):
    (server,) = stack.start(farm)
    pool = pools(stack, [server.address], min_size=0, max_size=1)
    with pool.checkout() as client:
        if stack.name == "apache":
            assert isinstance(client, stack.module.Client)  # existing code keeps its types
        assert client.echo("hi") == "hi"
        assert client.ping() is None
        assert client.sleep(5) == 5
        assert client.whoami() == server.address
        with pytest.raises(stack.EchoError) as info:
            client.fail("declared")
        assert info.value.message == "declared"
        client.notify("one way")  # returns at once, no reply to read
        assert client.echo("after oneway") == "after oneway"
    wait_for(lambda: server.notices() == 1, 5, message="the one-way call to arrive")
    assert server.stats()["accepted"] == 1  # one connection served everything
    assert instance(pool, server)["idle"] == 1


@pytest.mark.timeout(30)
def test_idl_exception_through_checkout_arrives_as_the_idl_class(stack, farm, pools):
    """Apache's compiler 0.17+ makes IDL exceptions immutable; a contextmanager-based
    checkout (thrift_connector's) turns them into TypeError on Python 3.11+."""
    (server,) = stack.start(farm)
    pool = pools(stack, [server.address], min_size=0, max_size=1)
    with pytest.raises(stack.EchoError) as info:
        with pool.checkout() as client:
            client.fail("through the block")
    assert type(info.value) is stack.EchoError
    assert info.value.message == "through the block"
    assert pool.client().echo("kept") == "kept"
    assert server.stats()["accepted"] == 1  # an IDL exception keeps the connection


@pytest.mark.timeout(30)
def test_connections_are_reused_and_max_size_holds_under_threads(stack, farm, pools):
    (server,) = stack.start(farm)
    pool = pools(stack, [server.address], min_size=0, max_size=3, checkout_timeout=10)
    errors = []

    def work(i):
        try:
            for j in range(30):
                assert pool.client().echo(f"{i}-{j}") == f"{i}-{j}"
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert errors == []
    assert server.stats()["accepted"] <= 3
    assert pool.stats()["size"] <= 3


@pytest.mark.timeout(30)
def test_proxy_has_exactly_the_service_methods(stack, farm, pools):
    (server,) = stack.start(farm)
    pool = pools(stack, [server.address], min_size=0)
    proxy = pool.client()
    assert sorted(dir(proxy)) == sorted(["echo", "ping", "sleep", "whoami", "fail", "notify"])
    assert proxy.echo("via proxy") == "via proxy"
    with pytest.raises(stack.EchoError):
        proxy.fail("never retried")


@pytest.mark.timeout(30)
def test_client_used_after_its_block_raises_client_released(stack, farm, pools):
    (server,) = stack.start(farm)
    pool = pools(stack, [server.address], min_size=0, max_size=1)
    with pool.checkout() as stale:
        assert stale.echo("a") == "a"
    with pytest.raises(thriftpool.ClientReleased):
        stale.echo("b")
    with pool.checkout() as owner:
        with pytest.raises(thriftpool.ClientReleased):
            stale.ping()
        if stack.name == "apache":
            with pytest.raises(thriftpool.ClientReleased):
                stale.send_echo("the generated send_ half")
            with pytest.raises(thriftpool.ClientReleased):
                stale.recv_echo()
        assert owner.echo("c") == "c"
    wait_for(lambda: server.stats()["calls"] == 2, 5, message="exactly 2 calls")
    assert server.stats()["accepted"] == 1


# -- failures ------------------------------------------------------------------------------

@pytest.mark.timeout(30)
def test_stale_reply_after_a_timeout_is_never_an_answer(stack, farm, pools):
    """Apache's own Client sends seqid 0 and reads whatever comes next: after a timed-out
    sleep(300), the next sleep(1) returns 300.  Pooled, every call gets its own reply."""
    (server,) = stack.start(farm)
    pool = pools(stack, [server.address], min_size=0, max_size=1, socket_timeout=0.2)
    started = time.monotonic()
    with pytest.raises(timeouts(stack)):
        with pool.checkout() as client:
            client.sleep(300)
    assert 0.15 <= time.monotonic() - started < 2.0
    assert instance(pool, server)["closed"] == 1  # the timed-out socket was discarded
    time.sleep(0.3)  # the late reply has been written by now
    proxy = pool.client()
    assert proxy.sleep(1) == 1
    assert proxy.echo("mine") == "mine"
    assert server.stats()["accepted"] == 2


@pytest.mark.timeout(30)
def test_late_reply_on_the_same_client_raises_reply_mismatch(stack, farm, pools):
    (server,) = stack.start(farm)
    pool = pools(stack, [server.address], min_size=0, max_size=1, socket_timeout=0.2)
    with pool.checkout() as client:
        with pytest.raises(timeouts(stack)):
            client.sleep(300)
        time.sleep(0.3)  # the late reply arrives
        with pytest.raises(thriftpool.ReplyMismatch) as info:
            client.sleep(1)
        assert "sleep" in str(info.value)
    assert instance(pool, server)["size"] == 0
    assert pool.client().echo("fresh") == "fresh"


@pytest.mark.timeout(30)
def test_application_exception_keeps_the_connection(stack, farm, pools):
    (server,) = stack.start(farm)
    pool = pools(stack, [server.address], min_size=0, max_size=1)
    with pool.checkout() as client:
        # Calling with a missing required argument: thriftpy2 refuses before sending,
        # Apache's server answers it; either way a TApplicationException, not a drop.
        if stack.name == "apache":
            with pytest.raises(stack.TApplicationException) as info:
                client.fail("undeclared")  # the Apache test server raises RuntimeError
            assert info.value.type == stack.TApplicationException.INTERNAL_ERROR
        assert client.echo("still here") == "still here"
    assert server.stats()["accepted"] == 1


@pytest.mark.timeout(30)
def test_keyboard_interrupt_mid_call_discards(stack, farm, pools):
    (server,) = stack.start(farm)
    pool = pools(stack, [server.address], min_size=0, max_size=1, socket_timeout=5)
    armed = [True]

    def handler(signum, frame):
        if armed[0]:
            raise KeyboardInterrupt

    old = signal.signal(signal.SIGUSR1, handler)
    timer = threading.Timer(0.2, signal.pthread_kill,
                            (threading.main_thread().ident, signal.SIGUSR1))
    try:
        with pytest.raises(KeyboardInterrupt):
            with pool.checkout() as client:
                timer.start()
                client.sleep(800)
    finally:
        armed[0] = False
        timer.cancel()
        timer.join()
        signal.signal(signal.SIGUSR1, old)
    assert instance(pool, server)["closed"] == 1
    time.sleep(0.8)  # the interrupted call's reply is written into the closed socket
    assert pool.client().sleep(2) == 2  # a kept socket would have returned 800
    assert server.stats()["accepted"] == 2


@pytest.mark.timeout(30)
def test_server_dropped_connections_are_never_handed_out(stack, farm, pools):
    (server,) = stack.start(farm)
    pool = pools(stack, [server.address], min_size=2, max_size=2, watchdog_interval=60.0)
    wait_for(lambda: pool.stats()["idle"] == 2 and server.stats()["open"] == 2,
             message="two idle connections, seen by the server")
    assert server.drop() == 2
    time.sleep(0.1)
    proxy = pool.client()
    for _ in range(5):
        assert proxy.ping() is None  # not idempotent: a dead socket would fail it
    assert server.stats()["accepted"] == 3


@pytest.mark.timeout(30)
def test_connection_dropped_mid_call_raises_a_transport_error_and_is_discarded(
        stack, farm, pools):
    (server,) = stack.start(farm)
    pool = pools(stack, [server.address], min_size=0, max_size=1)
    threading.Timer(0.2, server.drop).start()
    with pytest.raises((stack.TTransportException, OSError)):
        with pool.checkout() as client:
            client.sleep(1000)
    assert instance(pool, server)["size"] == 0
    assert pool.client().echo("again") == "again"


@pytest.mark.timeout(30)
def test_nothing_listening_is_a_connect_failure_and_no_available_instance(stack, pools):
    dead = f"127.0.0.1:{free_port()}"
    pool = pools(stack, [dead], min_size=0, backoff_initial=5.0)
    with pytest.raises(thriftpool.NoAvailableInstance) as info:
        with pool.checkout():
            pass
    assert isinstance(info.value.__cause__, stack.TTransportException)
    assert info.value.__cause__.type == stack.TTransportException.NOT_OPEN
    assert not instance_by_key(pool, dead)["healthy"]


def instance_by_key(pool, key):
    return pool.stats()["instances"][key]


@pytest.mark.timeout(30)
def test_killed_instance_is_ejected_and_calls_go_to_the_other(stack, farm, pools):
    a, b = stack.start(farm, 2)
    pool = pools(stack, [a.address, b.address], min_size=1, balancer="round_robin")
    wait_for(lambda: pool.stats()["idle"] == 2, message="both connected")
    a.kill()
    proxy = pool.client()
    for _ in range(10):
        assert proxy.whoami() == b.address
    assert not instance(pool, a)["healthy"]


# -- proxy ---------------------------------------------------------------------------------

@pytest.mark.timeout(30)
def test_refused_connect_is_retried_on_another_instance(stack, farm, pools):
    (good,) = stack.start(farm)
    dead = f"127.0.0.1:{free_port()}"
    pool = pools(stack, [dead, good.address], balancer="round_robin", min_size=0)
    proxy = pool.client()
    assert [proxy.whoami() for _ in range(4)] == [good.address] * 4


@pytest.mark.timeout(30)
def test_failed_send_is_retried_and_a_sent_request_is_not(stack, farm, pools, fault_proxy):
    """The sent flag: a request that could not be flushed moves to another instance
    even when not idempotent; one that left whole and timed out does not."""
    a, b = stack.start(farm, 2)
    stuck = fault_proxy(a.address)
    pool = pools(stack, [stuck.address, b.address], balancer="round_robin", min_size=1,
                 socket_timeout=0.5)
    wait_for(lambda: pool.stats()["idle"] == 2, message="min_size connections")
    stuck.blackhole()  # reads nothing: a large request fills the buffers and blocks
    message = "x" * (8 << 20)
    assert pool.client().echo(message) == message
    wait_for(lambda: b.stats()["calls"] == 1, message="the call on the second server")
    assert a.stats()["calls"] == 0

    # A small request is flushed whole into the blackhole, then times out: it may have
    # run, so it is not retried (a retry would have answered it from b).
    pool2 = pools(stack, [stuck.address, b.address], balancer="round_robin", min_size=0,
                  socket_timeout=0.3)
    outcomes = []
    for _ in range(2):
        try:
            outcomes.append(pool2.client().echo("small"))
        except timeouts(stack):
            outcomes.append("timed out")
    assert sorted(outcomes) == ["small", "timed out"]
    wait_for(lambda: b.stats()["calls"] == 2, message="one more call on b")


@pytest.mark.timeout(30)
def test_idempotent_call_is_retried_after_a_timeout_and_others_are_not(stack, farm, pools):
    a, b = stack.start(farm, 2)
    pool = pools(stack, [a.address, b.address], balancer="round_robin", min_size=0,
                 socket_timeout=0.3, idempotent=["whoami"])
    proxy = pool.client()
    with pytest.raises(timeouts(stack)):
        proxy.sleep(600)  # sent and not idempotent: the timeout propagates
    assert proxy.whoami() in (a.address, b.address)


@pytest.mark.timeout(30)
def test_idl_exceptions_are_never_retried(stack, farm, pools):
    servers = stack.start(farm, 3)
    pool = pools(stack, [s.address for s in servers], idempotent=True, retries=5,
                 min_size=0)
    with pytest.raises(stack.EchoError):
        pool.client().fail("boom")
    time.sleep(0.1)
    assert sum(s.stats()["calls"] for s in servers) == 1


# -- options validated against the service ---------------------------------------------------

@pytest.mark.timeout(30)
def test_heartbeat_runs_on_idle_connections(stack, farm, pools):
    (server,) = stack.start(farm)
    pool = pools(stack, [server.address], min_size=1, heartbeat="ping",
                 heartbeat_interval=0.05, watchdog_interval=0.05)
    wait_for(lambda: server.stats()["calls"] >= 3, 10, message="heartbeats")
    assert server.stats()["accepted"] == 1
    assert pool.client().echo("alive") == "alive"


@pytest.mark.parametrize("options, field", [
    ({"heartbeat": "nope"}, "heartbeat"),
    ({"heartbeat": "echo"}, "no arguments"),
    ({"heartbeat": "notify"}, "oneway"),
    ({"idempotent": ["nope"]}, "idempotent"),
    ({"idempotent": "echo"}, "idempotent"),
])
def test_method_names_are_validated_against_the_service(stack, options, field):
    with pytest.raises(ValueError, match=field):
        thriftpool.ThriftPool(stack.service, ["127.0.0.1:1"], **options)


def test_the_other_stacks_factories_are_refused(stack):
    if stack.name == "apache":
        from thriftpy2.protocol import TBinaryProtocolFactory
        from thriftpy2.transport import TFramedTransportFactory
    else:
        pytest.importorskip("thrift")
        from thrift.protocol.TBinaryProtocol import TBinaryProtocolFactory
        from thrift.transport.TTransport import TFramedTransportFactory
    with pytest.raises(ValueError, match="protocol"):
        thriftpool.ThriftPool(stack.service, ["127.0.0.1:1"], protocol=TBinaryProtocolFactory())
    with pytest.raises(ValueError, match="transport"):
        thriftpool.ThriftPool(stack.service, ["127.0.0.1:1"],
                              transport=TFramedTransportFactory())


def test_a_trial_call_is_answered_without_running_any_method(stack, farm, pools):
    """The probe of an instance that refused calls: a method no service has, which every
    Thrift server answers with UNKNOWN_METHOD; the connection stays usable."""
    (server,) = stack.start(farm)
    pool = pools(stack, [server.address], min_size=0)
    with pool.checkout() as client:
        client._trial(1.0)
        assert client.echo("after") == "after"
    assert instance(pool, server)["closed"] == 0
