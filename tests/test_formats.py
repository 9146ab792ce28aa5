"""Record formats and hostile data in ZooKeeper, and the validated Endpoint.

Each format is written with its real layout by kazoo: a Curator ``ServiceDiscovery``
tree (``<base>/<service>/<id>``, ephemeral instance nodes holding Curator's JSON), Finagle
ServerSet members (``member_`` sequential nodes), thriftpool's own registrations and bare
``host:port`` names.  Hostile children (absurd numbers, NUL bytes, a megabyte of data,
2,000 children at once) are skipped with one warning each while the healthy ones serve.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any, Dict, List, Optional

import pytest

import thriftpool
from servers import wait_for
from test_zookeeper import (
    DISCOVERY_LOGGER,
    answers,
    discovery,
    instances,
    make_pool,
    register,
    warnings_about,
)


class Snapshots:
    def __init__(self) -> None:
        self.lists: List[List[thriftpool.Endpoint]] = []

    def __call__(self, endpoints: List[thriftpool.Endpoint]) -> None:
        self.lists.append(endpoints)

    def last(self) -> Dict[str, thriftpool.Endpoint]:
        return {str(e): e for e in self.lists[-1]} if self.lists else {}


def follow(zk: Any, path: str, **options: Any) -> Snapshots:
    got = Snapshots()
    disc = discovery(zk, path=path, **options)
    disc.start(got, "formats")
    zk.closing(disc)
    return got


def curator_instance(name: str, port: Optional[int], ssl_port: Optional[int] = None,
                     payload: Any = None, enabled: Optional[bool] = None,
                     address: str = "127.0.0.1") -> Dict[str, Any]:
    """What Curator's JsonInstanceSerializer writes for a ServiceInstance (Curator 5 adds
    ``enabled``); the payload as Spring Cloud Zookeeper registers it."""
    doc: Dict[str, Any] = {
        "name": name, "id": str(uuid.uuid4()), "address": address, "port": port,
        "sslPort": ssl_port, "payload": payload,
        "registrationTimeUTC": int(time.time() * 1000), "serviceType": "DYNAMIC",
        "uriSpec": {"parts": [{"value": "scheme", "variable": True},
                              {"value": "://", "variable": False},
                              {"value": "address", "variable": True},
                              {"value": ":", "variable": False},
                              {"value": "port", "variable": True}]},
    }
    if enabled is not None:
        doc["enabled"] = enabled
    return doc


def create_curator(admin: Any, base: str, doc: Dict[str, Any]) -> str:
    # Curator: client.create().creatingParentContainersIfNeeded().withMode(EPHEMERAL)
    #          .forPath(ZKPaths.makePath(basePath, name, id), serializer.serialize(i)).
    # kazoo cannot make container nodes, so the parents here are persistent; discovery
    # reads both the same way.
    path = f"{base}/{doc['name']}/{doc['id']}"
    admin.create(path, json.dumps(doc).encode(), ephemeral=True, makepath=True)
    return path


# -- Curator --------------------------------------------------------------------------------

@pytest.mark.timeout(30)
def test_curator_service_instances_are_read_with_their_payload(zk, farm, caplog):
    caplog.set_level(logging.WARNING, logger=DISCOVERY_LOGGER)
    plain, other = farm.start(2)
    admin = zk.client()
    base = "/curator/discovery"
    payload = {"@class": "org.springframework.cloud.zookeeper.discovery.ZookeeperInstance",
               "id": "echo", "name": "echo", "metadata": {"instance_status": "UP",
                                                          "zone": "a"}}
    up = curator_instance("echo", plain.port, payload=payload)
    tls = curator_instance("echo", None, ssl_port=9443, address="127.0.0.9")
    disabled = curator_instance("echo", other.port, enabled=False)
    for doc in (up, tls, disabled):
        create_curator(admin, base, doc)
    create_curator(admin, base, curator_instance("billing", 7000))  # another service

    got = follow(zk, f"{base}/echo")
    wait_for(lambda: len(got.last()) == 2, 5)
    seen = got.last()
    assert sorted(seen) == [plain.address, "127.0.0.9:9443"]
    endpoint = seen[plain.address]
    assert endpoint.tls is False
    assert endpoint.metadata["format"] == "curator"
    assert endpoint.metadata["id"] == up["id"] and endpoint.metadata["name"] == "echo"
    assert endpoint.metadata["payload"]["metadata"]["zone"] == "a"
    assert endpoint.metadata["serviceType"] == "DYNAMIC"
    assert seen["127.0.0.9:9443"].tls is True  # sslPort only: TLS
    assert warnings_about(caplog, base) == []

    # A pool routes to it, and a filter on the payload selects instances.
    pool = make_pool(zk, discovery(zk, path=f"{base}/echo", filter=lambda e: e.metadata.get(
        "payload") is not None and e.metadata["payload"]["metadata"]["zone"] == "a"))
    wait_for(lambda: instances(pool) == [plain.address], 5)
    assert answers(pool, 3) == {plain.address: 3}


@pytest.mark.timeout(40)
def test_a_thousand_curator_instances_are_applied_in_under_two_seconds(zk, make_pool):
    admin = zk.client()
    base, service = "/curator/discovery", "big"
    admin.ensure_path(f"{base}/{service}")
    results = []
    for i in range(1000):
        doc = curator_instance(service, 9, address=f"127.1.{i // 250}.{i % 250 + 1}")
        results.append(admin.create_async(f"{base}/{service}/{doc['id']}",
                                          json.dumps(doc).encode(), ephemeral=True))
    for r in results:
        r.get(timeout=10)
    began = time.monotonic()
    pool = make_pool(discovery(zk, path=f"{base}/{service}"), min_size=0,
                     watchdog_interval=5.0)
    wait_for(lambda: len(pool.stats()["instances"]) == 1000, 10)
    elapsed = time.monotonic() - began
    print(f"1000 Curator instances read and applied in {elapsed:.2f}s")
    assert elapsed < 2.0, elapsed


# -- Finagle ServerSets -----------------------------------------------------------------------

@pytest.mark.timeout(30)
def test_serverset_additional_endpoints_and_shards(zk, farm):
    admin_server, thrift_a, thrift_b = farm.start(3)
    admin = zk.client()

    def member(shard: int, thrift: Any, status: str = "ALIVE") -> bytes:
        return json.dumps({
            "serviceEndpoint": {"host": "127.0.0.1", "port": admin_server.port},
            "additionalEndpoints": {"thrift": {"host": "127.0.0.1", "port": thrift.port},
                                    "http": {"host": "127.0.0.1", "port": 1}},
            "status": status, "shard": shard}).encode()

    admin.create(f"{zk.path}/member_", member(0, thrift_a), sequence=True, makepath=True)
    admin.create(f"{zk.path}/member_", member(1, thrift_b), sequence=True)
    admin.create(f"{zk.path}/member_", json.dumps({
        "serviceEndpoint": {"host": "127.0.0.1", "port": 2}, "status": "ALIVE"}).encode(),
        sequence=True)  # no "thrift" endpoint: skipped with a warning

    got = follow(zk, zk.path, endpoint="thrift")
    wait_for(lambda: len(got.last()) == 2, 5)
    seen = got.last()
    assert sorted(seen) == sorted([thrift_a.address, thrift_b.address])
    assert seen[thrift_a.address].metadata == {
        "format": "serverset", "status": "ALIVE", "shard": 0, "endpoint": "thrift"}
    assert seen[thrift_b.address].metadata["shard"] == 1

    default = follow(zk, zk.path)  # serviceEndpoint: the same admin port for every member
    wait_for(lambda: sorted(default.last()) == sorted([admin_server.address,
                                                         "127.0.0.1:2"]), 5)

    shard1 = make_pool(zk, discovery(zk, endpoint="thrift",
                                     filter=lambda e: e.metadata.get("shard") == 1))
    wait_for(lambda: instances(shard1) == [thrift_b.address], 5)
    assert answers(shard1, 3) == {thrift_b.address: 3}


# -- thriftpool's own records and node names --------------------------------------------------

@pytest.mark.timeout(30)
def test_registration_metadata_and_host_port_names(zk, farm):
    a, b, named = farm.start(3)
    register(zk, a, metadata={"zone": "a", "version": "1.2"})
    register(zk, b, metadata={"zone": "b"})
    zk.client().create(f"{zk.path}/{named.address}", b"")
    got = follow(zk, zk.path)
    wait_for(lambda: len(got.last()) == 3, 5)
    seen = got.last()
    assert seen[a.address].metadata == {"format": "thriftpool", "zone": "a",
                                        "version": "1.2"}
    assert seen[named.address].metadata == {"format": "name"}
    pool = make_pool(zk, discovery(zk, filter=lambda e: e.metadata.get("zone") == "b"))
    wait_for(lambda: instances(pool) == [b.address], 5)


# -- hostile children -------------------------------------------------------------------------

HOSTILE = {
    "huge-weight": b'{"host": "127.0.0.1", "port": 1, "weight": 1' + b"0" * 309 + b"}",
    "float-weight": b'{"host": "127.0.0.1", "port": 2, "weight": 1.5}',
    "big-weight": b'{"host": "127.0.0.1", "port": 3, "weight": 1000001}',
    "inf-weight": b'{"host": "127.0.0.1", "port": 4, "weight": 1e999}',
    "nul-host": b'{"host": "127.0.0\\u0000.1", "port": 5}',
    "long-host": json.dumps({"host": "a" * 254, "port": 6}).encode(),
    "bad-chars": json.dumps({"host": "evil host;rm", "port": 7}).encode(),
    "huge-port": b'{"host": "127.0.0.1", "port": 1' + b"0" * 400 + b"}",
    "deep": b"[" * 100000 + b"]" * 100000,
    # A megabyte, just under ZooKeeper's default jute.maxbuffer (1 MiB with the request).
    "megabyte": json.dumps({"host": "h" * 1_000_000, "port": 8}).encode(),
}


def create_hostile(admin: Any, path: str) -> None:
    admin.ensure_path(path)
    for name, data in HOSTILE.items():
        admin.create(f"{path}/{name}", data)
    # A NUL in the node name is refused by ZooKeeper itself; in an IPv6-looking name:
    admin.create(f"{path}/[::1:5", b"")


@pytest.mark.timeout(60)
def test_hostile_children_are_skipped_and_never_break_checkouts(zk, farm, caplog):
    caplog.set_level(logging.WARNING, logger=DISCOVERY_LOGGER)
    server = farm.one()
    admin = zk.client()
    create_hostile(admin, zk.path)
    register(zk, server)
    disc = discovery(zk)
    pool = make_pool(zk, disc, balancer="least_loaded")
    wait_for(lambda: instances(pool) == [server.address], 10)
    for balancer in ("round_robin", "random", "least_loaded"):
        p = make_pool(zk, discovery(zk), balancer=balancer, name=balancer)
        wait_for(lambda p=p: instances(p) == [server.address], 10)
        assert answers(p, 3) == {server.address: 3}
    for name in HOSTILE:
        found = warnings_about(caplog, f"{zk.path}/{name}:")
        assert len(found) >= 1, name
        assert all(len(m) < 500 for m in found), (name, len(found[0]))  # no megabyte logs
    assert warnings_about(caplog, "not an integer in 1..1000000")
    assert disc.stats()["children"] == len(HOSTILE) + 2


@pytest.mark.timeout(90)
@pytest.mark.slow
def test_two_thousand_children_at_once_with_hostile_ones(zk, caplog):
    caplog.set_level(logging.WARNING, logger=DISCOVERY_LOGGER)
    admin = zk.client()
    create_hostile(admin, zk.path)
    got = follow(zk, zk.path)
    wait_for(lambda: got.lists, 10)
    assert got.lists[-1] == []
    # 2,000 children appear in one transaction: one watch event, one read of all.
    for chunk in range(4):
        t = admin.transaction()
        for i in range(500):
            n = chunk * 500 + i
            host = f"127.2.{n // 250}.{n % 250 + 1}"
            t.create(f"{zk.path}/{host}:9", json.dumps({"host": host, "port": 9,
                                                         "weight": 1 + n % 7}).encode())
        assert all(r is True or isinstance(r, str) for r in t.commit())
    began = time.monotonic()
    wait_for(lambda: len(got.last()) == 2000, 15, message="the 2,000 healthy children")
    print(f"2000 children delivered {time.monotonic() - began:.2f}s after the last commit")
    assert {e.weight for e in got.lists[-1]} == set(range(1, 8))
    for name in HOSTILE:
        assert len(warnings_about(caplog, f"{zk.path}/{name}:")) == 1, name


# -- Endpoint --------------------------------------------------------------------------------

def test_endpoint_construction_and_validation():
    address = thriftpool.Address("127.0.0.1", 9090)
    plain = thriftpool.Endpoint(address)
    assert (plain.weight, plain.tls, dict(plain.metadata)) == (1, False, {})
    assert thriftpool.Endpoint(address, 3, True).weight == 3
    assert thriftpool.Endpoint("[::1]:9090").address == thriftpool.Address("::1", 9090)
    rich = thriftpool.Endpoint(address, metadata={"shard": 1, "tags": ["a", "b"],
                                                  "payload": {"x": [1, {"y": 2}]}})
    same = thriftpool.Endpoint(address, metadata={"shard": 1, "tags": ("a", "b"),
                                                  "payload": {"x": (1, {"y": 2})}})
    assert rich == same and hash(rich) == hash(same) and len({rich, same, plain}) == 2
    assert rich != plain
    assert rich.metadata["tags"] == ("a", "b")
    assert rich.metadata.to_json() == {"shard": 1, "tags": ["a", "b"],
                                       "payload": {"x": [1, {"y": 2}]}}
    with pytest.raises(TypeError):
        rich.metadata["shard"] = 2  # type: ignore[index]
    with pytest.raises(AttributeError):
        rich.weight = 2  # type: ignore[misc]

    for weight in (0, -1, 1.5, 10**309, 1_000_001, True, "2", float("inf")):
        with pytest.raises(ValueError, match="weight"):
            thriftpool.Endpoint(address, weight)  # type: ignore[arg-type]
    for host in ("127.0.0\x00.1", "a" * 254, "a b", "", "-x", "a..b", "1::2::3"):
        with pytest.raises(ValueError, match="host|address|endpoint"):
            thriftpool.Endpoint(thriftpool.Address(host, 1))
    with pytest.raises(ValueError, match="tls"):
        thriftpool.Endpoint(address, tls="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="metadata"):
        thriftpool.Endpoint(address, metadata={"f": object()})
    assert thriftpool.Endpoint(thriftpool.Address("fe80::1%eth0", 1)).address.port == 1
    assert thriftpool.Endpoint(thriftpool.Address("a" * 63 + ".example.", 1))


def test_static_discovery_rejects_bad_weights_and_hosts_and_filters():
    with pytest.raises(ValueError, match="weight"):
        thriftpool.StaticDiscovery([thriftpool.Endpoint(
            thriftpool.Address("127.0.0.1", 1), 1.5)])  # type: ignore[arg-type]
    for bad in ("127.0.0\x00.1:1", ("a" * 300, 1), "evil host:1"):
        with pytest.raises(ValueError, match="discovery"):
            thriftpool.StaticDiscovery([bad])
    got: List[List[thriftpool.Endpoint]] = []
    static = thriftpool.StaticDiscovery(
        ["127.0.0.1:1", thriftpool.Endpoint("127.0.0.1:2", metadata={"zone": "b"})],
        filter=lambda e: e.metadata.get("zone") == "b")
    static.start(got.append, "static")
    assert [str(e) for e in got[-1]] == ["127.0.0.1:2"]
    with pytest.raises(ValueError, match="filter"):
        thriftpool.StaticDiscovery(["127.0.0.1:1"], filter=3)  # type: ignore[arg-type]


@pytest.mark.parametrize("kwargs, option", [
    (dict(snapshot_path=3), "snapshot_path"),
    (dict(max_drop_fraction=-0.1), "max_drop_fraction"),
    (dict(max_drop_fraction=True), "max_drop_fraction"),
    (dict(drop_confirm_delay=0), "drop_confirm_delay"),
    (dict(connect_timeout=float("nan")), "connect_timeout"),
    (dict(filter=1), "filter"),
    (dict(endpoint=""), "endpoint"),
])
def test_zookeeper_discovery_rejects_invalid_new_options(kwargs, option):
    with pytest.raises(ValueError, match=option):
        thriftpool.ZooKeeperDiscovery("127.0.0.1:2181", "/s", **kwargs)


def test_registration_rejects_bad_weights_and_hosts():
    for weight in (0, 1.5, 10**7, True):
        with pytest.raises(ValueError, match="weight"):
            thriftpool.ServiceRegistration("127.0.0.1:2181", "/s", "127.0.0.1", 1,
                                           weight=weight)  # type: ignore[arg-type]
    for host in ("127.0.0\x00.1", "a" * 254, "a;b"):
        with pytest.raises(ValueError, match="host"):
            thriftpool.ServiceRegistration("127.0.0.1:2181", "/s", host, 1)
