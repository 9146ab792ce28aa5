"""A minimal thriftpy2 echo server for the benchmarks, run as a subprocess.

It serves ``idl/echo.thrift`` on a loopback port, one thread per connection, with no idle
timeout (thriftpy2's ``make_server`` closes connections idle for 3 s, which would make the
idle-memory benchmark measure the server) and no per-call bookkeeping, so every client
kind pays the same, small, server cost per call.  It prints ``READY <port>`` once it
listens, and exits when its standard input closes, so it never outlives the benchmark.

Kept apart from ``tests/echo_server.py`` on purpose: the benchmarks must not change when
the test server grows new controls.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import threading

import thriftpy2
from thriftpy2.protocol import TBinaryProtocolFactory
from thriftpy2.thrift import TProcessor
from thriftpy2.transport import TBufferedTransportFactory, TFramedTransportFactory, TSocket

IDL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                   "idl", "echo.thrift")
echo_thrift = thriftpy2.load(IDL, module_name="echo_thrift")


class Handler:
    def __init__(self, name: str) -> None:
        self.name = name

    def echo(self, message):
        return message

    def ping(self):
        return None

    def sleep(self, ms):
        return ms

    def whoami(self):
        return self.name

    def fail(self, message):
        raise echo_thrift.EchoError(message=message)


def serve_connection(sock, processor, trans_factory, proto_factory):
    trans = trans_factory.get_transport(TSocket(sock=sock))
    prot = proto_factory.get_protocol(trans)
    try:
        while True:
            processor.process(prot, prot)
    except Exception:
        pass  # the client hung up (or sent garbage): drop the connection
    finally:
        try:
            sock.close()
        except OSError:
            pass


def accept_loop(listener, processor, trans_factory, proto_factory):
    while True:
        sock, _ = listener.accept()
        threading.Thread(target=serve_connection, daemon=True,
                         args=(sock, processor, trans_factory, proto_factory)).start()


def exit_when_parent_goes() -> None:
    # The parent holds our stdin open; EOF means it exited (even by SIGKILL).
    sys.stdin.read()
    os._exit(0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--backlog", type=int, default=1024)
    parser.add_argument("--transport", choices=["buffered", "framed"], default="buffered")
    args = parser.parse_args()
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", args.port))
    listener.listen(args.backlog)
    port = listener.getsockname()[1]
    processor = TProcessor(echo_thrift.Echo, Handler(f"127.0.0.1:{port}"))
    threading.Thread(target=exit_when_parent_goes, daemon=True).start()
    print(f"READY {port}", flush=True)
    transport = (TFramedTransportFactory() if args.transport == "framed"
                 else TBufferedTransportFactory())
    accept_loop(listener, processor, transport, TBinaryProtocolFactory())


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(0)
