"""Side-by-side throughput: thriftpool against raw clients, thrift_connector and connect-per-call.

Starts 3 loopback echo server processes and drives 16-byte ``echo`` calls from 1, 4, 16
and 64 threads through each kind of client:

- ``raw``: one persistent thriftpy2 client per thread (thread i talks to server i % 3);
  the ceiling;
- ``raw_rr``: a diagnostic: each thread holds one raw client per server and rotates
  over them per call, as the pools do; it shows what spreading calls over the servers
  costs by itself on this machine (a third at one thread), apart from any pool;
- ``tc_pool``: thrift_connector's ``ClientPool`` (one per server, picked round robin per
  call; it pings the server on every checkout);
- ``tc_heartbeat``: thrift_connector's ``HeartbeatClientPool`` (same, no ping per checkout);
- ``connect``: a new connection per call, closed after it; the floor;
- ``tp_checkout``: thriftpool, ``with pool.checkout() as c: c.echo(...)``;
- ``tp_client``: thriftpool, ``pool.client().echo(...)``.

This machine's speed swings 2-4x in episodes of one to a few seconds (a raw client's
rate, read every 100 ms, moves between 7,000 and 29,000 calls/s), so rates from different
moments mean little.  Runs are short (``--duration`` 0.3 s) and many (``--reps`` 15), and
interleaved ``raw, A, raw, B, raw, ...`` (the order of A, B, ... rotates each repetition);
each run is compared with the mean of the raw runs right before and after it, and the
table shows the median of those ratios.  It also shows "best/best": the kind's best rate
over the repetitions divided by raw's best (slow-downs from the machine only ever lower a
rate, so the best runs are the least disturbed).  Each kind does one unmeasured run first,
so pools have their connections open.  Every run is bounded in time (``--warmup +
--duration``) and in count (``--max-calls`` per thread).

Run from the repository root::

    python bench/bench_peers.py                  # about 5 minutes
    python bench/bench_peers.py --threads 1 4 --reps 5   # a quick look
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from _common import (
    MESSAGE,
    Echo,
    EchoServer,
    machine_line,
    median,
    print_table,
    raise_fd_limit,
    start_servers,
)

from thriftpy2.rpc import make_client

import thriftpool

Address = Tuple[str, int]
Call = Callable[[], Any]

# thriftpy2 and thrift_connector take milliseconds / seconds; all kinds use a 5 s socket
# timeout, which no call comes near.
SOCKET_TIMEOUT_MS = 5000


# -- client kinds -------------------------------------------------------------------------
#
# Each kind is built once per thread count, serves every repetition, and is closed at the
# end.  ``caller(i)`` returns the zero-argument function thread ``i`` calls in its loop:
# exactly the line a user of that client would write.


class Kind:
    name = "?"
    label = "?"

    def __init__(self, addresses: List[Address], nthreads: int) -> None:
        self.addresses = addresses
        self.nthreads = nthreads

    def caller(self, i: int) -> Call:
        raise NotImplementedError

    def enter(self) -> None:
        """Called before each of this kind's runs."""

    def exit(self) -> None:
        """Called after each of this kind's runs."""

    def close(self) -> None:
        pass


class Raw(Kind):
    name = "raw"
    label = "raw thriftpy2 client per thread (ceiling)"

    def __init__(self, addresses: List[Address], nthreads: int) -> None:
        super().__init__(addresses, nthreads)
        self.clients = []
        for i in range(nthreads):
            host, port = addresses[i % len(addresses)]
            self.clients.append(make_client(Echo, host, port, timeout=SOCKET_TIMEOUT_MS))

    def caller(self, i: int) -> Call:
        client = self.clients[i]
        return lambda: client.echo(MESSAGE)

    def close(self) -> None:
        for c in self.clients:
            c.close()


