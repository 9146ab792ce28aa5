"""Failures: what is discarded and what is kept, stale replies, dead and returning servers.

Whether a connection was kept or discarded is checked from the server side: a kept
connection serves the next call (``accepted`` unchanged), a discarded one is closed (the
server's ``open`` count drops) and the next call arrives on a new one (``accepted`` + 1).
"""

from __future__ import annotations

import signal
import socket
import threading
import time
from typing import List

import pytest
from thriftpy2.protocol.binary import TBinaryProtocol
from thriftpy2.protocol.cybin import TCyBinaryProtocol
from thriftpy2.thrift import TMessageType
from thriftpy2.transport import TTransportException
from thriftpy2.transport.buffered import TBufferedTransport
from thriftpy2.transport.socket import TSocket

import thriftpool
from servers import echo_thrift, free_ports, wait_for

#: Every pool these tests build must end consistent (tests/consistency.py).
pytestmark = [pytest.mark.usefixtures("no_thread_leak"), pytest.mark.consistent]


def instance_stats(pool, server):
    return pool.stats()["instances"][server.address]


# -- timeouts ------------------------------------------------------------------------------

@pytest.mark.timeout(20)
def test_socket_timeout_discards_and_the_next_call_gets_its_own_reply(farm, make_pool):
    server = farm.one()
    pool = make_pool([server.address], min_size=0, max_size=1, socket_timeout=0.2)
    started = time.monotonic()
    with pytest.raises(socket.timeout):
        with pool.checkout() as client:
            client.sleep(600)
    assert 0.15 <= time.monotonic() - started < 2.0
    inst = instance_stats(pool, server)
    assert (inst["size"], inst["in_use"], inst["idle"], inst["closed"]) == (0, 0, 0, 1)
    # The server finishes the sleep, writes its late reply into the closed socket and
    # only then sees the connection gone: after that, the late reply exists.
    wait_for(lambda: server.open_connections() == 0, 5, message="late reply written")
    proxy = pool.client()
    assert proxy.echo("mine") == "mine"
    assert proxy.sleep(5) == 5
    assert server.stats()["accepted"] == 2


@pytest.mark.timeout(20)
def test_a_late_reply_is_never_read_as_the_next_answer_on_the_same_client(farm, make_pool):
    """Catching the timeout and calling again inside the same block reads the late reply
    first; the pooled client notices it answers another request instead of returning it."""
    server = farm.one()
    pool = make_pool([server.address], min_size=0, max_size=1, socket_timeout=0.2)
    with pool.checkout() as client:
        with pytest.raises(socket.timeout):
            client.sleep(300)
        time.sleep(0.3)  # the late reply arrives
        with pytest.raises(thriftpool.ReplyMismatch) as info:
            client.echo("next")
        assert "sleep" in str(info.value) and "echo" in str(info.value)
    assert instance_stats(pool, server)["size"] == 0
    assert pool.client().echo("fresh") == "fresh"
    assert server.stats()["accepted"] == 2


@pytest.mark.timeout(20)
def test_socket_timeout_none_waits_longer_than_connect_timeout(farm, make_pool):
    """socket_timeout=None means a call may take as long as it takes; the connect timeout
    must not stay on the socket after the connect."""
    server = farm.one()
    pool = make_pool([server.address], min_size=0, socket_timeout=None, connect_timeout=0.1)
    assert pool.client().sleep(400) == 400
    assert server.stats()["accepted"] == 1


@pytest.mark.timeout(20)
def test_socket_timeout_is_in_seconds(farm, make_pool):
    server = farm.one()
    pool = make_pool([server.address], min_size=0, socket_timeout=1.5)
    # 300 ms is well within 1.5 s (it would fail if 1.5 were taken as milliseconds)
    assert pool.client().sleep(300) == 300


# -- exceptions that keep the connection ---------------------------------------------------

@pytest.mark.timeout(20)
def test_idl_exception_keeps_the_connection(farm, make_pool):
    server = farm.one()
    pool = make_pool([server.address], min_size=0, max_size=1)
    with pool.checkout() as client:
        with pytest.raises(echo_thrift.EchoError) as info:
            client.fail("declared")
        assert info.value.message == "declared"
        assert client.echo("same socket") == "same socket"
    with pytest.raises(echo_thrift.EchoError):
        with pool.checkout() as client:
            client.fail("escapes the block")
    inst = instance_stats(pool, server)
    assert (inst["idle"], inst["in_use"], inst["closed"]) == (1, 0, 0)
    assert pool.client().echo("again") == "again"
    stats = server.stats()
    assert stats["accepted"] == 1 and stats["open"] == 1


