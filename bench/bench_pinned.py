"""Client CPU per call, pinned: the client process on CPU 0, the servers on CPU 1.

Pinning (``os.sched_setaffinity``) keeps the servers from competing with the client for
its core, so ``time.process_time()`` of the client process (all its threads) divided by
the calls it made is the client's own cost per call, including what its threads lose
fighting over the GIL.  Each run is bounded in calls and in time.

The clients under test are a table of named factories (:data:`FACTORIES`): each builds
whatever it needs for ``nthreads`` threads against the servers and returns one
zero-argument call per thread, exactly the line a user would write.  Add a row to
measure another client; ``--kinds`` picks rows.  Runs of all kinds are interleaved and
repeated (``--reps``); the table shows each kind's median us/call and its difference
from the first kind given as ``--baseline``.

    python bench/bench_pinned.py                      # every kind, 1, 4 and 16 threads
    python bench/bench_pinned.py --kinds raw_apache thriftpool_apache --threads 1 16
    python bench/bench_pinned.py --pooled bench/results/2026-12-01-pinned-*.json  # no measuring
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from _common import MESSAGE, Echo, machine_line, median, print_table, start_servers

import thriftpool

Address = Tuple[str, int]
Call = Callable[[], Any]
#: A factory: (server addresses, thread count, generated Apache module) ->
#: (one call per thread, close()).
Factory = Callable[[List[Address], int, Any], Tuple[List[Call], Callable[[], None]]]
TIMEOUT_S = 5.0


def raw_thriftpy2(addresses: List[Address], nthreads: int, apache: Any
                  ) -> Tuple[List[Call], Callable[[], None]]:
    """thriftpy2's own client (Cython binary protocol), one per server per thread,
    rotated per call."""
    from thriftpy2.rpc import make_client

    clients = [[make_client(Echo, h, p, timeout=TIMEOUT_S * 1000) for h, p in addresses]
               for _ in range(nthreads)]

    def call(mine: List[Any]) -> Call:
        rr = itertools.cycle(mine)
        return lambda: next(rr).echo(MESSAGE)

    return [call(c) for c in clients], lambda: [c.close() for cs in clients for c in cs]


def raw_apache(addresses: List[Address], nthreads: int, apache: Any
               ) -> Tuple[List[Call], Callable[[], None]]:
    """Apache's generated client over TSocket, TBufferedTransport and the C-accelerated
    binary protocol, one per server per thread, rotated per call (the ceiling)."""
    from thrift.protocol.TBinaryProtocol import TBinaryProtocolAccelerated
    from thrift.transport.TSocket import TSocket
    from thrift.transport.TTransport import TBufferedTransport

    transports = []

    def client(host: str, port: int) -> Any:
        sock = TSocket(host, port)
        sock.setTimeout(TIMEOUT_S * 1000)
        trans = TBufferedTransport(sock)
        trans.open()
        transports.append(trans)
        return apache.Client(TBinaryProtocolAccelerated(trans))

    clients = [[client(h, p) for h, p in addresses] for _ in range(nthreads)]

    def call(mine: List[Any]) -> Call:
        rr = itertools.cycle(mine)
        return lambda: next(rr).echo(MESSAGE)

    return [call(c) for c in clients], lambda: [t.close() for t in transports]


def _thriftpool(service: Any, addresses: List[Address], nthreads: int
                ) -> Tuple[List[Call], Callable[[], None]]:
    pool = thriftpool.ThriftPool(service, [f"{h}:{p}" for h, p in addresses],
                                 max_size=nthreads, min_size=0, socket_timeout=TIMEOUT_S,
                                 checkout_timeout=TIMEOUT_S, name="bench")

    def call() -> Any:
        with pool.checkout() as client:
            return client.echo(MESSAGE)

    return [call] * nthreads, pool.close


def thriftpool_thriftpy2(addresses: List[Address], nthreads: int, apache: Any
                         ) -> Tuple[List[Call], Callable[[], None]]:
    """thriftpool over thriftpy2: ``with pool.checkout() as c: c.echo(...)``."""
    return _thriftpool(Echo, addresses, nthreads)


def thriftpool_apache(addresses: List[Address], nthreads: int, apache: Any
                      ) -> Tuple[List[Call], Callable[[], None]]:
    """thriftpool over Apache Thrift (accelerated binary), same call."""
    return _thriftpool(apache, addresses, nthreads)


def thrift_connector(addresses: List[Address], nthreads: int, apache: Any
                     ) -> Tuple[List[Call], Callable[[], None]]:
    """thrift_connector's default ``ClientPool`` (Apache clients, accelerated binary),
    one pool per server picked round robin per call (it serves one host)."""
    from thrift_connector import ClientPool

    pools = [ClientPool(apache, h, p, timeout=TIMEOUT_S, max_conn=nthreads)
             for h, p in addresses]
    lock = threading.Lock()
    rr = itertools.cycle(pools)

    def call() -> Any:
        with lock:
            pool = next(rr)
        with pool.connection_ctx() as client:
            return client.echo(MESSAGE)

    def close() -> None:
        for p in pools:
            p.clear()

    return [call] * nthreads, close


FACTORIES: Dict[str, Factory] = {
    "raw_thriftpy2": raw_thriftpy2,
    "thriftpool_thriftpy2": thriftpool_thriftpy2,
    "raw_apache": raw_apache,
    "thrift_connector": thrift_connector,
    "thriftpool_apache": thriftpool_apache,
}
#: The raw client each pooled kind is held against in the paired table.
RAW_OF: Dict[str, str] = {
    "thriftpool_thriftpy2": "raw_thriftpy2",
    "thriftpool_apache": "raw_apache",
    "thrift_connector": "raw_apache",
}


def generate_apache() -> Tuple[Any, str]:
    """``thrift --gen py`` the IDL into a temporary directory; returns ``echo.Echo``."""
    compiler = shutil.which("thrift")
    if compiler is None:
        raise SystemExit("needs Apache Thrift's compiler (Debian: thrift-compiler)")
    out = tempfile.mkdtemp(prefix="bench-gen-py-")
    idl = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       "idl", "echo.thrift")
    subprocess.run([compiler, "--gen", "py", "-out", out, idl], check=True, timeout=60)
    sys.path.insert(0, out)
    from echo import Echo as apache_echo
    return apache_echo, out


def run_once(calls: List[Call], max_calls: int, duration: float, warmup: float
             ) -> Tuple[float, int]:
    """Run every thread's call in a loop; returns (client CPU us per call, calls).

    Each thread stops at its share of ``max_calls`` or after ``duration`` seconds.
    """
    nthreads = len(calls)
    share = max(1, max_calls // nthreads)
    counts = [0] * nthreads
    start = threading.Barrier(nthreads + 1)
    measure = threading.Event()
    stop = threading.Event()
    errors: List[BaseException] = []

    def loop(i: int) -> None:
        call = calls[i]
        try:
            start.wait(30)
            while not measure.is_set():  # warm-up, not counted
                call()
            n = 0
            while n < share and not stop.is_set():
                call()
                n += 1
            counts[i] = n
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(nthreads)]
    for t in threads:
        t.start()
    start.wait(30)
    time.sleep(warmup)
    cpu0 = time.process_time()
    measure.set()
    deadline = time.monotonic() + duration
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    stop.set()
    for t in threads:
        t.join(30)
    cpu = time.process_time() - cpu0
    if errors:
        raise RuntimeError(f"a call failed: {errors[0]!r}") from errors[0]
    total = sum(counts)
    return (cpu / total * 1e6 if total else float("nan")), total


def print_paired(runs: Sequence[Dict[int, Dict[str, List[float]]]], threads: Sequence[int],
                 kinds: Sequence[str]) -> None:
    """Print each pooled kind's difference from its stack's raw client, paired by rep.

    Each rep runs every kind back to back, so (kind - its raw client) within a rep cancels
    the machine's slower minutes; the median of those is the steady figure.  With several
    ``runs`` the reps of all of them are pooled.
    """
    rows = []
    for kind in kinds:
        raw = RAW_OF.get(kind)
        if raw is None or raw not in kinds:
            continue
        cells = []
        for n in threads:
            diffs = [a - b for run in runs if kind in run.get(n, {}) and raw in run.get(n, {})
                     for a, b in zip(run[n][kind], run[n][raw])]
            cells.append(f"{median(diffs):+.2f} ({min(diffs):+.1f} to {max(diffs):+.1f}; "
                         f"{len(diffs)} reps)" if diffs else "-")
        rows.append([f"{kind} - {raw}"] + cells)
    if rows:
        print("\nPaired by rep: median (min to max) of the kind's us/call minus its raw "
              "client's in the same rep\n")
        print_table(["difference"] + [f"{n} thr" for n in threads], rows)


def pooled(files: Sequence[str]) -> int:
    """``--pooled FILE...``: the paired table over the reps of earlier ``--json`` runs."""
    runs = []
    for path in files:
        with open(path) as f:
            data = json.load(f)
        runs.append({int(n): per for n, per in data["results"].items()})
        print(f"{path}: {data['machine']}")
    threads = sorted({n for run in runs for n in run})
    kinds = list(dict.fromkeys(k for run in runs for per in run.values() for k in per))
    print_paired(runs, threads, kinds)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--kinds", nargs="+", default=list(FACTORIES), choices=list(FACTORIES))
    parser.add_argument("--baseline", default="raw_apache", choices=list(FACTORIES))
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--calls", type=int, default=20_000, help="calls per run at most")
    parser.add_argument("--duration", type=float, default=1.5, help="seconds per run at most")
    parser.add_argument("--warmup", type=float, default=0.2)
    parser.add_argument("--json", help="write the raw numbers to this file")
    parser.add_argument("--pooled", nargs="+", metavar="FILE",
                        help="measure nothing: the paired table over the reps of these "
                             "--json files")
    args = parser.parse_args(argv)
    if args.pooled:
        return pooled(args.pooled)

    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise SystemExit("needs 2 CPUs: the client on one, the servers on the other")
    client_cpu, server_cpu = cpus[0], cpus[1]
    apache, _ = generate_apache()
    servers = start_servers(3)
    results: Dict[int, Dict[str, List[float]]] = {}
    try:
        for s in servers:
            os.sched_setaffinity(s.proc.pid, {server_cpu})
        # Before any thread starts: every thread of this process inherits it.
        os.sched_setaffinity(0, {client_cpu})
        addresses = [s.address for s in servers]
        for nthreads in args.threads:
            built = {k: FACTORIES[k](addresses, nthreads, apache) for k in args.kinds}
            per: Dict[str, List[float]] = {k: [] for k in args.kinds}
            try:
                for rep in range(args.reps):
                    order = args.kinds[rep % len(args.kinds):] + args.kinds[:rep % len(args.kinds)]
                    for kind in order:
                        us, n = run_once(built[kind][0], args.calls, args.duration, args.warmup)
                        per[kind].append(us)
                        print(f"threads={nthreads:<3} {kind:<22} {us:8.2f} us/call  ({n} calls)",
                              file=sys.stderr)
            finally:
                for _, close in built.values():
                    close()
            results[nthreads] = per
    finally:
        for s in servers:
            s.stop()

    print(f"\n{machine_line()}; client on CPU {client_cpu}, servers on CPU {server_cpu}; "
          f"median of {args.reps} runs of at most {args.calls} calls / {args.duration:g} s\n")
    header = ["kind"] + [f"{n} thr us/call" for n in args.threads] + \
        [f"{n} thr vs {args.baseline}" for n in args.threads]
    rows = []
    for kind in args.kinds:
        meds = [median(results[n][kind]) for n in args.threads]
        base = [median(results[n].get(args.baseline, [float("nan")])) for n in args.threads]
        rows.append([kind] + [f"{m:.2f}" for m in meds] +
                    [f"{m - b:+.2f}" for m, b in zip(meds, base)])
    print_table(header, rows)
    print_paired([results], args.threads, args.kinds)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine_line(), "args": vars(args), "results": results}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
