"""thriftpool with ZooKeeper: servers register themselves, a pool follows them.

Starts a throwaway ZooKeeper server (Debian's ``zookeeper`` package, started from
``/usr/share/java``; or use a running one with ``--zk host:port``), starts three echo
servers that register themselves under one service path, drives calls from a few
threads through a pool that discovers them, then stops one server: it deregisters
first, the pool stops routing to it within milliseconds, and the traffic moves to the
other two without a failed call.  Prints the traffic per server and the pool's stats.

    python examples/zookeeper_example.py
    python examples/zookeeper_example.py --zk 127.0.0.1:2181
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
try:
    import thriftpool
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, ROOT)
    import thriftpool

from echo_server import EchoHandler, echo_thrift  # noqa: E402  (examples/echo_server.py)

ZOOKEEPER_JAR = "/usr/share/java/zookeeper.jar"
THREADS = 4
PHASE_SECONDS = 2.0


class LocalZooKeeper:
    """A standalone ZooKeeper in a temporary directory on a free loopback port."""

    def __init__(self) -> None:
        java = shutil.which("java")
        if not java or not os.path.exists(ZOOKEEPER_JAR):
            sys.exit("needs Debian's zookeeper package (apt-get install -y zookeeper), "
                     "or --zk host:port of a running ZooKeeper")
        self.dir = tempfile.mkdtemp(prefix="thriftpool-zk-example-")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        config = os.path.join(self.dir, "zoo.cfg")
        with open(config, "w") as f:
            f.write(f"tickTime=500\ndataDir={self.dir}/data\nclientPort={self.port}\n"
                    "clientPortAddress=127.0.0.1\n4lw.commands.whitelist=srvr\n"
                    "admin.enableServer=false\n")
        classpath = ZOOKEEPER_JAR
        if os.path.exists("/usr/share/java/slf4j-nop.jar"):
            classpath += ":/usr/share/java/slf4j-nop.jar"  # keep the server quiet
        self.log = open(os.path.join(self.dir, "zookeeper.log"), "wb")
        self.proc = subprocess.Popen(
            [java, "-Xmx256m", "-XX:+UseSerialGC", "-Dzookeeper.admin.enableServer=false",
             "-cp", classpath, "org.apache.zookeeper.server.quorum.QuorumPeerMain", config],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.hosts = f"127.0.0.1:{self.port}"
        deadline = time.monotonic() + 30
        while not self._serving():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                sys.exit(f"ZooKeeper did not start; see {self.dir}/zookeeper.log")
            time.sleep(0.1)

    def _serving(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"srvr")
                return b"Mode:" in s.recv(4096)
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def drive(pool: thriftpool.ThriftPool, seconds: float) -> Dict[str, int]:
    """Call ``whoami`` from several threads for ``seconds``; count answers per server."""
    counts: "collections.Counter[str]" = collections.Counter()
    errors: List[str] = []
    lock = threading.Lock()
    proxy = pool.client()
    deadline = time.monotonic() + seconds

    def worker() -> None:
        seen: "collections.Counter[str]" = collections.Counter()
        while time.monotonic() < deadline:
            try:
                seen[proxy.whoami()] += 1
            except Exception as exc:  # there should be none
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}")
        with lock:
            counts.update(seen)

    threads = [threading.Thread(target=worker, name=f"caller-{i}") for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        print(f"  {len(errors)} failed calls, e.g. {errors[0]}")
    return dict(counts)


def show(title: str, counts: Dict[str, int], names: List[str]) -> None:
    total = sum(counts.values()) or 1
    print(title)
    for name in names:
        n = counts.get(name, 0)
        print(f"  {name:10} {n:7d} calls  {100 * n / total:5.1f}%  {'#' * (40 * n // total)}")


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zk", help="host:port of a running ZooKeeper (default: start one)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("thriftpool.registration").setLevel(logging.INFO)

    zookeeper = None if args.zk else LocalZooKeeper()
    hosts = args.zk or zookeeper.hosts  # type: ignore[union-attr]
    path = f"/thriftpool-example/echo-{os.getpid()}"
    print(f"ZooKeeper at {hosts}, service path {path}")
    servers: List[thriftpool.RegisteredServer] = []
    pool: Optional[thriftpool.ThriftPool] = None
    try:
        # Each server listens on a free loopback port, then registers an ephemeral node.
        for i in range(3):
            servers.append(thriftpool.RegisteredServer(
                echo_thrift.Echo, EchoHandler(f"server-{i}"), "127.0.0.1", 0,
                hosts=hosts, path=path, session_timeout=6.0, drain_timeout=2.0).start())
        print("registered:", ", ".join(s.address for s in servers))

        discovery = thriftpool.ZooKeeperDiscovery(hosts, path, session_timeout=6.0)
        pool = thriftpool.ThriftPool(echo_thrift.Echo, discovery, name="echo",
                                     min_size=1, max_size=4, balancer="round_robin")
        deadline = time.monotonic() + 10
        while len(pool.stats()["instances"]) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        print(f"the pool discovered {len(pool.stats()['instances'])} instances")

        names = [f"server-{i}" for i in range(3)]
        show(f"\n{THREADS} threads for {PHASE_SECONDS}s, three servers:",
             drive(pool, PHASE_SECONDS), names)

        print("\nstopping server-0 in 0.5s: deregister, drain, stop accepting ...")
        took: List[float] = []

        def stop_first() -> None:
            time.sleep(0.5)
            started = time.monotonic()
            servers[0].stop()
            took.append(time.monotonic() - started)

        stopping = threading.Thread(target=stop_first)
        stopping.start()
        counts = drive(pool, PHASE_SECONDS)  # traffic goes on while it stops
        stopping.join()
        print(f"server-0 deregistered, drained and stopped in {took[0] * 1000:.0f} ms; "
              f"the pool now lists {sorted(pool.stats()['instances'])}")
        show(f"\n{THREADS} threads for {PHASE_SECONDS}s, during and after the stop:",
             counts, names)
        show(f"\n{THREADS} threads for {PHASE_SECONDS}s, two servers:",
             drive(pool, PHASE_SECONDS), names)

        stats = pool.stats()
        print("\npool stats:")
        print(json.dumps({k: stats[k] for k in ("size", "idle", "in_use", "waiting")},
                         sort_keys=True))
        for key, inst in sorted(stats["instances"].items()):
            print(f"  {key}: " + json.dumps(
                {k: inst[k] for k in ("size", "idle", "in_use", "opened", "closed")
                 if k in inst}, sort_keys=True))
        print("discovery:", json.dumps(discovery.stats(), sort_keys=True))
    finally:
        if pool is not None:
            pool.close()
        for server in servers:
            server.stop(drain_timeout=0)
        if zookeeper is not None:
            zookeeper.stop()
    print("\ndone")


if __name__ == "__main__":
    main()
