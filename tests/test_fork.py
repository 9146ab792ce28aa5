"""A pool created before fork(): the child never touches the parent's sockets."""

from __future__ import annotations

import os
import sys
import traceback
import warnings

import pytest

import thriftpool
from servers import wait_for

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


def _fork() -> int:
    with warnings.catch_warnings():
        # Python 3.12+ warns that forking a multi-threaded process may deadlock; handling
        # exactly that is what this test checks.
        warnings.simplefilter("ignore", DeprecationWarning)
        return os.fork()


@pytest.mark.timeout(60)
def test_child_drops_inherited_sockets_and_parent_keeps_them(farm, service, no_thread_leak):
    server = farm.one()
    pool = thriftpool.ThriftPool(service, [server.address], min_size=2, initial_size=2,
                                 max_size=4, watchdog_interval=0.05)
    try:
        wait_for(lambda: server.stats()["open"] == 2, message="the parent's 2 connections")
        proxy = pool.client()
        assert proxy.echo("parent") == "parent"
        # (the server counts a call just after sending its reply)
        before = wait_for(lambda: (lambda st: st if st["calls"] == 1 else None)(server.stats()),
                          message="the server to count the parent's call")

        pid = _fork()
        if pid == 0:  # the child: report through the exit code only
            code = 1
            try:
                child_proxy = pool.client()
                replies = [child_proxy.echo(f"child {i}") for i in range(20)]
                assert replies == [f"child {i}" for i in range(20)], replies
                stats = pool.stats()
                assert stats["in_use"] == 0, stats
                pool.close()
                code = 0
            except BaseException:
                traceback.print_exc()
                sys.stderr.flush()
            finally:
                os._exit(code)

        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, "the child failed"
        after = server.stats()
        # The child connected on its own (it could not have used the parent's sockets
        # without the server seeing its calls arrive on old connections, which the
        # parent's next calls would then detect as stale replies).
        assert after["accepted"] > before["accepted"]
        wait_for(lambda: server.stats()["calls"] == before["calls"] + 20,
                 message="exactly the child's 20 calls")
        # The child's sockets are gone; the parent's two are still up.
        wait_for(lambda: server.stats()["open"] == 2,
                 message="the child's connections to close and the parent's to stay")

        accepted = server.stats()["accepted"]
        assert [proxy.echo(f"parent {i}") for i in range(20)] == \
            [f"parent {i}" for i in range(20)]
        assert server.stats()["accepted"] == accepted, "the parent had to reconnect"
    finally:
        pool.close()


@pytest.mark.timeout(60)
def test_fork_inside_a_checkout(farm, service):
    """The forking thread holds a connection: in the child it is released, never reused."""
    server = farm.one()
    pool = thriftpool.ThriftPool(service, [server.address], min_size=1, max_size=2)
    try:
        with pool.checkout() as client:
            assert client.echo("before") == "before"
            pid = _fork()
            if pid == 0:
                code = 1
                try:
                    try:
                        client.echo("from the child, on the parent's socket")
                    except thriftpool.ClientReleased:
                        pass  # the child's copy of this client is dead: good
                    else:
                        raise AssertionError("the child used an inherited socket")
                    code = 0
                except BaseException:
                    traceback.print_exc()
                finally:
                    os._exit(code)
            _, status = os.waitpid(pid, 0)
            assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
            assert client.echo("after") == "after"  # the parent's stream is intact
    finally:
        pool.close()