class RawRoundRobin(Kind):
    """Diagnostic: each thread holds one client per server and rotates, like the pools do."""

    name = "raw_rr"
    label = "raw, one client per thread per server, rotated"

    def __init__(self, addresses: List[Address], nthreads: int) -> None:
        super().__init__(addresses, nthreads)
        self.clients = [[make_client(Echo, h, p, timeout=SOCKET_TIMEOUT_MS)
                         for h, p in addresses] for _ in range(nthreads)]

    def caller(self, i: int) -> Call:
        mine = self.clients[i]
        rr = itertools.cycle(mine)
        return lambda: next(rr).echo(MESSAGE)

    def close(self) -> None:
        for cs in self.clients:
            for c in cs:
                c.close()


class _ThriftConnector(Kind):
    pool_class: Any = None

    def __init__(self, addresses: List[Address], nthreads: int) -> None:
        super().__init__(addresses, nthreads)
        from thrift_connector import ThriftPyClient

        # thrift_connector's ClientPool serves one host:port; one pool per server, picked
        # round robin per call as thriftpool does.  max_conn caps its idle list.
        self.pools = [self.pool_class(Echo, host, port, timeout=30, max_conn=nthreads,
                                      connection_class=ThriftPyClient)
                      for host, port in addresses]
        self._rr = itertools.count()

    def caller(self, i: int) -> Call:
        pools = self.pools
        n = len(pools)
        rr = self._rr
        return lambda: pools[next(rr) % n].echo(MESSAGE)

    def close(self) -> None:
        # HeartbeatClientPool's thread cannot be stopped (a daemon ``while True``); once
        # the pool is cleared it only wakes every 25 s to find nothing.
        for p in self.pools:
            p.clear()


class TcClientPool(_ThriftConnector):
    name = "tc_pool"
    label = "thrift_connector ClientPool"

    @property
    def pool_class(self) -> Any:  # type: ignore[override]
        from thrift_connector import ClientPool
        return ClientPool


class TcHeartbeat(_ThriftConnector):
    name = "tc_heartbeat"
    label = "thrift_connector HeartbeatClientPool"

    @property
    def pool_class(self) -> Any:  # type: ignore[override]
        from thrift_connector import HeartbeatClientPool
        return HeartbeatClientPool


class ConnectPerCall(Kind):
    name = "connect"
    label = "connect per call (floor)"

    def __init__(self, addresses: List[Address], nthreads: int) -> None:
        super().__init__(addresses, nthreads)
        self._rr = itertools.count()

    def caller(self, i: int) -> Call:
        addresses = self.addresses
        n = len(addresses)
        rr = self._rr

        def call() -> Any:
            host, port = addresses[next(rr) % n]
            client = make_client(Echo, host, port, timeout=SOCKET_TIMEOUT_MS)
            try:
                return client.echo(MESSAGE)
            finally:
                client.close()

        return call


class _ThriftPool(Kind):
    pool_options: Dict[str, Any] = {}

    def __init__(self, addresses: List[Address], nthreads: int) -> None:
        super().__init__(addresses, nthreads)
        # max_size is per instance: enough for every thread to hold a socket to the same
        # instance, as raw holds one socket per thread.  Other options are the defaults.
        options: Dict[str, Any] = dict(name=f"bench-{self.name}", max_size=nthreads,
                                       checkout_timeout=10.0)
        options.update(self.pool_options)
        self.pool = thriftpool.ThriftPool(Echo, [f"{h}:{p}" for h, p in addresses],
                                          **options)

    def close(self) -> None:
        self.pool.close()


class TpCheckout(_ThriftPool):
    name = "tp_checkout"
    label = "thriftpool pool.checkout()"

    def caller(self, i: int) -> Call:
        checkout = self.pool.checkout

        def call() -> Any:
            with checkout() as client:
                return client.echo(MESSAGE)

        return call


class TpClient(_ThriftPool):
    name = "tp_client"
    label = "thriftpool pool.client()"

    def caller(self, i: int) -> Call:
        proxy = self.pool.client()
        return lambda: proxy.echo(MESSAGE)


KINDS: Dict[str, type] = {k.name: k for k in (Raw, TcClientPool, TcHeartbeat, ConnectPerCall,
                                              TpCheckout, TpClient, RawRoundRobin)}
DEFAULT_KINDS = ["raw_rr", "tc_pool", "tc_heartbeat", "connect", "tp_checkout", "tp_client"]


# -- one timed run ------------------------------------------------------------------------


