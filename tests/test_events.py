"""Pool events for listeners, logging discipline, and the Prometheus exporter."""

from __future__ import annotations

import logging
import threading
from typing import Any, List, Tuple

import pytest
from thriftpy2.transport import TTransportException
from prometheus_client import CollectorRegistry, generate_latest

import thriftpool
from servers import wait_for
from thriftpool.prometheus import PrometheusExporter


class Recorder(thriftpool.PoolListener):
    def __init__(self) -> None:
        self.events: List[Tuple[Any, ...]] = []
        self.lock = threading.Lock()

    def _add(self, *event: Any) -> None:
        with self.lock:
            self.events.append(event)

    def connection_opened(self, pool, address):
        self._add("opened", address)

    def connection_closed(self, pool, address, reason):
        self._add("closed", address, reason)

    def checkout(self, pool, address, waited):
        self._add("checkout", address, waited)

    def exhausted(self, pool, event):
        self._add("exhausted", event.address)

    def instance_added(self, pool, address):
        self._add("added", address)

    def instance_removed(self, pool, address):
        self._add("removed", address)

    def instance_ejected(self, pool, address, reason, retry_in):
        self._add("ejected", address, reason)

    def instance_restored(self, pool, address):
        self._add("restored", address)

    def reasons(self) -> List[str]:
        with self.lock:
            return [e[2] for e in self.events if e[0] == "closed"]

    def kinds(self) -> List[str]:
        with self.lock:
            return [e[0] for e in self.events]


class ManualDiscovery(thriftpool.Discovery):
    """A real Discovery whose list the test sets (as ZooKeeper would)."""

    def __init__(self, addresses: List[str]) -> None:
        self.listener = None
        self.addresses = addresses

    def start(self, listener, pool_name):
        self.listener = listener
        self.publish(self.addresses)

    def publish(self, addresses: List[str]) -> None:
        self.listener([thriftpool.Endpoint(thriftpool.parse_address(a)) for a in addresses])

    def stop(self):
        pass


@pytest.mark.timeout(60)
def test_listener_sees_connection_lifecycle_with_reasons(farm, service):
    a, b = farm.start(2)
    rec = Recorder()
    discovery = ManualDiscovery([a.address, b.address])
    pool = thriftpool.ThriftPool(service, discovery, listeners=[rec], min_size=0,
                                 initial_size=0, max_size=1, checkout_timeout=0.1,
                                 idle_timeout=0.2, watchdog_interval=0.05,
                                 balancer="round_robin")
    try:
        assert rec.kinds()[:2] == ["added", "added"]
        with pool.checkout() as client:
            held = client.whoami()
            other = b.address if held == a.address else a.address
            with pool.checkout() as client2:  # the other instance
                assert client2.whoami() == other
                with pytest.raises(thriftpool.PoolExhausted):
                    with pool.checkout():
                        pass
        assert ("exhausted", a.address) in rec.events or ("exhausted", b.address) in rec.events
        assert rec.kinds().count("opened") == 2
        assert rec.kinds().count("checkout") == 2
        # idle reaping (min_size=0): both close with reason "idle"
        wait_for(lambda: rec.reasons().count("idle") == 2, message="idle closes")
        # a socket the server dropped is found at checkout: "peer_closed"
        with pool.checkout() as client:
            client.ping()
        a.drop()
        b.drop()
        wait_for(lambda: a.stats()["open"] == 0 and b.stats()["open"] == 0)
        for _ in range(2):  # round robin: one checkout per instance
            with pool.checkout() as client:
                client.ping()
        assert "peer_closed" in rec.reasons()
        # a timed-out call: "error"
        with pytest.raises(OSError):  # socket.timeout
            with pool.checkout(timeout=1) as client:
                client._conn.socket.sock.settimeout(0.05)
                client.sleep(500)
        assert "error" in rec.reasons()
        # discovery drops an instance: "removed" events
        with pool.checkout() as client:
            client.ping()
        discovery.publish([a.address])
        wait_for(lambda: ("removed", b.address) in rec.events)
    finally:
        pool.close()
    assert rec.reasons()[-1] in ("pool_closed", "removed", "idle")


