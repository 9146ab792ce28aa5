"""The Prometheus exporter forgets removed instances, so churning addresses do not grow
the metrics forever."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest

import thriftpool
from servers import wait_for
from test_events import ManualDiscovery
from thriftpool.prometheus import PrometheusExporter


@pytest.mark.timeout(60)
def test_label_sets_of_removed_instances_are_removed(farm, service):
    a, b = farm.start(2)
    registry = CollectorRegistry()
    exporter = PrometheusExporter(registry=registry)
    discovery = ManualDiscovery([a.address, b.address])
    with thriftpool.ThriftPool(service, discovery, name="churn", listeners=[exporter],
                               balancer="round_robin", min_size=1,
                               watchdog_interval=0.1) as pool:
        for _ in range(10):
            pool.client().echo("x")
        text = generate_latest(registry).decode()
        for server in (a, b):
            assert f'thriftpool_connections_opened_total{{instance="{server.address}"' in text

        discovery.publish([a.address])  # b leaves: its series go
        wait_for(lambda: b.open_connections() == 0, 5, message="b's connections closed")
        text = generate_latest(registry).decode()
        assert f'instance="{b.address}"' not in text
        assert f'thriftpool_connections_opened_total{{instance="{a.address}"' in text

        # Many addresses come and go: the exporter keeps series for the live ones only.
        # (On 127.0.0.2, where no test server listens: a server of the farm may have any
        # port on 127.0.0.1, 40009 included.)
        for round_ in range(3):
            discovery.publish([a.address, f"127.0.0.2:{40000 + round_}"])
            discovery.publish([a.address])
        text = generate_latest(registry).decode()
        assert "127.0.0.2:" not in text

        discovery.publish([a.address, b.address])  # b comes back: counted from zero
        wait_for(lambda: f'thriftpool_connections_opened_total{{instance="{b.address}"'
                 in generate_latest(registry).decode(), 5, message="b counted again")
