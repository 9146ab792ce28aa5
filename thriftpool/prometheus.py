"""Prometheus metrics for thriftpool pools (``pip install thriftpool[prometheus]``).

::

    from thriftpool.prometheus import PrometheusExporter
    exporter = PrometheusExporter()                 # registers on prometheus_client's REGISTRY
    pool = ThriftPool(service, addresses, listeners=[exporter])

Gauges (read from ``pool.stats()`` at scrape time, so they cost nothing per call):
``thriftpool_connections{pool,instance,state="idle|in_use|opening"}``,
``thriftpool_waiting{pool}``, ``thriftpool_instance_healthy{pool,instance}``.
Counters: ``thriftpool_connections_opened_total{pool,instance}``,
``thriftpool_connections_closed_total{pool,instance,reason}``,
``thriftpool_checkouts_exhausted_total{pool,instance}``,
``thriftpool_instance_ejections_total{pool,instance}``.
Histogram: ``thriftpool_checkout_wait_seconds{pool}``.

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
from prometheus_client.core import GaugeMetricFamily

from .events import ExhaustedEvent, PoolListener

if TYPE_CHECKING:
    from .pool import ThriftPool

__all__ = ["PrometheusExporter"]

#: How many removed instances are remembered, so that events arriving after the removal
#: (the close of a connection that was in use) do not make their series again.
_REMEMBER_REMOVED = 4096

_WAIT_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class _PoolCollector:
    """Reads live counts from every attached pool when Prometheus scrapes."""

    def __init__(self, namespace: str) -> None:
        self._namespace = namespace
        self._pools: "weakref.WeakSet[ThriftPool]" = weakref.WeakSet()

    def add(self, pool: "ThriftPool") -> None:
        self._pools.add(pool)

    def describe(self) -> Iterator[Any]:
        return iter(())  # unchecked collector: metrics appear with the first pool

    def collect(self) -> Iterator[GaugeMetricFamily]:
        ns = self._namespace
        conns = GaugeMetricFamily(f"{ns}_connections", "Pooled connections by state.",
                                  labels=["pool", "instance", "state"])
        waiting = GaugeMetricFamily(f"{ns}_waiting", "Checkouts waiting for a connection "
                                    "(from any instance).", labels=["pool"])
        healthy = GaugeMetricFamily(f"{ns}_instance_healthy",
                                    "1 if the instance takes traffic, 0 if ejected.",
                                    labels=["pool", "instance"])
        for pool in list(self._pools):
            if pool.closed:
                continue
            stats = pool.stats()
            waiting.add_metric([pool.name], stats["waiting"])
            for key, inst in stats["instances"].items():
                for state in ("idle", "in_use", "opening"):
                    conns.add_metric([pool.name, key, state], inst[state])
                healthy.add_metric([pool.name, key], 1 if inst["healthy"] else 0)
        yield conns
        yield waiting
        yield healthy


class PrometheusExporter(PoolListener):
    """A :class:`PoolListener` that keeps Prometheus metrics for every pool it is given to.

    :param registry: where to register the metrics (default: prometheus_client's global
        ``REGISTRY``); use a fresh ``CollectorRegistry`` per exporter in tests.
    :param namespace: prefix of every metric name.
    """

    def __init__(self, registry: Optional[CollectorRegistry] = None,
                 namespace: str = "thriftpool") -> None:
        registry = REGISTRY if registry is None else registry
        self._opened = Counter(f"{namespace}_connections_opened",
                               "Connections opened.", ["pool", "instance"], registry=registry)
        self._closed = Counter(f"{namespace}_connections_closed",
                               "Connections closed, by reason.", ["pool", "instance", "reason"],
                               registry=registry)
        self._exhausted = Counter(f"{namespace}_checkouts_exhausted",
                                  "Checkouts that timed out waiting.", ["pool", "instance"],
                                  registry=registry)
        self._ejected = Counter(f"{namespace}_instance_ejections",
                                "Times an instance was ejected.", ["pool", "instance"],
                                registry=registry)
        self._wait = Histogram(f"{namespace}_checkout_wait_seconds",
                               "Time a checkout waited for a connection.", ["pool"],
                               buckets=_WAIT_BUCKETS, registry=registry)
        self._wait_children: Dict[str, Any] = {}
        self._opened_children: Dict[Tuple[str, str], Any] = {}
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

    def connection_opened(self, pool: str, address: str) -> None:
        key = (pool, address)
        with self._lock:
            if key in self._removed:
                return
            child = self._opened_children.get(key)
            if child is None:
                child = self._opened_children[key] = self._opened.labels(pool, address)
        child.inc()

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

    def exhausted(self, pool: str, event: ExhaustedEvent) -> None:
        with self._lock:
            if (pool, event.address) in self._removed:
                return
            child = self._exhausted.labels(pool, event.address)
        child.inc()

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
            self._opened_children.pop(key, None)
            reasons = self._reasons.pop(key, set())
            for metric in (self._opened, self._exhausted, self._ejected):
                _remove(metric, pool, address)
            for reason in reasons:
                _remove(self._closed, pool, address, reason)


def _remove(metric: Any, *labels: str) -> None:
    try:
        metric.remove(*labels)
    except KeyError:
        pass  # never had that series
