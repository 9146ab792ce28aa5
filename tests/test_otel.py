"""thriftpool.otel: a client span per call, read back with the SDK's in-memory exporter."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

import thriftpool
from servers import ROOT, echo_thrift
from thriftpool.otel import OpenTelemetryListener

pytestmark = pytest.mark.usefixtures("no_thread_leak")


@pytest.fixture
def tracing():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


@pytest.mark.timeout(30)
def test_a_span_per_call_with_rpc_attributes_and_one_failing(farm, tracing):
    provider, exporter = tracing
    server = farm.one()
    tracer = provider.get_tracer("test")
    with thriftpool.ThriftPool(echo_thrift.Echo, [server.address], name="traced",
                               listeners=[OpenTelemetryListener(provider)]) as pool:
        with tracer.start_as_current_span("request") as parent:
            with pool.checkout() as client:
                assert client.echo("a") == "a"
                with pytest.raises(echo_thrift.EchoError):
                    client.fail("boom")
            assert pool.client().echo("b") == "b"
    spans = [s for s in exporter.get_finished_spans() if s.name != "request"]
    assert [s.name for s in spans] == ["Echo/echo", "Echo/fail", "Echo/echo"]
    host, port = server.address.rsplit(":", 1)
    for span in spans:
        assert span.kind is SpanKind.CLIENT
        assert span.parent is not None
        assert span.parent.span_id == parent.get_span_context().span_id
        attrs = dict(span.attributes)
        assert attrs["rpc.system"] == "apache_thrift"
        assert attrs["rpc.service"] == "Echo"
        assert attrs["server.address"] == host and attrs["server.port"] == int(port)
        assert attrs["thriftpool.pool"] == "traced"
    assert [dict(s.attributes)["rpc.method"] for s in spans] == ["echo", "fail", "echo"]
    ok1, failed, ok2 = spans
    assert ok1.status.status_code is StatusCode.UNSET is ok2.status.status_code
    assert failed.status.status_code is StatusCode.ERROR
    assert dict(failed.attributes)["error.type"] == "EchoError"
    assert [e.name for e in failed.events] == ["exception"]


@pytest.mark.apache
@pytest.mark.timeout(60)
def test_traceparent_is_sent_under_theader(apache, farm, tracing):
    from stacks import ApacheEchoServer

    provider, exporter = tracing
    server = ApacheEchoServer(apache.gen_dir, protocol="header")
    farm.servers.append(server)
    with thriftpool.ThriftPool(apache.service, [server.address], protocol="header",
                               listeners=[OpenTelemetryListener(provider)]) as pool:
        with pool.checkout() as client:
            assert client.echo("x") == "x"
            echoed = client.get_headers()
    (span,) = exporter.get_finished_spans()
    ctx = span.get_span_context()
    version, trace_id, span_id, flags = echoed[b"echoed-traceparent"].decode().split("-")
    assert (version, trace_id, span_id) == ("00", f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}")
    assert int(flags, 16) & 1  # sampled
    assert span.name == "Echo/echo"


def test_the_module_says_what_to_install_without_opentelemetry():
    code = ("import sys\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'opentelemetry' or name.startswith('opentelemetry.'):\n"
            "            raise ImportError('blocked')\n"
            "sys.meta_path.insert(0, Block())\n"
            "import thriftpool\n"
            "try:\n"
            "    import thriftpool.otel\n"
            "except ImportError as e:\n"
            "    print(e)\n")
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=60, check=True)
    assert "pip install python-thriftpool[otel]" in out.stdout
