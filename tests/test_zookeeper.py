"""ZooKeeper registration and discovery against a real ZooKeeper server.

Every test gets a fresh chroot (``zk``) on a shared standalone server, or a server of its
own (``zk_private``) when it stops or restarts ZooKeeper.  Echo servers are real
subprocesses (``farm``); what a pool does is checked from the servers' side (``whoami``,
open connections) and from ZooKeeper's side (nodes, owners, ACLs).
"""

from __future__ import annotations

import collections
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
import warnings
from typing import Any, Dict, List, Optional

import pytest
from kazoo.exceptions import NoAuthError
from kazoo.security import OPEN_ACL_UNSAFE, make_acl, make_digest_acl
from thriftpy2.thrift import TApplicationException

import thriftpool
from servers import ROOT, EchoServer, echo_thrift, wait_for
from zkharness import ZKContext, expire_session_client_side

DISCOVERY_LOGGER = "thriftpool.discovery.zookeeper"
REGISTRATION_LOGGER = "thriftpool.registration"


# -- helpers -----------------------------------------------------------------------------

def register(zk: ZKContext, server: Any, path: Optional[str] = None, start: bool = True,
             hosts: Optional[str] = None, **options: Any) -> thriftpool.ServiceRegistration:
    options.setdefault("session_timeout", 6.0)
    options.setdefault("reconnect_max_delay", 0.5)
    reg = zk.closing(thriftpool.ServiceRegistration(
        hosts or zk.hosts, path or zk.path, "127.0.0.1", server.port, **options))
    if start:
        assert reg.start(timeout=10), f"{reg!r} did not register"
    return reg


def discovery(zk: ZKContext, path: Optional[str] = None, hosts: Optional[str] = None,
              **options: Any) -> thriftpool.ZooKeeperDiscovery:
    options.setdefault("session_timeout", 6.0)
    options.setdefault("reconnect_max_delay", 0.5)
    return thriftpool.ZooKeeperDiscovery(hosts or zk.hosts, path or zk.path, **options)


def make_pool(zk: ZKContext, disc: Optional[thriftpool.ZooKeeperDiscovery] = None,
              **options: Any) -> thriftpool.ThriftPool:
    options.setdefault("name", "zk")
    options.setdefault("balancer", "round_robin")
    options.setdefault("watchdog_interval", 0.1)
    options.setdefault("checkout_timeout", 2.0)
    return zk.closing(thriftpool.ThriftPool(echo_thrift.Echo, disc or discovery(zk),
                                            **options))


def instances(pool: thriftpool.ThriftPool) -> List[str]:
    return sorted(pool.stats()["instances"])


def answers(pool: thriftpool.ThriftPool, calls: int = 30) -> collections.Counter:
    seen: collections.Counter = collections.Counter()
    for _ in range(calls):
        with pool.checkout() as client:
            seen[client.whoami()] += 1
    return seen


def addresses(*servers: Any) -> List[str]:
    return sorted(s.address for s in servers)


class Caller:
    """Calls the pool from a background thread until stopped; records every failure."""

    def __init__(self, pool: thriftpool.ThriftPool, pause: float = 0.005) -> None:
        self.pool = pool
        self.pause = pause
        self.calls = 0
        self.seen: collections.Counter = collections.Counter()
        self.failures: List[str] = []
        self.min_instances: Optional[int] = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="test-caller", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with self.pool.checkout() as client:
                    self.seen[client.whoami()] += 1
                self.calls += 1
            except Exception as exc:
                self.failures.append(f"{type(exc).__name__}: {exc}")
            n = len(self.pool.stats()["instances"])
            self.min_instances = n if self.min_instances is None else min(n, self.min_instances)
            time.sleep(self.pause)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        assert not self._thread.is_alive()


def warnings_about(caplog: Any, text: str, logger: str = DISCOVERY_LOGGER) -> List[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == logger and r.levelno == logging.WARNING and text in r.getMessage()]


# -- registration --------------------------------------------------------------------------

@pytest.mark.timeout(30)
def test_registration_creates_ephemeral_node_with_json_data(no_thread_leak, zk, farm):
    server = farm.one()
    reg = register(zk, server, weight=3, metadata={"zone": "a"})
    admin = zk.client()

    node = f"{zk.path}/127.0.0.1:{server.port}"
    assert reg.node_path == node
    data, stat = admin.get(node)
    assert json.loads(data) == {"host": "127.0.0.1", "port": server.port, "weight": 3,
                                "zone": "a"}
    assert stat.owner_session_id == reg.session_id  # ephemeral, owned by the registration
    assert reg.registered and reg.conflict is None
    assert any(t.name == f"thriftpool-registration-127.0.0.1:{server.port}" and t.daemon
               for t in threading.enumerate())

    reg.stop()  # deletes at once, before returning
    assert admin.exists(node) is None
    assert not reg.registered
    reg.stop()  # idempotent

    with thriftpool.ServiceRegistration(zk.hosts, zk.path, "127.0.0.1", server.port,
                                        node_name="custom") as reg2:
        assert admin.exists(f"{zk.path}/custom").owner_session_id == reg2.session_id
    assert admin.exists(f"{zk.path}/custom") is None


