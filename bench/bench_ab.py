"""Before and after, in one process: client CPU per pooled call of this tree's thriftpool
and another source tree's.

The other tree's package is copied as ``thriftpool_other`` and imported beside this one,
so both pools run in the same process, against the same three echo servers, in the same
minutes.  One thread makes ``--calls`` 16-byte ``echo`` calls per measurement, each as
``with pool.checkout() as c: c.echo(...)``; the two trees alternate, their order
swapping every rep.  Client pinned to CPU 0, servers to CPU 1.  The result is the median
over ``--reps`` of this tree's CPU per call minus the other's in the same rep, with the
quartiles: at one thread single reps scatter by several microseconds on a small VM, so
a difference below a microsecond needs 30-60 reps.  Bounded: ``--reps`` x 2 x
``--calls`` calls.

    git archive HEAD~1 thriftpool | (mkdir -p /tmp/base && tar -x -C /tmp/base)
    python bench/bench_ab.py /tmp/base                          # Apache stack, buffered
    python bench/bench_ab.py /tmp/base --stack thriftpy2 --transport framed --reps 61
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence

from _common import MESSAGE, Echo, machine_line, start_servers

import thriftpool

TIMEOUT_S = 5.0


def load_other(tree: str, tmp: str) -> Any:
    """The ``thriftpool`` package of source tree ``tree``, as ``thriftpool_other``."""
    shutil.copytree(os.path.join(os.path.abspath(tree), "thriftpool"),
                    os.path.join(tmp, "thriftpool_other"))
    sys.path.insert(0, tmp)
    return importlib.import_module("thriftpool_other")


def per_call(pool: Any, calls: int) -> float:
    """Client CPU microseconds per checkout + call."""
    checkout = pool.checkout
    started = time.process_time()
    for _ in range(calls):
        with checkout() as client:
            client.echo(MESSAGE)
    return (time.process_time() - started) / calls * 1e6


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("other", metavar="OTHER_TREE", help="a source tree with thriftpool/")
    parser.add_argument("--stack", choices=["apache", "thriftpy2"], default="apache")
    parser.add_argument("--transport", choices=["buffered", "framed"], default="buffered")
    parser.add_argument("--calls", type=int, default=2000, help="calls per measurement")
    parser.add_argument("--reps", type=int, default=31)
    args = parser.parse_args(argv)
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise SystemExit("needs 2 CPUs: the client on one, the servers on the other")
    tmp = tempfile.mkdtemp(prefix="bench-ab-")
    service: Any = Echo
    if args.stack == "apache":
        from bench_pinned import generate_apache

        service, _ = generate_apache()
    other = load_other(args.other, tmp)
    servers = start_servers(3, args.transport)
    pools: Dict[str, Any] = {}
    try:
        for s in servers:
            os.sched_setaffinity(s.proc.pid, {cpus[1]})
        os.sched_setaffinity(0, {cpus[0]})
        addresses = [f"{s.host}:{s.port}" for s in servers]
        for label, package in (("this", thriftpool), ("other", other)):
            pools[label] = package.ThriftPool(
                service, addresses, name=f"bench-{label}", min_size=0, max_size=1,
                socket_timeout=TIMEOUT_S, checkout_timeout=TIMEOUT_S,
                transport=args.transport)
        for pool in pools.values():  # warm up, and open the connections
            per_call(pool, args.calls)
        results: Dict[str, List[float]] = {label: [] for label in pools}
        for rep in range(args.reps):
            order = list(pools) if rep % 2 else list(reversed(list(pools)))
            for label in order:
                results[label].append(per_call(pools[label], args.calls))
    finally:
        for pool in pools.values():
            pool.close()
        for s in servers:
            s.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    diffs = sorted(a - b for a, b in zip(results["this"], results["other"]))
    quartile = len(diffs) // 4
    print(f"\n{machine_line()}; client on CPU {cpus[0]}, servers on CPU {cpus[1]}; "
          f"{args.stack} stack, {args.transport} transport; {args.reps} reps x "
          f"{args.calls} calls per tree, one thread")
    for label, values in results.items():
        print(f"{label:5s}  median {statistics.median(values):.2f} us/call, "
              f"min {min(values):.2f}")
    print(f"this - other, paired by rep: median {statistics.median(diffs):+.2f} us/call "
          f"(q1 {diffs[quartile]:+.2f}, q3 {diffs[-1 - quartile]:+.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
