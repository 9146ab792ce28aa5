"""The last-known-good snapshot file and the drop protection, against real ZooKeeper.

- A cold start with ZooKeeper down serves the snapshot (and a pool routes on it) until
  the first successful read replaces it; missing, corrupt and foreign files are ignored
  with a warning; a snapshot that cannot be written is a warning, never fatal.
- A read removing most instances at once (children deleted in one transaction, the
  parent deleted) is held until a later read confirms it; instances that come back
  release the hold; a single deregistration is applied at once.
- The pure rules (:class:`DropGuard`) and the file format (:class:`SnapshotFile`) are
  also tested directly, with a fake clock.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import time
from typing import Any, List

import pytest

import thriftpool
from servers import free_port, wait_for
from test_zookeeper import answers, discovery, instances, make_pool
from thriftpool.discovery._delivery import DropGuard, SnapshotFile

LOGGER = "thriftpool.discovery"


class Snapshots:
    def __init__(self) -> None:
        self.lists: List[List[thriftpool.Endpoint]] = []

    def __call__(self, endpoints: List[thriftpool.Endpoint]) -> None:
        self.lists.append(endpoints)

    def last(self) -> List[str]:
        return sorted(str(e) for e in self.lists[-1]) if self.lists else []


def endpoints(*ports: int) -> List[thriftpool.Endpoint]:
    return [thriftpool.Endpoint(thriftpool.Address("127.0.0.1", p)) for p in ports]


def warnings(caplog: Any, text: str) -> List[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and text in r.getMessage()]


# -- the pure rules ---------------------------------------------------------------------------

def test_drop_guard_holds_large_removals_until_a_later_read_confirms():
    guard = DropGuard(0.5, 5.0)
    ten = endpoints(*range(1, 11))
    assert guard.decide(None, ten, 0.0).endpoints == ten  # nothing known: no hold
    half = guard.decide(ten, ten[5:], 1.0)  # exactly half: not more than 0.5
    assert half.endpoints == ten[5:] and half.event is None and half.recheck_in is None

    held = guard.decide(ten, ten[6:] + endpoints(99), 2.0)  # 6 of 10 go, one comes
    assert held.event == "held" and held.removed == 6 and held.recheck_in == 5.0
    assert sorted(e.address.port for e in held.endpoints) == list(range(1, 11)) + [99]
    assert len(guard.held) == 6
    again = guard.decide(held.endpoints, ten[6:] + endpoints(99), 4.5)  # too early
    assert again.event is None and again.recheck_in == pytest.approx(2.5)
    assert len(again.endpoints) == 11
    confirmed = guard.decide(again.endpoints, ten[6:] + endpoints(99), 7.0)
    assert confirmed.event == "confirmed" and confirmed.endpoints == ten[6:] + endpoints(99)
    assert guard.held == set() and confirmed.recheck_in is None

    held = guard.decide(ten, [], 10.0)
    assert held.event == "held" and held.endpoints == ten
    partly = guard.decide(held.endpoints, ten[:8], 10.5)  # 2 still missing: still held
    assert partly.endpoints == ten and partly.event is None and len(guard.held) == 2
    back = guard.decide(held.endpoints, ten, 11.0)
    assert back.event == "released" and back.endpoints == ten and guard.held == set()

    one = endpoints(1)
    assert guard.decide(one, [], 20.0).endpoints == []  # a single removal: at once
    two = endpoints(1, 2)
    assert guard.decide(two, endpoints(2), 21.0).endpoints == endpoints(2)
    off = DropGuard(None, 5.0)
    assert off.decide(ten, [], 0.0).endpoints == []


def test_snapshot_file_is_atomic_private_and_round_trips(tmp_path):
    path = str(tmp_path / "echo.json")
    file = SnapshotFile(path, "zookeeper:/services/echo")
    assert file.read()[0] is None and "does not exist" in file.read()[2]
    rich = [thriftpool.Endpoint(thriftpool.Address("::1", 9), 7, True,
                                {"format": "curator", "payload": {"a": [1, 2]}})]
    file.write(endpoints(1, 2) + rich)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert os.listdir(tmp_path) == ["echo.json"]  # the temporary file was renamed
    read, age, problem = file.read()
    assert problem == "" and 0 <= age < 5
    assert read == endpoints(1, 2) + rich
    file.write([])
    assert file.read()[0] == []

    foreign = SnapshotFile(path, "zookeeper:/services/billing")
    assert foreign.read()[0] is None and "written for" in foreign.read()[2]
    with open(path, "wb") as f:
        f.write(b'{"format": "thriftpool-discovery-snap')
    assert "corrupt" in file.read()[2]
    with open(path, "w") as f:
        json.dump({"format": "thriftpool-discovery-snapshot", "version": 1,
                   "source": file.source, "written_at": 1.0,
                   "instances": [{"host": "127.0.0.1", "port": 1, "weight": 10**309}]}, f)
    assert "invalid" in file.read()[2]


# -- a cold start with ZooKeeper down -------------------------------------------------------

@pytest.mark.timeout(60)
def test_cold_start_with_zookeeper_down_serves_the_snapshot_until_the_first_read(
        zk_private, farm, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    zk = zk_private
    a, b, c = farm.start(3)
    path = str(tmp_path / "echo.json")
    admin = zk.client()
    admin.ensure_path(zk.path)
    for server in (a, b):
        admin.create(f"{zk.path}/{server.address}", b"")
    first = Snapshots()
    disc = discovery(zk, snapshot_path=path)
    disc.start(first, "first")
    wait_for(lambda: first.last() == sorted([a.address, b.address]), 5)
    wait_for(lambda: disc.stats()["snapshot_writes"] >= 1, 5)
    disc.stop()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600

    # While nobody watches, the service changes; then ZooKeeper goes down.
    admin.delete(f"{zk.path}/{a.address}")
    admin.create(f"{zk.path}/{c.address}", b"")
    zk.server.stop()

    cold = discovery(zk, snapshot_path=path, connect_timeout=0.5)
    began = time.monotonic()
    pool = make_pool(zk, cold)
    wait_for(lambda: instances(pool) == sorted([a.address, b.address]), 5,
             message="the snapshot served")
    assert time.monotonic() - began < 5.0
    stats = cold.stats()
    assert stats["source"] == "snapshot" and stats["snapshot_age"] >= 0
    assert set(answers(pool, 10)) == {a.address, b.address}  # a pool routes on it
    assert warnings(caplog, "serving the snapshot")

    zk.server.restart()
    wait_for(lambda: instances(pool) == sorted([b.address, c.address]), 20,
             message="the first read replaces the snapshot")
    assert cold.stats()["source"] == "zookeeper" and cold.stats()["snapshot_age"] is None

    def saved() -> List[str]:  # written right after the pool got the list
        with open(path) as f:
            return sorted(f"{r['host']}:{r['port']}" for r in json.load(f)["instances"])
    wait_for(lambda: saved() == sorted([b.address, c.address]), 5, message="the new file")


@pytest.mark.timeout(30)
@pytest.mark.parametrize("content, problem", [
    (None, "does not exist"),
    (b"\x00\x01 not json", "not JSON"),
    (b'{"format": "thriftpool-discovery-snapshot", "version": 1, '
     b'"source": "zookeeper:/other/service", "written_at": 1, "instances": []}',
     "written for"),
    (b'{"some": "other file"}', "not a thriftpool discovery snapshot"),
])
def test_missing_corrupt_or_foreign_snapshots_are_ignored_with_a_warning(
        tmp_path, caplog, content, problem):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    path = str(tmp_path / "echo.json")
    if content is not None:
        with open(path, "wb") as f:
            f.write(content)
    got = Snapshots()
    # Nothing listens on this port: ZooKeeper cannot be read at all.
    disc = thriftpool.ZooKeeperDiscovery(f"127.0.0.1:{free_port()}", "/services/echo",
                                         snapshot_path=path, connect_timeout=0.3,
                                         reconnect_max_delay=0.5)
    disc.start(got, "ignored")
    try:
        wait_for(lambda: warnings(caplog, "is not used"), 5, message="the warning")
        assert problem in warnings(caplog, "is not used")[0]
        time.sleep(0.3)
        assert got.lists == [] and disc.stats()["source"] is None
    finally:
        disc.stop()


@pytest.mark.timeout(30)
def test_a_snapshot_that_cannot_be_written_is_a_warning_never_fatal(zk, farm, caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    a, b = farm.start(2)
    admin = zk.client()
    admin.create(f"{zk.path}/{a.address}", b"", makepath=True)
    disc = discovery(zk, snapshot_path="/nonexistent-dir/thriftpool/echo.json")
    pool = make_pool(zk, disc)
    wait_for(lambda: instances(pool) == [a.address], 5)
    admin.create(f"{zk.path}/{b.address}", b"")
    wait_for(lambda: instances(pool) == sorted([a.address, b.address]), 5)
    assert disc.stats()["snapshot_write_errors"] == 2
    assert len(warnings(caplog, "cannot write the snapshot")) == 1  # once per problem


# -- drop protection ----------------------------------------------------------------------

def nodes(admin: Any, path: str, ports: List[int]) -> List[str]:
    admin.ensure_path(path)
    made = []
    for port in ports:
        made.append(admin.create(f"{path}/127.0.0.1:{port}", b""))
    return made


@pytest.mark.timeout(30)
def test_most_children_deleted_at_once_are_held_then_confirmed(zk, caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    admin = zk.client()
    made = nodes(admin, zk.path, [1, 2, 3, 4, 5])
    got = Snapshots()
    disc = discovery(zk, drop_confirm_delay=1.0)
    disc.start(got, "drop")
    zk.closing(disc)
    wait_for(lambda: len(got.last()) == 5, 5)

    admin.delete(made[4])  # one deregistration: at once
    wait_for(lambda: len(got.last()) == 4, 3)
    assert disc.stats()["drops_held"] == 0

    t = admin.transaction()
    for node in made[1:4]:
        t.delete(node)
    t.commit()
    wait_for(lambda: disc.stats()["drops_held"] == 1, 3, message="the hold")
    held_at = time.monotonic()
    assert len(got.last()) == 4
    assert disc.stats()["holding"] == [f"127.0.0.1:{p}" for p in (2, 3, 4)]
    wait_for(lambda: got.last() == ["127.0.0.1:1"], 5, message="the confirmation")
    assert time.monotonic() - held_at >= 0.8
    assert disc.stats()["drops_confirmed"] == 1 and disc.stats()["holding"] == []
    assert warnings(caplog, "holding the removal of 3 back")
    assert warnings(caplog, "confirmed: removing 3 of the 4")


@pytest.mark.timeout(30)
def test_a_held_removal_is_released_when_the_instances_come_back(zk):
    admin = zk.client()
    made = nodes(admin, zk.path, [1, 2, 3, 4])
    got = Snapshots()
    disc = discovery(zk, drop_confirm_delay=3.0)
    disc.start(got, "release")
    zk.closing(disc)
    wait_for(lambda: len(got.last()) == 4, 5)
    t = admin.transaction()
    for node in made[:3]:
        t.delete(node)
    t.commit()
    wait_for(lambda: disc.stats()["drops_held"] == 1, 3)
    nodes(admin, zk.path, [1, 2, 3])
    wait_for(lambda: disc.stats()["holding"] == [], 3, message="the release")
    time.sleep(3.5)  # past the confirmation delay: nothing is removed
    assert all(len(s) == 4 for s in got.lists)
    assert disc.stats()["drops_confirmed"] == 0


@pytest.mark.timeout(30)
def test_a_deleted_parent_path_is_held_then_confirmed(zk, farm):
    servers = farm.start(3)
    admin = zk.client()
    admin.ensure_path(zk.path)
    for s in servers:
        admin.create(f"{zk.path}/{s.address}", b"")
    disc = discovery(zk, drop_confirm_delay=1.5)
    pool = make_pool(zk, disc)
    wait_for(lambda: len(instances(pool)) == 3, 5)
    t = admin.transaction()  # someone deletes the whole service path by mistake
    for s in servers:
        t.delete(f"{zk.path}/{s.address}")
    t.delete(zk.path)
    t.commit()
    wait_for(lambda: disc.stats()["drops_held"] == 1, 3)
    assert len(answers(pool, 6)) == 3  # still served while held
    wait_for(lambda: instances(pool) == [], 5, message="the confirmed removal")
    assert disc.stats()["children"] == 0


def test_static_discovery_writes_the_list_it_serves(tmp_path, caplog):
    path = str(tmp_path / "static.json")
    disc = thriftpool.StaticDiscovery(["127.0.0.1:9090", "127.0.0.1:9091"],
                                      snapshot_path=path)
    got: List[Any] = []
    disc.start(got.append, "static")
    assert [str(e) for e in got[0]] == ["127.0.0.1:9090", "127.0.0.1:9091"]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    endpoints, age, why = SnapshotFile(path, "static:127.0.0.1:9090,127.0.0.1:9091").read()
    assert why == "" and [str(e) for e in endpoints] == ["127.0.0.1:9090", "127.0.0.1:9091"]
    # An unwritable path is a warning, never fatal: the pool still gets its list.
    bad = thriftpool.StaticDiscovery(["127.0.0.1:9090"],
                                     snapshot_path=str(tmp_path / "missing" / "x.json"))
    got.clear()
    with caplog.at_level(logging.WARNING):
        bad.start(got.append, "static")
    assert len(got[0]) == 1 and "cannot write the discovery snapshot" in caplog.text
    with pytest.raises(ValueError, match="snapshot_path"):
        thriftpool.StaticDiscovery(["127.0.0.1:9090"], snapshot_path="")
