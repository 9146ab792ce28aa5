"""``assert_consistent(pool)``: the invariants every chaos, leak and failure test ends on."""

from __future__ import annotations

from typing import Iterable, Optional

from servers import wait_for


def assert_consistent(pool, in_use: int = 0, servers: Optional[Iterable] = None,
                      timeout: float = 5.0) -> None:
    """Check that ``pool`` is at rest and its counts add up.

    - ``in_use`` equals the checkouts the test still holds, and nobody waits;
    - nothing stays opening or closing (waited for, up to ``timeout``);
    - every instance holds at most ``max_size`` connections;
    - with ``servers``, what they see open is what the pool counts (server side).
    """
    def at_rest():
        s = pool.stats()
        return s["opening"] == 0 and s["closing"] == 0 and s["waiting"] == 0 and s
    s = wait_for(at_rest, timeout, message="the pool at rest (nothing opening, closing "
                 "or waiting)")
    assert s["in_use"] == in_use, s
    max_size = pool.config.max_size
    for key, inst in s["instances"].items():
        assert inst["size"] <= max_size, (key, inst)
        assert inst["size"] == inst["idle"] + inst["in_use"], (key, inst)
    counts = pool._state.counts()
    assert counts["busy"] == 0 and counts["in_use"] == in_use, counts
    if servers is not None:
        for server in servers:
            key = server.address
            expected = s["instances"].get(key, {}).get("size", 0)
            wait_for(lambda server=server, expected=expected:
                     server.open_connections() == expected, timeout,
                     message=f"{key} sees the {expected} connections the pool holds")
