"""What only the Apache Thrift stack has: Apache's own servers in every dialect, THeader
headers, the C extension present and absent, thriftpool without ``thrift`` installed,
TLS, gevent, fork, serving an Apache processor, and the whole-call deadline.

The scenarios shared with thriftpy2 live in test_stacks.py.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import struct
import subprocess
import sys
import time
import traceback
import warnings

import pytest

import thriftpool
from servers import ROOT, CannedServer, echo_thrift, free_port, wait_for
from stacks import ApacheEchoServer

pytestmark = [pytest.mark.usefixtures("no_thread_leak"), pytest.mark.apache]


@pytest.fixture
def pools():
    made = []

    def make(service, discovery, **options):
        options.setdefault("name", "test")
        pool = thriftpool.ThriftPool(service, discovery, **options)
        made.append(pool)
        return pool

    yield make
    for pool in made:
        pool.close()


def run_script(code: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [ROOT, os.path.join(ROOT, "tests")] + [p for p in [env.get("PYTHONPATH")] if p])
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


def result_of(proc: subprocess.CompletedProcess):
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return json.loads(lines[-1][len("RESULT "):])


# -- Apache's own servers, every dialect -------------------------------------------------------

DIALECTS = [
    ("threaded", "buffered", "binary"),
    ("threaded", "framed", "compact"),
    ("threadpool", "buffered", "compact"),
    ("threadpool", "framed", "binary"),
    ("nonblocking", "framed", "binary"),
    ("nonblocking", "framed", "compact"),
    ("threaded", "buffered", "header"),
]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("server_kind, transport, protocol", DIALECTS)
def test_every_apache_server_and_dialect(apache, farm, pools, server_kind, transport,
                                         protocol):
    server = ApacheEchoServer(apache.gen_dir, server=server_kind, transport=transport,
                              protocol=protocol)
    farm.servers.append(server)
    pool = pools(apache.service, [server.address], min_size=0, max_size=1,
                 transport=transport, protocol=protocol, socket_timeout=0.25)
    with pool.checkout() as client:
        assert client.echo("hi") == "hi"
        with pytest.raises(apache.EchoError):
            client.fail("declared")
        client.notify("one way")
        assert client.sleep(2) == 2
    wait_for(lambda: server.notices() == 1, 5, message="the one-way call")
    # The stale-reply case, on this server: the late 300 is never an answer.
    with pytest.raises(apache.TTransportException) as info:
        pool.client().sleep(300)
    assert info.value.type == apache.TTransportException.TIMED_OUT
    time.sleep(0.3)
    assert pool.client().sleep(1) == 1
    assert server.stats()["accepted"] == 2


def _raw_client(apache, server, timeout_ms):
    """Apache's own generated client over its own TSocket (accelerated binary, buffered),
    and its open transport (close it)."""
    from thrift.protocol.TBinaryProtocol import TBinaryProtocolAccelerated
    from thrift.transport.TSocket import TSocket
    from thrift.transport.TTransport import TBufferedTransport

    raw_socket = TSocket("127.0.0.1", server.port)
    raw_socket.setTimeout(timeout_ms)
    transport = TBufferedTransport(raw_socket)
    client = apache.module.Client(TBinaryProtocolAccelerated(transport))
    transport.open()
    return client, transport


@pytest.mark.timeout(30)
def test_apaches_own_client_returns_the_stale_reply_and_ours_does_not(apache, farm, pools):
    """The bug the pool fixes, reproduced with Apache's own TSocket and Client."""
    (server,) = apache.start(farm)
    raw, transport = _raw_client(apache, server, timeout_ms=200)
    try:
        with pytest.raises(apache.TTransportException):
            raw.sleep(300)
        time.sleep(0.3)
        assert raw.sleep(1) == 300  # Apache's client reads the late reply as its own
    finally:
        transport.close()
    pool = pools(apache.service, [server.address], min_size=0, socket_timeout=0.2)
    with pytest.raises(apache.TTransportException):
        pool.client().sleep(300)
    time.sleep(0.3)
    assert pool.client().sleep(1) == 1


