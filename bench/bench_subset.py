"""Connections per client and per instance, with and without subsetting (a simulation).

No sockets: each client keeps ``min_size`` connections to every instance it uses, and
``thriftpool.subset.Subsetter`` (rendezvous hashing, a per-client salt) picks which ones.
Also measures the churn bound: one instance removed, how many members each client's
subset loses.

    python bench/bench_subset.py                      # the table in bench/README.md
    python bench/bench_subset.py --clients 1000 --instances 1000 --subset 10 20
"""

from __future__ import annotations

import argparse
import statistics
import time

from _common import print_table  # also puts the work tree on sys.path

from thriftpool import Address, Endpoint
from thriftpool.subset import Subsetter, spread


def run(clients: int, instances: int, subset: int, min_size: int) -> list:
    fleet = [Endpoint(Address(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}", 9090))
             for i in range(instances)]
    began = time.monotonic()
    subsetters = [Subsetter(subset, key=f"client-{c}") for c in range(clients)]
    counts, subsets = spread(subsetters, fleet)
    per_instance = [n * min_size for n in counts.values()]
    _after, later = spread(subsetters, fleet[1:])
    lost = max(len({e.address for e in a} - {e.address for e in b})
               for a, b in zip(subsets, later))
    elapsed = time.monotonic() - began
    return [f"{clients} x {instances}", str(subset),
            str(len(subsets[0]) * min_size),
            f"{min(per_instance)} / {statistics.mean(per_instance):.0f} / {max(per_instance)}",
            f"{clients * len(subsets[0]) * min_size:,}", str(lost), f"{elapsed:.1f}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1000])
    parser.add_argument("--instances", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--subset", type=int, nargs="+", default=[10, 20])
    parser.add_argument("--min-size", type=int, default=1)
    args = parser.parse_args()
    rows = []
    for clients in args.clients:
        for instances in args.instances:
            m = args.min_size
            rows.append([f"{clients} x {instances}", "none", str(instances * m),
                         f"{clients * m} / {clients * m} / {clients * m}",
                         f"{clients * instances * m:,}", "-", "-"])
            for k in args.subset:
                rows.append(run(clients, instances, k, m))
    print_table(["clients x instances", "subset", "conns per client",
                 "conns per instance min/mean/max", "conns in all",
                 "most members lost when 1 instance leaves", "sim s"], rows)


if __name__ == "__main__":
    main()
