"""Scale: one watchdog pass over 10,000 idle connections, checkout cost against the number
of instances, and ZooKeeper churn over 1,000 registered instances.

No Thrift server is needed for idle connections: one "holder" subprocess (this script with
``--hold N``) listens on N loopback ports with a single-threaded ``selectors`` loop that
accepts every connection, holds it, and closes it when the client does.  It exits when
this process exits (it watches its stdin).

- ``watchdog``: one pool over 100 instances with ``min_size = max_size = N / 100`` idle
  connections each, for N = 1,000, 2,500, 5,000, 7,500, 10,000.  The watchdog interval is an hour,
  so its thread never runs during the measurement; ``pool._maintain()`` is called
  directly, ``--reps`` times, and the median, min and max are reported.  A pass polls
  every idle socket once (``poll(0)``), checks expiry and idle time, and opens nothing.
- ``checkout``: ``with pool.checkout(): pass`` (no I/O, one thread) on pools of 1, 10,
  100 and 1,000 instances with one idle connection each, for the ``least_loaded``
  (default) and ``round_robin`` balancers; the pools are measured interleaved, median
  of ``--reps``.
- ``churn``: a standalone ZooKeeper server (Debian's ``zookeeper`` package, started as
  ``tests/zkharness.py`` does), 1,000 ephemeral nodes ``{"host", "port"}`` written by one
  kazoo client, one pool with ``ZooKeeperDiscovery`` and ``min_size=1`` (so every
  instance holds one connection to the holder).  Each round deletes 100 random nodes and
  creates 100 new ones (200 pipelined requests), then polls ``pool.stats()`` every 10 ms
  until its instance set is the new one; it also checks that the 900 unchanged instances
  kept the same ``InstancePool``, the same connection object and ``opened``/``closed``
  counters, and times until the 100 new instances have their connection.

Run from the repository root::

    python bench/bench_scale.py                      # about a minute
    python bench/bench_scale.py --parts watchdog --reps 21
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

from _common import Echo, machine_line, median, print_table, raise_fd_limit, stop_process

import thriftpool

HOUR = 3600.0


# -- the holder server -------------------------------------------------------------------

def hold(nports: int) -> None:
    """Listen on ``nports`` loopback ports; accept and hold every connection until the
    client closes it.  Prints ``READY port port ...``; exits when stdin closes."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    sel = selectors.DefaultSelector()
    ports = []
    for _ in range(nports):
        lsock = socket.socket()
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(4096)
        lsock.setblocking(False)
        sel.register(lsock, selectors.EVENT_READ, True)
        ports.append(lsock.getsockname()[1])

    def exit_when_parent_goes() -> None:
        sys.stdin.read()
        os._exit(0)

    threading.Thread(target=exit_when_parent_goes, daemon=True).start()
    print("READY " + " ".join(map(str, ports)), flush=True)
    while True:
        for key, _ in sel.select():
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            if key.data:  # a listener: take every pending connection
                while True:
                    try:
                        conn, _addr = sock.accept()
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:  # EMFILE and the like: leave it in the backlog
                        break
                    conn.setblocking(False)
                    sel.register(conn, selectors.EVENT_READ, False)
            else:
                try:
                    data = sock.recv(65536)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    data = b""
                if not data:  # the client closed (or reset): close our side
                    sel.unregister(sock)
                    sock.close()


class Holder:
    """The holder subprocess."""

    def __init__(self, nports: int, timeout: float = 30.0) -> None:
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--hold",
                                      str(nports)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line: Dict[str, str] = {}
        reader = threading.Thread(
            target=lambda: line.setdefault("ready", self.proc.stdout.readline()),  # type: ignore[union-attr]
            daemon=True)
        reader.start()
        reader.join(timeout)
        ready = line.get("ready", "")
        if not ready.startswith("READY"):
            self.stop()
            raise RuntimeError(f"holder did not start: {ready!r}")
        self.ports = [int(p) for p in ready.split()[1:]]

    def stop(self) -> None:
        stop_process(self.proc)


def addresses(ports: Sequence[int]) -> List[str]:
    return [f"127.0.0.1:{p}" for p in ports]


def wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.01) -> float:
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)
    return time.monotonic() - t0


# -- (a) one watchdog pass ---------------------------------------------------------------