@pytest.mark.timeout(30)
def test_session_expiry_recreates_the_node_with_the_same_data(zk, farm, caplog):
    caplog.set_level(logging.INFO)
    server = farm.one()
    reg = register(zk, server)
    admin = zk.client()
    data_before, stat_before = admin.get(reg.node_path)
    old_session = reg.session_id

    zk.expire(reg.client)  # the server ends the session: the node goes with it

    def recreated() -> Any:
        stat = admin.exists(reg.node_path)
        return stat and stat.owner_session_id == reg.session_id != old_session \
            and reg.registered
    wait_for(recreated, 10, message="the node recreated by the new session")
    data_after, stat_after = admin.get(reg.node_path)
    assert data_after == data_before
    assert stat_after.czxid > stat_before.czxid  # a new node, not the old one
    assert reg.registered and reg.registrations == 2
    assert any("session lost" in r.getMessage() for r in caplog.records
               if r.name == REGISTRATION_LOGGER)


@pytest.mark.timeout(30)
def test_node_left_by_our_own_expired_session_is_replaced(zk, farm, caplog):
    caplog.set_level(logging.INFO)
    server = farm.one()
    reg = register(zk, server, session_timeout=10.0)
    admin = zk.client()

    # The client gives its session up while the server still keeps it, and the node
    # with it: the new session finds a node whose owner is our old session.
    old_session = expire_session_client_side(reg.client)

    def replaced() -> Any:
        stat = admin.exists(reg.node_path)
        return stat and reg.session_id and stat.owner_session_id == reg.session_id \
            and reg.session_id != old_session and reg.registered
    wait_for(replaced, 10, message="the node taken over by the new session")
    assert reg.registered and reg.conflict is None
    assert any("replacing the node left by our expired session" in r.getMessage()
               for r in caplog.records)


@pytest.mark.timeout(30)
def test_node_owned_by_another_session_is_reported_not_overwritten(zk, farm, caplog):
    server = farm.one()
    other = zk.client()
    node = f"{zk.path}/127.0.0.1:{server.port}"
    other.create(node, b'{"host": "127.0.0.1", "port": 1}', ephemeral=True, makepath=True)
    owner = other.client_id[0]

    # start() waits, then reports the conflict, and stops.
    reg = thriftpool.ServiceRegistration(zk.hosts, zk.path, "127.0.0.1", server.port)
    with pytest.raises(thriftpool.RegistrationConflict) as info:
        reg.start(timeout=1.0)
    assert info.value.owner == owner and info.value.path == node
    assert not reg.running

    # Without waiting: the conflict is exposed, logged once, the node left alone...
    caplog.clear()
    reg = register(zk, server, start=False)
    assert reg.start(timeout=0) is False
    wait_for(lambda: reg.conflict == owner, 5, message="the conflict to be reported")
    time.sleep(0.3)
    assert other.get(node)[0] == b'{"host": "127.0.0.1", "port": 1}'
    errors = [r for r in caplog.records
              if r.name == REGISTRATION_LOGGER and r.levelno == logging.ERROR]
    assert len(errors) == 1 and f"0x{owner:x}" in errors[0].getMessage()
    assert not reg.registered

    # ...and taken over once its owner goes away.
    other.delete(node)
    assert reg.wait_registered(5)
    data, stat = other.get(node)
    assert stat.owner_session_id == reg.session_id and data == reg.data
    assert reg.conflict is None


@pytest.mark.timeout(30)
def test_node_deleted_by_someone_else_is_recreated(zk, farm):
    server = farm.one()
    reg = register(zk, server)
    admin = zk.client()
    admin.delete(reg.node_path)
    wait_for(lambda: admin.exists(reg.node_path), 5, message="the node recreated")
    assert admin.exists(reg.node_path).owner_session_id == reg.session_id


