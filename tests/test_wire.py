"""The wire: whole-call timeouts (per method too), heartbeats bounded the same way, the
socket wrapper for other Thrift libraries, and bounded name resolution over every
address."""

from __future__ import annotations

import os
import select
import socket
import struct
import threading
import time
import warnings

import pytest
from thriftpy2.transport import TTransportException

import thriftpool
from servers import echo_thrift, free_ports, wait_for
from thriftpool.address import Address, parse_address
from thriftpool.connection import (
    BoundedSocket,
    BoundedTSocket,
    Connection,
    WireBounds,
    client_class,
    is_connect_error,
    resolve,
)



def _echo_request(message: str, seqid: int = 1) -> bytes:
    """An unframed binary ``echo`` call, by hand."""
    name, raw = b"echo", message.encode()
    return (struct.pack("!ii", -2147418112 | 1, len(name)) + name + struct.pack("!i", seqid)
            + b"\x0b\x00\x01" + struct.pack("!i", len(raw)) + raw + b"\x00")


# -- whole-call timeouts ---------------------------------------------------------------------


def _timed_out(stack):
    """What a call that runs out of its own timeout raises on ``stack``."""
    return stack.TTransportException if stack.name == "apache" else socket.timeout


def _check_timed_out(stack, exc):
    assert not isinstance(exc, thriftpool.DeadlineExceeded)
    if stack.name == "apache":
        assert exc.type == stack.TTransportException.TIMED_OUT


@pytest.mark.timeout(30)
def test_a_reply_spread_over_many_reads_is_bounded_by_socket_timeout(liar, make_pool):
    server = liar(trickle_interval=0.05).lie("trickle")  # ~240 bytes: 12 s if unbounded
    pool = make_pool([server.address], min_size=0, socket_timeout=0.5)
    started = time.monotonic()
    with pytest.raises(socket.timeout):
        pool.client().echo("x" * 200)
    assert 0.45 < time.monotonic() - started < 0.9


@pytest.mark.timeout(30)
def test_a_one_read_reply_sets_no_timeout_on_the_socket(stack, farm, make_pool, monkeypatch):
    (server,) = stack.start(farm)
    pool = make_pool([server.address], service=stack.service, min_size=1, socket_timeout=5.0)
    pool.wait()
    proxy = pool.client()
    assert proxy.echo("warm") == "warm"
    arms = []
    real_arm = WireBounds._arm

    def counting_arm(self, seconds, rcv, snd):
        arms.append(seconds)
        return real_arm(self, seconds, rcv, snd)

    monkeypatch.setattr(WireBounds, "_arm", counting_arm)
    for i in range(200):
        assert proxy.echo(str(i)) == str(i)
    # No setsockopt()/settimeout() per call: the kernel timeout stays.  (A call whose read
    # starts more than 1 ms after its first byte, on a loaded machine, re-arms once and the
    # next call once back: a few, never one per call.)
    assert len(arms) <= 10, len(arms)


@pytest.mark.timeout(30)
def test_method_timeouts_override_socket_timeout(stack, liar, make_pool):
    server = liar(trickle_interval=0.05)  # the binary wire: the same for both stacks
    short = make_pool([server.address], service=stack.service, min_size=0,
                      socket_timeout=0.3, method_timeouts={"sleep": 3.0})
    assert short.client().sleep(700) == 700  # beyond socket_timeout: sleep has its own
    server.lie("trickle")
    started = time.monotonic()
    with pytest.raises(_timed_out(stack)) as info:
        short.client().echo("x" * 50)  # echo keeps socket_timeout
    _check_timed_out(stack, info.value)
    assert time.monotonic() - started < 0.8
    unbounded = make_pool([server.address], service=stack.service, min_size=0,
                          socket_timeout=0.3, method_timeouts={"sleep": None})
    assert unbounded.client().sleep(700) == 700
    tight = make_pool([server.address], service=stack.service, min_size=0,
                      socket_timeout=5.0, method_timeouts={"sleep": 0.3})
    started = time.monotonic()
    with pytest.raises(_timed_out(stack)) as info:
        tight.client().sleep(2000)
    _check_timed_out(stack, info.value)
    if stack.name == "apache":
        assert "0.3s" in str(info.value)  # Apache's exception names the call's timeout
    assert time.monotonic() - started < 0.8
    assert tight.client().echo("unaffected") == "unaffected"
    with thriftpool.deadline(0.2):  # and a deadline still takes the smaller
        with pytest.raises(thriftpool.DeadlineExceeded):
            short.client().sleep(700)


