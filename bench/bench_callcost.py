"""Client CPU per call, pinned: one client thread on CPU 0, one echo server on CPU 1.

Measures ``time.process_time()`` per 16-byte ``echo`` call (the client process's CPU,
so the server's work and the machine's other load on CPU 1 do not count) for:

- ``raw``: a persistent thriftpy2 client (Cython buffered transport and binary codec);
- ``tp_checkout``: ``with pool.checkout() as c: c.echo(...)``;
- ``tp_client``: ``pool.client().echo(...)``;
- ``tp_deadline``: ``tp_client`` inside ``with thriftpool.deadline(5):`` per call (only
  when the thriftpool under test has ``deadline``).

``--compare OTHER_TREE`` runs the same measurement with the thriftpool package of
another source tree (e.g. a ``git archive`` of the previous commit) in alternating child
processes, so both sets of numbers come from the same minutes of the same machine.
Bounded: ``--calls`` per measurement, ``--reps`` measurements per kind, ``--rounds``.

Run from the repository root::

    python bench/bench_callcost.py
    git archive HEAD~1 thriftpool | (mkdir -p /tmp/base && tar -x -C /tmp/base)
    python bench/bench_callcost.py --compare /tmp/base
    python bench/bench_callcost.py --compare /tmp/base --wire   # the connection layer alone

``--wire`` drives a ``PooledClient`` over a socketpair whose other end, in the same
thread, holds the canned reply before each call: no server, no scheduler.  With
``--compare``, the other tree's package is copied as ``thriftpool_other`` and both
connection layers run in one process, in alternating reps, so the paired difference
is steady where the end-to-end numbers swing by several microseconds; the same child
then does the same for ``pool.client().echo()`` of both trees against one real server.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)


def _pin(cpu: int) -> None:
    if hasattr(os, "sched_setaffinity") and cpu < (os.cpu_count() or 1):
        os.sched_setaffinity(0, {cpu})


def child(tree: str, port: int, calls: int, reps: int) -> Dict[str, List[float]]:
    """Runs in a subprocess: import thriftpool from ``tree`` and measure."""
    sys.path.insert(0, BENCH)
    _pin(0)
    from _common import MESSAGE, Echo  # noqa: E402  (puts this tree on sys.path)
    from thriftpy2.rpc import make_client  # noqa: E402

    sys.path.insert(0, tree)  # ... so the tree under test goes before it
    import thriftpool  # noqa: E402

    assert os.path.dirname(os.path.dirname(os.path.abspath(thriftpool.__file__))) == \
        os.path.abspath(tree), thriftpool.__file__
    raw = make_client(Echo, "127.0.0.1", port, timeout=5000)
    pool = thriftpool.ThriftPool(Echo, [f"127.0.0.1:{port}"], min_size=1, max_size=1,
                                 socket_timeout=5.0)
    pool.wait()
    proxy = pool.client()
    deadline = getattr(thriftpool, "deadline", None)

    def checkout_call() -> Any:
        with pool.checkout() as c:
            return c.echo(MESSAGE)

    def deadline_call() -> Any:
        assert deadline is not None
        with deadline(5):
            return proxy.echo(MESSAGE)

    kinds: Dict[str, Callable[[], Any]] = {
        "raw": lambda: raw.echo(MESSAGE),
        "tp_checkout": checkout_call,
        "tp_client": lambda: proxy.echo(MESSAGE),
    }
    if deadline is not None:
        kinds["tp_deadline"] = deadline_call
    results: Dict[str, List[float]] = {k: [] for k in kinds}
    for fn in kinds.values():  # warm up every path
        for _ in range(min(calls, 2000)):
            fn()
    for _ in range(reps):
        for name, fn in kinds.items():
            c0 = time.process_time()
            for _ in range(calls):
                fn()
            results[name].append((time.process_time() - c0) / calls * 1e6)
    pool.close()
    raw.close()
    return results


def _wire_client(pkg: Any, Echo: Any) -> Tuple[Any, Any, Any]:
    """A PooledClient of package ``pkg`` over one end of a socketpair."""
    import socket

    from thriftpy2.protocol import TBinaryProtocolFactory
    from thriftpy2.transport import TBufferedTransportFactory, TSocket

    connection = importlib.import_module(pkg.__name__ + ".connection")
    a, b = socket.socketpair()
    config = pkg.PoolConfig.build(service=Echo, socket_timeout=5.0)
    tsock: Any
    if hasattr(connection, "BoundedTSocket"):
        tsock = connection.BoundedTSocket("127.0.0.1", 1, config)
        tsock.sock = a
        tsock.bound(5.0, config.max_message_size, peer="bench")
        extra: tuple = (5.0, None)
    else:  # before the wire: thriftpy2's TSocket with kernel timeouts
        tsock = TSocket(sock=a)
        connection._set_call_timeout(a, 5.0)
        extra = ()
    transport = TBufferedTransportFactory().get_transport(tsock)
    protocol = TBinaryProtocolFactory().get_protocol(transport)
    conn = connection.Connection(pkg.Address("bench", 1), tsock, transport, protocol,
                                 0.0, float("inf"), *extra)
    cls = connection.client_class(Echo)
    try:
        client = cls(conn)
    except TypeError:  # before 2026-12-01: PooledClient(service, conn)
        client = cls(Echo, conn)
    return b, conn, client


def wire_child(other: Optional[str], calls: int, reps: int, port: int = 0
               ) -> Dict[str, List[float]]:
    """The connection layer alone, in one process: a PooledClient over a socketpair whose
    other end, in this same thread, holds the canned reply before each call (no server, no
    scheduler).  With ``other`` (a directory holding a copy of another tree's package as
    ``thriftpool_other``), both layers are measured in alternating reps."""
    import struct

    sys.path.insert(0, BENCH)
    _pin(0)
    from _common import MESSAGE, Echo  # noqa: E402

    import thriftpool  # noqa: E402  (this tree: _common put it first on sys.path)

    packages = {"this tree": thriftpool}
    if other:
        sys.path.insert(0, other)
        packages["other tree"] = importlib.import_module("thriftpool_other")
    raw = MESSAGE.encode()
    head = struct.pack("!ii", -2147418110, 4) + b"echo"  # VERSION_1 | REPLY, "echo"
    body = b"\x0b\x00\x00" + struct.pack("!i", len(raw)) + raw + b"\x00"
    replies = [head + struct.pack("!i", i) + body for i in range(1, calls + 1)]
    clients = {label: _wire_client(pkg, Echo) for label, pkg in packages.items()}
    results: Dict[str, List[float]] = {label: [] for label in packages}
    labels = list(packages)
    for rep in range(reps + 1):
        for label in labels if rep % 2 else labels[::-1]:
            b, conn, client = clients[label]
            conn.seqid = 0
            c0 = time.process_time()
            for i in range(calls):
                b.send(replies[i])
                client.echo(MESSAGE)
                if i % 64 == 63:
                    b.recv(1 << 20)  # drain the requests
            per_call = (time.process_time() - c0) / calls * 1e6
            b.setblocking(False)
            try:
                while b.recv(1 << 20):
                    pass
            except BlockingIOError:
                pass
            b.setblocking(True)
            if rep:  # the first rep warms up
                results[label].append(per_call)
    if port:  # the same, end to end: pool.client().echo() against a real server
        proxies = {}
        for label, pkg in packages.items():
            pool = pkg.ThriftPool(Echo, [f"127.0.0.1:{port}"], min_size=1, max_size=1)
            pool.wait()
            proxies[label] = (pool, pool.client())
        for label in packages:
            results[f"{label} (pool.client)"] = []
        for rep in range(reps + 1):
            for label in labels if rep % 2 else labels[::-1]:
                proxy = proxies[label][1]
                c0 = time.process_time()
                for _ in range(calls):
                    proxy.echo(MESSAGE)
                if rep:
                    results[f"{label} (pool.client)"].append(
                        (time.process_time() - c0) / calls * 1e6)
        for pool, _ in proxies.values():
            pool.close()
    return results


def run_child(tree: str, port: int, calls: int, reps: int) -> Dict[str, List[float]]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", tree, "--port", str(port), "--calls",
         str(calls), "--reps", str(reps)],
        capture_output=True, text=True, timeout=600,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    if out.returncode != 0:
        raise SystemExit(f"measuring {tree} failed:\n{out.stderr}")
    result: Dict[str, List[float]] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def _median(values: Sequence[float]) -> float:
    s = sorted(values)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compare", metavar="OTHER_TREE", help="also measure this tree")
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--wire", action="store_true",
                        help="measure the connection layer alone over a socketpair")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        if args.wire:
            other = None if args.child == "-" else args.child
            print(json.dumps(wire_child(other, args.calls, args.reps, args.port or 0)))
        else:
            print(json.dumps(child(args.child, args.port, args.calls, args.reps)))
        return

    sys.path.insert(0, BENCH)
    from _common import EchoServer, machine_line

    if args.wire:
        server = EchoServer()
        if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
            os.sched_setaffinity(server.proc.pid, {1})
        with tempfile.TemporaryDirectory() as tmp:
            other = None
            if args.compare:
                other = tmp
                shutil.copytree(os.path.join(os.path.abspath(args.compare), "thriftpool"),
                                os.path.join(tmp, "thriftpool_other"))
            out = subprocess.run(
                [sys.executable, __file__, "--child", other or "-", "--wire", "--calls",
                 str(args.calls), "--reps", str(args.reps), "--port", str(server.port)],
                capture_output=True, text=True, timeout=1800,
                env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
        server.stop()
        if out.returncode != 0:
            raise SystemExit(f"measuring failed:\n{out.stderr}")
        results = json.loads(out.stdout.strip().splitlines()[-1])
        print(machine_line())
        print(f"one process, client CPU us/call, pinned to CPU 0 (server on CPU 1); "
              f"{args.reps} alternating reps x {args.calls} calls; unlabelled: the "
              f"connection layer alone (socketpair, canned reply)")
        for label, values in results.items():
            print(f"{label:<12} median {_median(values):6.2f}  min {min(values):6.2f}  "
                  f"max {max(values):6.2f}")
        for suffix in ("", " (pool.client)"):
            if "other tree" + suffix in results:
                deltas = [t - o for t, o in zip(results["this tree" + suffix],
                                                results["other tree" + suffix])]
                print(f"this - other{suffix}, paired by rep: median {_median(deltas):+.2f}")
        return

    server = EchoServer()
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(server.proc.pid, {1})
    trees = {"this tree": ROOT}
    if args.compare:
        trees = {"other tree": os.path.abspath(args.compare), "this tree": ROOT}
    samples: Dict[str, Dict[str, List[float]]] = {t: {} for t in trees}
    try:
        for _ in range(args.rounds):
            for label, tree in trees.items():
                for kind, values in run_child(tree, server.port, args.calls,
                                              args.reps).items():
                    samples[label].setdefault(kind, []).extend(values)
    finally:
        server.stop()
    print(machine_line())
    print(f"client CPU us/call, client pinned to CPU 0, server to CPU 1; {args.rounds} rounds "
          f"x {args.reps} reps x {args.calls} calls per kind")
    print("'over raw': median of (kind - raw) over the reps, each rep measuring every kind "
          "back to back; 'min': the least disturbed rep")
    kinds = sorted({k for s in samples.values() for k in s},
                   key=["raw", "tp_checkout", "tp_client", "tp_deadline"].index)
    print(f"{'kind':<14}" + "".join(f"{label + ' over raw':>22}{'min':>8}" for label in trees))
    for kind in kinds:
        cells = []
        for label in trees:
            values = samples[label].get(kind)
            if not values:
                cells.append(f"{'-':>22}{'-':>8}")
                continue
            deltas = [v - r for v, r in zip(values, samples[label]["raw"])]
            cells.append(f"{_median(deltas):+22.2f}{min(values):8.2f}")
        print(f"{kind:<14}" + "".join(cells))


if __name__ == "__main__":
    main()
