"""OpenTelemetry client spans for thriftpool calls (``pip install python-thriftpool[otel]``).

::

    from thriftpool.otel import OpenTelemetryListener
    pool = ThriftPool(service, addresses, listeners=[OpenTelemetryListener()])

Every call made through a checked-out client or ``pool.client()`` (each retry is a call)
becomes a span of kind ``CLIENT``, a child of the caller's current span, named
``"<service>/<method>"``, with the semantic-convention attributes for RPC:
``rpc.system="apache_thrift"``, ``rpc.service``, ``rpc.method``, ``server.address`` and
``server.port`` (and ``thriftpool.pool``).  A call that raises ends its span with status
``ERROR``, the attribute ``error.type`` (the exception's class) and the exception recorded
as an event.  Where the transport carries headers (``protocol="header"``, the Apache
stack) the span's context is sent with the request as a W3C ``traceparent`` header
(through the globally configured propagator), so the server can continue the trace.

Only ``opentelemetry-api`` is needed; without an SDK configured the spans are no-ops.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

try:
    from opentelemetry import propagate, trace
    from opentelemetry.trace import SpanKind, Status, StatusCode
except ImportError as exc:  # pragma: no cover - tested in a subprocess without it
    raise ImportError("thriftpool.otel needs opentelemetry-api: "
                      "pip install python-thriftpool[otel]") from exc

from .events import PoolListener

if TYPE_CHECKING:
    from .pool import ThriftPool

__all__ = ["OpenTelemetryListener"]


def _split(address: str) -> Tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port) if port.isdigit() else 0


class OpenTelemetryListener(PoolListener):
    """A :class:`~thriftpool.PoolListener` that makes a client span per call (module doc).

    :param tracer_provider: where spans go (default: the global tracer provider).
    :param propagate_context: send ``traceparent`` where the transport carries headers.
    """

    def __init__(self, tracer_provider: Any = None, propagate_context: bool = True) -> None:
        from . import __version__

        self._tracer = trace.get_tracer("thriftpool", __version__,
                                        tracer_provider=tracer_provider)
        self._propagate = propagate_context
        self._services: Dict[str, str] = {}
        # The open spans of each thread (or greenlet: get_ident is looked up at call
        # time, so a process gevent patched later is served too), innermost last.
        self._open: Dict[int, List[Any]] = {}

    def attach_pool(self, pool: "ThriftPool") -> None:
        self._services[pool.name] = pool._spec.name

    def call_started(self, pool: str, address: str, method: str,
                     headers: Dict[str, str]) -> None:
        service = self._services.get(pool, pool)
        host, port = _split(address)
        span = self._tracer.start_span(
            f"{service}/{method}", kind=SpanKind.CLIENT,
            attributes={"rpc.system": "apache_thrift", "rpc.service": service,
                        "rpc.method": method, "server.address": host, "server.port": port,
                        "thriftpool.pool": pool})
        if self._propagate:
            propagate.inject(headers, context=trace.set_span_in_context(span))
        self._open.setdefault(threading.get_ident(), []).append(span)

    def call_finished(self, pool: str, address: str, method: str, duration: float,
                      error: Optional[BaseException], sent: bool) -> None:
        ident = threading.get_ident()
        spans = self._open.get(ident)
        if not spans:
            return
        span = spans.pop()
        if not spans:
            self._open.pop(ident, None)
        if error is not None:
            span.set_attribute("error.type", type(error).__qualname__)
            span.record_exception(error)
            span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
        span.end()