def _outcome(body, client):
    try:
        return ("ok", body(client))
    except Exception as exc:  # noqa: BLE001 - compared between the two clients
        return (type(exc).__name__, str(exc))


@pytest.mark.timeout(30)
def test_the_pooled_client_answers_every_call_as_the_generated_client_does(
        apache, farm, pools, monkeypatch):
    # The pooled client makes a call itself (the generated send_/recv_ pair, inlined):
    # every way of calling must end as the generated client's call ends.
    (server,) = apache.start(farm)
    raw, transport = _raw_client(apache, server, timeout_ms=5000)
    pool = pools(apache.service, [server.address], min_size=0, max_size=1)
    calls = [
        lambda c: c.echo("x"), lambda c: c.echo(message="y"), lambda c: c.echo(None),
        lambda c: c.echo(), lambda c: c.echo("a", "b"), lambda c: c.echo(msg="z"),
        lambda c: c.ping(), lambda c: c.sleep(1), lambda c: c.fail("declared"),
        lambda c: c.fail("undeclared"), lambda c: c.notify("n"), lambda c: c.whoami(),
    ]
    try:
        for index, body in enumerate(calls):
            theirs = _outcome(body, raw)
            with pool.checkout() as client:
                ours = _outcome(body, client)
                assert client.echo("after") == "after", index  # the stream is intact
            assert ours == theirs, index
        # The generated send_/recv_ are not on the path of a well-formed call ...
        def refuse(self, *args):
            raise AssertionError("generated send_echo called")

        monkeypatch.setattr(apache.module.Client, "send_echo", refuse)
        with pool.checkout() as client:
            assert client.echo("direct") == "direct"
            # ... and the generated method still takes what the inlined path does not.
            with pytest.raises(TypeError, match="missing 1 required positional"):
                client.echo()
            assert client.echo("still") == "still"
        assert pool.stats()["in_use"] == 0
    finally:
        transport.close()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("transport", ["buffered", "framed"])
def test_a_call_is_one_write_of_the_bytes_apaches_protocol_writes(apache, farm, pools,
                                                                   monkeypatch, transport):
    # With the C-accelerated binary protocol, the pooled call encodes its request in one
    # piece and sends it in one write: the same bytes as Apache's protocol and
    # transport write.  An argument the encoder refuses sends nothing, so the next call
    # on the same client still gets its own answer.
    from thrift.protocol.TBinaryProtocol import TBinaryProtocolAccelerated
    from thrift.transport.TTransport import TFramedTransport, TMemoryBuffer

    from thriftpool.apache import PoolSocket

    server = ApacheEchoServer(apache.gen_dir, transport=transport, protocol="binary")
    farm.servers.append(server)
    pool = pools(apache.service, [server.address], min_size=0, max_size=1,
                 transport=transport, protocol="binary")
    writes = []
    real_write = PoolSocket.write

    def record(self, data):
        writes.append(bytes(data))
        return real_write(self, data)

    monkeypatch.setattr(PoolSocket, "write", record)
    with pool.checkout() as client:
        seqid = client._conn.seqid + 1
        assert client.echo("one piece") == "one piece"
        assert len(writes) == 1
        expected = TMemoryBuffer()
        framed = TFramedTransport(expected) if transport == "framed" else expected
        generated = apache.module.Client(TBinaryProtocolAccelerated(framed))
        generated._seqid = seqid
        generated.send_echo("one piece")
        assert writes[0] == expected.getvalue()
        writes.clear()
        with pytest.raises(TypeError):
            client.echo(12345)  # not a string: the encoder refuses it
        assert writes == []
        assert client.echo("next") == "next"
    # The last call ended cleanly, so the connection stays pooled.
    assert pool.stats()["idle"] == 1 and pool.stats()["in_use"] == 0