@pytest.mark.timeout(30)
def test_digest_acl_protects_the_registration(zk, farm, caplog):
    server = farm.one()
    path = "/protected/echo"
    acl = [make_digest_acl("svc", "s3cret", all=True), make_acl("world", "anyone", read=True)]
    reg = register(zk, server, path=path, auth_data=[("digest", "svc:s3cret")], acl=acl)
    anonymous = zk.client()
    intruder = zk.client(auth_data=[("digest", "svc:wrong")])

    for client in (anonymous, intruder):
        with pytest.raises(NoAuthError):
            client.delete(reg.node_path)
        with pytest.raises(NoAuthError):
            client.set(reg.node_path, b'{"host": "10.6.6.6", "port": 666}')
        with pytest.raises(NoAuthError):  # no rogue instance beside it
            client.create(f"{path}/10.6.6.6:666", b'{"host": "10.6.6.6", "port": 666}')
        with pytest.raises(NoAuthError):
            client.set_acls(path, [make_acl("world", "anyone", all=True)])
    assert anonymous.exists(reg.node_path).owner_session_id == reg.session_id
    owner = zk.client(auth_data=[("digest", "svc:s3cret")])  # sees the digests
    assert set(owner.get_acls(reg.node_path)[0]) == set(acl)
    assert set(owner.get_acls(path)[0]) == set(acl)
    # The shared parent keeps the open ACL: another service can create its path there.
    assert anonymous.get_acls("/protected")[0] == list(OPEN_ACL_UNSAFE)
    anonymous.create("/protected/other-service")
    assert anonymous.get_children(path) == [f"127.0.0.1:{server.port}"]

    # A registration with the wrong password cannot register there either.
    rogue = thriftpool.ServiceRegistration(zk.hosts, path, "127.0.0.1", 666,
                                           auth_data=[("digest", "svc:wrong")], acl=acl)
    zk.closing(rogue)
    assert rogue.start(timeout=1.0) is False
    assert anonymous.get_children(path) == [f"127.0.0.1:{server.port}"]

    # Discovery needs no credentials to read a world-readable service.
    pool = make_pool(zk, discovery(zk, path=path))
    wait_for(lambda: instances(pool) == [server.address], 5)
    assert answers(pool, 3) == {server.address: 3}


# -- discovery -----------------------------------------------------------------------------

@pytest.mark.timeout(30)
def test_discovers_three_registered_servers(no_thread_leak, zk, farm):
    servers = farm.start(3)
    for s in servers:
        register(zk, s)
    disc = discovery(zk)
    pool = make_pool(zk, disc, name="three")
    wait_for(lambda: instances(pool) == addresses(*servers), 5,
             message="the three registered servers")
    seen = answers(pool, 30)
    assert set(seen) == set(addresses(*servers))
    assert any(t.name == "thriftpool-three-zookeeper" and t.daemon
               for t in threading.enumerate())
    stats = disc.stats()
    assert stats["connected"] and stats["instances"] == 3 and stats["reads"] == 3


@pytest.mark.timeout(30)
def test_deregistration_stops_routing_and_closes_idle_connections(zk, farm):
    servers = farm.start(3)
    regs = [register(zk, s) for s in servers]
    pool = make_pool(zk, min_size=2)
    wait_for(lambda: all(s.open_connections() == 2 for s in servers), 5,
             message="2 idle connections to every server")
    gone = servers[0]
    calls_before = gone.stats()["calls"]

    started = time.monotonic()
    regs[0].stop()
    wait_for(lambda: gone.open_connections() == 0, 2,
             message="the removed server's connections to close")
    wait_for(lambda: instances(pool) == addresses(*servers[1:]), 2)
    assert time.monotonic() - started < 2.0
    seen = answers(pool, 30)
    assert gone.address not in seen and set(seen) == set(addresses(*servers[1:]))
    assert gone.stats()["calls"] == calls_before
    assert gone.open_connections() == 0


@pytest.mark.timeout(30)
def test_new_registration_is_used_within_two_seconds(zk, farm):
    first, second = farm.start(2)
    register(zk, first)
    pool = make_pool(zk)
    wait_for(lambda: instances(pool) == [first.address], 5)

    started = time.monotonic()
    register(zk, second)

    def used() -> bool:
        return second.address in answers(pool, 4)
    wait_for(used, 2, message="a call answered by the new server")
    assert time.monotonic() - started < 2.0
    # Unchanged instances keep their connections (the snapshot is applied as a diff).
    assert pool.stats()["instances"][first.address]["opened"] == 1


@pytest.mark.timeout(30)
def test_empty_list_raises_no_available_instance(zk, farm):
    server, later = farm.start(2)
    reg = register(zk, server)
    pool = make_pool(zk)
    wait_for(lambda: instances(pool) == [server.address], 5)
    reg.stop()

    def refused() -> bool:
        try:
            with pool.checkout(timeout=0.1):
                return False
        except thriftpool.NoAvailableInstance:
            return True
    wait_for(refused, 2, message="NoAvailableInstance once the last node is gone")
    with pytest.raises(thriftpool.NoAvailableInstance):
        with pool.checkout():
            pass
    register(zk, later)
    wait_for(lambda: instances(pool) == [later.address], 2)
    assert answers(pool, 2) == {later.address: 2}


