"""``thriftpool.deadline()``: one budget over every call (and retry) inside the block.

The tests of calls take the ``stack`` fixture: each runs on thriftpy2 and on Apache Thrift."""

from __future__ import annotations

import pickle
import socket
import threading
import time

import pytest

import thriftpool
from servers import echo_thrift, wait_for
from thriftpool import deadlines
from thriftpool.errors import DeadlineExceeded, ThriftPoolError



# -- the context variable ------------------------------------------------------------------


def test_no_deadline_outside_a_block():
    assert deadlines.current() is None
    assert deadlines.remaining() is None
    assert deadlines.clamp(2.5, "x") == (2.5, None)
    assert deadlines.clamp(None, "x") == (None, None)


def test_a_block_sets_and_restores_the_deadline():
    with thriftpool.deadline(5) as d:
        assert deadlines.current() is d
        left = deadlines.remaining()
        assert left is not None and 4.5 < left <= 5
        assert d.seconds == 5.0 and not d.expired()
    assert deadlines.current() is None
    with pytest.raises(KeyError):
        with thriftpool.deadline(5):
            raise KeyError("out")  # an exception leaving the block restores it too
    assert deadlines.current() is None


def test_nesting_takes_the_smaller_bound():
    with thriftpool.deadline(10) as outer:
        with thriftpool.deadline(0.5) as inner:
            assert inner.expires_at < outer.expires_at
            assert deadlines.remaining() <= 0.5
        assert deadlines.current() is outer
    with thriftpool.deadline(0.5) as outer:
        with thriftpool.deadline(10) as inner:
            assert inner.expires_at == outer.expires_at
            assert inner.seconds == 0.5
            assert deadlines.remaining() <= 0.5
        with thriftpool.deadline(None) as unbounded:
            assert unbounded.expires_at == outer.expires_at
    with thriftpool.deadline(None):
        assert deadlines.current() is None  # no bound at all: calls keep their fast path


def test_clamp_applies_the_time_left():
    with thriftpool.deadline(10):
        assert deadlines.clamp(1.0, "x") == (1.0, None)
    with thriftpool.deadline(0.5) as d:
        seconds, binding = deadlines.clamp(1.0, "checkout")
        assert binding is d and 0.4 < seconds <= 0.5
        seconds, binding = deadlines.clamp(None, "checkout")
        assert binding is d and seconds <= 0.5
    with thriftpool.deadline(0):
        with pytest.raises(DeadlineExceeded) as info:
            deadlines.clamp(1.0, "checkout")
        assert info.value.what == "checkout"
        assert "no time left for checkout" in str(info.value)


def test_each_thread_has_its_own_deadline():
    seen = {}

    def child() -> None:
        seen["inherited"] = deadlines.current()
        with thriftpool.deadline(0.01):
            seen["own"] = deadlines.remaining()

    with thriftpool.deadline(5) as d:
        t = threading.Thread(target=child)
        t.start()
        t.join(5)
        assert deadlines.current() is d  # the child's block did not touch this thread
    assert seen["inherited"] is None  # a thread starts without the caller's deadline
    assert seen["own"] is not None and seen["own"] <= 0.01


@pytest.mark.parametrize("bad", [-1, float("nan"), True, "1", [1]])
def test_deadline_seconds_are_validated(bad):
    with pytest.raises(ValueError, match="deadline seconds"):
        thriftpool.deadline(bad)


def test_a_deadline_object_is_entered_once_at_a_time():
    d = thriftpool.deadline(1)
    with d:
        with pytest.raises(RuntimeError):
            d.__enter__()
    with d:  # after its block it may be used again
        pass


def test_deadline_exceeded_is_a_pool_error_and_a_timeout_and_pickles():
    exc = DeadlineExceeded("deadline of 0.5s exceeded", timeout=0.5, what="echo()")
    assert isinstance(exc, ThriftPoolError) and isinstance(exc, TimeoutError)
    assert isinstance(exc, socket.timeout) or not issubclass(socket.timeout, TimeoutError)
    copy = pickle.loads(pickle.dumps(exc))
    assert type(copy) is DeadlineExceeded
    assert (str(copy), copy.timeout, copy.what) == (str(exc), 0.5, "echo()")


# -- calls -----------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_a_call_with_no_time_left_sends_nothing_and_keeps_its_connection(stack, liar,
                                                                         make_pool):
    server = liar()  # the binary wire: the same for both stacks
    pool = make_pool([server.address], service=stack.service, min_size=0)
    with pool.checkout() as client:
        assert client.echo("a") == "a"
        with thriftpool.deadline(0):
            with pytest.raises(DeadlineExceeded) as info:
                client.echo("never sent")
        assert "the request was not sent" in str(info.value)
        assert client.echo("b") == "b"  # same connection, still in sync
    assert server.stats()["requests"] == 2
    assert server.stats()["accepted"] == 1
    assert server.stats()["closes_seen"] == 0


@pytest.mark.timeout(30)
def test_a_call_cut_short_by_the_deadline_raises_deadline_exceeded(stack, liar, make_pool):
    server = liar(trickle_interval=0.2).lie("trickle")
    pool = make_pool([server.address], service=stack.service, min_size=0, socket_timeout=5.0)
    started = time.monotonic()
    with thriftpool.deadline(0.4):
        with pytest.raises(DeadlineExceeded) as info:
            pool.client().echo("x" * 50)
    elapsed = time.monotonic() - started
    assert 0.35 < elapsed < 0.9, elapsed
    assert isinstance(info.value.__cause__, socket.timeout)
    assert info.value.timeout == 0.4
    assert "echo()" in str(info.value)
    wait_for(lambda: server.stats()["closes_seen"] == 1, timeout=5,
             message="the connection to be discarded")
    assert pool.client().echo("next") == "next"


