"""Starting, inspecting, killing and restarting real echo servers in subprocesses."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import thriftpy2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IDL = os.path.join(ROOT, "idl", "echo.thrift")
SERVER_SCRIPT = os.path.join(ROOT, "tests", "echo_server.py")

echo_thrift = thriftpy2.load(IDL, module_name="echo_thrift")


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02,
             message: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


class EchoServer:
    """One echo server subprocess on a loopback port, with its control channel."""

    def __init__(self, port: int = 0, name: Optional[str] = None,
                 transport: str = "buffered", protocol: str = "binary",
                 tls: Optional[Tuple[str, str]] = None, client_ca: Optional[str] = None
                 ) -> None:
        self.requested_port = port
        self.name = name
        self.transport = transport
        self.protocol = protocol
        self.tls = tls
        self.client_ca = client_ca
        self.proc: Optional[subprocess.Popen] = None
        self.port = port
        self.control_port = 0
        self.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def command_line(self) -> List[str]:
        cmd = [sys.executable, SERVER_SCRIPT, "--port", str(self.port),
               "--transport", self.transport, "--protocol", self.protocol]
        if self.name:
            cmd += ["--name", self.name]
        if self.tls:
            cmd += ["--certfile", self.tls[0], "--keyfile", self.tls[1]]
        if self.client_ca:
            cmd += ["--client-ca", self.client_ca]
        return cmd

    def start(self, timeout: float = 15.0) -> None:
        self.proc = subprocess.Popen(self.command_line(), stdout=subprocess.PIPE, text=True)
        result: Dict[str, str] = {}

        def read_ready() -> None:
            assert self.proc is not None and self.proc.stdout is not None
            result["line"] = self.proc.stdout.readline()

        reader = threading.Thread(target=read_ready, daemon=True)
        reader.start()
        reader.join(timeout)
        line = result.get("line", "")
        if not line.startswith("READY"):
            self.kill()
            raise RuntimeError(f"echo server did not start: {line!r}")
        _, port, control = line.split()
        self.port, self.control_port = int(port), int(control)

    def command(self, cmd: str) -> Dict[str, Any]:
        with socket.create_connection(("127.0.0.1", self.control_port), timeout=5) as s:
            s.sendall(cmd.encode() + b"\n")
            with s.makefile("r") as f:
                return json.loads(f.readline())

    def stats(self) -> Dict[str, int]:
        """``{"open", "accepted", "calls", "peak"}`` as the server sees them."""
        return self.command("stats")

    def notices(self) -> int:
        """One-way ``notify`` calls the server received."""
        return self.stats()["notices"]

    def open_connections(self) -> int:
        return self.stats()["open"]

    def peers(self) -> List[int]:
        """The client-side ports of the connections open on the server now."""
        return self.command("peers")["peers"]

    def drop(self) -> int:
        """Close every client connection from the server side."""
        return self.command("drop")["dropped"]

    def kill(self) -> None:
        """SIGKILL: the kernel closes every connection, nothing is said."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()

    def restart(self) -> None:
        """Start again on the same port after :meth:`kill`."""
        self.kill()
        self.start()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class ServerFarm:
    """Every server a test started; all killed at teardown."""

    def __init__(self) -> None:
        self.servers: List[EchoServer] = []

    def start(self, n: int = 1, **kwargs: Any) -> List[EchoServer]:
        started = [EchoServer(**kwargs) for _ in range(n)]
        self.servers.extend(started)
        return started

    def one(self, **kwargs: Any) -> EchoServer:
        return self.start(1, **kwargs)[0]

    def stop_all(self) -> None:
        for s in self.servers:
            s.kill()


def free_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    return free_ports(1)[0]


def free_ports(n: int) -> List[int]:
    """``n`` distinct loopback ports nobody listens on.  All are held bound until the last
    is picked: ports picked one at a time may repeat (a ZooKeeper ensemble once got one
    port as a server's client port and another's quorum port, and never elected a leader
    again)."""
    held = []
    try:
        for _ in range(n):
            s = socket.socket()
            held.append(s)
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in held]
    finally:
        for s in held:
            s.close()


def start_servers(farm: ServerFarm, n: int, **kwargs: Any) -> List[EchoServer]:
    """Start ``n`` echo servers at once (each takes ~0.5 s to import thriftpy2) and add
    them to ``farm``, so its teardown kills them."""
    started: List[Optional[EchoServer]] = [None] * n
    errors: List[BaseException] = []

    def run(i: int) -> None:
        try:
            started[i] = EchoServer(**kwargs)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    servers = [s for s in started if s is not None]
    farm.servers.extend(servers)
    if errors or len(servers) != n:
        raise RuntimeError(f"echo servers did not start: {errors}")
    return servers


class CannedServer:
    """Answers the first request of its first connection with fixed bytes (one at a time,
    ``gap`` seconds apart, when ``gap`` is set; or, given a list of parts, each part
    ``gap`` seconds after the one before), then reads until the client hangs up
    (``closed`` is set then).  For replies no Thrift server would send."""

    def __init__(self, reply: Union[bytes, Sequence[bytes]], gap: float = 0.0) -> None:
        if isinstance(reply, bytes):
            self.parts = [reply[i:i + 1] for i in range(len(reply))] if gap else [reply]
        else:
            self.parts = list(reply)
        self.gap = gap
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self._run, name="canned-server", daemon=True)
        self.thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _run(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        with conn:
            try:
                conn.settimeout(10)
                conn.recv(65536)
                for i, part in enumerate(self.parts):
                    if i:
                        time.sleep(self.gap)
                    conn.sendall(part)
                while conn.recv(65536):
                    pass
            except OSError:
                pass
        self.closed.set()

    def stop(self) -> None:
        self.listener.close()
        self.thread.join(5)
