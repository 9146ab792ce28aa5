"""The wire guarantees of issue 11 on the Apache Thrift stack: ``max_message_size``
(frames, THeader frames, string and container lengths), malformed replies as Apache's own
exceptions, bounded resolution over every address, a TLS session refused at its first read
as a failed connect, and Apache's non-strict headers.  The whole-call, per-method,
``call_timeout()`` and heartbeat bounds are in tests/test_wire.py and ``thriftpool.deadline()``
in tests/test_deadlines.py, each run on both stacks.  The lying servers (tests/liars.py)
speak the binary and compact wire, which is the same for both stacks."""

from __future__ import annotations

import functools
import socket
import struct
import threading
import time
import tracemalloc

import pytest

import thriftpool
from liars import FRAMED_LIES, LIES
from servers import CannedServer, wait_for
from thriftpool.address import Address, parse_address
from thriftpool.connection import Connection, is_connect_error, should_discard

pytestmark = [pytest.mark.usefixtures("no_thread_leak"), pytest.mark.apache]

COMBOS = [("buffered", "binary"), ("buffered", "compact"), ("framed", "binary"),
          ("framed", "compact")]
SOCKET_TIMEOUT = 1.0



@pytest.fixture
def pools(apache, make_pool):
    """``pools(addresses, **options)``: pools of the Apache service (``make_pool``'s, so
    closed at teardown)."""
    return functools.partial(make_pool, service=apache.service)


def _open(apache, address: str, **options):
    config = thriftpool.PoolConfig.build(service=apache.service, **options)
    conn = Connection.open(parse_address(address), config)
    return conn, config.spec.make_client(conn)


# -- malformed replies ----------------------------------------------------------------------

def _cases():
    for transport, protocol in COMBOS:
        for lie in LIES + (FRAMED_LIES if transport == "framed" else ()):
            yield transport, protocol, lie


@pytest.mark.timeout(30)
@pytest.mark.parametrize("transport,protocol,lie", list(_cases()))
def test_a_lying_reply_raises_apaches_exception_and_discards(apache, liar, pools, transport,
                                                             protocol, lie):
    server = liar(transport, protocol)
    pool = pools([server.address], min_size=0, transport=transport, protocol=protocol,
                 socket_timeout=SOCKET_TIMEOUT, failure_threshold=5)
    with pool.checkout() as client:  # an honest call first: the codec path is warm
        assert client.echo("warm") == "warm"
    server.lie(lie)
    tracemalloc.start()
    started = time.monotonic()
    try:
        with pytest.raises(Exception) as info:
            with pool.checkout() as client:
                client.echo("x" * 200)
        elapsed = time.monotonic() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    exc = info.value
    # Apache's own exception types, never OverflowError, MemoryError, struct.error...
    assert isinstance(exc, (apache.TProtocolException, apache.TTransportException)), \
        f"{lie}: {type(exc).__name__}: {exc}"
    assert should_discard(exc)
    if lie == "trickle":
        assert exc.type == apache.TTransportException.TIMED_OUT
        assert SOCKET_TIMEOUT - 0.05 <= elapsed < SOCKET_TIMEOUT + 0.5
    else:
        assert elapsed < 1.0, f"{lie} took {elapsed:.2f}s"
    if lie in ("frame_len", "string_len", "string_1g", "list_len") and \
            isinstance(exc, apache.TProtocolException):
        assert exc.type in (apache.TProtocolException.SIZE_LIMIT,
                            apache.TProtocolException.INVALID_DATA), exc
    if lie in ("negative_len", "frame_negative"):
        assert exc.type == apache.TProtocolException.NEGATIVE_SIZE, exc
    if lie == "deep":
        assert exc.type == 6  # DEPTH_LIMIT
    assert peak < 4 * 1024 * 1024, f"{lie}: traced peak {peak} bytes"
    wait_for(lambda: server.stats()["closes_seen"] == 1, timeout=5,
             message=f"the server to see the close after {lie}")
    stats = pool.stats()["instances"][server.address]
    assert stats["idle"] + stats["in_use"] == 0
    assert pool.stats()["call_errors"] == 1  # counted once, on the failing call
    with pool.checkout() as client:  # the next call works, on a new connection
        assert client.echo("again") == "again"
    assert server.stats()["accepted"] == 2


@pytest.mark.timeout(30)
@pytest.mark.parametrize("lie", ["string_len", "negative_len", "garbage"])
def test_an_instance_answering_malformed_replies_is_ejected(apache, liar, pools, lie):
    bad = liar().lie(*[lie] * 20)
    good = liar()
    pool = pools([bad.address, good.address], min_size=0, failure_threshold=2,
                 backoff_initial=30.0, balancer="round_robin")
    proxy = pool.client()
    failures = 0
    for i in range(12):
        try:
            assert proxy.echo(str(i)) == str(i)
        except apache.TProtocolException:
            failures += 1
    assert failures == 2  # then the liar is out of rotation
    assert pool.stats()["instances"][bad.address]["healthy"] is False
    assert pool.stats()["instances"][good.address]["healthy"] is True


