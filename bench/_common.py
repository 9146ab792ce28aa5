"""Helpers shared by the benchmarks: echo server subprocesses, the IDL, small statistics.

The benchmarks import thriftpool from this work tree (not from site-packages), so a run
measures the code next to it.
"""

from __future__ import annotations

import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import thriftpy2  # noqa: E402

IDL = os.path.join(ROOT, "idl", "echo.thrift")
SERVER_SCRIPT = os.path.join(BENCH, "echo_server.py")

echo_thrift = thriftpy2.load(IDL, module_name="echo_thrift")
Echo = echo_thrift.Echo

#: The 16-byte payload of every echo call.
MESSAGE = "0123456789abcdef"
assert len(MESSAGE.encode()) == 16


class EchoServer:
    """One ``bench/echo_server.py`` subprocess on a free loopback port.

    The server exits by itself when this process exits (it watches its stdin), so a
    benchmark killed half-way leaves nothing behind.
    """

    def __init__(self, timeout: float = 15.0, transport: str = "buffered") -> None:
        self.proc = subprocess.Popen([sys.executable, SERVER_SCRIPT, "--transport", transport],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line: Dict[str, str] = {}

        def read_ready() -> None:
            assert self.proc.stdout is not None
            line["ready"] = self.proc.stdout.readline()

        reader = threading.Thread(target=read_ready, daemon=True)
        reader.start()
        reader.join(timeout)
        ready = line.get("ready", "")
        if not ready.startswith("READY"):
            self.stop()
            raise RuntimeError(f"echo server did not start: {ready!r}")
        self.host = "127.0.0.1"
        self.port = int(ready.split()[1])

    @property
    def address(self) -> Tuple[str, int]:
        return self.host, self.port

    def stop(self) -> None:
        stop_process(self.proc)


def stop_process(proc: "subprocess.Popen[str]") -> None:
    """Kill a helper subprocess (if still running) and close its pipes."""
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)
    for f in (proc.stdin, proc.stdout):
        if f is not None:
            try:
                f.close()
            except OSError:
                pass


def start_servers(n: int, transport: str = "buffered") -> List[EchoServer]:
    servers: List[EchoServer] = []
    try:
        for _ in range(n):
            servers.append(EchoServer(transport=transport))
    except BaseException:
        for s in servers:
            s.stop()
        raise
    return servers


def raise_fd_limit(needed: int) -> int:
    """Raise the soft descriptor limit to at least ``needed`` if the hard limit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        new = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        soft = new
    if soft != resource.RLIM_INFINITY and soft < needed:
        raise SystemExit(f"need {needed} file descriptors, ulimit -n allows {soft}")
    return soft


def rss_bytes() -> int:
    """This process's resident set size, from /proc (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def median(values: Iterable[float]) -> float:
    values = list(values)
    return statistics.median(values) if values else float("nan")


def machine_line() -> str:
    """One line naming what was measured on, for the tables in README.md."""
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import thriftpy2 as t
    return (f"{time.strftime('%Y-%m-%d %H:%M %Z')}; Python {platform.python_version()}; "
            f"thriftpy2 {t.__version__ if hasattr(t, '__version__') else '?'}; "
            f"{os.cpu_count()} CPUs ({cpu}); Linux {platform.release()}")


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]],
                out: Optional[List[str]] = None) -> None:
    """Print a Markdown table (and append its lines to ``out``)."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def fmt(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"

    lines = [fmt(header), "| " + " | ".join("-" * w for w in widths) + " |"]
    lines += [fmt(r) for r in rows]
    for line in lines:
        print(line)
    if out is not None:
        out.extend(lines)