@pytest.mark.timeout(30)
def test_a_call_whose_own_timeout_is_shorter_raises_its_timeout(stack, liar, make_pool):
    # Its own timeout, as the stack reports one: socket.timeout (thriftpy2) or
    # TTransportException(TIMED_OUT) (Apache), not DeadlineExceeded.
    server = liar(trickle_interval=0.2).lie("trickle")
    pool = make_pool([server.address], service=stack.service, min_size=0, socket_timeout=0.3)
    started = time.monotonic()
    expected = stack.TTransportException if stack.name == "apache" else socket.timeout
    with thriftpool.deadline(5):
        with pytest.raises(expected) as info:
            pool.client().echo("x" * 50)
    assert not isinstance(info.value, DeadlineExceeded)
    if stack.name == "apache":
        assert info.value.type == stack.TTransportException.TIMED_OUT
    assert time.monotonic() - started < 0.8


@pytest.mark.timeout(30)
def test_calls_in_a_block_share_one_budget(stack, farm, make_pool):
    (server,) = stack.start(farm)
    pool = make_pool([server.address], service=stack.service, min_size=1, socket_timeout=5.0)
    pool.wait()
    proxy = pool.client()
    started = time.monotonic()
    with thriftpool.deadline(1.0):
        assert proxy.sleep(400) == 400
        assert proxy.sleep(400) == 400
        with pytest.raises(DeadlineExceeded):
            proxy.sleep(400)
    elapsed = time.monotonic() - started
    assert 0.95 < elapsed < 1.5, elapsed


@pytest.mark.timeout(30)
def test_a_retry_gets_only_the_time_left(liar, farm, make_pool):
    # The first instance stalls 0.5 s, then hangs up; the idempotent retry goes to the
    # second, whose sleep(1000) would take 1 s: the deadline (1.0 s in all) ends it about
    # 0.5 s later, not 1 s later.
    staller = liar(trickle_interval=0.5).lie("stall_close")
    sleeper = farm.one()
    pool = make_pool([staller.address, sleeper.address], min_size=0, socket_timeout=5.0,
                     idempotent=True, retries=2, balancer="round_robin")
    started = time.monotonic()
    with thriftpool.deadline(1.0):
        with pytest.raises(DeadlineExceeded):
            pool.client().sleep(1000)
    elapsed = time.monotonic() - started
    assert 0.95 < elapsed < 1.4, elapsed
    assert staller.stats()["requests"] == 1  # round robin: the first attempt went here
    # ... and the retry to the second, which the deadline cut before it answered.
    assert sleeper.stats()["accepted"] == 1
    assert sleeper.stats()["calls"] == 0


@pytest.mark.timeout(30)
def test_no_retry_once_the_deadline_is_spent(stack, liar, make_pool):
    first = liar(trickle_interval=0.2).lie("trickle")
    second = liar()
    pool = make_pool([first.address, second.address], service=stack.service, min_size=0,
                     socket_timeout=5.0, idempotent=True, retries=2, balancer="round_robin")
    with thriftpool.deadline(0.4):
        with pytest.raises(DeadlineExceeded):
            pool.client().echo("x" * 50)
    assert first.stats()["requests"] == 1
    assert second.stats()["requests"] == 0


@pytest.mark.timeout(30)
def test_a_checkout_wait_is_bounded_by_the_deadline(farm, make_pool):
    server = farm.one()
    pool = make_pool([server.address], min_size=0, max_size=1, checkout_timeout=1.5)
    holder = pool.checkout()
    holder.__enter__()
    try:
        started = time.monotonic()
        with thriftpool.deadline(0.3):
            with pytest.raises(DeadlineExceeded):
                with pool.checkout():
                    pass
        assert time.monotonic() - started < 0.8
        # A checkout's own timeout, shorter than the deadline, stays PoolExhausted.
        with thriftpool.deadline(5):
            with pytest.raises(thriftpool.PoolExhausted) as info:
                with pool.checkout(timeout=0.1):
                    pass
            assert not isinstance(info.value, DeadlineExceeded)
        # No time left at all: DeadlineExceeded at once, nothing waited for.
        with thriftpool.deadline(0):
            with pytest.raises(DeadlineExceeded):
                with pool.checkout():
                    pass
        assert pool.stats()["waiting"] == 0
    finally:
        holder.__exit__(None, None, None)


@pytest.mark.timeout(30)
def test_connects_inside_a_deadline_take_only_the_time_left(make_pool, fault_proxy):
    hung = fault_proxy("127.0.0.1:9")
    hung.deaf()  # connects hang
    pool = make_pool([hung.address], min_size=0, connect_timeout=5, checkout_timeout=5)
    started = time.monotonic()
    with thriftpool.deadline(0.3):
        with pytest.raises(DeadlineExceeded):
            with pool.checkout():
                pass
    assert time.monotonic() - started < 0.7


def test_deadline_is_exported():
    assert thriftpool.deadline is deadlines.deadline
    assert thriftpool.DeadlineExceeded is DeadlineExceeded
    assert {"deadline", "Deadline", "DeadlineExceeded"} <= set(thriftpool.__all__)
    assert echo_thrift.Echo  # the service the other tests use