def bench_watchdog(holder: Holder, sizes: Sequence[int], reps: int, out: List[str],
                   results: Dict[str, Any]) -> None:
    ports = holder.ports[:100]
    rows = []
    for total in sizes:
        per = total // len(ports)
        t0 = time.monotonic()
        pool = thriftpool.ThriftPool(
            Echo, addresses(ports), name=f"scale-{total}", min_size=per, max_size=per,
            idle_timeout=None, max_lifetime=None, watchdog_interval=HOUR, connect_timeout=5.0)
        try:
            pool.wait(60)
            want = per * len(ports)
            wait_for(lambda p=pool, n=want: p.stats()["idle"] == n, 120,
                     f"{total} idle connections")
            fill = time.monotonic() - t0
            times = []
            for _ in range(reps):
                s = time.perf_counter()
                pool._maintain()
                times.append((time.perf_counter() - s) * 1e3)
            stats = pool.stats()
            assert stats["idle"] == per * len(ports), stats  # the passes closed nothing
            opened = sum(i["opened"] for i in stats["instances"].values())
            assert opened == per * len(ports), opened        # ... and opened nothing
        finally:
            pool.close()
        med = median(times)
        results.setdefault("watchdog", []).append(
            {"connections": total, "per_instance": per, "fill_s": fill, "ms": times})
        rows.append([f"{total:,}", str(per), f"{med:.2f} ({min(times):.2f}-{max(times):.2f})",
                     f"{med * 1e3 / total:.2f}", f"{fill:.1f}"])
        print(f"# {total} connections: {med:.2f} ms", file=sys.stderr, flush=True)
        # let the holder close its ends before the next pool opens more
        time.sleep(0.5)
    print_table(["idle connections", "per instance (100 instances)",
                 "one _maintain() pass, ms: median (min-max)", "us per connection",
                 "fill time, s"], rows, out)


# -- (b) checkout against the number of instances ------------------------------------------

def bench_checkout(holder: Holder, counts: Sequence[int], ops: int, reps: int,
                   out: List[str], results: Dict[str, Any]) -> None:
    pools: Dict[Tuple[str, int], thriftpool.ThriftPool] = {}
    try:
        for balancer in ("least_loaded", "round_robin"):
            for n in counts:
                pools[(balancer, n)] = thriftpool.ThriftPool(
                    Echo, addresses(holder.ports[:n]), name=f"co-{balancer}-{n}",
                    min_size=1, max_size=4, idle_timeout=None, max_lifetime=None,
                    watchdog_interval=HOUR, balancer=balancer, connect_timeout=5.0)
        for (_balancer, n), pool in pools.items():
            pool.wait(60)
            wait_for(lambda p=pool, n=n: p.stats()["idle"] == n, 60, f"{n} idle connections")
        timings: Dict[Tuple[str, int], List[float]] = {k: [] for k in pools}
        for rep in range(reps):
            keys = list(pools)
            keys = keys[rep % len(keys):] + keys[:rep % len(keys)]
            for key in keys:
                checkout = pools[key].checkout

                s = time.perf_counter()
                for _ in range(ops):
                    with checkout():
                        pass
                timings[key].append((time.perf_counter() - s) / ops * 1e6)
        # The balancer's pick alone, to tell its cost from the rest of the checkout.
        picks: Dict[Tuple[str, int], List[float]] = {k: [] for k in pools}
        for _ in range(reps):
            for key, pool in pools.items():
                pick, ring = pool._balancer.pick, pool._ring
                s = time.perf_counter()
                for _ in range(ops):
                    pick(ring)
                picks[key].append((time.perf_counter() - s) / ops * 1e6)
        for key, pool in pools.items():
            stats = pool.stats()
            # every checkout took an idle connection; none was opened beyond min_size
            assert stats["size"] == key[1], (key, stats["size"])
    finally:
        for pool in pools.values():
            pool.close()
    rows = []
    for n in counts:
        row = [f"{n:,}"]
        for balancer in ("least_loaded", "round_robin"):
            t = timings[(balancer, n)]
            row.append(f"{median(t):.2f} ({min(t):.2f}-{max(t):.2f})")
            row.append(f"{median(picks[(balancer, n)]):.2f}")
        rows.append(row)
    results["checkout"] = {f"{b}/{n}": t for (b, n), t in timings.items()}
    results["pick"] = {f"{b}/{n}": t for (b, n), t in picks.items()}
    print_table(["instances (1 idle connection each)",
                 "least_loaded (default), us: median (min-max)", "its pick() alone, us",
                 "round_robin, us: median (min-max)", "its pick() alone, us"], rows, out)


# -- (c) ZooKeeper churn ------------------------------------------------------------------

ZOOKEEPER_JAR = os.environ.get("ZOOKEEPER_JAR", "/usr/share/java/zookeeper.jar")
SLF4J_SIMPLE_JAR = "/usr/share/java/slf4j-simple.jar"


