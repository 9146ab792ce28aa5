"""thriftpool in a gevent-patched process (real gevent, patched before any import)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any, Dict

import pytest

pytestmark = pytest.mark.gevent

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gevent_worker.py")


def run_scenario(name: str, timeout: float = 90, **args: Any) -> Dict[str, Any]:
    """Run a scenario of gevent_worker.py in a fresh interpreter; fails if gevent is missing."""
    proc = subprocess.run([sys.executable, WORKER, name, json.dumps(args)],
                          capture_output=True, text=True, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, (
        f"gevent scenario {name} failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.timeout(120)
def test_200_greenlets_share_4_connections_per_instance(farm):
    servers = farm.start(2)
    result = run_scenario("load", addresses=[s.address for s in servers], greenlets=200,
                          calls=6)
    assert result["errors"] == []
    assert result["ok"] == 200
    assert result["in_use"] == 0
    assert result["max_size_seen"] <= 4
    for s in servers:
        stats = s.stats()
        assert stats["peak"] <= 4, stats  # the servers never saw more than max_size each
        assert stats["calls"] > 0
    assert result["watchdog_thread"], "the watchdog should run (as a greenlet)"
    # The hub was never blocked for long: a 10 ms ticker kept ticking.
    assert result["max_gap"] < 0.5, result["max_gap"]
    # close() left no greenlet running (watchdog included).
    assert result["live_greenlets"] == []


@pytest.mark.timeout(60)
def test_waiting_on_a_full_pool_does_not_block_the_hub(farm):
    server = farm.one()
    result = run_scenario("exhausted", addresses=[server.address])
    assert result["error"] == "PoolExhausted"
    assert 0.25 <= result["elapsed"] < 1.2, result["elapsed"]
    assert result["events"] == 1
    # Other greenlets ran while the checkout waited: about 30 ticks of 10 ms in 0.3 s.
    assert result["ticks_during_wait"] >= 10, result
    assert result["max_gap"] < 0.5
    assert result["live_greenlets"] == []


@pytest.mark.timeout(120)
def test_gevent_wsgi_example_under_concurrent_requests(farm):
    """examples/gevent_wsgi.py serves 300 concurrent HTTP requests through its pool."""
    import signal
    import threading
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    servers = farm.start(2)
    cmd = [sys.executable, os.path.join(root, "examples", "gevent_wsgi.py"), "--port", "0",
           "--max-size", "3"]
    for s in servers:
        cmd += ["--backend", s.address]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line: Dict[str, str] = {}
        reader = threading.Thread(target=lambda: line.setdefault("l", proc.stdout.readline()),
                                  daemon=True)
        reader.start()
        reader.join(30)
        assert line.get("l", "").startswith("LISTENING"), (line, proc.poll())
        port = int(line["l"].split()[1])

        def get(i: int) -> Dict[str, Any]:
            url = f"http://127.0.0.1:{port}/echo?request-{i}"
            with urllib.request.urlopen(url, timeout=20) as resp:
                assert resp.status == 200
                return json.loads(resp.read())

        with ThreadPoolExecutor(max_workers=32) as ex:
            replies = list(ex.map(get, range(300)))
        assert [r["echo"] for r in replies] == [f"request-{i}" for i in range(300)]
        assert {r["server"] for r in replies} == {s.address for s in servers}
        for s in servers:
            assert s.stats()["peak"] <= 3  # the pool's cap held under 32 concurrent clients
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err
        assert "stopped" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.mark.timeout(60)
def test_gevent_timeouts_while_waiting_and_in_a_listener_leak_nothing(farm):
    server = farm.one()
    result = run_scenario("interrupt", addresses=[server.address], interrupts=20)
    assert result["timeouts"] == 20
    assert (result["waiting_during"], result["in_use_during"]) == (0, 2)
    assert result["listener_timeouts"] == 5
    assert result["ok"] == 50  # a full round afterwards: every greenlet succeeded
    assert (result["in_use"], result["waiting"], result["opening"]) == (0, 0, 0)
    assert result["size"] <= 2


LATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gevent_late.py")


@pytest.mark.timeout(90)
@pytest.mark.parametrize("mode", ["preload", "same"])
def test_gevent_patched_after_the_pool_was_built(farm, mode):
    """gunicorn --preload -k gevent: thriftpool imported and a pool built and used before
    the (forked) worker patches; the pool rebuilds for gevent at its next checkout."""
    servers = farm.start(2)
    proc = subprocess.run([sys.executable, LATE, mode,
                           json.dumps({"addresses": [s.address for s in servers]})],
                          capture_output=True, text=True, timeout=80)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, (proc.returncode, proc.stdout, proc.stderr)
    result = json.loads(lines[-1][len("RESULT "):])
    assert result["errors"] == [] and result["ok"] == 50, result
    assert result["in_use"] == 0
    assert result["watchdog_alive"] is True and result["watchdogs"] == 1, result
    # 50 greenlets x 4 calls of 5 ms through 2 connections per instance: the checkouts
    # waited, on gevent's primitives, and the hub kept ticking.  (Without a fork, the
    # one-time rebuild stops the pool's old OS thread first: a stall of about a second.)
    assert result["max_gap"] < (0.5 if mode == "preload" else 2.0), result
    assert result["elapsed"] < 20


def test_deadlines_follow_each_greenlet(farm):
    server = farm.one()
    result = run_scenario("deadline", addresses=[server.address])
    assert result["bounded"] == "DeadlineExceeded"
    assert 0.25 <= result["bounded_elapsed"] < 0.8, result
    assert result["unbounded_deadline"] is True  # spawned inside the block, without its bound
    assert result["unbounded"] == 600
    assert result["max_gap"] < 0.5