class Run:
    """Threads calling in a loop; counts read without a lock (ints, under the GIL)."""

    def __init__(self, nthreads: int) -> None:
        self.stop = False
        self.counts = [0] * nthreads
        self.errors: List[BaseException] = []


def _loop(call: Call, i: int, run: Run, max_calls: int, start: threading.Barrier) -> None:
    counts = run.counts
    n = 0
    try:
        start.wait(30)
        while not run.stop and n < max_calls:
            call()
            n += 1
            counts[i] = n
    except BaseException as exc:  # reported by the main thread
        run.errors.append(exc)


def _switches() -> int:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_nvcsw + usage.ru_nivcsw


def timed_run(kind: Kind, nthreads: int, warmup: float, duration: float,
              max_calls: int) -> Tuple[float, float, float]:
    """Return (calls per second, client CPU microseconds per call, client context
    switches per call) over ``duration``."""
    run = Run(nthreads)
    start = threading.Barrier(nthreads + 1)
    kind.enter()
    try:
        threads = [threading.Thread(target=_loop, name=f"bench-{kind.name}-{i}", daemon=True,
                                    args=(kind.caller(i), i, run, max_calls, start))
                   for i in range(nthreads)]
        for t in threads:
            t.start()
        start.wait(30)
        time.sleep(warmup)
        c0, t0, cpu0, cs0 = (sum(run.counts), time.perf_counter(), time.process_time(),
                             _switches())
        time.sleep(duration)
        c1, t1, cpu1, cs1 = (sum(run.counts), time.perf_counter(), time.process_time(),
                             _switches())
        run.stop = True
        for t in threads:
            t.join(30)
    finally:
        run.stop = True
        kind.exit()
    if run.errors:
        raise RuntimeError(f"{kind.name} at {nthreads} threads failed: {run.errors[0]!r}"
                           ) from run.errors[0]
    if any(t.is_alive() for t in threads):
        raise RuntimeError(f"{kind.name} at {nthreads} threads: a thread did not stop")
    if any(n >= max_calls for n in run.counts):
        print(f"  warning: {kind.name} hit --max-calls; raise it for a full window",
              file=sys.stderr)
    calls = c1 - c0
    if calls <= 0:
        raise RuntimeError(f"{kind.name} at {nthreads} threads made no call in the window")
    return calls / (t1 - t0), (cpu1 - cpu0) / calls * 1e6, (cs1 - cs0) / calls


# -- the interleaved schedule -----------------------------------------------------------


def _record(into: Dict[str, List[float]], run: Tuple[float, float, float]) -> None:
    into["rate"].append(run[0])
    into["cpu"].append(run[1])
    into["switches"].append(run[2])


def bench_thread_count(addresses: List[Address], nthreads: int, kinds: Sequence[str],
                       args: argparse.Namespace) -> Dict[str, Dict[str, List[float]]]:
    built: Dict[str, Kind] = {}
    try:
        for name in ["raw", *kinds]:
            built[name] = KINDS[name](addresses, nthreads)
        results: Dict[str, Dict[str, List[float]]] = {
            name: {"rate": [], "cpu": [], "switches": [], "ratio": []} for name in built}
        for kind in built.values():  # open every pool's connections; not measured
            timed_run(kind, nthreads, args.warmup, args.duration, args.max_calls)
        for rep in range(args.reps):
            shift = rep % len(kinds)
            order = list(kinds[shift:]) + list(kinds[:shift])
            raw_before = timed_run(built["raw"], nthreads, args.warmup, args.duration,
                                   args.max_calls)
            _record(results["raw"], raw_before)
            for name in order:
                rate, cpu, switches = timed_run(built[name], nthreads, args.warmup,
                                                args.duration, args.max_calls)
                raw_after = timed_run(built["raw"], nthreads, args.warmup, args.duration,
                                      args.max_calls)
                _record(results["raw"], raw_after)
                ratio = rate / ((raw_before[0] + raw_after[0]) / 2)
                _record(results[name], (rate, cpu, switches))
                results[name]["ratio"].append(ratio)
                if args.verbose:
                    print(f"  {nthreads:>2} threads rep {rep + 1} {name:<13} {rate:9.0f}/s "
                          f"raw {raw_before[0]:9.0f} / {raw_after[0]:9.0f}  "
                          f"ratio {ratio:.3f}  cpu {cpu:.1f} us/call  {switches:.2f} cs/call",
                          flush=True)
                raw_before = raw_after
        return results
    finally:
        for kind in built.values():
            try:
                kind.close()
            except Exception as exc:  # keep closing the others
                print(f"  closing {kind.name} failed: {exc!r}", file=sys.stderr)