@pytest.mark.timeout(30)
@pytest.mark.parametrize("transport, protocol", [("buffered", "binary"),
                                                 ("framed", "compact")])
def test_apache_clients_and_thriftpy2_servers_interoperate(apache, farm, pools, transport,
                                                           protocol):
    thriftpy2_server = farm.one(transport=transport, protocol=protocol)
    apache_server = ApacheEchoServer(apache.gen_dir, transport=transport, protocol=protocol)
    farm.servers.append(apache_server)
    to_thriftpy2 = pools(apache.service, [thriftpy2_server.address], transport=transport,
                         protocol=protocol, min_size=0)
    to_apache = pools(echo_thrift.Echo, [apache_server.address], transport=transport,
                      protocol=protocol, min_size=0)
    for pool in (to_thriftpy2, to_apache):
        assert pool.client().echo("across") == "across"
    with pytest.raises(apache.EchoError):
        to_thriftpy2.client().fail("x")
    with pytest.raises(echo_thrift.EchoError):
        to_apache.client().fail("x")


# -- THeader -------------------------------------------------------------------------------

@pytest.mark.timeout(30)
def test_theader_headers_are_per_call_and_per_checkout(apache, farm, pools):
    server = ApacheEchoServer(apache.gen_dir, protocol="header")
    farm.servers.append(server)
    pool = pools(apache.service, [server.address], protocol="header", min_size=0,
                 max_size=1)
    with pool.checkout() as client:
        assert client.get_headers() == {}
        client.set_header(b"trace", b"abc")
        assert client.echo("x") == "x"
        assert client.get_headers() == {b"echoed-trace": b"abc"}
        assert client.echo("y") == "y"  # headers go with one call only
        assert client.get_headers() == {}
        client.set_header(b"left", b"over")  # set, and the checkout ends without a call
    with pool.checkout() as client:
        assert client.get_headers() == {}
        assert client.echo("z") == "z"
        assert client.get_headers() == {}  # the last checkout's header was not sent
    assert server.stats()["accepted"] == 1
    # A thriftpy2 client (unframed binary) is answered by the same THeader server.
    assert pools(echo_thrift.Echo, [server.address], min_size=0).client().echo("v") == "v"
    plain = pools(apache.service, [server.address], min_size=0, name="plain")
    with pool.checkout():
        pass
    with plain.checkout() as client, pytest.raises(TypeError, match="header"):
        client.set_header(b"k", b"v")


def test_header_protocol_options_are_checked(apache):
    with pytest.raises(ValueError, match="header"):
        thriftpool.ThriftPool(apache.service, ["127.0.0.1:1"], protocol="header",
                              transport="framed")
    with pytest.raises(ValueError, match="Apache"):
        thriftpool.ThriftPool(echo_thrift.Echo, ["127.0.0.1:1"], protocol="header")
    with pytest.raises(ValueError, match="protocol"):
        thriftpool.ThriftPool(apache.service, ["127.0.0.1:1"], protocol="json")


# -- the C extension, and no thrift at all ---------------------------------------------------

@pytest.mark.timeout(30)
def test_the_c_extension_is_used_when_present(apache, farm, pools):
    from thrift.protocol.TBinaryProtocol import TBinaryProtocolAccelerated
    from thrift.protocol.TCompactProtocol import TCompactProtocolAccelerated

    from thriftpool.apache import HAS_FASTBINARY

    assert HAS_FASTBINARY
    (server,) = apache.start(farm)
    for protocol, cls in (("binary", TBinaryProtocolAccelerated),
                          ("compact", TCompactProtocolAccelerated)):
        pool = pools(apache.service, [server.address], protocol=protocol, min_size=0,
                     name=protocol)
        with pool.checkout() as client:
            prot = client._conn.protocol
            assert isinstance(prot, cls) and prot._fast_encode is not None
            if protocol == "binary":
                assert client.echo("fast") == "fast"