# -- max_message_size -----------------------------------------------------------------------

@pytest.mark.timeout(30)
@pytest.mark.parametrize("transport,protocol", COMBOS)
def test_max_message_size_limits_honest_replies(apache, liar, pools, transport, protocol):
    server = liar(transport, protocol)
    pool = pools([server.address], min_size=0, transport=transport, protocol=protocol,
                 max_message_size=10_000)
    assert pool.client().echo("y" * 9_000) == "y" * 9_000
    with pytest.raises(apache.TProtocolException) as info:
        pool.client().echo("y" * 12_000)
    assert info.value.type == apache.TProtocolException.SIZE_LIMIT
    assert pool.client().echo("z") == "z"


@pytest.mark.timeout(30)
def test_string_and_container_limits_follow_max_message_size(apache, liar):
    from thrift.protocol.TBinaryProtocol import TBinaryProtocolAcceleratedFactory
    from thrift.protocol.TCompactProtocol import TCompactProtocolFactory

    server = liar()
    for protocol, limit, want in [
            ("binary", 1000, (1000, 1000)),
            ("compact", 1000, (1000, 1000)),
            (TBinaryProtocolAcceleratedFactory(string_length_limit=100), 1000, (100, 1000)),
            (TCompactProtocolFactory(container_length_limit=10), 1000, (1000, 10)),
            ("binary", None, None)]:
        conn, _ = _open(apache, server.address, protocol=protocol, max_message_size=limit)
        try:
            got = (conn.protocol.string_length_limit, conn.protocol.container_length_limit)
            if want is None:  # no limit of ours: Apache's defaults stay
                assert got[1] is None
            else:
                assert got == want, (protocol, got)
        finally:
            conn.close()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("size", [2 ** 31 - 1, 20_000])
def test_a_theader_frame_over_max_message_size_is_refused_before_it_is_read(apache, pools,
                                                                           size):
    # A THeader frame header (4 bytes of length, then the 0x0FFF magic) claiming more than
    # the limit: nothing is read or allocated for it.
    server = CannedServer(struct.pack("!iHH", size, 0x0FFF, 0) + b"\x00" * 64)
    try:
        pool = pools([server.address], min_size=0, protocol="header",
                     max_message_size=10_000)
        tracemalloc.start()
        try:
            started = time.monotonic()
            with pytest.raises(apache.TProtocolException) as info:
                pool.client().echo("x")
            elapsed = time.monotonic() - started
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert info.value.type == apache.TProtocolException.SIZE_LIMIT
        assert "max_message_size (10000)" in str(info.value)
        assert elapsed < 1.0 and peak < 4 * 1024 * 1024
        assert server.closed.wait(5)  # discarded
    finally:
        server.stop()


@pytest.mark.timeout(30)
def test_max_message_size_limits_theader_replies(apache, farm, pools):
    (server,) = apache.start(farm, protocol="header")
    pool = pools([server.address], min_size=0, protocol="header", max_message_size=10_000)
    assert pool.client().echo("h" * 9_000) == "h" * 9_000
    with pytest.raises(apache.TProtocolException) as info:
        pool.client().echo("h" * 12_000)
    assert info.value.type == apache.TProtocolException.SIZE_LIMIT
    assert pool.client().echo("after") == "after"


# -- connecting -----------------------------------------------------------------------------

@pytest.mark.timeout(30)
def test_every_address_is_tried_within_connect_timeout(apache, liar, monkeypatch):
    server = liar()
    refused = socket.socket()
    refused.bind(("127.0.0.1", 0))
    refused_port = refused.getsockname()[1]
    refused.close()  # nothing listens there now
    asked = []

    def two(host, port, *args, **kwargs):
        asked.append(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", p))
                for p in (refused_port, server.port)]

    monkeypatch.setattr(socket, "getaddrinfo", two)
    config = thriftpool.PoolConfig.build(service=apache.service, connect_timeout=1.0)
    conn = Connection.open(Address("multi.example", server.port), config)
    try:
        client = config.spec.make_client(conn)
        assert client.echo("second address") == "second address"
        assert asked == ["multi.example"]
    finally:
        conn.close()


@pytest.mark.timeout(30)
def test_a_hung_resolver_is_bounded_by_connect_timeout(apache, monkeypatch):
    release = threading.Event()

    def hung(*args, **kwargs):
        release.wait(3)
        raise socket.gaierror("gave up")

    monkeypatch.setattr(socket, "getaddrinfo", hung)
    config = thriftpool.PoolConfig.build(service=apache.service, connect_timeout=0.3)
    started = time.monotonic()
    try:
        with pytest.raises(apache.TTransportException) as info:
            Connection.open(Address("hung.example", 9), config)
        assert time.monotonic() - started < 0.8
        assert is_connect_error(info.value)
        assert "resolving" in str(info.value)
    finally:
        release.set()
        wait_for(lambda: not any(t.name.endswith("-resolver") for t in threading.enumerate()),
                 timeout=5, message="the resolver helper to finish")


