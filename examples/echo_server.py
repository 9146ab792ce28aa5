"""A small threaded echo server for the examples (serves idl/echo.thrift).

Run it alone with ``python examples/echo_server.py --port 9090``, or import
:func:`start_echo_server` to run one in a background thread.
"""

from __future__ import annotations

import argparse
import os
import socket
import threading
import time
from typing import Optional

import thriftpy2
from thriftpy2.rpc import make_server
from thriftpy2.server import TThreadedServer

IDL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                   "idl", "echo.thrift")
echo_thrift = thriftpy2.load(IDL, module_name="echo_thrift")


class EchoHandler:
    """Implements the Echo service; ``whoami`` answers with the server's name."""

    def __init__(self, name: str) -> None:
        self.name = name

    def echo(self, message: str) -> str:
        return message

    def ping(self) -> None:
        return None

    def sleep(self, ms: int) -> int:
        time.sleep(ms / 1000.0)
        return ms

    def whoami(self) -> str:
        return self.name

    def fail(self, message: str) -> str:
        raise echo_thrift.EchoError(message=message)


class RunningServer:
    """An echo server serving in a daemon thread; :meth:`stop` closes it."""

    def __init__(self, server: TThreadedServer, port: int, thread: threading.Thread) -> None:
        self.server = server
        self.port = port
        self.thread = thread

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        # TThreadedServer.close() only sets a flag: also close the listening socket so
        # the accept loop ends, then join.
        self.server.close()
        self.server.trans.close()
        self.thread.join(5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_echo_server(port: int = 0, name: Optional[str] = None) -> RunningServer:
    """Serve the Echo service on 127.0.0.1:``port`` (0: a free port) in a daemon thread."""
    port = port or _free_port()
    # client_timeout=None: thriftpy2 would otherwise drop connections idle for 3 s.
    server = make_server(echo_thrift.Echo, EchoHandler(name or f"127.0.0.1:{port}"),
                         host="127.0.0.1", port=port, client_timeout=None)
    server.trans.listen()
    thread = threading.Thread(target=_accept_loop, args=(server,), daemon=True,
                              name=f"echo-server-{port}")
    thread.start()
    return RunningServer(server, port, thread)


def _accept_loop(server: TThreadedServer) -> None:
    """TThreadedServer.serve(), minus the error log when stop() closes the socket."""
    while not server.closed:
        try:
            client = server.trans.accept()
        except (OSError, AttributeError, AssertionError):
            return  # the listening socket was closed by stop()
        threading.Thread(target=server.handle, args=(client,), daemon=True).start()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=9090)
    args = parser.parse_args()
    running = start_echo_server(args.port)
    print(f"echo server on {running.address}; Ctrl-C stops it")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        running.stop()


if __name__ == "__main__":
    main()