def test_method_timeouts_are_validated():
    with pytest.raises(ValueError, match=r"method_timeouts names methods the service lacks: "
                                         r"\['bulk_load'\]"):
        thriftpool.ThriftPool(echo_thrift.Echo, ["127.0.0.1:1"],
                              method_timeouts={"bulk_load": 60.0})
    with pytest.raises(ValueError, match=r"method_timeouts\['sleep'\]"):
        thriftpool.PoolConfig.build(service=echo_thrift.Echo, method_timeouts={"sleep": -1})
    with pytest.raises(ValueError, match="method_timeouts must be a mapping"):
        thriftpool.PoolConfig.build(service=echo_thrift.Echo, method_timeouts=[("sleep", 1)])
    config = thriftpool.PoolConfig.build(service=echo_thrift.Echo,
                                         method_timeouts={"sleep": 60, "ping": None})
    assert dict(config.method_timeouts) == {"sleep": 60.0, "ping": None}
    with pytest.raises(TypeError):
        config.method_timeouts["echo"] = 1.0  # type: ignore[index]  # read-only
    hash(config)  # still hashable


@pytest.mark.timeout(30)
def test_call_timeout_bounds_every_call_in_its_block_then_restores(stack, farm):
    (server,) = stack.start(farm)
    config = thriftpool.PoolConfig.build(service=stack.service, socket_timeout=5.0,
                                         method_timeouts={"sleep": 10.0})
    conn = Connection.open(parse_address(server.address), config)
    try:
        client = config.spec.make_client(conn)
        started = time.monotonic()
        with conn.call_timeout(0.3):
            with pytest.raises(_timed_out(stack)) as info:
                client.sleep(2000)
        _check_timed_out(stack, info.value)
        assert time.monotonic() - started < 0.8
        assert conn.timeout == 5.0 and conn.timeouts == {"sleep": 10.0}
    finally:
        conn.close()


@pytest.mark.timeout(30)
def test_a_heartbeat_is_bounded_for_the_whole_call(stack, liar, make_pool):
    # The heartbeat's ping is answered one byte every 0.1 s (~25 bytes: 2.5 s); with
    # connect_timeout 0.5 the watchdog gives up after 0.5 s in all and drops the socket.
    server = liar(trickle_interval=0.1).lie("trickle")
    pool = make_pool([server.address], service=stack.service, min_size=1, socket_timeout=5.0,
                     connect_timeout=0.5, heartbeat="ping", heartbeat_interval=0.1,
                     watchdog_interval=0.05)
    wait_for(lambda: server.stats()["closes_seen"] >= 1, timeout=10,
             message="the heartbeat to give up")
    (lie, told), (what, closed) = server.events[:2]
    assert (lie, what) == ("trickle", "close")
    assert 0.4 < closed - told < 1.0, closed - told
    assert pool.client().echo("after") == "after"


# -- the socket wrapper, for transports that call handle.recv() ----------------------------


@pytest.mark.timeout(30)
def test_bounded_socket_bounds_a_trickled_reply(liar):
    server = liar(trickle_interval=0.05).lie("trickle")
    raw = socket.create_connection(("127.0.0.1", server.port))
    wire = BoundedSocket(raw)
    try:
        wire.bound(0.4, limit=1 << 20, peer=server.address)
        wire.begin(0.4)
        wire.sendall(_echo_request("x" * 200))
        got = b""
        started = time.monotonic()
        with pytest.raises(socket.timeout):
            while True:
                chunk = wire.recv(4096)
                assert chunk
                got += chunk
        assert 0.3 < time.monotonic() - started < 0.8
        assert 2 < len(got) < 20  # bytes did arrive, one at a time
        assert wire.fileno() == raw.fileno()  # everything else goes to the socket
        # recv with flags (a liveness peek) bypasses the bounds: the call above is over.
        wait_for(lambda: select.select([raw], [], [], 0)[0], message="the next byte")
        peeked = wire.recv(1, socket.MSG_PEEK)
        wire.begin(0.4)
        assert wire.recv(1) == peeked
    finally:
        raw.close()


