"""Subsetting (thriftpool.subset): spread across clients, churn bounds, ejection, stability.

Pure functions, so these are simulations: 1,000 clients x 100 instances with subsets of
10, each client with its own key.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from typing import List

import pytest

from thriftpool import Address, Endpoint
from thriftpool.subset import Subsetter, rank, score, spread


def fleet(n: int, base: str = "10.0") -> List[Endpoint]:
    return [Endpoint(Address(f"{base}.{i // 250}.{i % 250}", 9090)) for i in range(n)]


@pytest.mark.timeout(30)
def test_thousand_clients_spread_evenly_and_one_removal_changes_at_most_one_member():
    began = time.monotonic()
    instances = fleet(100)
    clients = [Subsetter(10, key=f"client-{i}") for i in range(1000)]
    counts, subsets = spread(clients, instances)
    mean = statistics.mean(counts.values())
    assert mean == 100  # 1,000 x 10 / 100
    assert max(counts.values()) <= 1.3 * mean, max(counts.values())
    assert min(counts.values()) > 0
    assert all(len(s) == 10 and len({e.address for e in s}) == 10 for s in subsets)

    for gone in (instances[0], instances[57]):  # one instance removed
        remaining = [e for e in instances if e != gone]
        _counts, after = spread(clients, remaining)
        for before_set, after_set in zip(subsets, after):
            changed = {e.address for e in before_set} - {e.address for e in after_set}
            assert len(changed) <= 1
            assert changed <= {gone.address}
    joined = instances + fleet(1, base="10.9")  # one instance added
    _counts, after = spread(clients, joined)
    for before_set, after_set in zip(subsets, after):
        assert len({e.address for e in before_set} - {e.address for e in after_set}) <= 1
    elapsed = time.monotonic() - began
    print(f"1000 x 100 subsetting simulation: {elapsed:.2f}s, most loaded "
          f"{max(counts.values())}, least {min(counts.values())}, mean {mean}")
    assert elapsed < 10.0


def test_an_excluded_member_is_replaced_by_the_next_in_rank_while_it_is_out():
    instances = fleet(20)
    client = Subsetter(3, key="c")
    ranked = client.ranked(instances)
    assert client.select(instances) == ranked[:3]
    out = ranked[1]
    assert client.select(instances, excluded={out.address}) == [ranked[0], ranked[2],
                                                                  ranked[3]]
    assert client.select(instances, excluded=[out]) == [ranked[0], ranked[2], ranked[3]]
    assert client.select(instances) == ranked[:3]  # back in its place
    assert client.select(instances, excluded={e.address for e in instances}) == []
    assert client.select(instances[:2]) == client.ranked(instances[:2])  # fewer than k


def test_the_ranking_is_stable_across_processes_and_random_without_a_key():
    instances = fleet(50)
    here = [str(e) for e in Subsetter(5, key="host-17").select(instances)]
    code = ("from thriftpool import Address, Endpoint\n"
            "from thriftpool.subset import Subsetter\n"
            "eps = [Endpoint(Address(f'10.0.{i // 250}.{i % 250}', 9090)) for i in range(50)]\n"
            "print(','.join(str(e) for e in Subsetter(5, key='host-17').select(eps)))\n")
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           timeout=30, env={**os.environ, "PYTHONHASHSEED": "123"})
    assert there.stdout.strip().split(",") == here, there.stderr
    assert Subsetter(5, key=b"host-17").select(instances) == \
        Subsetter(5, key="host-17").select(instances)
    randoms = {tuple(str(e) for e in Subsetter(5).select(instances)) for _ in range(5)}
    assert len(randoms) > 1
    salt = b"s"
    assert rank(salt, [e.address for e in instances])[0] == max(
        (e.address for e in instances), key=lambda a: score(salt, a))
    assert score(salt, instances[0].address) == score(salt, instances[0].address)


def test_duplicates_are_merged_and_options_are_checked():
    instances = fleet(5)
    client = Subsetter(10, key="k")
    assert len(client.select(instances + instances)) == 5
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="subset_size"):
            Subsetter(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="subset_key"):
        Subsetter(3, key=5)  # type: ignore[arg-type]
    assert Subsetter(2, key="x" * 500).select(instances)  # a long key is hashed down