@pytest.mark.timeout(20)
def test_user_exception_between_calls_keeps_the_connection(farm, make_pool):
    server = farm.one()
    pool = make_pool([server.address], min_size=0, max_size=1)
    with pytest.raises(ValueError):
        with pool.checkout() as client:
            assert client.echo("a") == "a"
            raise ValueError("the caller's own bug")
    inst = instance_stats(pool, server)
    assert (inst["idle"], inst["in_use"], inst["closed"]) == (1, 0, 0)
    assert pool.client().echo("b") == "b"
    assert server.stats()["accepted"] == 1


@pytest.mark.timeout(20)
@pytest.mark.parametrize("error", [
    OSError("the caller's disk is full"),
    socket.timeout("the caller's own socket timed out"),
    TTransportException(TTransportException.END_OF_FILE, "the caller's other client"),
    KeyboardInterrupt(),
], ids=["OSError", "socket.timeout", "TTransportException", "KeyboardInterrupt"])
def test_any_error_raised_between_calls_keeps_the_connection(farm, make_pool, error):
    """No call was in flight, so the stream is intact whatever the exception's type: the
    connection is kept and its instance is not blamed (failure_threshold is 3)."""
    server = farm.one()
    pool = make_pool([server.address], min_size=0, max_size=1)
    for i in range(4):
        with pytest.raises(type(error)):
            with pool.checkout() as client:
                assert client.echo(str(i)) == str(i)
                raise error
    inst = instance_stats(pool, server)
    assert inst["healthy"] is True
    assert (inst["idle"], inst["in_use"], inst["closed"]) == (1, 0, 0)
    assert pool.client().echo("still") == "still"
    assert server.stats()["accepted"] == 1


@pytest.mark.timeout(20)
def test_another_pools_failures_inside_a_checkout_do_not_count_against_it(farm, make_pool):
    """Nested checkouts from two pools: the inner pool's server times out; the error
    escapes both blocks, but only the inner connection is at fault."""
    good, slow = farm.start(2)
    outer = make_pool([good.address], name="outer", min_size=0, max_size=1)
    inner = make_pool([slow.address], name="inner", min_size=0, socket_timeout=0.1)
    for _ in range(4):
        with pytest.raises(socket.timeout):
            with outer.checkout() as a:
                assert a.echo("a") == "a"
                with inner.checkout() as b:
                    b.sleep(300)
    inst = instance_stats(outer, good)
    assert inst["healthy"] is True and inst["closed"] == 0
    assert outer.client().echo("fine") == "fine"
    assert good.stats()["accepted"] == 1
    assert instance_stats(inner, slow)["closed"] == 4


# -- exceptions that interrupt a call -------------------------------------------------------

class Interrupted(BaseException):
    """Stands for gevent.Timeout: a BaseException that cuts a call short."""


class InterruptingProtocolFactory:
    """A binary protocol that, once armed, raises after the request was sent and before
    the reply is read: the reply stays unread in the socket."""

    def __init__(self) -> None:
        self.armed = False

    def get_protocol(self, trans):
        factory = self

        class Protocol(TCyBinaryProtocol):  # what protocol="binary" uses
            def read_message_begin(self):
                if factory.armed:
                    factory.armed = False
                    raise Interrupted()
                return super().read_message_begin()

        return Protocol(trans)


@pytest.mark.timeout(20)
def test_base_exception_mid_call_discards_the_connection(farm, make_pool):
    server = farm.one()
    factory = InterruptingProtocolFactory()
    pool = make_pool([server.address], min_size=0, max_size=1, protocol=factory)
    assert pool.client().echo("warm") == "warm"
    factory.armed = True
    with pytest.raises(Interrupted):
        with pool.checkout() as client:
            client.echo("unread reply")
    inst = instance_stats(pool, server)
    assert (inst["size"], inst["closed"]) == (0, 1)
    wait_for(lambda: server.open_connections() == 0, 5, message="server sees it closed")
    # Had the socket been kept, this would read "unread reply".
    assert pool.client().echo("own reply") == "own reply"
    assert server.stats()["accepted"] == 2


@pytest.mark.timeout(20)
def test_base_exception_caught_inside_the_block_still_discards(farm, make_pool):
    server = farm.one()
    factory = InterruptingProtocolFactory()
    pool = make_pool([server.address], min_size=0, max_size=1, protocol=factory)
    with pool.checkout() as client:
        factory.armed = True
        try:
            client.echo("unread reply")
        except Interrupted:
            pass  # the block ends normally: the half-finished call must still count
    assert instance_stats(pool, server)["closed"] == 1
    assert pool.client().echo("own reply") == "own reply"
    assert server.stats()["accepted"] == 2


