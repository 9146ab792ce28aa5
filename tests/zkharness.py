"""Real ZooKeeper servers for the tests: standalone or a 3-node ensemble, on loopback.

Debian's ``zookeeper`` package provides the server (``/usr/share/java/zookeeper.jar``,
whose manifest lists its dependency jars; ``slf4j-simple`` gives it a log).  Each server
is a ``java`` subprocess with its own temporary data directory, a free loopback client
port and ``tickTime`` 500 ms, so sessions can be expired in seconds.  A fixture fails
(never skips) when Java or ZooKeeper is missing.

Fixtures (hooked into pytest by import lines in ``conftest.py``):

- ``zk``: a fresh chroot on one standalone server shared by the session; for tests that
  do not stop the server.
- ``zk_private``: a standalone server of the test's own, for tests that stop, restart or
  expire things wholesale.
- ``zk_ensemble``: three servers forming a quorum, with helpers to find and kill the
  leader.

Tests that use any of them are marked ``zookeeper`` automatically.  When a test fails,
the part of each server's log written during the test is printed.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest
from kazoo.client import KazooClient
from kazoo.protocol.connection import _SESSION_EXPIRED
from kazoo.protocol.states import KazooState

from servers import free_port, free_ports

ZOOKEEPER_JAR = os.environ.get("ZOOKEEPER_JAR", "/usr/share/java/zookeeper.jar")
SLF4J_SIMPLE_JAR = "/usr/share/java/slf4j-simple.jar"
MAIN_CLASS = "org.apache.zookeeper.server.quorum.QuorumPeerMain"
TICK_MS = 500

ZK_FIXTURES = ("zk", "zk_server", "zk_private", "zk_ensemble")

_counter = itertools.count(1)


def _java() -> str:
    java = os.environ.get("JAVA") or shutil.which("java")
    if not java:
        pytest.fail("java is not installed: the ZooKeeper tests need Debian's zookeeper "
                    "package (apt-get install -y zookeeper; .ci/test installs it)",
                    pytrace=False)
    if not os.path.exists(ZOOKEEPER_JAR):
        pytest.fail(f"{ZOOKEEPER_JAR} is missing: the ZooKeeper tests need Debian's "
                    "zookeeper package (apt-get install -y zookeeper)", pytrace=False)
    return java


def four_letter(port: int, cmd: str, timeout: float = 1.0) -> str:
    """Send a four-letter command (``ruok``, ``srvr``...) and return the reply ('' on error)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(cmd.encode())
            chunks = []
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    break
                chunks.append(chunk)
            return b"".join(chunks).decode("utf-8", "replace")
    except OSError:
        return ""