@pytest.mark.timeout(30)
def test_malformed_children_are_skipped_with_one_warning_each(zk, farm, caplog):
    good, by_name, plain = farm.start(3)
    admin = zk.client()
    p = zk.path
    admin.ensure_path(p)
    admin.create(f"{p}/json", json.dumps({"host": "127.0.0.1", "port": good.port,
                                          "weight": 2}).encode())
    admin.create(f"{p}/{by_name.address}", b"{not json")        # used by its name, warned
    admin.create(f"{p}/{plain.address}", b"")                    # used by its name, silently
    bad = {
        "garbage": b"\xff\xfe not even utf-8",
        "no-port": b'{"host": "127.0.0.1"}',
        "bad-port": b'{"host": "127.0.0.1", "port": 70000}',
        "bad-weight": b'{"host": "127.0.0.1", "port": 1, "weight": 0}',
        "a-list": b"[1, 2]",
        "empty": b"",
    }
    for name, data in bad.items():
        admin.create(f"{p}/{name}", data)
    caplog.set_level(logging.WARNING, logger=DISCOVERY_LOGGER)

    disc = discovery(zk)
    pool = make_pool(zk, disc)
    expected = addresses(good, by_name, plain)
    wait_for(lambda: instances(pool) == expected, 5, message="the three usable children")
    assert set(answers(pool, 9)) == set(expected)
    assert pool.stats()["instances"][good.address]["weight"] == 2

    # More watch events (children added and removed, a full re-read after a new session)
    # repeat no warning.
    admin.create(f"{p}/extra", b"junk")
    admin.delete(f"{p}/extra")
    admin.create(f"{p}/dup", json.dumps({"host": "127.0.0.1", "port": good.port}).encode())
    old_session = disc.stats()["session_id"]
    zk.expire(disc.client)
    wait_for(lambda: disc.stats()["session_id"] not in (None, old_session), 5)
    admin.create(f"{p}/late", json.dumps({"host": "127.0.0.1", "port": 9}).encode())
    wait_for(lambda: "127.0.0.1:9" in instances(pool), 5)

    for name in bad:
        assert len(warnings_about(caplog, f"{p}/{name}:")) == 1, name
    assert len(warnings_about(caplog, f"{p}/{by_name.address}:")) == 1
    assert "using its name" in warnings_about(caplog, f"{p}/{by_name.address}:")[0]
    assert warnings_about(caplog, f"{p}/{plain.address}:") == []
    assert len(warnings_about(caplog, f"{p}/extra:")) <= 1
    assert warnings_about(caplog, f"{p}/json:") == []


@pytest.mark.timeout(30)
def test_serverset_members_are_read_and_only_alive_ones_serve(zk, farm, caplog):
    alive, starting = farm.start(2)
    admin = zk.client()

    def member(server: EchoServer, status: str) -> bytes:
        return json.dumps({"serviceEndpoint": {"host": "127.0.0.1", "port": server.port},
                           "additionalEndpoints": {"admin": {"host": "127.0.0.1",
                                                             "port": 1}},
                           "status": status, "shard": 0}).encode()

    admin.create(f"{zk.path}/member_", member(alive, "ALIVE"), sequence=True,
                 makepath=True)
    second = admin.create(f"{zk.path}/member_", member(starting, "STARTING"),
                          sequence=True)
    caplog.set_level(logging.WARNING, logger=DISCOVERY_LOGGER)
    pool = make_pool(zk)
    wait_for(lambda: instances(pool) == [alive.address], 5)
    assert answers(pool, 5) == {alive.address: 5}

    admin.set(second, member(starting, "ALIVE"))  # a data change, same child
    wait_for(lambda: instances(pool) == addresses(alive, starting), 2)
    assert set(answers(pool, 10)) == set(addresses(alive, starting))
    admin.set(second, member(starting, "STOPPING"))
    wait_for(lambda: instances(pool) == [alive.address], 2)
    assert warnings_about(caplog, "member_") == []