@pytest.mark.timeout(20)
def test_keyboard_interrupt_from_a_real_signal_mid_call_discards(farm, make_pool):
    """A real signal interrupts the blocking recv of a call; its handler raises
    KeyboardInterrupt (pytest runs tests in the main thread, where handlers run)."""
    server = farm.one()
    pool = make_pool([server.address], min_size=0, max_size=1, socket_timeout=5)

    armed = [True]  # a late signal must not interrupt anything but this call

    def handler(signum, frame):
        if armed[0]:
            raise KeyboardInterrupt

    old = signal.signal(signal.SIGUSR1, handler)
    timer = threading.Timer(0.2, signal.pthread_kill,
                            (threading.main_thread().ident, signal.SIGUSR1))
    try:
        started = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            with pool.checkout() as client:
                timer.start()
                client.sleep(1200)
        assert time.monotonic() - started < 1.1  # interrupted, not finished
    finally:
        armed[0] = False
        timer.cancel()
        timer.join()
        signal.signal(signal.SIGUSR1, old)
    inst = instance_stats(pool, server)
    assert (inst["size"], inst["in_use"], inst["closed"]) == (0, 0, 1)
    assert pool.client().echo("after") == "after"
    assert server.stats()["accepted"] == 2
    # Once the server's sleep ends it finds the interrupted connection closed.
    wait_for(lambda: server.open_connections() == 1, 5, message="old connection closed")


@pytest.mark.timeout(20)
def test_discards_that_are_not_failures_do_not_reset_the_failure_streak(farm, make_pool):
    """failure_threshold counts calls that failed in a row; an interrupted call or a dead
    idle socket found at checkout is no successful call and must not clear the count."""
    server = farm.one()
    factory = InterruptingProtocolFactory()
    # Three idle sockets from the start, and no watchdog pass after that one.
    pool = make_pool([server.address], min_size=3, max_size=3, failure_threshold=2,
                     socket_timeout=0.1, protocol=factory, backoff_initial=5,
                     watchdog_interval=30)
    wait_for(lambda: pool.stats()["idle"] == 3, 10, message="3 idle sockets")
    with pytest.raises(socket.timeout):
        pool.client().sleep(300)  # failure 1
    factory.armed = True
    with pytest.raises(Interrupted):
        pool.client().echo("interrupted")  # discarded: neither success nor failure
    assert pool.stats()["idle"] == 1
    server.drop()  # the last idle socket dies
    wait_for(lambda: server.open_connections() == 0, 5, message="server dropped it")
    with pytest.raises(socket.timeout):
        pool.client().sleep(300)  # finds the dead idle socket first; then failure 2
    assert instance_stats(pool, server)["healthy"] is False


@pytest.mark.timeout(20)
def test_max_size_holds_when_a_panic_probe_races_an_ejection(farm, make_pool):
    """The leak test found an instance above max_size: a checkout that probes an ejected
    instance (panic mode) while the call that ejected it has not returned its socket yet,
    and an idle one is left.  An ``instance_ejected`` listener runs in exactly that
    moment, so another caller checks out from there."""
    server = farm.one()
    seen: List[dict] = []

    class OtherCaller:
        pool = None

        def instance_ejected(self, pool_name, address, reason, retry_in):
            result: dict = {}

            def other():
                try:
                    with self.pool.checkout(timeout=0.5) as client:
                        result["size"] = self.pool.stats()["size"]
                        client.ping()
                except thriftpool.ThriftPoolError as exc:
                    result["error"] = exc

            t = threading.Thread(target=other)
            t.start()
            t.join(5)
            seen.append(result)

    caller = OtherCaller()
    pool = make_pool([server.address], min_size=0, max_size=2, failure_threshold=1,
                     socket_timeout=0.1, backoff_initial=5, listeners=[caller])
    caller.pool = pool
    with pool.checkout() as a, pool.checkout() as b:
        a.ping()
        b.ping()
    assert pool.stats()["idle"] == 2
    with pytest.raises(socket.timeout):
        pool.client().sleep(300)  # ejects the only instance; one socket stays idle
    assert len(seen) == 1
    assert seen[0].get("size", 0) <= 2, seen
    assert server.stats()["peak"] <= 2


# -- released clients ----------------------------------------------------------------------