BLOCKER = r"""
import sys
class Blocker:
    def __init__(self, names):
        self.names = names
    def find_spec(self, name, path=None, target=None):
        if name in self.names or name.split(".")[0] in self.names:
            raise ImportError(f"{name} hidden by the test")
        return None
sys.meta_path.insert(0, Blocker(set(sys.argv[1].split(","))))
"""

NO_FASTBINARY = BLOCKER + r"""
import json, logging
records = []
class Keep(logging.Handler):
    def emit(self, record):
        records.append(record.getMessage())
logging.getLogger("thriftpool").addHandler(Keep())
logging.getLogger("thriftpool").setLevel(logging.INFO)
sys.path.insert(0, sys.argv[2])
import thriftpool
from thriftpool.apache import HAS_FASTBINARY
from echo import Echo
out = {"has_fastbinary": HAS_FASTBINARY}
for name in ("a", "b"):
    with thriftpool.ThriftPool(Echo, [sys.argv[3]], min_size=0, name=name) as pool:
        with pool.checkout() as client:
            out[name] = client.echo(name)
            out["fast_encode"] = client._conn.protocol._fast_encode is not None
out["lines"] = [r for r in records if "C extension" in r]
print("RESULT " + json.dumps(out))
"""


@pytest.mark.timeout(60)
def test_without_the_c_extension_the_pure_python_protocol_is_used_with_one_info_line(
        apache, farm):
    (server,) = apache.start(farm)
    result = result_of(run_script(NO_FASTBINARY, "thrift.protocol.fastbinary",
                                  apache.gen_dir, server.address))
    assert result["has_fastbinary"] is False
    assert (result["a"], result["b"]) == ("a", "b")
    assert result["fast_encode"] is False
    assert len(result["lines"]) == 1, result["lines"]


NO_THRIFT = BLOCKER + r"""
import json, types
import thriftpy2, thriftpool
echo = thriftpy2.load(sys.argv[2], module_name="echo_thrift")
out = {"thrift_loaded": "thrift" in sys.modules}
with thriftpool.ThriftPool(echo.Echo, [sys.argv[3]], min_size=0) as pool:
    out["echo"] = pool.client().echo("no thrift")
    with pool.checkout() as client:
        try:
            client.fail("x")
        except echo.EchoError:
            out["idl_error"] = True
fake = types.ModuleType("fake.Echo")
fake.Client = type("Client", (), {})
fake.Iface = type("Iface", (), {"echo": lambda self, m: None})
try:
    thriftpool.ThriftPool(fake, ["127.0.0.1:1"])
except ValueError as exc:
    out["error"] = str(exc)
out["thrift_loaded_after"] = "thrift" in sys.modules
print("RESULT " + json.dumps(out))
"""


@pytest.mark.timeout(60)
def test_the_thriftpy2_stack_works_without_thrift_installed(farm):
    server = farm.one()
    result = result_of(run_script(NO_THRIFT, "thrift", os.path.join(ROOT, "idl", "echo.thrift"),
                                  server.address))
    assert result["thrift_loaded"] is False and result["thrift_loaded_after"] is False
    assert result["echo"] == "no thrift" and result["idl_error"] is True
    assert "pip install 'thriftpool[apache]'" in result["error"]


# -- TLS -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    from tlscerts import make_pki

    ca, server, client, rogue, rogue_server = make_pki(str(tmp_path_factory.mktemp("pki")))
    return {"ca": ca, "server": server, "rogue_server": rogue_server}


