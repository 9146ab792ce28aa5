"""Replies that lie: every malformed reply raises a Thrift exception, fast, within a
few MB, discards its connection (the server sees the close), counts against the
instance, and the next call works.  Both transports, both protocols."""

from __future__ import annotations

import os
import socket
import time
import tracemalloc
from typing import Iterator, Tuple

import pytest
from thriftpy2.protocol.exc import TProtocolException
from thriftpy2.transport import TTransportException

import thriftpool
from liars import FRAMED_LIES, LIES
from servers import wait_for
from thriftpool.connection import DEPTH_LIMIT, should_discard

COMBOS = [("buffered", "binary"), ("buffered", "compact"), ("framed", "binary"),
          ("framed", "compact")]
SOCKET_TIMEOUT = 1.0

# What each lie must raise: (exception class, TProtocolException kind or None).  Where the
# transport or protocol changes the answer, the key carries it.
P = TProtocolException
EXPECTED = {
    "garbage": (P, None),
    "http": (P, None),
    "truncated": (TTransportException, TTransportException.END_OF_FILE),
    "frame_len": (P, P.SIZE_LIMIT),
    "frame_negative": (P, P.NEGATIVE_SIZE),
    "string_len": (P, None),
    "string_1g": (P, None),
    "negative_len": (P, P.NEGATIVE_SIZE),
    "list_len": (P, None),
    "deep": (P, DEPTH_LIMIT),
    "unknown_type": (P, P.INVALID_DATA),
    "trickle": (socket.timeout, None),
    # An unframed binary reply whose skipped list claims 2**31 - 1 elements: thriftpy2's
    # Cython codec skips element by element as bytes arrive (it allocates nothing for
    # them), so the call looks like a slow server and ends at socket_timeout.
    ("buffered", "binary", "list_len"): (socket.timeout, None),
    # A length beyond a frame: the decoder asks for more than the frame holds.
    ("framed", "binary", "string_len"): (P, P.INVALID_DATA),
    ("framed", "binary", "string_1g"): (P, P.INVALID_DATA),
    ("framed", "binary", "list_len"): (P, P.INVALID_DATA),
    ("buffered", "binary", "string_len"): (P, P.SIZE_LIMIT),
    ("buffered", "binary", "string_1g"): (P, P.SIZE_LIMIT),
    ("buffered", "compact", "string_len"): (P, P.SIZE_LIMIT),
    ("framed", "compact", "string_len"): (P, P.SIZE_LIMIT),
    ("buffered", "compact", "list_len"): (P, P.SIZE_LIMIT),
    ("framed", "compact", "list_len"): (P, P.SIZE_LIMIT),
}
SLOW_LIES = {"trickle", ("buffered", "binary", "list_len")}


def _cases() -> Iterator[Tuple[str, str, str]]:
    for transport, protocol in COMBOS:
        for lie in LIES + (FRAMED_LIES if transport == "framed" else ()):
            yield transport, protocol, lie


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")