@pytest.mark.timeout(20)
def test_client_used_after_its_block_raises_client_released(farm, make_pool):
    server = farm.one()
    pool = make_pool([server.address], min_size=0, max_size=1)
    with pool.checkout() as stale:
        assert stale.echo("a") == "a"
    with pytest.raises(thriftpool.ClientReleased):
        stale.echo("b")
    with pytest.raises(thriftpool.ClientReleased):
        stale.ping()
    assert issubclass(thriftpool.ClientReleased, thriftpool.ThriftPoolError)
    # The socket now belongs to another caller; the stale client must not touch it.
    with pool.checkout() as owner:
        with pytest.raises(thriftpool.ClientReleased):
            stale.echo("intrusion")
        assert owner.echo("c") == "c"
        assert owner.sleep(1) == 1
    wait_for(lambda: server.stats()["calls"] == 3, 5, message="3 calls")
    stats = server.stats()
    assert stats["accepted"] == 1 and stats["calls"] == 3


# -- stale replies ---------------------------------------------------------------------------

class MisbehavingServer:
    """A raw Thrift server (binary protocol, buffered) that answers every call correctly
    except for the reply's sequence id (``seqid_offset``) or method name (``reply_name``)."""

    def __init__(self, seqid_offset: int = 0, reply_name=None) -> None:
        self.seqid_offset = seqid_offset
        self.reply_name = reply_name
        self.lock = threading.Lock()
        self.accepted = 0
        self.open = 0
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.address = "127.0.0.1:%d" % self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                self.accepted += 1
                self.open += 1
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock):
        trans = TBufferedTransport(TSocket(sock=sock))
        prot = TBinaryProtocol(trans)
        try:
            while True:
                name, _, seqid = prot.read_message_begin()
                args = getattr(echo_thrift.Echo, name + "_args")()
                args.read(prot)
                prot.read_message_end()
                result = getattr(echo_thrift.Echo, name + "_result")()
                if name == "echo":
                    result.success = args.message
                prot.write_message_begin(self.reply_name or name, TMessageType.REPLY,
                                         seqid + self.seqid_offset)
                result.write(prot)
                prot.write_message_end()
                trans.flush()
        except Exception:
            pass
        finally:
            with self.lock:
                self.open -= 1
            sock.close()

    def close(self):
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        except OSError:
            pass
        self.listener.close()
        self.thread.join(5)


@pytest.fixture
def misbehaving():
    servers: List[MisbehavingServer] = []

    def start(**kwargs):
        s = MisbehavingServer(**kwargs)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.close()


@pytest.mark.timeout(20)
@pytest.mark.parametrize("kwargs", [{"seqid_offset": 7}, {"seqid_offset": -1},
                                    {"reply_name": "whoami"}])
def test_reply_mismatch_raises_and_discards(misbehaving, make_pool, kwargs):
    server = misbehaving(**kwargs)
    pool = make_pool([server.address], min_size=0, max_size=1)
    for n in (1, 2):
        with pytest.raises(thriftpool.ReplyMismatch) as info:
            with pool.checkout() as client:
                client.echo("x")
        assert isinstance(info.value, thriftpool.ThriftPoolError)
        inst = pool.stats()["instances"][server.address]
        assert (inst["size"], inst["in_use"], inst["closed"]) == (0, 0, n)
        assert server.accepted == n  # each call had to open a new connection
    wait_for(lambda: server.open == 0, 5, message="server sees both closed")


@pytest.mark.timeout(20)
def test_a_well_behaved_raw_server_passes_the_reply_check(misbehaving, make_pool):
    """The check accepts the echoed sequence ids over many calls on one connection."""
    server = misbehaving()
    pool = make_pool([server.address], min_size=0, max_size=1)
    with pool.checkout() as client:
        for i in range(50):
            assert client.echo(str(i)) == str(i)
    assert pool.client().echo("y") == "y"
    assert server.accepted == 1


# -- dead connections and dead servers --------------------------------------------------------

@pytest.mark.timeout(20)
def test_server_dropped_connections_are_never_handed_out(farm, make_pool):
    server = farm.one()
    pool = make_pool([server.address], min_size=3, max_size=3, watchdog_interval=30)
    wait_for(lambda: server.open_connections() == 3, 10, message="min_size connections")
    assert server.drop() == 3
    wait_for(lambda: server.open_connections() == 0, 5, message="server closed them")
    # Every idle socket is dead: the checkout discards them all and opens a fresh one,
    # and the caller never sees an error.
    with pool.checkout() as client:
        assert client.echo("fresh") == "fresh"
    inst = instance_stats(pool, server)
    assert inst["closed"] == 3 and inst["healthy"] is True
    assert server.stats()["accepted"] == 4