@pytest.mark.timeout(60)
def test_apache_calls_over_verified_tls(apache, farm, pools, pki):
    server = farm.one(tls=(pki["server"].cert, pki["server"].key))
    ctx = ssl.create_default_context(cafile=pki["ca"].files.cert)
    pool = pools(apache.service, [server.address], ssl_context=ctx, min_size=1,
                 socket_timeout=0.3)
    proxy = pool.client()
    assert [proxy.echo(f"m{i}") for i in range(20)] == [f"m{i}" for i in range(20)]
    with pool.checkout() as client:
        assert isinstance(client._conn.socket.sock, ssl.SSLSocket)
    accepted = server.stats()["accepted"]
    for i in range(20):
        assert proxy.echo(str(i)) == str(i)
    assert server.stats()["accepted"] == accepted  # idle TLS sockets pass the liveness check
    with pytest.raises(apache.TTransportException) as info:
        proxy.sleep(600)  # the whole-call deadline holds over TLS too
    assert info.value.type == apache.TTransportException.TIMED_OUT

    rogue = farm.one(tls=(pki["rogue_server"].cert, pki["rogue_server"].key))
    bad = pools(apache.service, [rogue.address], ssl_context=ctx, min_size=0,
                backoff_initial=5.0, name="rogue")
    with pytest.raises(thriftpool.NoAvailableInstance) as refused:
        with bad.checkout():
            pass
    cause = refused.value.__cause__
    assert isinstance(cause, apache.TTransportException)
    assert cause.type == apache.TTransportException.NOT_OPEN
    assert "certificate verify failed" in str(cause)


# -- gevent and fork -------------------------------------------------------------------------

GEVENT_SCRIPT = r"""
from gevent import monkey
monkey.patch_all()
import json, sys, time
import gevent
sys.path.insert(0, sys.argv[1])
import thriftpool
from echo import Echo
from thrift.transport.TTransport import TTransportException

gaps = [0.0]
def ticker():
    last = time.monotonic()
    while True:
        gevent.sleep(0.01)
        now = time.monotonic()
        gaps[0] = max(gaps[0], now - last)
        last = now
tick = gevent.spawn(ticker)
out = {"errors": []}
with thriftpool.ThriftPool(Echo, sys.argv[2:], max_size=4, checkout_timeout=10,
                           socket_timeout=0.3) as pool:
    def work(i):
        try:
            proxy = pool.client()
            for j in range(5):
                assert proxy.sleep(20) == 20
        except Exception as exc:
            out["errors"].append(repr(exc))
    gevent.joinall([gevent.spawn(work, i) for i in range(100)], timeout=60)
    started = time.monotonic()
    try:
        pool.client().sleep(800)
    except TTransportException as exc:
        out["timeout_type"] = exc.type
    out["timeout_took"] = time.monotonic() - started
    gevent.sleep(0.6)
    out["after"] = pool.client().sleep(1)
    out["max_size_seen"] = max(s["size"] for s in pool.stats()["instances"].values())
tick.kill()
out["max_gap"] = gaps[0]
print("RESULT " + json.dumps(out))
"""


@pytest.mark.gevent
@pytest.mark.timeout(120)
def test_apache_pool_under_gevent(apache, farm):
    pytest.importorskip("gevent")
    servers = apache.start(farm, 2)
    result = result_of(run_script(GEVENT_SCRIPT, apache.gen_dir,
                                  *[s.address for s in servers], timeout=100))
    assert result["errors"] == []
    assert result["max_size_seen"] <= 4
    assert result["timeout_type"] == 3  # TIMED_OUT, from gevent's socket timeout
    assert result["timeout_took"] < 1.0
    assert result["after"] == 1
    assert result["max_gap"] < 0.5, result["max_gap"]


def _fork() -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return os.fork()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.timeout(60)
def test_fork_child_uses_its_own_sockets_and_a_checked_out_client_is_dead(apache, farm):
    (server,) = apache.start(farm)
    pool = thriftpool.ThriftPool(apache.service, [server.address], min_size=1, max_size=2)
    try:
        assert pool.client().echo("parent") == "parent"
        with pool.checkout() as client:
            accepted = server.stats()["accepted"]
            pid = _fork()
            if pid == 0:
                code = 1
                try:
                    try:
                        client.echo("on the parent's socket")
                    except thriftpool.ClientReleased:
                        pass
                    else:
                        raise AssertionError("the child used an inherited socket")
                    assert [pool.client().echo(f"c{i}") for i in range(5)] == \
                        [f"c{i}" for i in range(5)]
                    pool.close()
                    code = 0
                except BaseException:
                    traceback.print_exc()
                finally:
                    os._exit(code)
            _, status = os.waitpid(pid, 0)
            assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, "the child failed"
            assert client.echo("after") == "after"  # the parent's stream is intact
            assert server.stats()["accepted"] > accepted  # the child connected itself
    finally:
        pool.close()