class ZooKeeperServer:
    """One ZooKeeper server process (standalone, or one member of an ensemble)."""

    def __init__(self, base_dir: str, myid: int = 0,
                 peers: Optional[List[Tuple[int, int, int, int]]] = None) -> None:
        self.java = _java()
        self.myid = myid
        self.dir = os.path.join(base_dir, f"zk{myid}")
        self.data_dir = os.path.join(self.dir, "data")
        os.makedirs(self.data_dir, exist_ok=True)
        self.log_path = os.path.join(self.dir, "zookeeper.log")
        self.config_path = os.path.join(self.dir, "zoo.cfg")
        self.proc: Optional[subprocess.Popen] = None
        lines = [
            f"tickTime={TICK_MS}",
            "initLimit=10",
            "syncLimit=4",
            f"dataDir={self.data_dir}",
            "clientPortAddress=127.0.0.1",
            "minSessionTimeout=1000",
            "maxSessionTimeout=20000",
            "4lw.commands.whitelist=*",
            "admin.enableServer=false",
            "forceSync=no",
            "preAllocSize=1024",
            "maxClientCnxns=0",
        ]
        if peers:
            self.port = next(p[1] for p in peers if p[0] == myid)
            lines.append(f"clientPort={self.port}")
            for sid, _client, quorum, election in peers:
                lines.append(f"server.{sid}=127.0.0.1:{quorum}:{election}")
            with open(os.path.join(self.data_dir, "myid"), "w") as f:
                f.write(f"{myid}\n")
        else:
            self.port = free_port()
            lines.append(f"clientPort={self.port}")
        with open(self.config_path, "w") as f:
            f.write("\n".join(lines) + "\n")
        self._log_file: Optional[Any] = None

    @property
    def hosts(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, wait: bool = True, timeout: float = 30.0) -> None:
        """Start the process; with ``wait``, until it serves requests."""
        assert not self.running, "already running"
        classpath = ZOOKEEPER_JAR
        if os.path.exists(SLF4J_SIMPLE_JAR):
            classpath += os.pathsep + SLF4J_SIMPLE_JAR
        cmd = [self.java, "-Xms32m", "-Xmx256m", "-XX:+UseSerialGC",
               "-XX:TieredStopAtLevel=1", "-Xshare:auto", "-Djava.net.preferIPv4Stack=true",
               "-Dzookeeper.admin.enableServer=false", "-Dzookeeper.jmx.log4j.disable=true",
               "-Dzookeeper.cnxTimeout=1000", "-Dorg.slf4j.simpleLogger.showDateTime=true",
               "-Dorg.slf4j.simpleLogger.dateTimeFormat=HH:mm:ss.SSS",
               "-cp", classpath, MAIN_CLASS, self.config_path]
        self._log_file = open(self.log_path, "ab")
        self._log_file.write(f"=== starting: {' '.join(cmd)}\n".encode())
        self._log_file.flush()
        self.proc = subprocess.Popen(cmd, stdout=self._log_file, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd=self.dir,
                                     start_new_session=True)
        if wait:
            self.wait_serving(timeout)

    def wait_serving(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if not self.running:
                raise AssertionError(f"ZooKeeper {self.myid} exited:\n{self.log_tail()}")
            if self.serving():
                return
            if time.monotonic() >= deadline:
                raise AssertionError(f"ZooKeeper {self.myid} did not serve within "
                                     f"{timeout}s:\n{self.log_tail()}")
            time.sleep(0.05)

    def serving(self) -> bool:
        """It answers ``srvr`` with a mode (``ruok`` says imok even without a quorum)."""
        return self.mode() is not None

    def mode(self) -> Optional[str]:
        """``"standalone"``, ``"leader"``, ``"follower"``, or None when not serving."""
        for line in four_letter(self.port, "srvr").splitlines():
            if line.startswith("Mode:"):
                return line.split(":", 1)[1].strip()
        return None

    def stop(self) -> None:
        """Kill the process by pid (SIGKILL: a crash, nothing said to clients)."""
        if self.proc is not None:
            if self.proc.poll() is None:
                os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
            self.proc = None
        if self._log_file is not None:
            self._log_file.write(b"=== stopped\n")
            self._log_file.close()
            self._log_file = None
        # The port is free once nobody listens on it.
        deadline = time.monotonic() + 5
        while four_letter(self.port, "ruok", 0.2) and time.monotonic() < deadline:
            time.sleep(0.05)

    def restart(self, wait: bool = True) -> None:
        """Start again on the same port and data directory."""
        if self.running:
            self.stop()
        self.start(wait)

    def log_size(self) -> int:
        try:
            return os.path.getsize(self.log_path)
        except OSError:
            return 0

    def log_tail(self, offset: int = 0, limit: int = 60_000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return "(no log)"
        return text[-limit:]


class ZooKeeperEnsemble:
    """Three servers on loopback, each with its own data dir, ``myid`` and ports."""

    def __init__(self, base_dir: str, size: int = 3) -> None:
        ports = iter(free_ports(3 * size))
        peers = [(sid, next(ports), next(ports), next(ports)) for sid in range(1, size + 1)]
        self.servers = [ZooKeeperServer(base_dir, sid, peers) for sid, *_ in peers]

    @property
    def hosts(self) -> str:
        return ",".join(s.hosts for s in self.servers)

    def start(self, timeout: float = 45.0) -> None:
        for s in self.servers:
            s.start(wait=False)
        self.wait_quorum(timeout)

    def wait_quorum(self, timeout: float = 30.0) -> "ZooKeeperServer":
        """Wait until the running servers have a leader and serve; return the leader."""
        deadline = time.monotonic() + timeout
        while True:
            running = [s for s in self.servers if s.running]
            modes = {s.myid: s.mode() for s in running}
            leaders = [s for s in running if modes[s.myid] == "leader"]
            if leaders and all(modes.values()):
                return leaders[0]
            if time.monotonic() >= deadline:
                logs = "\n".join(f"--- zk{s.myid}\n{s.log_tail(limit=8000)}"
                                 for s in self.servers)
                raise AssertionError(f"no quorum within {timeout}s ({modes}):\n{logs}")
            time.sleep(0.05)

    def leader(self) -> Optional[ZooKeeperServer]:
        for s in self.servers:
            if s.running and s.mode() == "leader":
                return s
        return None

    def kill_leader(self) -> ZooKeeperServer:
        leader = self.leader()
        assert leader is not None, "no leader to kill"
        leader.stop()
        return leader

    def stop(self) -> None:
        for s in self.servers:
            s.stop()


# -- sessions ---------------------------------------------------------------------------

def expire_session(server_hosts: str, client: KazooClient, timeout: float = 15.0) -> None:
    """Make the server expire ``client``'s session, as after a long partition.

    ``client`` is pointed at a dead port (so it cannot reconnect), then a second
    connection presents the session's id and password, which moves the session to it,
    and closes it: the server ends the session and deletes its ephemeral nodes
    (ZooKeeper's own tests and Curator's ``KillSession`` do the same).  Then ``client``
    gets its hosts back, learns that its session expired, and opens a new one; this
    waits until it has.
    """
    client_id = client.client_id
    assert client_id is not None, "client is not connected"
    lost = []

    def listener(state: str) -> None:
        if state == KazooState.LOST:
            lost.append(state)

    original = ",".join(f"{h}:{p}" for h, p in client.hosts) + (client.chroot or "")
    client.add_listener(listener)
    client.set_hosts(f"127.0.0.1:{free_port()}" + (client.chroot or ""))
    killer = KazooClient(hosts=server_hosts.split("/")[0],
                         timeout=client._session_timeout / 1000)
    killer._session_id, killer._session_passwd = client_id
    try:
        killer.start(timeout=10)
        assert killer.client_id is not None and killer.client_id[0] == client_id[0]
    finally:
        killer.stop()
        killer.close()
        client.set_hosts(original)
    deadline = time.monotonic() + timeout
    while not (lost and client.connected and client.client_id
               and client.client_id[0] != client_id[0]):
        if time.monotonic() >= deadline:
            raise AssertionError(f"session 0x{client_id[0]:x} did not expire and recover "
                                 f"within {timeout}s (lost={lost})")
        time.sleep(0.05)
    client.remove_listener(listener)


def expire_session_client_side(client: KazooClient) -> int:
    """Make ``client`` believe its session expired while the server keeps it alive.

    The client opens a new session; the old one, with its ephemeral nodes, lives on
    until the server times it out.  Returns the old session id.
    """
    client_id = client.client_id
    assert client_id is not None, "client is not connected"
    client._call(_SESSION_EXPIRED, client.handler.async_result())
    return client_id[0]


# -- fixtures ---------------------------------------------------------------------------

class ZKContext:
    """What a test gets: the server(s), a fresh chroot and helpers."""

    def __init__(self, servers: List[ZooKeeperServer], server_hosts: str,
                 ensemble: Optional[ZooKeeperEnsemble] = None) -> None:
        self.servers = servers
        self.server = servers[0]
        self.ensemble = ensemble
        self.server_hosts = server_hosts
        self.chroot = f"/t{os.getpid()}-{next(_counter)}"
        self.hosts = server_hosts + self.chroot
        self.path = "/services/echo"
        self._clients: List[KazooClient] = []
        self._closers: List[Any] = []
        self._offsets = {id(s): s.log_size() for s in servers}
        admin = self.client(chroot=False)
        admin.ensure_path(self.chroot)

    @property
    def hosts_listed_twice(self) -> str:
        """``hosts`` with each server listed twice, for tests that restart ZooKeeper.

        Kazoo gives up on a connection that gets no answer after ``session_timeout /
        len(hosts)``, and ZooKeeper 3.8 leaves some connections unanswered while it
        starts up; with a single server that costs the whole session timeout, so a
        session the restarted server restored can expire before its client is back.
        Listing the server twice halves that wait, as a multi-server string would.
        """
        doubled = ",".join(h for h in self.server_hosts.split(",") for _ in range(2))
        return doubled + self.chroot

    def client(self, auth_data: Any = None, chroot: bool = True,
               session_timeout: float = 6.0) -> KazooClient:
        """A connected kazoo client on the test's chroot, closed at teardown.

        It lists the servers twice (see :attr:`hosts_listed_twice`), so that a test that
        restarts ZooKeeper does not wait out a connection the server left unanswered.
        """
        hosts = self.hosts_listed_twice if chroot else self.hosts_listed_twice[
            :-len(self.chroot)]
        client = KazooClient(hosts=hosts, timeout=session_timeout, auth_data=auth_data)
        client.start(timeout=15)
        self._clients.append(client)
        return client

    def closing(self, thing: Any) -> Any:
        """Stop/close ``thing`` (pool, discovery, registration, server) at teardown."""
        self._closers.append(thing)
        return thing

    def expire(self, client: KazooClient) -> None:
        expire_session(self.server_hosts, client)

    def log_excerpt(self) -> str:
        return "\n".join(f"----- ZooKeeper {s.myid} log ({s.log_path}) -----\n"
                         f"{s.log_tail(self._offsets.get(id(s), 0))}" for s in self.servers)

    def close(self, drop_chroot: bool) -> None:
        for thing in reversed(self._closers):
            try:
                closer = getattr(thing, "close", None) or thing.stop
                closer()
            except Exception:
                pass
        if drop_chroot and self._clients and self._clients[0].connected:
            try:
                self._clients[0].delete(self.chroot, recursive=True)
            except Exception:
                pass
        for client in self._clients:
            try:
                client.stop()
                client.close()
            except Exception:
                pass


def _dump_on_failure(request: Any, ctx: ZKContext, failed_before: int) -> None:
    if request.session.testsfailed <= failed_before:
        return
    text = ctx.log_excerpt()
    capman = request.config.pluginmanager.getplugin("capturemanager")
    if capman is not None:
        with capman.global_and_fixture_disabled():
            sys.stderr.write(f"\n{text}\n")
    else:  # pragma: no cover
        sys.stderr.write(f"\n{text}\n")


@pytest.fixture(scope="session")
def zk_server() -> Iterator[ZooKeeperServer]:
    """One standalone ZooKeeper server for the whole session (tests must not stop it)."""
    base = tempfile.mkdtemp(prefix="thriftpool-zk-")
    server = ZooKeeperServer(base)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def zk(request: Any, zk_server: ZooKeeperServer) -> Iterator[ZKContext]:
    """A fresh chroot on the shared server."""
    failed_before = request.session.testsfailed
    if not zk_server.running:  # a test killed it: bring it back for the next ones
        zk_server.restart()
    ctx = ZKContext([zk_server], zk_server.hosts)
    try:
        yield ctx
    finally:
        ctx.close(drop_chroot=True)
        _dump_on_failure(request, ctx, failed_before)


@pytest.fixture
def zk_private(request: Any, tmp_path: Any) -> Iterator[ZKContext]:
    """A standalone server of this test's own (``ctx.server.stop()/restart()``)."""
    failed_before = request.session.testsfailed
    server = ZooKeeperServer(str(tmp_path))
    ctx: Optional[ZKContext] = None
    try:
        server.start()
        ctx = ZKContext([server], server.hosts)
        yield ctx
    finally:
        if ctx is not None:
            ctx.close(drop_chroot=False)
        server.stop()
        if ctx is not None:
            _dump_on_failure(request, ctx, failed_before)
        elif request.session.testsfailed > failed_before:
            sys.stderr.write(server.log_tail())


@pytest.fixture
def zk_ensemble(request: Any, tmp_path: Any) -> Iterator[ZKContext]:
    """A 3-node ensemble (``ctx.ensemble``), with a fresh chroot."""
    failed_before = request.session.testsfailed
    ensemble = ZooKeeperEnsemble(str(tmp_path))
    ctx: Optional[ZKContext] = None
    try:
        ensemble.start()
        ctx = ZKContext(ensemble.servers, ensemble.hosts, ensemble)
        yield ctx
    finally:
        if ctx is not None:
            ctx.close(drop_chroot=False)
        ensemble.stop()
        if ctx is not None:
            _dump_on_failure(request, ctx, failed_before)


@pytest.hookimpl(specname="pytest_collection_modifyitems")
def pytest_zkharness_mark_items(items: List[Any]) -> None:
    """Mark every test that uses a ZooKeeper fixture ``zookeeper`` (``-m "not zookeeper"``)."""
    for item in items:
        if any(name in ZK_FIXTURES for name in getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.zookeeper)


def server_stats(hosts: str) -> Dict[str, str]:
    """``srvr`` as a dict, for diagnostics."""
    host, _, port = hosts.split(",")[0].split("/")[0].rpartition(":")
    out: Dict[str, str] = {}
    for line in four_letter(int(port), "srvr").splitlines():
        key, _, value = line.partition(":")
        out[key.strip()] = value.strip()
    return out
