"""Operations on ZooKeeper-registered fleets: TLS advertisement, restricted readers, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from kazoo.exceptions import NoAuthError
from kazoo.security import make_digest_acl

import thriftpool
from servers import IDL, wait_for
from test_zookeeper import discovery, instances, make_pool, register


@pytest.mark.timeout(30)
def test_registration_advertising_tls_is_never_sent_plaintext(zk, farm):
    plain, tls_only = farm.start(2)
    register(zk, plain)
    reg = register(zk, tls_only, tls=True)
    assert json.loads(reg.data)["tls"] is True
    pool = make_pool(zk, min_size=0)
    wait_for(lambda: len(instances(pool)) == 2, 5)
    seen = {pool.client().whoami() for _ in range(20)}
    assert seen == {plain.address}  # all traffic went to the plaintext instance
    assert tls_only.stats()["accepted"] == 0  # not even a TCP connection to the TLS one
    assert pool.stats()["instances"][tls_only.address]["healthy"] is False


@pytest.mark.timeout(30)
def test_tls_flag_must_be_boolean(zk):
    with pytest.raises(ValueError, match="tls"):
        thriftpool.ServiceRegistration(zk.hosts, zk.path, "127.0.0.1", 9, tls="yes")
    with pytest.raises(ValueError, match="tls"):
        thriftpool.ServiceRegistration(zk.hosts, zk.path, "127.0.0.1", 9,
                                       metadata={"tls": True})


@pytest.mark.timeout(30)
def test_readers_can_be_restricted(zk, farm):
    server = farm.one()
    path = "/private/echo"
    acl = [make_digest_acl("svc", "s3cret", all=True),
           make_digest_acl("reader", "r3ad", read=True)]
    register(zk, server, path=path, auth_data=[("digest", "svc:s3cret")], acl=acl)
    with pytest.raises(NoAuthError):
        zk.client().get_children(path)
    # A discovery with the reader's credentials follows the service...
    pool = make_pool(zk, discovery(zk, path=path, auth_data=[("digest", "reader:r3ad")]))
    wait_for(lambda: instances(pool) == [server.address], 5)
    assert pool.client().echo("ok") == "ok"
    # ...and the reader still cannot write or delete there.
    reader = zk.client(auth_data=[("digest", "reader:r3ad")])
    child = f"{path}/{reader.get_children(path)[0]}"
    with pytest.raises(NoAuthError):
        reader.delete(child)
    with pytest.raises(NoAuthError):
        reader.create(f"{path}/10.6.6.6:666", b"{}")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "thriftpool", *args], capture_output=True,
                          text=True, timeout=60)


@pytest.mark.timeout(60)
def test_cli_instances_lists_nodes_with_their_validity(zk, farm):
    a, b = farm.start(2)
    register(zk, a)
    register(zk, b, weight=3, tls=True)
    admin = zk.client()
    admin.create(f"{zk.path}/garbage", b"not json")
    admin.create(f"{zk.path}/127.0.0.1:4242", b"")
    result = run_cli("instances", "--zk", zk.hosts, "--path", zk.path)
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line for line in result.stdout.splitlines()[1:-1]}
    assert "ok" in rows[a.address] and " no " in rows[a.address]
    assert " 3 " in rows[b.address] and " yes " in rows[b.address]
    assert "skipped" in rows["garbage"]
    assert rows["127.0.0.1:4242"].split()[1] == "127.0.0.1:4242"  # taken from its name
    assert result.stdout.splitlines()[-1].startswith("3 valid of 4 nodes")


@pytest.mark.timeout(60)
def test_cli_ping_and_bench_through_zookeeper(zk, farm):
    a, b = farm.start(2)
    register(zk, a)
    register(zk, b)
    ping = run_cli("ping", "--idl", IDL, "--zk", zk.hosts, "--path", zk.path)
    assert ping.returncode == 0, ping.stderr
    assert ping.stdout.count(" ok ") == 2
    bench = run_cli("bench", "--idl", IDL, "--zk", zk.hosts, "--path", zk.path,
                    "--method", "echo", "--args", '["x"]', "--calls", "500", "--duration", "5")
    assert bench.returncode == 0, bench.stderr
    total = [line for line in bench.stdout.splitlines() if line.startswith("total")][0]
    assert int(total.split()[1]) == 500


@pytest.mark.timeout(30)
def test_cli_instances_on_a_missing_path_fails_clearly(zk):
    result = run_cli("instances", "--zk", zk.hosts, "--path", "/no/such/service")
    assert result.returncode == 1
    assert "does not exist" in result.stderr


@pytest.mark.timeout(30)
def test_wait_blocks_until_discovery_and_initial_connections(zk, farm):
    servers = farm.start(2)
    for s in servers:
        register(zk, s)
    pool = make_pool(zk, min_size=1, initial_size=2, max_size=4)
    pool.wait(timeout=10)
    stats = pool.stats()
    assert sorted(stats["instances"]) == sorted(s.address for s in servers)
    assert all(i["size"] >= 2 for i in stats["instances"].values())
    assert all(s.open_connections() >= 2 for s in servers)


@pytest.mark.timeout(30)
def test_wait_on_an_empty_service_raises(zk, service):
    pool = make_pool(zk, discovery(zk, path="/services/nobody"))
    with pytest.raises(thriftpool.NoAvailableInstance, match="no instance within"):
        pool.wait(timeout=0.3)
    pool.close()
    with pytest.raises(thriftpool.PoolClosed):
        pool.wait(timeout=0.3)