@pytest.mark.timeout(20)
def test_connection_dropped_mid_call_raises_and_is_discarded(farm, make_pool):
    server = farm.one()
    pool = make_pool([server.address], min_size=0, max_size=1)
    with pytest.raises(TTransportException):
        with pool.checkout() as client:
            threading.Timer(0.2, server.drop).start()
            client.sleep(3000)
    assert instance_stats(pool, server)["size"] == 0
    assert pool.client().echo("next") == "next"
    assert server.stats()["accepted"] == 2


def call_or_none(proxy, *args):
    try:
        return proxy.whoami()
    except thriftpool.NoAvailableInstance:
        return None


@pytest.mark.timeout(30)
def test_killed_server_is_marked_unhealthy_and_comes_back_after_backoff(farm, make_pool):
    server = farm.one()
    pool = make_pool([server.address], min_size=1, initial_size=2, max_size=4,
                     backoff_initial=0.3, backoff_jitter=0, watchdog_interval=0.05)
    wait_for(lambda: server.open_connections() == 2, 10, message="initial connections")
    server.kill()
    started = time.monotonic()
    with pytest.raises(thriftpool.NoAvailableInstance) as info:
        pool.client().whoami()
    assert time.monotonic() - started < 2.0  # no wait on a dead instance
    assert server.address in str(info.value)
    inst = instance_stats(pool, server)
    assert inst["healthy"] is False
    assert inst["idle"] == 0 and inst["in_use"] == 0  # the two stale sockets are gone
    server.restart()  # same port
    assert server.address in pool.stats()["instances"]
    proxy = pool.client()
    # Any error other than NoAvailableInstance (a stale socket) fails the test here.
    wait_for(lambda: call_or_none(proxy), 10, interval=0.05, message="instance back")
    assert time.monotonic() - started >= 0.25  # not before the backoff
    assert instance_stats(pool, server)["healthy"] is True
    for _ in range(10):
        assert proxy.echo("ok") == "ok"
    wait_for(lambda: server.open_connections() >= 1, 5, message="server sees the pool")
    assert server.stats()["open"] <= 4


@pytest.mark.timeout(30)
def test_killed_instance_is_skipped_and_restored(farm, make_pool):
    a, b = farm.start(2)
    pool = make_pool([a.address, b.address], min_size=1, max_size=2, backoff_initial=0.2,
                     backoff_jitter=0, watchdog_interval=0.05)
    for s in (a, b):
        wait_for(lambda s=s: s.open_connections() == 1, 10, message="min_size each")
    b.kill()
    proxy = pool.client()
    # No caller sees the dead instance: its stale socket is discarded, the connect fails
    # and the checkout goes to the live one.
    answers = [proxy.whoami() for _ in range(20)]
    assert set(answers) == {a.address}
    assert instance_stats(pool, b)["healthy"] is False
    assert instance_stats(pool, a)["healthy"] is True
    b.restart()
    wait_for(lambda: b.address in {proxy.whoami() for _ in range(4)}, 10,
             interval=0.05, message="restarted instance serves again")
    assert instance_stats(pool, b)["healthy"] is True


@pytest.mark.timeout(20)
def test_no_available_instance_when_nothing_listens(make_pool):
    addresses = [f"127.0.0.1:{port}" for port in free_ports(3)]
    pool = make_pool(addresses, min_size=0, backoff_initial=5)
    started = time.monotonic()
    for _ in range(3):
        with pytest.raises(thriftpool.NoAvailableInstance) as info:
            with pool.checkout():
                pass
        assert isinstance(info.value, thriftpool.ThriftPoolError)
    assert time.monotonic() - started < 2.0
    s = pool.stats()
    assert all(not i["healthy"] for i in s["instances"].values())
    assert (s["size"], s["in_use"], s["opening"], s["waiting"]) == (0, 0, 0, 0)


@pytest.mark.timeout(20)
def test_no_available_instance_when_every_server_was_killed(farm, make_pool):
    servers = farm.start(3)
    pool = make_pool([s.address for s in servers], min_size=1, backoff_initial=5)
    for s in servers:
        wait_for(lambda s=s: s.open_connections() == 1, 10, message="min_size each")
    for s in servers:
        s.kill()
    with pytest.raises(thriftpool.NoAvailableInstance):
        pool.client().echo("anyone?")
    assert all(not i["healthy"] for i in pool.stats()["instances"].values())
    assert pool.stats()["size"] == 0


@pytest.mark.timeout(20)
def test_no_available_instance_with_an_empty_discovery(make_pool):
    pool = make_pool([], min_size=0)
    with pytest.raises(thriftpool.NoAvailableInstance):
        pool.client().echo("x")
