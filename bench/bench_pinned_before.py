"""``bench_pinned.py`` with one more kind, ``thriftpool_apache_before``: thriftpool over
the Apache stack from another source tree (an older commit), loaded in the same process
as the package ``thriftpool_before``, so that before and after are measured in one run.

    git archive <old-commit> | tar -x -C /tmp/before
    python bench/bench_pinned_before.py /tmp/before --kinds raw_apache \\
        thriftpool_apache_before thriftpool_apache --reps 7

Every other argument is ``bench_pinned.py``'s.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Any, Callable, List, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_pinned  # noqa: E402


def load_before(tree: str) -> Any:
    """The ``thriftpool`` package of ``tree``, imported as ``thriftpool_before``."""
    package = os.path.join(tree, "thriftpool")
    spec = importlib.util.spec_from_file_location(
        "thriftpool_before", os.path.join(package, "__init__.py"),
        submodule_search_locations=[package])
    if spec is None or spec.loader is None:
        raise SystemExit(f"no thriftpool package in {tree}")
    module = importlib.util.module_from_spec(spec)
    sys.modules["thriftpool_before"] = module
    spec.loader.exec_module(module)
    return module


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1].startswith("-"):
        raise SystemExit(__doc__)
    before = load_before(sys.argv[1])

    def thriftpool_apache_before(addresses: List[Tuple[str, int]], nthreads: int,
                                 apache: Any) -> Tuple[List[Callable[[], Any]],
                                                       Callable[[], None]]:
        """thriftpool over Apache Thrift from the older tree, same call."""
        pool = before.ThriftPool(apache, [f"{h}:{p}" for h, p in addresses],
                                 max_size=nthreads, min_size=0,
                                 socket_timeout=bench_pinned.TIMEOUT_S,
                                 checkout_timeout=bench_pinned.TIMEOUT_S, name="before")

        def call() -> Any:
            with pool.checkout() as client:
                return client.echo(bench_pinned.MESSAGE)

        return [call] * nthreads, pool.close

    bench_pinned.FACTORIES["thriftpool_apache_before"] = thriftpool_apache_before
    return bench_pinned.main(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