@pytest.mark.timeout(60)
def test_ejected_and_restored_events(farm, service):
    server = farm.one()
    rec = Recorder()
    pool = thriftpool.ThriftPool(service, [server.address], listeners=[rec], min_size=1,
                                 backoff_initial=0.1, backoff_max=0.2, watchdog_interval=0.05)
    try:
        assert pool.client().echo("x") == "x"
        server.kill()
        with pytest.raises((TTransportException, thriftpool.NoAvailableInstance)):
            for _ in range(3):
                pool.client().echo("down")
        wait_for(lambda: "ejected" in rec.kinds(), message="ejection event")
        server.restart()
        wait_for(lambda: "restored" in rec.kinds(), timeout=15, message="restore event")
        wait_for(lambda: _call_ok(pool), timeout=10)
    finally:
        pool.close()


def _call_ok(pool) -> bool:
    try:
        return pool.client().echo("back") == "back"
    except Exception:
        return False


@pytest.mark.timeout(30)
def test_failing_listener_never_breaks_the_pool(farm, service, caplog):
    class Broken(thriftpool.PoolListener):
        def connection_opened(self, pool, address):
            raise RuntimeError("listener bug")

        def checkout(self, pool, address, waited):
            raise RuntimeError("listener bug")

    server = farm.one()
    with thriftpool.ThriftPool(service, [server.address], listeners=[Broken()]) as pool:
        assert [pool.client().echo(str(i)) for i in range(5)] == [str(i) for i in range(5)]
    assert any("listener" in r.getMessage() and r.levelno == logging.ERROR
               for r in caplog.records)


def test_listeners_are_validated(service):
    with pytest.raises(ValueError, match="listeners"):
        thriftpool.ThriftPool(service, ["127.0.0.1:1"], listeners=[object()])
    with pytest.raises(ValueError, match="listeners"):
        thriftpool.ThriftPool(service, ["127.0.0.1:1"], listeners="x")


@pytest.mark.timeout(30)
def test_no_log_lines_per_call_at_info(farm, service, caplog):
    server = farm.one()
    with thriftpool.ThriftPool(service, [server.address]) as pool:
        proxy = pool.client()
        proxy.echo("warm up")
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="thriftpool"):
            for i in range(200):
                assert proxy.echo(str(i)) == str(i)
                with pool.checkout() as client:
                    client.ping()
        assert [r.getMessage() for r in caplog.records if r.name.startswith("thriftpool")] == []


@pytest.mark.timeout(30)
def test_prometheus_exporter(farm, service):
    server = farm.one()
    registry = CollectorRegistry()
    exporter = PrometheusExporter(registry=registry)
    with thriftpool.ThriftPool(service, [server.address], name="echo", listeners=[exporter],
                               min_size=1, max_size=2, checkout_timeout=0.05) as pool:
        for i in range(10):
            pool.client().echo(str(i))
        with pool.checkout():
            with pool.checkout():
                with pytest.raises(thriftpool.PoolExhausted):
                    with pool.checkout():
                        pass
                text = generate_latest(registry).decode()
                assert f'thriftpool_connections{{instance="{server.address}",pool="echo",' \
                       f'state="in_use"}} 2.0' in text
        text = generate_latest(registry).decode()
    assert f'thriftpool_connections_opened_total{{instance="{server.address}",pool="echo"}} 2.0' \
        in text
    # The pool's counters, read from pool.stats() (waiters are pool-wide: no instance).
    assert 'thriftpool_checkouts_exhausted_total{pool="echo"} 1.0' in text
    assert 'thriftpool_calls_total{pool="echo"} 10.0' in text
    assert 'thriftpool_checkouts_total{pool="echo"} 12.0' in text
    assert 'thriftpool_max_size{pool="echo"} 2.0' in text
    assert 'thriftpool_checkout_wait_seconds_count{pool="echo"} 12.0' in text
    assert f'thriftpool_instance_healthy{{instance="{server.address}",pool="echo"}} 1.0' in text
    after = generate_latest(registry).decode()
    assert 'reason="pool_closed"' in after
