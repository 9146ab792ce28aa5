"""DNS discovery against a real DNS server (dnsmasq on loopback, tests/dnsharness.py).

The records are edited by the test: scale out, scale in, SRV ports and weights, short
TTLs, a failure period with the server stopped, and a cold start with the server down.
What discovery delivers is checked from its listener; one test routes a real pool to
real thriftpy2 servers on several loopback addresses sharing one port.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from typing import Any, List

import pytest
import thriftpy2.rpc

import thriftpool
from servers import echo_thrift, wait_for

NAME = "echo.test"
LOGGER = "thriftpool.discovery"


class Snapshots:
    """A discovery listener that keeps every list it gets."""

    def __init__(self) -> None:
        self.lists: List[List[thriftpool.Endpoint]] = []
        self.lock = threading.Lock()

    def __call__(self, endpoints: List[thriftpool.Endpoint]) -> None:
        with self.lock:
            self.lists.append(endpoints)

    @property
    def last(self) -> List[str]:
        with self.lock:
            return [str(e) for e in self.lists[-1]] if self.lists else []


@pytest.fixture
def started():
    """Starts discoveries with a listener (``started(disc)``); stops them at teardown."""
    running = []

    def start(disc: thriftpool.DnsDiscovery, name: str = "dns") -> Snapshots:
        got = Snapshots()
        disc.start(got, name)
        running.append(disc)
        return got

    try:
        yield start
    finally:
        for disc in running:
            disc.stop()


def load(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


def dns(server: Any, name: str = NAME, **options: Any) -> thriftpool.DnsDiscovery:
    options.setdefault("refresh", 0.3)
    options.setdefault("timeout", 0.5)
    if not options.get("srv"):
        options.setdefault("port", 9090)
    return thriftpool.DnsDiscovery(name, nameservers=[server.nameserver], **options)


@pytest.mark.timeout(30)
def test_every_a_and_aaaa_record_is_an_instance_through_scale_out_and_in(
        no_thread_leak, dns_server, started):
    dns_server.set_hosts({NAME: ["127.0.0.2", "127.0.0.3", "::1"]})
    disc = dns(dns_server)
    got = started(disc)
    wait_for(lambda: got.last == ["127.0.0.2:9090", "127.0.0.3:9090", "[::1]:9090"], 5)
    first = got.lists[-1][0]
    assert first.metadata == {"format": "dns", "record": "A", "name": NAME}
    assert got.lists[-1][2].metadata["record"] == "AAAA"
    assert any(t.name == "thriftpool-dns-dns" and t.daemon for t in threading.enumerate())

    dns_server.set_hosts({NAME: ["127.0.0.2", "127.0.0.3", "127.0.0.4", "::1"]})  # out
    wait_for(lambda: "127.0.0.4:9090" in got.last, 3, message="the scale-out")
    dns_server.set_hosts({NAME: ["127.0.0.3", "127.0.0.4", "::1"]})  # in, by one
    wait_for(lambda: got.last == ["127.0.0.3:9090", "127.0.0.4:9090", "[::1]:9090"], 3)
    count = len(got.lists)
    time.sleep(1.0)  # several refreshes of an unchanged answer deliver nothing
    assert len(got.lists) == count
    stats = disc.stats()
    assert stats["source"] == "dns" and stats["instances"] == 3
    assert stats["resolutions"] >= 3 and stats["failures"] == 0 and stats["ttl"] == 30


class Server:
    """A real thriftpy2 echo server in this process, on one loopback address."""

    def __init__(self, host: str, port: int) -> None:
        class Handler:
            def echo(self, message: str) -> str:
                return message

            def whoami(self) -> str:
                return f"{host}:{port}"

            def ping(self) -> None:
                return None

        self.server = thriftpy2.rpc.make_server(echo_thrift.Echo, Handler(), host, port,
                                                client_timeout=None)
        self.thread = threading.Thread(target=self._serve, daemon=True,
                                       name=f"test-server-{host}")
        self.thread.start()
        wait_for(lambda: self._accepts(host, port), 5, message=f"{host}:{port} listening")

    def _serve(self) -> None:
        try:
            self.server.serve()
        except Exception:
            pass  # the listening socket was shut down by stop()

    @staticmethod
    def _accepts(host: str, port: int) -> bool:
        try:
            socket.create_connection((host, port), timeout=0.2).close()
            return True
        except OSError:
            return False

    def stop(self) -> None:
        # TThreadedServer.close() only sets a flag: shut the socket down to end accept().
        self.server.close()
        sock = self.server.trans.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        self.thread.join(5)
        assert not self.thread.is_alive()


def free_port_on(hosts: List[str]) -> int:
    for _ in range(50):
        with socket.socket() as s:
            s.bind((hosts[0], 0))
            port = s.getsockname()[1]
        try:
            for host in hosts[1:]:
                with socket.socket() as s:
                    s.bind((host, port))
            return int(port)
        except OSError:
            continue
    raise RuntimeError("no common free port")


@pytest.mark.timeout(40)
def test_pool_follows_the_name_to_real_servers(dns_server, make_pool):
    hosts = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
    port = free_port_on(hosts)
    servers = [Server(h, port) for h in hosts]
    try:
        dns_server.set_hosts({NAME: hosts[:2]})
        pool = make_pool(dns(dns_server, port=port), balancer="round_robin",
                         checkout_timeout=2.0)
        wait_for(lambda: sorted(pool.stats()["instances"]) ==
                 [f"{h}:{port}" for h in hosts[:2]], 5)
        seen = {pool.client().whoami() for _ in range(10)}
        assert seen == {f"{h}:{port}" for h in hosts[:2]}

        dns_server.set_hosts({NAME: hosts})
        wait_for(lambda: len(pool.stats()["instances"]) == 3, 3, message="scale-out")
        seen = {pool.client().whoami() for _ in range(15)}
        assert seen == {f"{h}:{port}" for h in hosts}

        dns_server.set_hosts({NAME: hosts[1:]})
        wait_for(lambda: f"{hosts[0]}:{port}" not in pool.stats()["instances"], 3)
        seen = {pool.client().whoami() for _ in range(10)}
        assert seen == {f"{h}:{port}" for h in hosts[1:]}
    finally:
        for s in servers:
            s.stop()


@pytest.mark.timeout(30)
def test_a_failure_period_keeps_the_last_list(dns_server, started, caplog):
    caplog.set_level(logging.INFO, logger="thriftpool.discovery.dns")
    dns_server.set_hosts({NAME: ["127.0.0.2", "127.0.0.3"]})
    disc = dns(dns_server)
    got = started(disc)
    wait_for(lambda: len(got.last) == 2, 5)
    count = len(got.lists)

    dns_server.stop()
    wait_for(lambda: disc.stats()["failures"] >= 3, 10, message="failed resolutions")
    assert got.last == ["127.0.0.2:9090", "127.0.0.3:9090"] and len(got.lists) == count
    assert "Timeout" in disc.stats()["last_error"]
    warned = [r for r in caplog.records if r.levelno == logging.WARNING
              and "resolving echo.test failed" in r.getMessage()]
    assert len(warned) == 1  # once per kind of failure, not per retry

    dns_server.set_hosts({NAME: ["127.0.0.3", "127.0.0.5"]}, wait=False)
    dns_server.start()
    wait_for(lambda: got.last == ["127.0.0.3:9090", "127.0.0.5:9090"], 10,
             message="the new list after the outage")
    assert disc.stats()["last_error"] is None
    assert any("works again" in r.getMessage() for r in caplog.records)


@pytest.mark.timeout(30)
def test_srv_records_give_ports_and_weights(dns_server, started):
    srv = "_thrift._tcp.echo.test"
    dns_server.set_hosts({"a.test": ["127.0.0.2"], "b.test": ["127.0.0.3", "::1"]})
    dns_server.set_srv([(srv, "a.test", 9091, 0, 30), (srv, "b.test", 9092, 0, 10),
                        (srv, "c.test", 9093, 1, 0)])  # c.test has no address
    disc = dns(dns_server, name=srv, srv=True, max_drop_fraction=None)  # no hold
    got = started(disc)
    wait_for(lambda: len(got.last) == 3, 5)
    by_address = {str(e): e for e in got.lists[-1]}
    assert sorted(by_address) == ["127.0.0.2:9091", "127.0.0.3:9092", "[::1]:9092"]
    assert by_address["127.0.0.2:9091"].weight == 30
    assert by_address["127.0.0.3:9092"].weight == 10
    assert by_address["[::1]:9092"].metadata == {
        "format": "dns", "record": "SRV", "name": srv, "target": "b.test", "priority": 0,
        "weight": 10}

    dns_server.set_srv([(srv, "a.test", 9091, 0, 0)])  # scale in; weight 0 counts as 1
    wait_for(lambda: got.last == ["127.0.0.2:9091"], 5)
    assert got.lists[-1][0].weight == 1


@pytest.mark.timeout(30)
def test_a_short_ttl_re_resolves_before_refresh(dns_server, started):
    dns_server.stop()
    dns_server.ttl = 1
    dns_server.start()
    dns_server.set_hosts({NAME: ["127.0.0.2"]})
    disc = dns(dns_server, refresh=60.0)
    got = started(disc)
    wait_for(lambda: got.last == ["127.0.0.2:9090"], 5)
    assert disc.stats()["ttl"] == 1
    changed = time.monotonic()
    dns_server.set_hosts({NAME: ["127.0.0.2", "127.0.0.3"]})
    wait_for(lambda: len(got.last) == 2, 8, message="a re-resolution at the TTL")
    assert time.monotonic() - changed < 6.0  # far below refresh=60


@pytest.mark.timeout(30)
def test_a_vanished_name_is_held_then_confirmed_and_one_removal_is_not(dns_server, started,
                                                                      caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    dns_server.set_hosts({NAME: ["127.0.0.2", "127.0.0.3", "127.0.0.4"],
                          "other.test": ["127.0.0.9"]})
    disc = dns(dns_server, drop_confirm_delay=1.5)
    got = started(disc)
    wait_for(lambda: len(got.last) == 3, 5)

    dns_server.set_hosts({NAME: ["127.0.0.2", "127.0.0.3"], "other.test": ["127.0.0.9"]})
    wait_for(lambda: len(got.last) == 2, 3, message="one removal applied at once")
    assert disc.stats()["drops_held"] == 0

    dns_server.set_hosts({"other.test": ["127.0.0.9"]})  # the name is gone: NXDOMAIN
    wait_for(lambda: disc.stats()["drops_held"] == 1, 3, message="the hold")
    held_at = time.monotonic()
    assert got.last == ["127.0.0.2:9090", "127.0.0.3:9090"]
    assert disc.stats()["holding"] == ["127.0.0.2:9090", "127.0.0.3:9090"]
    wait_for(lambda: got.last == [], 5, message="the confirmed removal")
    assert time.monotonic() - held_at >= 1.0
    stats = disc.stats()
    assert stats["drops_confirmed"] == 1 and stats["holding"] == []
    messages = [r.getMessage() for r in caplog.records]
    assert any("holding the removal of 2" in m for m in messages)
    assert any("confirmed: removing 2" in m for m in messages)


@pytest.mark.timeout(30)
def test_cold_start_with_dns_down_serves_the_snapshot(dns_server, started, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    path = str(tmp_path / "echo.json")
    dns_server.set_hosts({NAME: ["127.0.0.2", "127.0.0.3"]})
    first = dns(dns_server, snapshot_path=path)
    got = started(first, "first")
    wait_for(lambda: len(got.last) == 2 and os.path.exists(path), 5)
    wait_for(lambda: first.stats()["snapshot_writes"] >= 1, 5)
    first.stop()
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert load(path)["source"] == "dns:echo.test:9090"

    dns_server.stop()
    disc = dns(dns_server, snapshot_path=path, connect_timeout=0.5)
    began = time.monotonic()
    got = started(disc, "cold")
    wait_for(lambda: got.last == ["127.0.0.2:9090", "127.0.0.3:9090"], 5,
             message="the snapshot served")
    assert time.monotonic() - began < 5.0
    stats = disc.stats()
    assert stats["source"] == "snapshot" and stats["snapshot_age"] >= 0
    assert any("serving the snapshot" in r.getMessage() for r in caplog.records)

    dns_server.set_hosts({NAME: ["127.0.0.3", "127.0.0.4"]}, wait=False)
    dns_server.start()
    wait_for(lambda: got.last == ["127.0.0.3:9090", "127.0.0.4:9090"], 10,
             message="the first resolution replaces the snapshot")
    assert disc.stats()["source"] == "dns" and disc.stats()["snapshot_age"] is None
    # Written right after the listener got the list.
    wait_for(lambda: [(r["host"], r["port"]) for r in load(path)["instances"]] ==
             [("127.0.0.3", 9090), ("127.0.0.4", 9090)], 5, message="the new file")


@pytest.mark.timeout(20)
def test_filter_selects_instances(dns_server, started):
    dns_server.set_hosts({NAME: ["127.0.0.2", "127.0.0.3", "::1"]})
    got = started(dns(dns_server, filter=lambda e: e.metadata["record"] == "AAAA"))
    wait_for(lambda: got.last == ["[::1]:9090"], 5)


@pytest.mark.timeout(20)
def test_stop_wakes_the_worker_at_once_and_is_idempotent(no_thread_leak, dns_server):
    dns_server.set_hosts({NAME: ["127.0.0.2"]})
    got = Snapshots()
    disc = dns(dns_server, refresh=60.0)
    disc.start(got, "stopper")
    wait_for(lambda: got.last, 5)
    began = time.monotonic()
    disc.stop()
    assert time.monotonic() - began < 2.0  # not refresh=60
    disc.stop()
    assert not any(t.name == "thriftpool-stopper-dns" for t in threading.enumerate())
    disc.start(got, "stopper")  # a stopped discovery can start again
    disc.stop()


@pytest.mark.parametrize("kwargs, option", [
    (dict(name="echo.test"), "port"),
    (dict(name="echo.test", port=0), "port"),
    (dict(name="_x._tcp.echo.test", port=9090, srv=True), "port"),
    (dict(name="bad name", port=1), "name"),
    (dict(name="echo.test", port=1, refresh=0), "refresh"),
    (dict(name="echo.test", port=1, timeout=-1), "timeout"),
    (dict(name="echo.test", port=1, nameservers=["dns.example"]), "nameservers"),
    (dict(name="echo.test", port=1, nameservers=[]), "nameservers"),
    (dict(name="echo.test", port=1, weight=0), "weight"),
    (dict(name="echo.test", port=1, max_drop_fraction=1.5), "max_drop_fraction"),
    (dict(name="echo.test", port=1, filter="yes"), "filter"),
    (dict(name="echo.test", port=1, srv="yes"), "srv"),
])
def test_invalid_options_raise_value_error_naming_them(kwargs, option):
    with pytest.raises(ValueError, match=option):
        thriftpool.DnsDiscovery(**kwargs)


def test_without_dnspython_the_error_names_the_extra():
    code = ("import sys; sys.modules['dns'] = None\n"
            "import thriftpool\n"
            "try:\n"
            "    thriftpool.DnsDiscovery('echo.test', port=1)\n"
            "except ImportError as exc:\n"
            "    print(exc)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=30)
    assert "pip install 'thriftpool[dns]'" in out.stdout, out.stderr