@pytest.mark.timeout(30)
def test_missing_path_is_waited_for_or_created_when_asked(zk, farm):
    server = farm.one()
    admin = zk.client()
    disc = discovery(zk, path="/not/yet")
    waiting = make_pool(zk, disc, name="w")
    # A successful read of a missing path: an empty list, and nothing created.
    wait_for(lambda: disc.stats()["source"] == "zookeeper", 5, message="the first read")
    assert disc.stats()["instances"] == 0 and disc.stats()["children"] == 0
    assert admin.exists("/not/yet") is None and instances(waiting) == []
    register(zk, server, path="/not/yet")  # creates the path: the exists watch fires
    wait_for(lambda: instances(waiting) == [server.address], 2)

    pool = make_pool(zk, discovery(zk, path="/made/by/discovery", create_path=True))
    wait_for(lambda: admin.exists("/made/by/discovery"), 5, message="the path created")
    register(zk, server, path="/made/by/discovery")
    wait_for(lambda: instances(pool) == [server.address], 2)


@pytest.mark.timeout(30)
def test_session_expiry_of_discovery_rereads_and_rearms(zk, farm):
    first, second = farm.start(2)
    register(zk, first)
    disc = discovery(zk)
    pool = make_pool(zk, disc)
    wait_for(lambda: instances(pool) == [first.address], 5)
    old = disc.stats()["session_id"]
    snapshots = disc.stats()["snapshots"]

    zk.expire(disc.client)
    wait_for(lambda: disc.stats()["session_id"] not in (None, old), 5,
             message="a full re-read in the new session")
    assert disc.stats()["snapshots"] == snapshots  # same list: the pool was not bothered
    assert instances(pool) == [first.address]
    register(zk, second)  # seen only if the watch was armed again
    wait_for(lambda: instances(pool) == addresses(first, second), 2)


@pytest.mark.timeout(40)
def test_thousand_children_are_read_once_each(zk):
    admin = zk.client()
    admin.ensure_path(zk.path)
    results = [admin.create_async(f"{zk.path}/10.0.{i // 250}.{i % 250}:9090",
                                  json.dumps({"host": f"10.0.{i // 250}.{i % 250}",
                                              "port": 9090}).encode())
               for i in range(1000)]
    for r in results:
        r.get(timeout=10)

    snapshots: List[List[thriftpool.Endpoint]] = []
    disc = discovery(zk)
    started = time.monotonic()
    disc.start(snapshots.append, "big")
    zk.closing(disc)
    wait_for(lambda: snapshots and len(snapshots[-1]) == 1000, 10)
    first_read = time.monotonic() - started
    assert disc.stats()["reads"] == 1000
    assert first_read < 5.0, first_read

    admin.create(f"{zk.path}/10.1.0.1:9090", b'{"host": "10.1.0.1", "port": 9090}')
    wait_for(lambda: len(snapshots[-1]) == 1001, 2)
    admin.delete(f"{zk.path}/10.0.0.0:9090")
    wait_for(lambda: len(snapshots[-1]) == 1000, 2)
    assert disc.stats()["reads"] == 1001  # only the new child was read
    assert all(isinstance(e, thriftpool.Endpoint) for e in snapshots[-1])
    disc.stop()
    disc.stop()  # idempotent


# -- outages ---------------------------------------------------------------------------------

@pytest.mark.timeout(40)
def test_pool_keeps_serving_while_zookeeper_is_down(zk_private, farm):
    zk = zk_private
    servers = farm.start(2)
    for s in servers:
        register(zk, s, session_timeout=2.0)
    disc = discovery(zk, session_timeout=2.0)
    pool = make_pool(zk, disc)
    wait_for(lambda: instances(pool) == addresses(*servers), 5)

    caller = Caller(pool)
    zk.server.stop()
    wait_for(lambda: not disc.connected, 5, message="discovery to notice")
    time.sleep(3.0)  # longer than the session timeout
    caller.stop()
    assert caller.failures == []
    assert caller.min_instances == 2  # fail static: the list was never emptied
    assert instances(pool) == addresses(*servers)
    recent = answers(pool, 10)
    assert set(recent) == set(addresses(*servers))


@pytest.mark.timeout(60)
def test_zookeeper_restart_after_session_timeout(zk_private, farm):
    zk = zk_private
    first, second, third = farm.start(3)
    hosts = zk.hosts_listed_twice  # see there: no session may expire after the restart
    regs = [register(zk, s, hosts=hosts, session_timeout=2.0) for s in (first, second)]
    disc = discovery(zk, hosts=hosts, session_timeout=2.0)
    pool = make_pool(zk, disc)
    wait_for(lambda: instances(pool) == addresses(first, second), 5)

    caller = Caller(pool)
    zk.server.stop()
    time.sleep(3.0)  # past the session timeout
    zk.server.restart()
    # The registrations come back (kept or recreated, whichever the server decided)...
    admin = zk.client()
    wait_for(lambda: sorted(admin.get_children(zk.path)) == addresses(first, second), 15,
             message="both registrations back")

    def owned() -> bool:
        return all(r.registered and r.session_id is not None
                   and admin.exists(r.node_path).owner_session_id == r.session_id
                   for r in regs)
    wait_for(owned, 10, message="each node owned by its registration's live session")
    # ...and discovery follows changes made after the restart.
    wait_for(lambda: disc.connected, 10)
    register(zk, third, session_timeout=2.0)
    wait_for(lambda: instances(pool) == addresses(first, second, third), 5)
    wait_for(lambda: third.address in answers(pool, 6), 2)
    caller.stop()
    assert caller.failures == []
    assert caller.min_instances == 2