@pytest.mark.timeout(30)
@pytest.mark.apache
def test_bounded_socket_under_apache_thrift(liar):
    TSocket = pytest.importorskip("thrift.transport.TSocket")
    from thrift.protocol import TBinaryProtocol
    from thrift.Thrift import TMessageType, TType
    from thrift.transport import TTransport

    server = liar(trickle_interval=0.05)
    raw = socket.create_connection(("127.0.0.1", server.port))
    wire = BoundedSocket(raw)
    wire.bound(0.4, peer=server.address)
    tsock = TSocket.TSocket()
    tsock.setHandle(wire)
    trans = TTransport.TBufferedTransport(tsock)
    proto = TBinaryProtocol.TBinaryProtocol(trans)

    def call(seqid: int, message: str) -> str:
        wire.begin(0.4)
        proto.writeMessageBegin("echo", TMessageType.CALL, seqid)
        proto.writeStructBegin("echo_args")
        proto.writeFieldBegin("message", TType.STRING, 1)
        proto.writeString(message)
        proto.writeFieldEnd()
        proto.writeFieldStop()
        proto.writeStructEnd()
        proto.writeMessageEnd()
        trans.flush()
        name, mtype, rseqid = proto.readMessageBegin()
        assert (name, mtype, rseqid) == ("echo", TMessageType.REPLY, seqid)
        proto.readStructBegin()
        _, ftype, fid = proto.readFieldBegin()
        assert (ftype, fid) == (TType.STRING, 0)
        return proto.readString()

    from thrift.transport.TTransport import TTransportException as ApacheTransportException
    try:
        assert call(1, "apache") == "apache"
        server.lie("trickle")
        started = time.monotonic()
        with pytest.raises(ApacheTransportException) as info:
            call(2, "y" * 200)
        assert info.value.type == ApacheTransportException.TIMED_OUT
        assert time.monotonic() - started < 0.8
    finally:
        raw.close()


# -- name resolution -----------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_a_name_is_resolved_off_thread_and_connects(liar, make_pool, monkeypatch):
    server = liar()
    names = []
    real = socket.getaddrinfo

    def recording(host, *args, **kwargs):
        names.append((host, threading.current_thread().name))
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", recording)
    pool = make_pool([f"localhost:{server.port}"], min_size=0, name="dns")
    assert pool.client().echo("by name") == "by name"
    assert ("localhost", "thriftpool-dns-resolver") in names
    assert server.stats()["accepted"] == 1


@pytest.mark.timeout(30)
def test_an_ipv6_only_address_connects(liar, make_pool):
    server = liar(host="::1")
    assert server.address.startswith("[::1]:")
    pool = make_pool([server.address], min_size=0)
    assert pool.client().echo("v6") == "v6"
    with pool.checkout() as client:
        assert client._conn.socket.sock.family == socket.AF_INET6


def test_literals_are_not_looked_up(monkeypatch):
    def no_lookup(*args, **kwargs):
        raise AssertionError("getaddrinfo() called for a literal")

    monkeypatch.setattr(socket, "getaddrinfo", no_lookup)
    assert resolve("127.0.0.1", 9, 1.0)[0][4] == ("127.0.0.1", 9)
    assert resolve("::1", 9, 1.0)[0][0] == socket.AF_INET6


@pytest.mark.timeout(30)
@pytest.mark.parametrize("host", ["bad\x00host", "a" * 300 + "\x00"])
def test_an_invalid_host_is_a_connect_failure(make_pool, host):
    config = thriftpool.PoolConfig.build(service=echo_thrift.Echo)
    with pytest.raises(TTransportException) as info:
        Connection.open(Address(host, 9090), config)
    assert is_connect_error(info.value)
    assert "invalid host" in str(info.value)
    # At the boundary, discovery data with such a host never gets that far.
    with pytest.raises(ValueError, match="discovery"):
        make_pool([(host, 9090)], min_size=0)