@pytest.mark.timeout(30)
def test_an_invalid_host_is_a_connect_failure(apache):
    config = thriftpool.PoolConfig.build(service=apache.service, connect_timeout=1.0)
    with pytest.raises(apache.TTransportException) as info:
        Connection.open(Address("bad\x00host", 9), config)
    assert is_connect_error(info.value)


# -- TLS ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    from tlscerts import make_pki

    ca, server, client, rogue, _ = make_pki(str(tmp_path_factory.mktemp("pki")))
    return {"ca": ca, "server": server, "rogue_client": rogue.issue("rogue_client",
                                                                    client=True)}


def _tls13(pki, cert=None):
    import ssl

    ctx = ssl.create_default_context(cafile=pki["ca"].files.cert)
    ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    if cert is not None:
        ctx.load_cert_chain(cert.cert, cert.key)
    return ctx


@pytest.mark.timeout(60)
def test_a_tls_session_refused_at_the_first_read_is_a_connect_failure(apache, farm, pki):
    import ssl

    strict = farm.one(tls=(pki["server"].cert, pki["server"].key),
                      client_ca=pki["ca"].files.cert)
    conn, client = _open(apache, strict.address,
                         ssl_context=_tls13(pki, pki["rogue_client"]))
    try:
        with pytest.raises(apache.TTransportException) as info:
            client.echo("anonymous")
        error = info.value
        assert error.type == apache.TTransportException.NOT_OPEN
        assert "rejected by the server" in str(error)
        assert conn.sent is False  # not delivered: the proxy may retry elsewhere
        assert is_connect_error(error) and should_discard(error)
        assert isinstance(error.__cause__, ssl.SSLError)
    finally:
        conn.close()
    assert strict.stats()["calls"] == 0


@pytest.mark.timeout(60)
def test_the_proxy_fails_over_from_an_instance_refusing_the_client_certificate(
        apache, farm, pki, pools):
    strict = farm.one(tls=(pki["server"].cert, pki["server"].key),
                      client_ca=pki["ca"].files.cert)
    lenient = farm.one(tls=(pki["server"].cert, pki["server"].key))
    pool = pools([strict.address, lenient.address], min_size=0, balancer="round_robin",
                 retries=2, ssl_context=_tls13(pki, pki["rogue_client"]))
    proxy = pool.client()
    assert [proxy.echo(f"m{i}") for i in range(20)] == [f"m{i}" for i in range(20)]
    assert strict.stats()["calls"] == 0
    assert lenient.stats()["calls"] == 20


# -- the binary message header, read and written in one piece --------------------------------

def _result(value: bytes) -> bytes:
    return b"\x0b\x00\x00" + struct.pack("!i", len(value)) + value + b"\x00"


@pytest.mark.timeout(30)
def test_a_non_strict_reply_header_is_read(apache, pools):
    # An old-style header: the name's length first, then the name, type and seqid.
    server = CannedServer(struct.pack("!i", 4) + b"echo" + b"\x02" + struct.pack("!i", 1)
                         + _result(b"old style"))
    try:
        pool = pools([server.address], min_size=0)
        with pool.checkout() as client:
            assert client.echo("x") == "old style"
        pool.close()  # the connection was kept: closing the pool closes it
        assert server.closed.wait(5)
    finally:
        server.stop()


@pytest.mark.timeout(30)
def test_a_non_strict_reply_is_refused_with_strict_read(apache, pools):
    from thrift.protocol.TBinaryProtocol import TBinaryProtocolAcceleratedFactory

    server = CannedServer(struct.pack("!i", 4) + b"echo" + b"\x02" + struct.pack("!i", 1)
                         + _result(b"old style"))
    try:
        factory = TBinaryProtocolAcceleratedFactory(fallback=False)
        pool = pools([server.address], min_size=0, protocol=factory)
        with pool.checkout() as client:
            client._iprot.strictRead = True
            with pytest.raises(apache.TProtocolException) as info:
                client.echo("x")
        assert info.value.type == apache.TProtocolException.BAD_VERSION
        assert server.closed.wait(5)
    finally:
        server.stop()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("name, seqid", [(b"sleep", 1), (b"ecHo", 1), (b"echo", 7)])
def test_a_reply_to_another_request_is_a_mismatch(apache, pools, name, seqid):
    server = CannedServer(struct.pack("!ii", -2147418112 | 2, len(name)) + name
                         + struct.pack("!i", seqid) + _result(b"not yours"))
    try:
        pool = pools([server.address], min_size=0)
        with pytest.raises(thriftpool.ReplyMismatch):
            pool.client().echo("x")
        assert server.closed.wait(5)  # discarded
    finally:
        server.stop()


@pytest.mark.timeout(30)
def test_non_strict_writing_keeps_apaches_own_header_code(apache, farm, pools):
    from thrift.protocol.TBinaryProtocol import TBinaryProtocolFactory

    (server,) = apache.start(farm)
    pool = pools([server.address], min_size=0,
                 protocol=TBinaryProtocolFactory(strictWrite=False))
    with pool.checkout() as client:
        assert type(client._oprot).__mro__[1].__name__ == "_NumberedNoEnd"
        assert client.echo("old") == "old"