@pytest.mark.timeout(40)
def test_pool_construction_does_not_wait_for_zookeeper(zk_private, farm):
    zk = zk_private
    server = farm.one()
    zk.server.stop()
    started = time.monotonic()
    pool = make_pool(zk, discovery(zk, hosts=zk.hosts_listed_twice, reconnect_max_delay=0.2,
                                   session_timeout=2.0))
    assert time.monotonic() - started < 0.5
    with pytest.raises(thriftpool.NoAvailableInstance):
        with pool.checkout(timeout=0.1):
            pass
    zk.server.restart()
    register(zk, server, session_timeout=2.0)
    wait_for(lambda: instances(pool) == [server.address], 8)
    assert answers(pool, 2) == {server.address: 2}


@pytest.mark.timeout(40)
def test_a_kazoo_client_that_gave_up_is_restarted(zk_private, farm, caplog, monkeypatch):
    import thriftpool.discovery.zookeeper as discovery_module
    import thriftpool.registration as registration_module

    monkeypatch.setattr(discovery_module, "_SUPERVISE_INTERVAL", 0.3)
    monkeypatch.setattr(registration_module, "_SUPERVISE_INTERVAL", 0.3)
    zk = zk_private
    server = farm.one()
    zk.server.stop()
    # A retry policy that gives up (kazoo's default grows to an hour; thriftpool's never
    # gives up): the clients stop connecting while ZooKeeper is down.
    gives_up = {"connection_retry": {"max_tries": 1, "delay": 0.05, "max_delay": 0.1}}
    reg = register(zk, server, start=False, session_timeout=2.0, kazoo_options=gives_up)
    assert reg.start(timeout=0) is False
    disc = discovery(zk, session_timeout=2.0, kazoo_options=gives_up)
    pool = make_pool(zk, disc)
    wait_for(lambda: len([r for r in caplog.records if "restarting it" in r.getMessage()])
             >= 2, 10, message="both clients restarted after giving up")
    zk.server.restart()
    assert reg.wait_registered(15)
    wait_for(lambda: instances(pool) == [server.address], 15)
    assert answers(pool, 2) == {server.address: 2}


# -- serving -------------------------------------------------------------------------------

class Handler:
    def __init__(self, name: str) -> None:
        self.name = name

    def echo(self, message: str) -> str:
        return message

    def ping(self) -> None:
        return None

    def sleep(self, ms: int) -> int:
        time.sleep(ms / 1000.0)
        return ms

    def whoami(self) -> str:
        return self.name

    def fail(self, message: str) -> str:
        if message == "undeclared":
            raise RuntimeError("boom")
        raise echo_thrift.EchoError(message=message)


@pytest.mark.timeout(40)
def test_registered_server_deregisters_before_it_stops_accepting(no_thread_leak, zk):
    def start(name: str) -> thriftpool.RegisteredServer:
        return zk.closing(thriftpool.RegisteredServer(
            echo_thrift.Echo, Handler(name), "127.0.0.1", 0, hosts=zk.hosts, path=zk.path,
            session_timeout=6.0, drain_timeout=3.0).start())

    a, b = start("a"), start("b")
    admin = zk.client()
    assert sorted(admin.get_children(zk.path)) == sorted([a.address, b.address])
    pool = make_pool(zk, min_size=2)
    wait_for(lambda: instances(pool) == sorted([a.address, b.address]), 5)
    caller = Caller(pool, pause=0.001)
    wait_for(lambda: caller.seen["a"] > 20 and caller.seen["b"] > 20, 5)

    # The undeclared exception is answered, and the connection survives it.
    with pool.checkout() as client:
        with pytest.raises(TApplicationException):
            client.fail("undeclared")
        assert client.echo("still here") == "still here"

    started = time.monotonic()
    a.stop()
    assert time.monotonic() - started < 2.0  # drained early: the pool let go at once
    assert admin.exists(a.registration.node_path) is None
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", a.port), timeout=1).close()
    served_by_a = caller.seen["a"]
    wait_for(lambda: caller.seen["b"] > 0 and caller.calls > 50, 5)
    time.sleep(0.2)
    caller.stop()
    assert caller.failures == []
    assert caller.seen["a"] == served_by_a
    assert a.open_connections == 0
    b.stop()
    pool.close()


