"""Client memory per idle connection: RSS growth with 1,000 idle connections.

One echo server process (one thread per connection, no idle timeout) accepts every
connection.  Each measurement runs in a fresh child process, so allocator state from one
kind never flatters another:

- ``bare``: 1,000 thriftpy2 clients (``make_client``: TSocket, buffered transport,
  binary protocol, TClient) kept in a list;
- ``thrift_connector``: a ``ClientPool`` holding 1,000 idle ``ThriftPyClient``
  connections (``produce_client()`` + ``put_back_connection()``);
- ``thriftpool``: a ``ThriftPool`` over the one instance with ``initial_size=1000``,
  filled by its own watchdog the way a user gets idle connections; the fixed cost of one
  more (empty) pool, measured first in the same child, is subtracted.

Each child first opens ``--warm`` connections of its kind (so code paths, caches and
allocator arenas are warm), collects garbage and reads RSS, then opens ``--conns`` more,
collects garbage and reads RSS again.  The table shows the median over ``--reps`` of
(RSS after - RSS before) / conns.  Sockets themselves live in the kernel and are not in
RSS.  thriftpool checks liveness with one ``select.poll`` object per connection, never
``select.select``, so descriptors above 1024 are fine; the soft ``ulimit -n`` is raised to
the hard limit if it is too low for the connections.

Run from the repository root::

    python bench/bench_memory.py               # about 30 seconds
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

from _common import Echo, EchoServer, machine_line, median, print_table, raise_fd_limit, rss_bytes

KINDS = {
    "bare": "bare thriftpy2 client",
    "thrift_connector": "thrift_connector ClientPool",
    "thriftpool": "thriftpool ThriftPool",
}


def _wait_idle(pool: Any, n: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while pool.stats()["idle"] < n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"pool did not reach {n} idle connections: {pool.stats()}")
        time.sleep(0.05)


def _settle() -> int:
    gc.collect()
    time.sleep(0.1)
    gc.collect()
    return rss_bytes()


def child(kind: str, host: str, port: int, conns: int, warm: int) -> Dict[str, Any]:
    """Runs in the child process; returns the measurement."""
    from thriftpy2.rpc import make_client

    keep: List[Any] = []
    fixed = 0
    if kind == "bare":
        keep += [make_client(Echo, host, port, timeout=5000) for _ in range(warm)]
        keep[0].echo("warm")
        before = _settle()
        keep += [make_client(Echo, host, port, timeout=5000) for _ in range(conns)]
        after = _settle()
    elif kind == "thrift_connector":
        from thrift_connector import ClientPool, ThriftPyClient

        pool = ClientPool(Echo, host, port, timeout=30, max_conn=warm + conns,
                          connection_class=ThriftPyClient)
        for _ in range(warm):
            pool.put_back_connection(pool.produce_client())
        pool.echo("warm")
        before = _settle()
        for _ in range(conns):
            pool.put_back_connection(pool.produce_client())
        after = _settle()
        if pool.pool_size() != warm + conns:
            raise RuntimeError(f"thrift_connector holds {pool.pool_size()} connections")
        keep.append(pool)
    elif kind == "thriftpool":
        import thriftpool

        def build(initial: int, name: str) -> Any:
            return thriftpool.ThriftPool(
                Echo, [f"{host}:{port}"], name=name, min_size=0, initial_size=initial,
                max_size=max(initial, 1), idle_timeout=None, max_lifetime=None)

        warm_pool = build(warm, "warm")
        _wait_idle(warm_pool, warm)
        with warm_pool.checkout() as client:
            client.echo("warm")
        keep.append(warm_pool)
        # The fixed cost of one more pool (its objects and watchdog thread), no socket.
        base = _settle()
        keep.append(build(0, "empty"))
        time.sleep(0.2)
        before = _settle()
        fixed = before - base
        pool = build(conns, "measured")
        _wait_idle(pool, conns)
        after = _settle() - fixed
        keep.append(pool)
        if pool.stats()["idle"] != conns:
            raise RuntimeError(f"thriftpool holds {pool.stats()}")
    else:
        raise SystemExit(f"unknown kind {kind!r}")
    result = {"kind": kind, "conns": conns, "before": before, "after": after,
              "fixed_pool_bytes": fixed, "per_conn": (after - before) / conns}
    for obj in keep:  # close before exit so the server's threads end promptly
        try:
            obj.close()
        except Exception:
            pass
    return result


def run_child(kind: str, server: EchoServer, conns: int, warm: int) -> Dict[str, Any]:
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--child", kind, "--port",
         str(server.port), "--conns", str(conns), "--warm", str(warm)],
        capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        raise RuntimeError(f"{kind} child failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    parser.add_argument("--conns", type=int, default=1000)
    parser.add_argument("--warm", type=int, default=20)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--json", help="also write the raw results to this file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    # Client and server each hold one descriptor per connection, plus some.
    raise_fd_limit(2 * (args.conns + args.warm) + 256)
    if args.child:
        print(json.dumps(child(args.child, "127.0.0.1", args.port, args.conns, args.warm)))
        return

    header = machine_line()
    print(f"# bench_memory: {header}")
    print(f"# {' '.join(sys.argv)}", flush=True)
    server = EchoServer()
    results: Dict[str, List[Dict[str, Any]]] = {k: [] for k in args.kinds}
    try:
        for _ in range(args.reps):
            for kind in args.kinds:
                results[kind].append(run_child(kind, server, args.conns, args.warm))
    finally:
        server.stop()
    print()
    print(f"Client RSS growth per idle connection with {args.conns} idle connections, "
          f"median of {args.reps} fresh processes (min-max).")
    print()
    rows = []
    for kind in args.kinds:
        per = [r["per_conn"] / 1024 for r in results[kind]]
        rows.append([KINDS[kind], f"{median(per):.2f} ({min(per):.2f}-{max(per):.2f})"])
    print_table(["client", "KB per idle connection"], rows)
    if "thriftpool" in results:
        fixed = [r["fixed_pool_bytes"] / 1024 for r in results["thriftpool"]]
        print(f"\n(thriftpool: the fixed cost of one more pool, {median(fixed):.0f} KB, was "
              "subtracted.)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": header, "argv": sys.argv, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