@pytest.mark.timeout(30)
@pytest.mark.parametrize("transport,protocol,lie", list(_cases()))
def test_lying_reply_raises_a_thrift_exception_and_discards(liar, make_pool, transport,
                                                            protocol, lie):
    server = liar(transport, protocol)
    pool = make_pool([server.address], min_size=0, transport=transport, protocol=protocol,
                     socket_timeout=SOCKET_TIMEOUT, failure_threshold=5)
    with pool.checkout() as client:  # an honest call first: the codec path is warm
        assert client.echo("warm") == "warm"
    server.lie(lie)
    rss_before = _rss()
    tracemalloc.start()
    started = time.monotonic()
    try:
        with pytest.raises(Exception) as info:
            with pool.checkout() as client:
                client.echo("x" * 200)
        elapsed = time.monotonic() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    rss_growth = _rss() - rss_before

    cls, kind = EXPECTED.get((transport, protocol, lie), EXPECTED[lie])
    exc = info.value
    assert isinstance(exc, cls), f"{lie}: {type(exc).__name__}: {exc}"
    if kind is not None:
        assert exc.type == kind, f"{lie}: kind {exc.type}: {exc}"
    if isinstance(exc, TProtocolException) and exc.__cause__ is not None:
        assert not isinstance(exc.__cause__, (TProtocolException, TTransportException))
    assert should_discard(exc)
    # Fast, except what only a clock can tell from a slow server.
    slow = lie in SLOW_LIES or (transport, protocol, lie) in SLOW_LIES
    bound = SOCKET_TIMEOUT + 0.5 if slow else 1.0
    assert elapsed < bound, f"{lie} took {elapsed:.2f}s"
    if slow:
        assert elapsed >= SOCKET_TIMEOUT - 0.05
    # Nothing was allocated for what the reply claimed (2 GiB, 1 GiB, 100,000 levels).
    assert peak < 4 * 1024 * 1024, f"{lie}: traced peak {peak} bytes"
    assert rss_growth < 16 * 1024 * 1024, f"{lie}: RSS grew {rss_growth} bytes"
    # The connection was discarded: the server sees the client close it.
    wait_for(lambda: server.stats()["closes_seen"] == 1, timeout=5,
             message=f"the server to see the close after {lie}")
    stats = pool.stats()["instances"][server.address]
    assert stats["idle"] + stats["in_use"] == 0
    # The next call works, on a new connection.
    with pool.checkout() as client:
        assert client.echo("again") == "again"
    assert server.stats()["accepted"] == 2


@pytest.mark.timeout(30)
@pytest.mark.parametrize("transport,protocol", COMBOS)
def test_an_instance_answering_garbage_is_ejected(liar, make_pool, transport, protocol):
    bad = liar(transport, protocol).lie(*["garbage"] * 20)
    good = liar(transport, protocol)
    pool = make_pool([bad.address, good.address], min_size=0, transport=transport,
                     protocol=protocol, failure_threshold=2, backoff_initial=30.0,
                     balancer="round_robin")
    proxy = pool.client()
    failures = 0
    for i in range(12):
        try:
            assert proxy.echo(str(i)) == str(i)
        except TProtocolException:
            failures += 1
    assert failures == 2  # then the liar is out of rotation
    assert pool.stats()["instances"][bad.address]["healthy"] is False
    assert pool.stats()["instances"][good.address]["healthy"] is True


@pytest.mark.timeout(30)
def test_unknown_message_type_is_not_returned_as_the_answer(liar, make_pool):
    server = liar("buffered", "binary").lie("unknown_type")
    pool = make_pool([server.address], min_size=0)
    with pytest.raises(TProtocolException) as info:
        pool.client().echo("x")
    assert "message type 7" in str(info.value)
    wait_for(lambda: server.stats()["closes_seen"] == 1, timeout=5)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("transport", ["buffered", "framed"])
def test_max_message_size_limits_honest_replies_too(liar, make_pool, transport):
    server = liar(transport, "binary")
    pool = make_pool([server.address], min_size=0, transport=transport,
                     max_message_size=10_000)
    assert pool.client().echo("y" * 9_000) == "y" * 9_000
    with pytest.raises(TProtocolException) as info:
        pool.client().echo("y" * 12_000)
    assert info.value.type == TProtocolException.SIZE_LIMIT
    assert "max_message_size (10000)" in str(info.value)
    assert pool.client().echo("z") == "z"


@pytest.mark.timeout(30)
def test_max_message_size_none_lifts_the_limit(liar, make_pool):
    server = liar("framed", "binary")
    pool = make_pool([server.address], min_size=0, transport="framed",
                     max_message_size=None)
    big = "b" * (3 * 1024 * 1024)
    assert pool.client().echo(big) == big


def test_max_message_size_is_validated():
    from servers import echo_thrift
    for bad in (0, -1, 1.5, "64M", True):
        with pytest.raises(ValueError, match="max_message_size"):
            thriftpool.PoolConfig.build(service=echo_thrift.Echo, max_message_size=bad)
    assert thriftpool.PoolConfig.build(service=echo_thrift.Echo).max_message_size == \
        64 * 1024 * 1024