SERVE_SCRIPT = r"""
import logging, sys
logging.basicConfig(level=logging.INFO)
sys.path.insert(0, sys.argv[1])
import thriftpool
from servers import echo_thrift

class Handler:
    def whoami(self):
        return "served"

thriftpool.serve(echo_thrift.Echo, Handler(), "127.0.0.1", 0, hosts=sys.argv[2],
                 path=sys.argv[3], session_timeout=6.0)
print("clean exit", flush=True)
"""


@pytest.mark.timeout(40)
def test_serve_runs_until_sigterm_and_deregisters_first(zk):
    admin = zk.client()
    proc = subprocess.Popen([sys.executable, "-c", SERVE_SCRIPT, os.path.join(ROOT, "tests"),
                             zk.hosts, zk.path], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        children = wait_for(lambda: admin.exists(zk.path) and admin.get_children(zk.path),
                            15, message="the served instance to register")
        pool = make_pool(zk)
        wait_for(lambda: instances(pool) == children, 5)
        assert answers(pool, 2) == {"served": 2}
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err[-3000:]
    assert "clean exit" in out
    assert admin.get_children(zk.path) == []
    assert "deregistered" in err  # logged before the server stopped
    assert err.index("deregistered") < err.index("stopped")


# -- processes -------------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_forked_child_gets_its_own_zookeeper_session(zk, farm):
    server = farm.one()
    register(zk, server)
    disc = discovery(zk)
    pool = make_pool(zk, disc)
    wait_for(lambda: instances(pool) == [server.address], 5)
    parent_session = disc.stats()["session_id"]

    read_fd, write_fd = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads (3.12+)
        pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(read_fd)
            answer = answers(pool, 1)
            wait_for(lambda: disc.stats()["session_id"] is not None, 10)
            report = {"answer": list(answer), "session": disc.stats()["session_id"]}
            os.write(write_fd, json.dumps(report).encode())
            pool.close()
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as f:
        report = json.loads(f.read() or b"{}")
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, report
    assert report["answer"] == [server.address]
    assert report["session"] not in (None, parent_session)
    # The parent's session and watch are untouched by the child.
    assert disc.client.client_id[0] == parent_session
    second = farm.one()
    register(zk, second)
    wait_for(lambda: instances(pool) == addresses(server, second), 2)


GEVENT_SCRIPT = r"""
from gevent import monkey
monkey.patch_all()
import json, sys, time
import gevent
sys.path.insert(0, sys.argv[1])
import thriftpool
from servers import echo_thrift
hosts, path, port = sys.argv[2], sys.argv[3], int(sys.argv[4])
ticks = []
def ticker():
    while True:
        ticks.append(time.monotonic())
        gevent.sleep(0.01)
gevent.spawn(ticker)
reg = thriftpool.ServiceRegistration(hosts, path, "127.0.0.1", port, session_timeout=6)
assert reg.start(timeout=10)
disc = thriftpool.ZooKeeperDiscovery(hosts, path, session_timeout=6)
pool = thriftpool.ThriftPool(echo_thrift.Echo, disc, name="gevent")
handlers = [type(reg.client.handler).__name__, type(disc.client.handler).__name__]
deadline = time.monotonic() + 10
while not pool.stats()["instances"] and time.monotonic() < deadline:
    gevent.sleep(0.01)
with pool.checkout() as client:
    answer = client.whoami()
reg.stop()  # the node is deleted: the pool must follow
deadline = time.monotonic() + 10
while pool.stats()["instances"] and time.monotonic() < deadline:
    gevent.sleep(0.01)
followed = not pool.stats()["instances"]
try:
    with pool.checkout():
        pass
    after = "served"
except thriftpool.NoAvailableInstance:
    after = "NoAvailableInstance"
pool.close()
gaps = [b - a for a, b in zip(ticks, ticks[1:])]
print(json.dumps({"handlers": handlers, "answer": answer, "max_gap": max(gaps),
                  "followed_deletion": followed, "after": after}))
"""


@pytest.mark.gevent
@pytest.mark.timeout(60)
def test_gevent_uses_kazoo_gevent_handler(zk, farm):
    server = farm.one()
    proc = subprocess.run([sys.executable, "-c", GEVENT_SCRIPT, os.path.join(ROOT, "tests"),
                           zk.hosts, zk.path, str(server.port)],
                          capture_output=True, text=True, timeout=50)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["handlers"] == ["SequentialGeventHandler", "SequentialGeventHandler"]
    assert result["answer"] == server.address
    assert result["max_gap"] < 0.5, result  # the hub was never blocked for long
    assert result["followed_deletion"], result  # the deletion reached the pool under gevent
    assert result["after"] == "NoAvailableInstance"


# -- options ----------------------------------------------------------------------------------

@pytest.mark.timeout(10)
@pytest.mark.parametrize("kwargs, option", [
    (dict(hosts=""), "hosts"),
    (dict(hosts=["127.0.0.1:2181", 5]), "hosts"),
    (dict(hosts="127.0.0.1:99999"), "hosts"),
    (dict(hosts="127.0.0.1:2181/bad//chroot"), "hosts"),
    (dict(path="services/echo"), "path"),
    (dict(path="/services/echo/"), "path"),
    (dict(path="/a/../b"), "path"),
    (dict(auth_data="digest:user:pw"), "auth_data"),
    (dict(auth_data=[("digest",)]), "auth_data"),
    (dict(acl=["world:anyone"]), "acl"),
    (dict(acl=[]), "acl"),
    (dict(session_timeout=0), "session_timeout"),
    (dict(session_timeout=True), "session_timeout"),
    (dict(session_timeout=float("nan")), "session_timeout"),
    (dict(reconnect_max_delay=-1), "reconnect_max_delay"),
    (dict(create_path="yes"), "create_path"),
    (dict(kazoo_options={"timeout": 3}), "kazoo_options"),
    (dict(kazoo_options=[("use_ssl", True)]), "kazoo_options"),
])
def test_discovery_rejects_invalid_options(kwargs, option):
    options: Dict[str, Any] = dict(hosts="127.0.0.1:2181", path="/services/echo")
    options.update(kwargs)
    with pytest.raises(ValueError, match=option):
        thriftpool.ZooKeeperDiscovery(options.pop("hosts"), options.pop("path"), **options)


@pytest.mark.timeout(10)
@pytest.mark.parametrize("kwargs, option", [
    (dict(host=""), "host"),
    (dict(host="a b"), "host"),
    (dict(port=0), "port"),
    (dict(port=True), "port"),
    (dict(port="9090"), "port"),
    (dict(weight=0), "weight"),
    (dict(weight=1.5), "weight"),
    (dict(node_name="a/b"), "node_name"),
    (dict(node_name=".."), "node_name"),
    (dict(metadata={"port": 1}), "metadata"),
    (dict(metadata={"x": object()}), "metadata"),
    (dict(path="relative"), "path"),
    (dict(hosts=None), "hosts"),
    (dict(acl="open"), "acl"),
    (dict(session_timeout=-2), "session_timeout"),
    (dict(kazoo_options={"handler": None}), "kazoo_options"),
])
def test_registration_rejects_invalid_options(kwargs, option):
    options: Dict[str, Any] = dict(hosts="127.0.0.1:2181", path="/services/echo",
                                   host="127.0.0.1", port=9090)
    options.update(kwargs)
    with pytest.raises(ValueError, match=option):
        thriftpool.ServiceRegistration(**options)


@pytest.mark.timeout(10)
@pytest.mark.parametrize("kwargs, option", [
    (dict(host="0.0.0.0"), "advertise_host"),
    (dict(port=-1), "port"),
    (dict(drain_timeout=-1), "drain_timeout"),
    (dict(register_timeout="1"), "register_timeout"),
    (dict(backlog=0), "backlog"),
    (dict(transport="zlib"), "transport"),
    (dict(protocol=object()), "protocol"),
    (dict(weight=-3), "weight"),
    (dict(path=""), "path"),
])
def test_registered_server_rejects_invalid_options(kwargs, option):
    options: Dict[str, Any] = dict(host="127.0.0.1", port=0, hosts="127.0.0.1:2181",
                                   path="/services/echo")
    options.update(kwargs)
    with pytest.raises(ValueError, match=option):
        thriftpool.RegisteredServer(echo_thrift.Echo, Handler("x"), **options)


@pytest.mark.timeout(10)
def test_registration_start_rejects_negative_timeout():
    reg = thriftpool.ServiceRegistration("127.0.0.1:2181", "/s", "127.0.0.1", 9090)
    with pytest.raises(ValueError, match="timeout"):
        reg.start(timeout=-1)
    assert not reg.running


@pytest.mark.timeout(10)
def test_hosts_are_normalized():
    disc = thriftpool.ZooKeeperDiscovery(["zk1", "127.0.0.1:2182", "[::1]"], "/s")
    assert disc.hosts == "zk1:2181,127.0.0.1:2182,[::1]:2181"
    disc = thriftpool.ZooKeeperDiscovery("a:1, b:2/chroot/x", "/s")
    assert disc.hosts == "a:1,b:2/chroot/x"