def _reply_parts(reply: bytes, how: str, framed: bool):
    if framed:
        reply = struct.pack("!i", len(reply)) + reply
    header = (4 if framed else 0) + 4 + 4 + len("echo") + 4
    return {"whole": [reply], "header, then the rest": [reply[:header], reply[header:]],
            "a byte at a time": [reply[i:i + 1] for i in range(len(reply))],
            "then bytes nobody asked for": [reply + reply]}[how]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("transport", ["buffered", "framed"])
@pytest.mark.parametrize("how, size", [("whole", 10), ("whole", 20000),
                                       ("header, then the rest", 10),
                                       ("header, then the rest", 20000),
                                       ("a byte at a time", 10),
                                       ("then bytes nobody asked for", 10)])
def test_a_reply_is_read_whole_however_it_arrives(apache, pools, monkeypatch, how, size,
                                                  transport):
    # Over the accelerated binary protocol and a buffered or framed transport the pooled
    # call reads the reply's header itself and hands the rest to the C decoder.  A
    # buffered reply whose header is not whole in the first read takes the protocol's
    # readMessageBegin; a framed one is read up to its frame's end first.
    from thrift.Thrift import TMessageType

    from thriftpool.apache import _StrictBinary

    value = "v" * size
    framed = transport == "framed"
    parts = _reply_parts(_reply(apache, TMessageType.REPLY, value), how, framed)
    server = CannedServer(parts, gap=0.2 if len(parts) == 2 else 0.01)
    headers = []
    real = _StrictBinary.readMessageBegin
    monkeypatch.setattr(_StrictBinary, "readMessageBegin",
                        lambda self: headers.append(1) or real(self))
    extra = how == "then bytes nobody asked for"
    try:
        pool = pools(apache.service, [server.address], min_size=0, max_size=1,
                     transport=transport)
        with pool.checkout() as client:
            if extra and framed:
                # In the same read as the frame: more than the reply may have.
                with pytest.raises(apache.TProtocolException) as info:
                    client.echo("x")
                assert info.value.type == apache.TProtocolException.INVALID_DATA
                assert "after the reply's frame" in str(info.value)
            else:
                assert client.echo("x") == value
                slow = how == "a byte at a time" and not framed
                assert len(headers) == (1 if slow else 0)
            if extra and not framed:
                # Still in the transport's buffer: they are never read as an answer.
                with pytest.raises(thriftpool.ReplyMismatch):
                    client.echo("y")
        if extra:
            assert server.closed.wait(5)  # discarded
        else:
            assert pool.stats()["idle"] == 1  # kept
    finally:
        server.stop()

# -- the whole-call deadline and replies that lie ------------------------------------------

def _reply(apache, mtype: int, value: str = "x" * 10) -> bytes:
    from thrift.protocol.TBinaryProtocol import TBinaryProtocol
    from thrift.transport.TTransport import TMemoryBuffer

    buf = TMemoryBuffer()
    prot = TBinaryProtocol(buf)
    prot.writeMessageBegin("echo", mtype, 1)
    result = apache.module.echo_result(success=value)
    result.write(prot)
    prot.writeMessageEnd()
    return buf.getvalue()


