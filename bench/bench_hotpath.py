"""Measure proposed hot-path changes, interleaved with the current code, in one run.

The same schedule as ``bench_peers.py`` (raw, A, raw, B, ... against 3 loopback echo
servers, each run's ratio to the raw runs around it), over thriftpool variants that
differ only in the monkeypatches of ``bench/_patches.py``, which mirror
``bench/proposed.diff`` and are installed just for their own runs:

- ``tp``: thriftpool ``checkout()`` as it is in the work tree;
- ``tp+kto``: + ``kernel_timeouts`` (no CPython ``poll()`` before each send and recv);
- ``tp+lean``: + ``lean_client`` (IDL methods bound once per service);
- ``tp+diff``: ``bench/proposed.diff``: both, ``fast_checkout`` (the picked instance's
  top idle connection before the general checkout loop) and ``proxy_import`` (which only
  ``pool.client()`` runs);
- ``tp+diff+tcpi``: + ``tcp_info`` (liveness by ``getsockopt(TCP_INFO)``; measured, and
  not proposed);
- ``tpc``, ``tpc+imp``, ``tpc+diff``: ``pool.client()`` as is, with only
  ``proxy_import`` (the import statement hoisted out of the per-call function), and
  with the whole diff;
- ``tp+diff+first`` (not run by default): + a balancer that sends each checkout to the
  healthy instance with the fewest connections in use, the first in the ring on ties, so
  a lone thread keeps to one server as a raw client does.

Every variant's pool starts empty (``min_size=0``), so each of its connections is opened
during its own runs, with its own patches installed.  Once ``proposed.diff`` is applied
to thriftpool, ``tp`` already has it and the ``+kto``/``+lean`` variants measure nothing new.

Run from the repository root::

    python bench/bench_hotpath.py                      # about 6 minutes
    python bench/bench_hotpath.py --threads 1 16 --reps 9
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence, Tuple

import _patches
import bench_peers

from thriftpool import Balancer

KTO = ["kernel_timeouts"]
LEAN = ["lean_client"]
IMPORT = ["proxy_import"]
DIFF = KTO + LEAN + IMPORT + ["fast_checkout"]

VARIANTS: List[Tuple[str, Sequence[str], str]] = [
    ("tp", [], "thriftpool checkout(), as is"),
    ("tp+kto", KTO, "checkout() + kernel socket timeouts"),
    ("tp+lean", LEAN, "checkout() + lean client"),
    ("tp+diff", DIFF, "checkout() + proposed.diff"),
    ("tp+diff+tcpi", DIFF + ["tcp_info"], "checkout() + proposed.diff + TCP_INFO check"),
    ("tpc", [], "thriftpool client(), as is"),
    ("tpc+imp", IMPORT, "client() + import hoisted"),
    ("tpc+diff", DIFF, "client() + proposed.diff"),
    ("tp+diff+first", DIFF, "checkout() + proposed.diff + least-in-use-first balancer"),
]


class LeastInUseFirst(Balancer):
    """The healthy instance with the fewest connections in use; the first one on ties.

    An experiment, not thriftpool code: with one thread every checkout goes to the same
    instance, with many the load spreads by connections in use.  O(instances) per pick.
    """

    name = "least_in_use_first"

    def pick(self, ring: Sequence[Any]) -> Optional[Any]:
        best = None
        best_load = 0
        for inst in ring:
            if inst.healthy:
                load = inst.in_use
                if best is None or load < best_load:
                    best, best_load = inst, load
                    if not load:
                        break
        return best


def _variant(name: str, patches: Sequence[str], label: str, proxy: bool) -> type:
    base: Any = bench_peers.TpClient if proxy else bench_peers.TpCheckout

    class Variant(base):  # type: ignore[misc, valid-type]
        _undo: Callable[[], None]

        def __init__(self, addresses: Any, nthreads: int) -> None:
            self.pool_options = {"min_size": 0, "initial_size": 0}
            if name.endswith("+first"):
                self.pool_options["balancer"] = LeastInUseFirst()
            super().__init__(addresses, nthreads)

        def enter(self) -> None:
            self._undo = _patches.install(patches)

        def exit(self) -> None:
            self._undo()

    Variant.name = name
    Variant.label = label
    Variant.__name__ = Variant.__qualname__ = "Variant_" + name.replace("+", "_")
    return Variant


for _name, _patch_names, _label in VARIANTS:
    bench_peers.KINDS[_name] = _variant(_name, _patch_names, _label, _name.startswith("tpc"))

DEFAULT = ["tp", "tp+kto", "tp+lean", "tp+diff", "tp+diff+tcpi", "tpc", "tpc+imp", "tpc+diff"]

if __name__ == "__main__":
    bench_peers.main(title="bench_hotpath", default_kinds=DEFAULT,
                     description=__doc__.split("\n\n")[0])
