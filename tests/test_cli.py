"""The ``thriftpool`` command line, run as a real subprocess against real servers."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import List

import pytest

from servers import IDL, free_port


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "thriftpool", *args], capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.timeout(60)
def test_ping_reports_each_instance_and_fails_on_a_dead_one(farm):
    a, b = farm.start(2)
    dead = f"127.0.0.1:{free_port()}"
    ok = run("ping", "--idl", IDL, "--address", a.address, "--address", b.address)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.count(" ok ") == 2
    bad = run("ping", "--idl", IDL, "--address", a.address, "--address", dead)
    assert bad.returncode == 1
    lines: List[str] = bad.stdout.splitlines()
    assert any(line.startswith(a.address) and " ok " in line for line in lines)
    assert any(line.startswith(dead) and "FAIL" in line for line in lines)
    assert a.stats()["calls"] >= 2 and b.stats()["calls"] >= 1


@pytest.mark.timeout(60)
def test_ping_with_a_method_and_arguments(farm):
    server = farm.one()
    result = run("ping", "--idl", IDL, "--address", server.address, "--method", "echo",
                 "--args", '["hello"]')
    assert result.returncode == 0, result.stderr
    assert "'hello'" in result.stdout


@pytest.mark.timeout(60)
def test_bench_prints_progress_and_a_table(farm):
    a, b = farm.start(2)
    result = run("bench", "--idl", IDL, "--address", a.address, "--address", b.address,
                 "--method", "echo", "--args", '["0123456789abcdef"]', "--threads", "4",
                 "--duration", "2", "--calls", "3000", "--balancer", "round_robin")
    assert result.returncode == 0, result.stderr
    assert "calls" in result.stderr and "/s" in result.stderr  # the live progress line
    header, *rows = result.stdout.splitlines()
    assert header.split()[:4] == ["INSTANCE", "CALLS", "ERRORS", "CALLS/S"]
    by_instance = {r.split()[0]: r.split() for r in rows}
    assert set(by_instance) == {a.address, b.address, "total"}
    total = int(by_instance["total"][1])
    assert 0 < total <= 3000
    assert a.stats()["calls"] + b.stats()["calls"] == total


@pytest.mark.timeout(60)
@pytest.mark.parametrize("args, message", [
    (["ping", "--idl", "/nonexistent.thrift", "--address", "127.0.0.1:1"], "no such file"),
    (["ping", "--idl", IDL], "--address"),
    (["ping", "--idl", IDL, "--address", "nonsense"], "--address"),
    (["ping", "--idl", IDL, "--address", "127.0.0.1:1", "--method", "nope"], "no method"),
    (["ping", "--idl", IDL, "--address", "127.0.0.1:1", "--service", "Nope"], "no service"),
    (["ping", "--idl", IDL, "--address", "127.0.0.1:1", "--args", "[1,"], "--args"),
    (["bench", "--idl", IDL, "--address", "127.0.0.1:1", "--threads", "0"], "--threads"),
    (["bench", "--idl", IDL, "--address", "127.0.0.1:1", "--duration", "-1"], "--duration"),
    (["instances", "--zk", "127.0.0.1:1"], "--path"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_arguments_get_a_clear_message_and_exit_2(args, message):
    result = run(*args)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_console_script_is_declared():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "setup.cfg")) as f:
        assert "thriftpool = thriftpool.cli:main" in f.read()