@pytest.mark.timeout(30)
def test_socket_timeout_bounds_the_whole_call_against_a_trickling_server(apache, pools):
    from thrift.Thrift import TMessageType

    server = CannedServer(_reply(apache, TMessageType.REPLY), gap=0.1)
    try:
        pool = pools(apache.service, [server.address], min_size=0, socket_timeout=0.5)
        started = time.monotonic()
        with pytest.raises(apache.TTransportException) as info:
            pool.client().echo("x")
        took = time.monotonic() - started
        assert info.value.type == apache.TTransportException.TIMED_OUT
        assert 0.45 <= took < 0.9, took  # each read got only the time left
        assert server.closed.wait(5)  # the connection was discarded
    finally:
        server.stop()


@pytest.mark.timeout(30)
def test_unknown_message_type_is_a_protocol_error_and_discards(apache, pools):
    server = CannedServer(_reply(apache, 7))
    try:
        pool = pools(apache.service, [server.address], min_size=0, failure_threshold=1)
        with pytest.raises(apache.TProtocolException):
            pool.client().echo("x")
        assert server.closed.wait(5)
        assert not pool.stats()["instances"][server.address]["healthy"]
    finally:
        server.stop()


# -- serving an Apache processor -----------------------------------------------------------

class Handler:
    def __init__(self, name):
        self.name = name

    def echo(self, message):
        return message

    def whoami(self):
        return self.name


@pytest.mark.timeout(60)
@pytest.mark.parametrize("form", ["module", "processor"])
def test_registered_server_serves_an_apache_processor_and_drains(apache, zk, form):
    service, handler = ((apache.module, Handler(form)) if form == "module"
                        else (apache.module.Processor(Handler(form)), None))
    server = zk.closing(thriftpool.RegisteredServer(
        service, handler, "127.0.0.1", 0, hosts=zk.hosts, path=zk.path, drain_timeout=3.0,
        protocol="compact").start())
    admin = zk.client()
    assert admin.get_children(zk.path) == [server.address]
    pool = zk.closing(thriftpool.ThriftPool(
        apache.service, thriftpool.ZooKeeperDiscovery(hosts=zk.hosts, path=zk.path),
        protocol="compact", watchdog_interval=0.1))
    pool.wait(10)
    assert pool.client().whoami() == form
    assert pool.client().echo("served") == "served"
    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < 2.0  # deregistered first: the pool let go at once
    assert admin.get_children(zk.path) == []


def test_registered_server_checks_its_service(apache):
    opts = dict(hosts="127.0.0.1:1", path="/x")
    with pytest.raises(ValueError, match="handler must be None"):
        thriftpool.RegisteredServer(apache.module.Processor(Handler("x")), Handler("y"),
                                    **opts)
    with pytest.raises(ValueError, match="handler is required"):
        thriftpool.RegisteredServer(apache.module, None, **opts)
    with pytest.raises(ValueError, match="service must be"):
        thriftpool.RegisteredServer(object(), Handler("x"), **opts)


@pytest.mark.timeout(60)
def test_a_dying_accept_loop_logs_and_deregisters(apache, zk, caplog):
    server = zk.closing(thriftpool.RegisteredServer(
        apache.module, Handler("a"), "127.0.0.1", 0, hosts=zk.hosts, path=zk.path).start())
    admin = zk.client()
    assert admin.get_children(zk.path) == [server.address]

    def broken(listener):
        raise RuntimeError("injected accept failure")

    server._accept_one = broken
    socket.create_connection(("127.0.0.1", server.port), timeout=2).close()
    wait_for(lambda: admin.get_children(zk.path) == [], 10, message="the deregistration")
    assert isinstance(server.accept_error, RuntimeError)
    assert any("accept loop died" in r.getMessage() for r in caplog.records)
    server.stop()


FDS_SCRIPT = r"""
import json, os, resource, socket, sys
sys.path.insert(0, sys.argv[1])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
if soft < 2048:
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(2048, hard), hard))
held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
import thriftpool
from echo import Echo
class Handler:
    def echo(self, m):
        return m
server = thriftpool.RegisteredServer(Echo, Handler(), "127.0.0.1", 0, hosts=sys.argv[2],
                                     path=sys.argv[3]).start()
print(json.dumps({"port": server.port, "fd": server._listener.fileno(),
                  "open": len(os.listdir("/proc/self/fd"))}), flush=True)
sys.stdin.readline()
server.stop()
"""


