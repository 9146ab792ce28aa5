"""Registration and discovery against a 3-node ZooKeeper ensemble on loopback.

Production ZooKeeper is an ensemble: losing the leader, the server a client is connected
to, or quorum for a moment must cost no session, no registration and no failed call.
"""

from __future__ import annotations

import time

import pytest

import thriftpool
from servers import echo_thrift, wait_for
from test_zookeeper import Caller, addresses, instances
from zkharness import ZKContext

SESSION_TIMEOUT = 8.0  # comfortably longer than an election plus a JVM restart


def _register(zk: ZKContext, server) -> thriftpool.ServiceRegistration:
    reg = zk.closing(thriftpool.ServiceRegistration(
        zk.hosts, zk.path, "127.0.0.1", server.port, session_timeout=SESSION_TIMEOUT,
        reconnect_max_delay=0.5))
    assert reg.start(timeout=15)
    return reg


def _nodes(zk: ZKContext) -> list:
    client = zk.client()  # a fresh session, on whichever server serves
    try:
        return sorted(client.get_children(zk.path))
    finally:
        client.stop()
        client.close()


@pytest.mark.timeout(150)
def test_leader_loss_then_quorum_loss_cost_no_call_and_no_registration(zk_ensemble, farm):
    zk = zk_ensemble
    ensemble = zk.ensemble
    servers = farm.start(3)
    regs = [_register(zk, s) for s in servers]
    sessions = [r.session_id for r in regs]
    disc = zk.closing(thriftpool.ZooKeeperDiscovery(
        zk.hosts, zk.path, session_timeout=SESSION_TIMEOUT, reconnect_max_delay=0.5))
    pool = zk.closing(thriftpool.ThriftPool(
        echo_thrift.Echo, disc, name="ens", balancer="round_robin", watchdog_interval=0.1,
        checkout_timeout=2.0))
    wait_for(lambda: instances(pool) == addresses(*servers), 10)
    disc_session = disc.stats()["session_id"]
    caller = Caller(pool)

    # 1. The leader dies: a new one is elected among the other two.
    first = ensemble.kill_leader()
    second_leader = ensemble.wait_quorum(30)
    assert second_leader is not first
    assert _nodes(zk) == addresses(*servers)

    # 2. A second node dies: no quorum, nobody serves; then it comes back.
    ensemble.kill_leader()
    survivor = next(s for s in ensemble.servers if s.running)
    wait_for(lambda: not survivor.serving(), 10, message="the survivor to lose quorum")
    time.sleep(1.0)  # clients are cut off meanwhile
    first.start(wait=False)
    ensemble.wait_quorum(30)

    # Every client keeps (or regains) its session: nothing was re-registered.
    wait_for(lambda: all(r.session_id is not None for r in regs) and disc.connected, 20,
             message="every client reconnected")
    assert [r.session_id for r in regs] == sessions
    assert all(r.registered and r.registrations == 1 for r in regs)
    assert disc.stats()["session_id"] == disc_session
    assert _nodes(zk) == addresses(*servers)

    # The pool never lost an instance, and discovery still follows changes.
    assert caller.min_instances == 3
    regs[0].stop()
    wait_for(lambda: instances(pool) == addresses(*servers[1:]), 2)
    caller.stop()
    assert caller.failures == []
    assert caller.calls > 100
    for server in servers[1:]:
        assert caller.seen[server.address] > 0
