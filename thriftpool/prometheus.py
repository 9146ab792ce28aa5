"""Prometheus metrics for thriftpool pools (``pip install thriftpool[prometheus]``).

::

    from thriftpool.prometheus import PrometheusExporter
    exporter = PrometheusExporter()                 # registers on prometheus_client's REGISTRY
    pool = ThriftPool(service, addresses, listeners=[exporter])

Read from ``pool.stats()`` at scrape time, so they cost nothing per call: the gauges
``thriftpool_connections{pool,instance,state="idle|in_use|opening"}``,
``thriftpool_waiting{pool}``, ``thriftpool_instance_healthy{pool,instance}``,
``thriftpool_max_size{pool}``, ``thriftpool_discovery_on_snapshot{pool}`` (1 while the
discovery's ``stats()["source"]`` is ``"snapshot"``), and the pool's cumulative counters (see
:meth:`~thriftpool.ThriftPool.stats`; do not call ``pop_stats()`` on a pool the exporter
reads, it resets them): ``thriftpool_connections_opened_total{pool,instance}``,
``thriftpool_checkouts_total{pool}``, ``thriftpool_checkouts_waited_total{pool}``,
``thriftpool_checkout_queue_seconds_total{pool}``,
``thriftpool_checkouts_exhausted_total{pool}``, ``thriftpool_too_many_waiters_total{pool}``,
``thriftpool_connect_errors_total{pool}``, ``thriftpool_connections_lost_total{pool}``,
``thriftpool_calls_total{pool}``, ``thriftpool_call_errors_total{pool}``,
``thriftpool_in_use_seconds_total{pool}``, ``thriftpool_connect_seconds_total{pool}``.
Kept from events: the counters ``thriftpool_connections_closed_total{pool,instance,reason}``
and ``thriftpool_instance_ejections_total{pool,instance}``, and the histogram
``thriftpool_checkout_wait_seconds{pool}``.

When discovery removes an instance, every series labelled with it is removed too, so a
fleet whose addresses churn (Kubernetes pods) does not grow the metrics forever; the
connections of a removed instance that close after its removal are not counted.  An
instance that comes back starts its counters from zero.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Dict, Iterator, Optional, Set, Tuple

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .events import PoolListener

if TYPE_CHECKING:
    from .pool import ThriftPool

__all__ = ["PrometheusExporter"]

#: How many removed instances are remembered, so that events arriving after the removal
#: (the close of a connection that was in use) do not make their series again.
_REMEMBER_REMOVED = 4096

_WAIT_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

#: The pool's counters (``stats()`` key, metric name without ``_total``, help, scale).
_POOL_COUNTERS = (
    ("checkouts", "checkouts", "Checkouts ended (connections given back).", 1.0),
    ("checkouts_waited", "checkouts_waited", "Checkouts that queued for a connection.", 1.0),
    ("wait_ms", "checkout_queue_seconds", "Time checkouts spent queued.", 0.001),
    ("exhausted", "checkouts_exhausted", "Checkouts that timed out waiting.", 1.0),
    ("too_many_waiters", "too_many_waiters", "Checkouts refused by max_waiting.", 1.0),
    ("connect_errors", "connect_errors", "Connects that failed or ran out of time.", 1.0),
    ("connections_lost", "connections_lost",
     "Connections closed because they were found broken.", 1.0),
    ("calls", "calls", "Calls made on checked-out clients and the proxy.", 1.0),
    ("call_errors", "call_errors", "Calls that raised.", 1.0),
    ("in_use_ms", "in_use_seconds", "Time connections spent checked out.", 0.001),
    ("connect_ms", "connect_seconds", "Time spent connecting.", 0.001),
)


class _PoolCollector:
    """Reads live counts from every attached pool when Prometheus scrapes."""

    def __init__(self, namespace: str) -> None:
        self._namespace = namespace
        self._pools: "weakref.WeakSet[ThriftPool]" = weakref.WeakSet()

    def add(self, pool: "ThriftPool") -> None:
        self._pools.add(pool)

    def describe(self) -> Iterator[Any]:
        return iter(())  # unchecked collector: metrics appear with the first pool

    def collect(self) -> Iterator[Any]:
        ns = self._namespace
        conns = GaugeMetricFamily(f"{ns}_connections", "Pooled connections by state.",
                                  labels=["pool", "instance", "state"])
        waiting = GaugeMetricFamily(f"{ns}_waiting", "Checkouts waiting for a connection "
                                    "(from any instance).", labels=["pool"])
        healthy = GaugeMetricFamily(f"{ns}_instance_healthy",
                                    "1 if the instance takes traffic, 0 if ejected.",
                                    labels=["pool", "instance"])
        max_size = GaugeMetricFamily(f"{ns}_max_size", "The per-instance connection cap.",
                                     labels=["pool"])
        on_snapshot = GaugeMetricFamily(
            f"{ns}_discovery_on_snapshot", "1 while discovery serves its snapshot file "
            "(the registry is unreachable), else 0.", labels=["pool"])
        opened = CounterMetricFamily(f"{ns}_connections_opened", "Connections opened.",
                                     labels=["pool", "instance"])
        counters = [(key, scale, CounterMetricFamily(f"{ns}_{name}", help_, labels=["pool"]))
                    for key, name, help_, scale in _POOL_COUNTERS]
        for pool in list(self._pools):
            if pool.closed:
                continue
            stats = pool.stats()
            waiting.add_metric([pool.name], stats["waiting"])
            max_size.add_metric([pool.name], stats["max_size"])
            on_snapshot.add_metric([pool.name], 1 if _discovery_source(pool) == "snapshot"
                                   else 0)
            for key, inst in stats["instances"].items():
                for state in ("idle", "in_use", "opening"):
                    conns.add_metric([pool.name, key, state], inst[state])
                healthy.add_metric([pool.name, key], 1 if inst["healthy"] else 0)
                opened.add_metric([pool.name, key], inst["opened"])
            for key, scale, family in counters:
                family.add_metric([pool.name], stats[key] * scale)
        yield conns
        yield waiting
        yield healthy
        yield max_size
        yield on_snapshot
        yield opened
        for _, _, family in counters:
            yield family


class PrometheusExporter(PoolListener):
    """A :class:`PoolListener` that keeps Prometheus metrics for every pool it is given to.

    :param registry: where to register the metrics (default: prometheus_client's global
        ``REGISTRY``); use a fresh ``CollectorRegistry`` per exporter in tests.
    :param namespace: prefix of every metric name.
    """

    def __init__(self, registry: Optional[CollectorRegistry] = None,
                 namespace: str = "thriftpool") -> None:
        registry = REGISTRY if registry is None else registry
        self._closed = Counter(f"{namespace}_connections_closed",
                               "Connections closed, by reason.", ["pool", "instance", "reason"],
                               registry=registry)
        self._ejected = Counter(f"{namespace}_instance_ejections",
                                "Times an instance was ejected.", ["pool", "instance"],
                                registry=registry)
        self._wait = Histogram(f"{namespace}_checkout_wait_seconds",
                               "Time a checkout waited for a connection.", ["pool"],
                               buckets=_WAIT_BUCKETS, registry=registry)
        self._wait_children: Dict[str, Any] = {}
        # Guards the maps below and the removal of label sets (no I/O under it).
        self._lock = threading.Lock()
        # (pool, instance) -> the close reasons it has series for.
        self._reasons: Dict[Tuple[str, str], Set[str]] = {}
        # Instances removed by discovery, oldest first: late events about them make no
        # new series.  Bounded, or churning addresses would grow it instead.
        self._removed: "OrderedDict[Tuple[str, str], None]" = OrderedDict()
        self._collector = _PoolCollector(namespace)
        registry.register(self._collector)  # type: ignore[arg-type]

    def attach_pool(self, pool: "ThriftPool") -> None:
        self._collector.add(pool)

    def connection_closed(self, pool: str, address: str, reason: str) -> None:
        key = (pool, address)
        with self._lock:
            if key in self._removed:
                return
            self._reasons.setdefault(key, set()).add(reason)
            child = self._closed.labels(pool, address, reason)
        child.inc()

    def checkout(self, pool: str, address: str, waited: float) -> None:
        child = self._wait_children.get(pool)
        if child is None:
            child = self._wait_children[pool] = self._wait.labels(pool)
        child.observe(waited)

    def instance_ejected(self, pool: str, address: str, reason: str, retry_in: float) -> None:
        with self._lock:
            if (pool, address) in self._removed:
                return
            child = self._ejected.labels(pool, address)
        child.inc()

    def instance_added(self, pool: str, address: str) -> None:
        with self._lock:
            self._removed.pop((pool, address), None)

    def instance_removed(self, pool: str, address: str) -> None:
        """Drop every series of the removed instance (see the module docstring)."""
        key = (pool, address)
        with self._lock:
            self._removed[key] = None
            self._removed.move_to_end(key)
            while len(self._removed) > _REMEMBER_REMOVED:
                self._removed.popitem(last=False)
            reasons = self._reasons.pop(key, set())
            _remove(self._ejected, pool, address)
            for reason in reasons:
                _remove(self._closed, pool, address, reason)


def _discovery_source(pool: "ThriftPool") -> Optional[str]:
    """``stats()["source"]`` of the pool's discovery (``None`` without one)."""
    stats = getattr(pool._discovery, "stats", None)
    if not callable(stats):
        return None
    try:
        source = stats().get("source")
    except Exception:
        return None
    return source if isinstance(source, str) else None


def _remove(metric: Any, *labels: str) -> None:
    try:
        metric.remove(*labels)
    except KeyError:
        pass  # never had that series