@pytest.mark.timeout(60)
def test_a_server_with_1100_descriptors_open_still_accepts(apache, zk):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-c", FDS_SCRIPT, apache.gen_dir, zk.hosts,
                             zk.path], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert line, proc.stderr.read()
        info = json.loads(line)
        assert info["fd"] > 1023 and info["open"] > 1100
        pool = zk.closing(thriftpool.ThriftPool(
            apache.service, thriftpool.ZooKeeperDiscovery(hosts=zk.hosts, path=zk.path),
            max_size=4))
        pool.wait(10)
        assert [pool.client().echo(str(i)) for i in range(10)] == [str(i) for i in range(10)]
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


# -- the command line ----------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_cli_ping_and_bench_take_an_apache_module(apache, farm):
    (server,) = apache.start(farm)
    where = f"{apache.gen_dir}:echo.Echo"

    def run(*args):
        return subprocess.run([sys.executable, "-m", "thriftpool", *args],
                              capture_output=True, text=True, timeout=60)

    ok = run("ping", "--idl", where, "--address", server.address, "--method", "echo",
             "--args", '["apache"]')
    assert ok.returncode == 0, ok.stderr
    assert "'apache'" in ok.stdout
    bench = run("bench", "--idl", where, "--address", server.address, "--calls", "200",
                "--duration", "5", "--threads", "2")
    assert bench.returncode == 0, bench.stderr
    assert any(line.startswith("total") for line in bench.stdout.splitlines())
    bad = run("ping", "--idl", f"{apache.gen_dir}:echo.ttypes", "--address", server.address)
    assert bad.returncode == 2 and "not a service module" in bad.stderr
    dead = f"127.0.0.1:{free_port()}"
    down = run("ping", "--idl", where, "--address", dead)
    assert down.returncode == 1 and "FAIL" in down.stdout





def test_apache_exceptions_are_classified_like_thriftpy2s(apache):
    from thriftpool.connection import is_connect_error, should_discard

    app, trans, prot = apache.TApplicationException, apache.TTransportException, \
        apache.TProtocolException
    assert should_discard(trans(trans.END_OF_FILE)) and should_discard(prot(prot.INVALID_DATA))
    assert is_connect_error(trans(trans.NOT_OPEN)) and not is_connect_error(trans(trans.TIMED_OUT))
    for code in (app.BAD_SEQUENCE_ID, app.PROTOCOL_ERROR, app.INVALID_MESSAGE_TYPE,
                 app.INVALID_TRANSFORM, app.INVALID_PROTOCOL, app.UNSUPPORTED_CLIENT_TYPE):
        assert should_discard(app(code)), code
    for code in (app.UNKNOWN, app.UNKNOWN_METHOD, app.MISSING_RESULT, app.INTERNAL_ERROR):
        assert not should_discard(app(code)), code
    assert not should_discard(apache.EchoError(message="declared"))


@pytest.mark.timeout(60)
def test_a_theader_registered_server_answers_every_dialect(apache, zk):
    server = zk.closing(thriftpool.RegisteredServer(
        apache.module, Handler("h"), "127.0.0.1", 0, hosts=zk.hosts, path=zk.path,
        protocol="header").start())
    for options in ({"protocol": "header"}, {}, {"transport": "framed", "protocol": "compact"}):
        with thriftpool.ThriftPool(apache.service, [server.address], min_size=0,
                                   **options) as pool:
            assert pool.client().echo(str(options)) == str(options)
    with thriftpool.ThriftPool(echo_thrift.Echo, [server.address], min_size=0) as pool:
        assert pool.client().whoami() == "h"
    server.stop()
