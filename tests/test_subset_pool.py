"""``ThriftPool(..., subset_size=k)`` against real servers: connections to k instances
only, an ejected member replaced by the next in rank, and its place back on restore."""

from __future__ import annotations

import pytest

import thriftpool
from thriftpool.address import Endpoint, parse_address
from thriftpool.subset import Subsetter

from consistency import assert_consistent
from servers import wait_for

pytestmark = [pytest.mark.usefixtures("no_thread_leak"), pytest.mark.timeout(40)]


def expected_members(addresses, k, key):
    ranked = Subsetter(k, key).ranked(Endpoint(parse_address(a)) for a in addresses)
    return [str(e.address) for e in ranked]


def test_connections_only_to_the_subset_and_an_ejected_member_is_replaced(farm, make_pool):
    servers = farm.start(5)
    by_address = {s.address: s for s in servers}
    addresses = list(by_address)
    ranked = expected_members(addresses, 2, "client-a")
    pool = make_pool(addresses, subset_size=2, subset_key="client-a", min_size=1,
                     watchdog_interval=0.05, backoff_initial=0.3, backoff_jitter=0)
    assert pool.stats()["subset"] == ranked[:2]
    for a in ranked[:2]:
        wait_for(lambda a=a: by_address[a].open_connections() == 1, 10,
                 message=f"member {a} connected")
    proxy = pool.client()
    seen = {proxy.whoami() for _ in range(40)}
    assert seen == set(ranked[:2])
    for a in ranked[2:]:
        assert by_address[a].stats()["accepted"] == 0  # never connected to
    # A member dies: the third in rank takes its place while it is out.
    by_address[ranked[0]].kill()
    wait_for(lambda: pool.stats()["subset"] == [ranked[1], ranked[2]], 10,
             message="the next in rank replaces the ejected member")
    wait_for(lambda: by_address[ranked[2]].open_connections() == 1, 10,
             message="the replacement connected")
    assert {proxy.whoami() for _ in range(40)} == {ranked[1], ranked[2]}
    # It comes back: it gets its place back and the replacement's connections go.
    by_address[ranked[0]].restart()
    wait_for(lambda: pool.stats()["subset"] == ranked[:2], 15,
             message="the restored member back in the subset")
    wait_for(lambda: by_address[ranked[2]].open_connections() == 0, 10,
             message="the replacement's connections closed")
    assert {proxy.whoami() for _ in range(40)} == set(ranked[:2])
    assert_consistent(pool)


@pytest.mark.parametrize("options, option", [
    ({"subset_size": 0}, "subset_size"),
    ({"subset_size": 2.5}, "subset_size"),
    ({"subset_size": True}, "subset_size"),
    ({"subset_key": "k"}, "subset_key"),
    ({"subset_size": 2, "subset_key": 5}, "subset_key"),
])
def test_subset_options_are_validated(options, option):
    with pytest.raises(ValueError, match=option):
        thriftpool.ThriftPool(thriftpool_service(), ["127.0.0.1:1"], **options)


def thriftpool_service():
    from servers import echo_thrift

    return echo_thrift.Echo