@pytest.mark.timeout(30)
def test_a_hung_resolver_is_bounded_by_connect_timeout(monkeypatch):
    # Stand-in for a DNS server that never answers (the real DNS fixture comes with the
    # discovery work): getaddrinfo() blocks for 3 s.
    calls = []
    release = threading.Event()

    def hung(host, *args, **kwargs):
        calls.append(host)
        release.wait(3)
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", hung)
    config = thriftpool.PoolConfig.build(service=echo_thrift.Echo, connect_timeout=0.3)
    errors = []

    def connect() -> None:
        started = time.monotonic()
        try:
            Connection.open(Address("hung.example", 9090), config)
        except TTransportException as exc:
            errors.append((exc, time.monotonic() - started))

    threads = [threading.Thread(target=connect) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    try:
        assert len(errors) == 3
        for exc, elapsed in errors:
            assert is_connect_error(exc)
            assert "resolving 'hung.example' took more than" in str(exc)
            assert elapsed < 0.8, elapsed
        assert calls == ["hung.example"]  # concurrent connects shared one lookup
    finally:
        release.set()
    wait_for(lambda: not any(t.name.endswith("-resolver") for t in threading.enumerate()),
             message="the resolver helper to finish")


@pytest.mark.timeout(30)
def test_the_watchdog_never_waits_on_a_hung_resolver(monkeypatch, make_pool):
    release = threading.Event()

    def hung(host, *args, **kwargs):
        release.wait(5)
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", hung)
    try:
        pool = make_pool(["hung.example:9090"], min_size=1, connect_timeout=0.3,
                         watchdog_interval=0.05, backoff_initial=10.0)
        # The watchdog's first fill is bounded like any connect: it fails, and ejects.
        wait_for(lambda: pool.stats()["instances"]["hung.example:9090"]["healthy"] is False,
                 timeout=3, message="the instance to be ejected")
        started = time.monotonic()
        pool.close()  # joins the watchdog: it is not stuck in getaddrinfo()
        assert time.monotonic() - started < 1.0
    finally:
        release.set()


@pytest.mark.timeout(30)
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_does_not_wait_on_the_parents_lookup(monkeypatch):
    parent = os.getpid()
    release = threading.Event()
    real = socket.getaddrinfo

    def hung_in_parent(host, *args, **kwargs):
        if os.getpid() == parent:
            release.wait(5)  # the parent's lookup hangs...
        return real("127.0.0.1", *args, **kwargs)  # ... the child's answers

    monkeypatch.setattr(socket, "getaddrinfo", hung_in_parent)
    try:
        with pytest.raises(TTransportException):
            resolve("name.example", 9, 0.1)  # in flight, in a helper thread, when we fork
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # 3.12+: threads and fork
            pid = os.fork()
        if pid == 0:
            code = 1
            try:
                assert resolve("name.example", 9, 1.0)[0][4] == ("127.0.0.1", 9)
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    finally:
        release.set()


@pytest.mark.timeout(30)
def test_every_address_is_tried_in_order(liar, monkeypatch, connect_log):
    # A name with three addresses: a blackhole (a listener whose backlog is full drops
    # SYNs), a refused port, then a live server.  Stand-in resolver, real connects.
    server = liar()
    blackhole = socket.socket()
    blackhole.bind(("127.0.0.1", 0))
    blackhole.listen(0)
    filler = socket.create_connection(blackhole.getsockname())
    refused = socket.socket()
    refused.bind(("127.0.0.1", 0))
    refused_port = refused.getsockname()[1]
    refused.close()  # nothing listens there now
    ports = [blackhole.getsockname()[1], refused_port, server.port]
    for p in ports:
        connect_log.watch(p)

    def three(host, port, *args, **kwargs):
        assert host == "multi.example"
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", p)) for p in ports]

    monkeypatch.setattr(socket, "getaddrinfo", three)
    config = thriftpool.PoolConfig.build(service=echo_thrift.Echo, connect_timeout=1.5)
    started = time.monotonic()
    conn = Connection.open(Address("multi.example", server.port), config)
    try:
        elapsed = time.monotonic() - started
        client = client_class(echo_thrift.Echo)(conn)
        assert client.echo("third time") == "third time"
        attempts = connect_log.attempts
        assert [a.port for a in attempts] == ports
        assert isinstance(attempts[0].error, socket.timeout)  # its share: 1.5 s / 3
        assert 0.4 < attempts[0].end - attempts[0].start < 0.7
        assert isinstance(attempts[1].error, ConnectionRefusedError)
        assert attempts[2].error is None
        assert elapsed < 1.0
    finally:
        conn.close()
        filler.close()
        blackhole.close()


@pytest.mark.timeout(30)
def test_all_addresses_failing_is_one_connect_failure(stack, monkeypatch):
    dead = free_ports(2)
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: [
        (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", p)) for p in dead])
    config = thriftpool.PoolConfig.build(service=stack.service, connect_timeout=1.0)
    with pytest.raises(stack.TTransportException) as info:
        Connection.open(Address("gone.example", dead[0]), config)
    assert is_connect_error(info.value)
    assert "tried 2 addresses" in str(info.value)
    cause = info.value.__cause__
    if stack.name == "apache":  # Apache's exception chains the thriftpy2 stack's connect
        cause = cause.__cause__
    assert isinstance(cause, ConnectionRefusedError)


_ARGS_IDL = """
service Calc {
    i32 add(1: required i32 a, 2: i32 b = 5),
    string greet(1: string name = "world", 2: i32 times = 1),
}
"""


def _sent_args(calc, make, call):
    """Make ``call(client)`` with a client from ``make(sock)`` over a socketpair whose far
    end already holds a reply; return the args struct that went over the wire, decoded
    by thriftpy2 (or the exception the call raised before sending anything)."""
    from thriftpy2.protocol import TBinaryProtocol
    from thriftpy2.thrift import TMessageType
    from thriftpy2.transport import TMemoryBuffer

    a, b = socket.socketpair()
    try:
        client, seqid = make(a)
        name = call.__name__
        out = TMemoryBuffer()
        prot = TBinaryProtocol(out)
        prot.write_message_begin(name, TMessageType.REPLY, seqid)
        result = getattr(calc, name + "_result")(success=1 if name == "add" else "hi")
        result.write(prot)
        prot.write_message_end()
        b.sendall(out.getvalue())
        try:
            call(client)
        except Exception as exc:  # noqa: BLE001 - compared between the two clients
            return type(exc), str(exc)
        b.settimeout(2)
        request = TBinaryProtocol(TMemoryBuffer(b.recv(65536)))
        assert request.read_message_begin()[0] == name
        args = getattr(calc, name + "_args")()
        args.read(request)
        return args
    finally:
        a.close()
        b.close()


@pytest.mark.timeout(30)
def test_requests_are_encoded_exactly_as_thriftpy2s_own_client_encodes_them(tmp_path):
    # The pooled client builds a request with the args struct's own __init__ (one call);
    # every way of passing arguments must put the same fields on the wire as thriftpy2's
    # TClient: defaults, positional None (= the default), keywords, an unknown keyword
    # (ignored by thriftpy2), a missing required argument (refused before sending).
    import thriftpy2
    from thriftpy2.protocol import TBinaryProtocolFactory
    from thriftpy2.thrift import TClient
    from thriftpy2.transport import TBufferedTransportFactory, TSocket

    idl = tmp_path / "calc.thrift"
    idl.write_text(_ARGS_IDL)
    calc = thriftpy2.load(str(idl), module_name="calc_thrift").Calc
    config = thriftpool.PoolConfig.build(service=calc, socket_timeout=5.0)

    def pooled(sock):
        tsock = BoundedTSocket("127.0.0.1", 1, config)
        tsock.sock = sock
        tsock.bound(5.0, config.max_message_size, peer="test")
        transport = TBufferedTransportFactory().get_transport(tsock)
        protocol = TBinaryProtocolFactory().get_protocol(transport)
        conn = Connection(Address("test", 1), tsock, transport, protocol, 0.0,
                          float("inf"), 5.0, None)
        return client_class(calc)(conn), 1

    def raw(sock):
        transport = TBufferedTransportFactory().get_transport(TSocket(sock=sock))
        return TClient(calc, TBinaryProtocolFactory().get_protocol(transport)), 0

    calls = [
        lambda c: c.add(1, 2), lambda c: c.add(1), lambda c: c.add(1, None),
        lambda c: c.add(a=1, b=2), lambda c: c.add(1, b=3), lambda c: c.add(b=3),
        lambda c: c.add(None, 3), lambda c: c.add(1, c=9), lambda c: c.add(a=None),
        lambda c: c.greet(), lambda c: c.greet("x"), lambda c: c.greet(None, 3),
        lambda c: c.greet(times=2), lambda c: c.greet(name=None),
    ]
    for index, body in enumerate(calls):
        name = "add" if index < 9 else "greet"

        def call(client, body=body):
            return body(client)

        call.__name__ = name
        ours, theirs = _sent_args(calc, pooled, call), _sent_args(calc, raw, call)
        if isinstance(theirs, tuple):  # refused before sending: the same error
            assert ours == theirs, index
            assert theirs[0] is thriftpy2.thrift.TApplicationException
        else:
            assert not isinstance(ours, tuple), (index, ours)
            assert ours.__dict__ == theirs.__dict__, (index, ours, theirs)