class ZooKeeper:
    """A standalone ZooKeeper server on a free loopback port (as in tests/zkharness.py)."""

    def __init__(self) -> None:
        java = os.environ.get("JAVA") or shutil.which("java")
        if not java or not os.path.exists(ZOOKEEPER_JAR):
            raise SystemExit("churn needs java and Debian's zookeeper package "
                             "(apt-get install -y zookeeper)")
        self.dir = tempfile.mkdtemp(prefix="bench-zk-")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        config = os.path.join(self.dir, "zoo.cfg")
        with open(config, "w") as f:
            f.write("\n".join([
                "tickTime=500", f"dataDir={self.dir}/data", "clientPortAddress=127.0.0.1",
                f"clientPort={self.port}", "minSessionTimeout=1000", "maxSessionTimeout=20000",
                "4lw.commands.whitelist=*", "admin.enableServer=false", "forceSync=no",
                "preAllocSize=1024", "maxClientCnxns=0"]) + "\n")
        classpath = ZOOKEEPER_JAR
        if os.path.exists(SLF4J_SIMPLE_JAR):
            classpath += os.pathsep + SLF4J_SIMPLE_JAR
        self.log = open(os.path.join(self.dir, "zookeeper.log"), "wb")
        self.proc = subprocess.Popen(
            [java, "-Xms32m", "-Xmx256m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1",
             "-Djava.net.preferIPv4Stack=true", "-Dzookeeper.admin.enableServer=false",
             "-cp", classpath, "org.apache.zookeeper.server.quorum.QuorumPeerMain", config],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)
        deadline = time.monotonic() + 60
        while "Mode:" not in self._srvr():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"ZooKeeper did not start; log in {self.dir}")
            time.sleep(0.1)
        self.hosts = f"127.0.0.1:{self.port}"

    def _srvr(self) -> str:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"srvr")
                return s.recv(4096).decode("utf-8", "replace")
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def bench_churn(holder: Holder, instances: int, change: int, rounds: int, out: List[str],
                results: Dict[str, Any]) -> None:
    from kazoo.client import KazooClient

    ports = holder.ports[:instances + change]
    if len(ports) < instances + change:
        raise SystemExit(f"churn needs {instances + change} holder ports")
    path = "/services/echo"
    zk = ZooKeeper()
    writer = KazooClient(hosts=zk.hosts, timeout=10)
    pool: Optional[thriftpool.ThriftPool] = None
    try:
        writer.start(30)
        writer.ensure_path(path)

        def node(port: int) -> str:
            return f"{path}/127.0.0.1:{port}"

        def data(port: int) -> bytes:
            return json.dumps({"host": "127.0.0.1", "port": port}).encode()

        current = list(ports[:instances])
        spare = list(ports[instances:])
        t0 = time.monotonic()
        for r in [writer.create_async(node(p), data(p), ephemeral=True) for p in current]:
            r.get(30)
        register = time.monotonic() - t0
        discovery = thriftpool.ZooKeeperDiscovery(zk.hosts, path)
        t0 = time.monotonic()
        pool = thriftpool.ThriftPool(Echo, discovery, name="churn", min_size=1, max_size=4,
                                     max_lifetime=None, connect_timeout=5.0)
        wait_for(lambda: len(pool.stats()["instances"]) == instances, 60,  # type: ignore[union-attr]
                 f"{instances} instances")
        first_list = time.monotonic() - t0
        wait_for(lambda: pool.stats()["idle"] == instances, 60,  # type: ignore[union-attr]
                 f"{instances} connections")
        first_conns = time.monotonic() - t0
        print(f"# registered {instances} in {register:.2f}s; pool saw them in "
              f"{first_list:.2f}s, connected in {first_conns:.2f}s", file=sys.stderr)
        rows = []
        rng = random.Random(6)
        for rnd in range(1, rounds + 1):
            removed = rng.sample(current, change)
            added = spare
            kept = [p for p in current if p not in set(removed)]
            before = {}
            for p in kept:
                inst = pool._instances[("127.0.0.1", p)]  # type: ignore[index]
                before[p] = (inst, list(inst._idle), inst.opened_total, inst.closed_total)
            reads0 = discovery.stats()["reads"]
            snaps0 = discovery.stats()["snapshots"]
            want = {f"127.0.0.1:{p}" for p in kept + added}
            t0 = time.monotonic()
            pending = [writer.delete_async(node(p)) for p in removed]
            pending += [writer.create_async(node(p), data(p), ephemeral=True) for p in added]
            for r in pending:
                r.get(30)
            acked = time.monotonic() - t0
            polls = 0
            while True:
                stats = pool.stats()
                polls += 1
                if set(stats["instances"]) == want:
                    break
                if time.monotonic() - t0 > 30:
                    raise RuntimeError("the pool did not apply the change within 30s")
                time.sleep(0.01)
            applied = time.monotonic() - t0
            wait_for(lambda new=added: all(  # type: ignore[misc]
                pool.stats()["instances"][f"127.0.0.1:{p}"]["idle"] == 1  # type: ignore[union-attr]
                for p in new), 30, "connections to the added instances")
            connected = time.monotonic() - t0
            changed = 0
            for p in kept:
                inst = pool._instances[("127.0.0.1", p)]  # type: ignore[index]
                now = (inst, list(inst._idle), inst.opened_total, inst.closed_total)
                old = before[p]
                if not (now[0] is old[0] and now[1] == old[1] and now[1][0] is old[1][0]
                        and now[2:] == old[2:]):
                    changed += 1
            reads = discovery.stats()["reads"] - reads0
            snaps = discovery.stats()["snapshots"] - snaps0
            results.setdefault("churn", []).append(
                {"round": rnd, "acked_s": acked, "applied_s": applied,
                 "connected_s": connected, "kept_changed": changed, "reads": reads,
                 "snapshots": snaps})
            rows.append([str(rnd), f"{acked * 1e3:.0f}", f"{applied * 1e3:.0f}",
                         f"{connected * 1e3:.0f}", str(reads), str(snaps),
                         f"{len(kept) - changed}/{len(kept)}"])
            print(f"# round {rnd}: applied in {applied * 1e3:.0f} ms", file=sys.stderr)
            current = kept + added
            spare = removed
        print_table(["round", "ZooKeeper acked all 200 ops, ms",
                     "pool's instance set matches, ms", "the 100 new ones connected, ms",
                     "child data reads", "snapshots delivered",
                     "unchanged instances that kept their connection"], rows, out)
        results["churn_setup"] = {"register_s": register, "first_list_s": first_list,
                                  "first_connections_s": first_conns}
        out.append("")
        out.append(f"Set-up: {instances:,} nodes registered in {register:.2f} s; the pool "
                   f"listed them {first_list:.2f} s and had connected all "
                   f"{first_conns:.2f} s after it was built.")
    finally:
        if pool is not None:
            pool.close()
        writer.stop()
        writer.close()
        zk.stop()


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--hold":
        hold(int(sys.argv[2]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", nargs="+", default=["watchdog", "checkout", "churn"],
                        choices=["watchdog", "checkout", "churn"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 2500, 5000, 7500, 10000],
                        help="idle connections for the watchdog pass (100 instances)")
    parser.add_argument("--instances", type=int, nargs="+", default=[1, 10, 100, 1000],
                        help="instance counts for the checkout cost")
    parser.add_argument("--ops", type=int, default=20_000, help="checkouts per run")
    parser.add_argument("--reps", type=int, default=11, help="repetitions (default 11)")
    parser.add_argument("--churn-instances", type=int, default=1000)
    parser.add_argument("--churn-change", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5, help="churn rounds (default 5)")
    parser.add_argument("--json", help="also write the raw results to this file")
    args = parser.parse_args()
    if any(s % 100 for s in args.sizes):
        parser.error("--sizes must be multiples of 100")
    need = max(max(args.sizes) if "watchdog" in args.parts else 0,
               2 * sum(args.instances) if "checkout" in args.parts else 0,
               args.churn_instances + args.churn_change if "churn" in args.parts else 0)
    raise_fd_limit(need + 200)
    import logging
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("thriftpool").setLevel(logging.WARNING)
    nports = max(100, max(args.instances), args.churn_instances + args.churn_change)
    out: List[str] = []
    results: Dict[str, Any] = {"machine": machine_line(), "argv": sys.argv}
    print(f"# bench_scale: {machine_line()}")
    print(f"# {' '.join(sys.argv)}")
    holder = Holder(nports)
    try:
        if "watchdog" in args.parts:
            bench_watchdog(holder, args.sizes, args.reps, out, results)
            print()
        if "checkout" in args.parts:
            bench_checkout(holder, args.instances, args.ops, args.reps, out, results)
            print()
        if "churn" in args.parts:
            bench_churn(holder, args.churn_instances, args.churn_change, args.rounds, out,
                        results)
            print(out[-1])
    finally:
        holder.stop()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