def report(all_results: Dict[int, Dict[str, Dict[str, List[float]]]],
           kinds: Sequence[str]) -> None:
    print()
    print("Calls per second (median of the repetitions); the median ratio to the raw runs")
    print("just before and after each run (min-max in brackets); the best rate over the best")
    print("raw rate; client-process CPU microseconds and context switches (voluntary +")
    print("involuntary, all threads) per call, medians.")
    print()
    rows = []
    for nthreads, res in all_results.items():
        for name in ["raw", *kinds]:
            r = res[name]
            if name == "raw":
                ratio = "1.00"
            else:
                ratio = (f"{median(r['ratio']):.2f} "
                         f"[{min(r['ratio']):.2f}-{max(r['ratio']):.2f}]")
            best = max(r["rate"]) / max(res["raw"]["rate"])
            rows.append([str(nthreads), KINDS[name].label, f"{median(r['rate']):,.0f}",
                         ratio, f"{best:.2f}", f"{median(r['cpu']):.0f}",
                         f"{median(r['switches']):.2f}"])
    print_table(["threads", "client", "calls/s", "x raw (median [min-max])", "best/best",
                 "client CPU us/call", "ctx switches/call"], rows)


def main(argv: Optional[Sequence[str]] = None, title: str = "bench_peers",
         default_kinds: Sequence[str] = DEFAULT_KINDS, description: str = "") -> None:
    parser = argparse.ArgumentParser(description=description or __doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--kinds", nargs="+", default=list(default_kinds),
                        choices=[k for k in KINDS if k != "raw"])
    parser.add_argument("--reps", type=int, default=15, help="repetitions (default 15)")
    parser.add_argument("--warmup", type=float, default=0.05,
                        help="seconds run before each measured window (default 0.05)")
    parser.add_argument("--duration", type=float, default=0.3,
                        help="seconds in each measured window (default 0.3)")
    parser.add_argument("--max-calls", type=int, default=1_000_000,
                        help="calls per thread per run at most (default 1,000,000)")
    parser.add_argument("--servers", type=int, default=3)
    parser.add_argument("--json", help="also write the raw results to this file")
    parser.add_argument("-v", "--verbose", action="store_true", help="print every run")
    args = parser.parse_args(argv)
    if args.reps < 1 or args.duration <= 0 or args.warmup < 0:
        parser.error("--reps >= 1, --duration > 0 and --warmup >= 0")
    # Every kind of every thread count is open at once: 4 sockets per thread and server.
    raise_fd_limit(8 * max(args.threads) * len(args.kinds) + 256)

    header = machine_line()
    print(f"# {title}: {header}")
    print(f"# {' '.join(sys.argv)}")
    print(f"# {args.servers} echo servers, 16-byte echo, {args.reps} reps, "
          f"{args.warmup}s warm-up + {args.duration}s window per run", flush=True)
    servers: List[EchoServer] = start_servers(args.servers)
    all_results: Dict[int, Dict[str, Dict[str, List[float]]]] = {}
    began = time.monotonic()
    try:
        addresses = [s.address for s in servers]
        for nthreads in args.threads:
            all_results[nthreads] = bench_thread_count(addresses, nthreads, args.kinds, args)
            print(f"# {nthreads} threads done at {time.monotonic() - began:.0f}s", flush=True)
    finally:
        for s in servers:
            s.stop()

    report(all_results, args.kinds)
    print(f"\ntotal {time.monotonic() - began:.0f}s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": header, "argv": sys.argv, "results": all_results}, f,
                      indent=1)


if __name__ == "__main__":
    main()
