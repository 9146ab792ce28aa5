"""A real thriftpy2 echo server for the tests, run as a subprocess.

It serves ``idl/echo.thrift`` on a loopback port, one thread per connection and no idle
timeout (thriftpy2's default closes connections idle for 3 s, which would hide what the
pool does).  A second loopback port takes one-line control commands, so a test can see
the server side of the pool:

- ``stats``: JSON ``{"open", "accepted", "calls", "peak", "notices"}`` (connections open
  now, accepted in all, calls answered (counted before the reply is written), most
  connections open at once, one-way ``notify`` calls received);
- ``drop``: close every client connection from the server side;
- ``reset_peak``: set ``peak`` to the current number of open connections.

It prints ``READY <port> <control_port>`` once both ports listen.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import ssl
import sys
import threading
import time

import thriftpy2
from thriftpy2.protocol import TBinaryProtocolFactory, TCompactProtocolFactory
from thriftpy2.thrift import TProcessor
from thriftpy2.transport import TBufferedTransportFactory, TFramedTransportFactory, TSocket

IDL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                   "idl", "echo.thrift")
echo_thrift = thriftpy2.load(IDL, module_name="echo_thrift")


class State:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.conns: set = set()
        self.accepted = 0
        self.calls = 0
        self.peak = 0
        self.tls_failures = 0
        self.notices = 0


class Handler:
    def __init__(self, name: str, state=None) -> None:
        self.name = name
        self.state = state

    def echo(self, message):
        return message

    def ping(self):
        return None

    def sleep(self, ms):
        time.sleep(ms / 1000.0)
        return ms

    def whoami(self):
        return self.name

    def fail(self, message):
        if message == "internal":
            # Not an IDL exception: TApplicationException INTERNAL_ERROR, as a bad deploy
            # answers.
            from thriftpy2.thrift import TApplicationException

            raise TApplicationException(TApplicationException.INTERNAL_ERROR, "a bug")
        raise echo_thrift.EchoError(message=message)

    def notify(self, message):
        if self.state is not None:
            with self.state.lock:
                self.state.notices += 1


class CountingProcessor(TProcessor):
    """Counts each answered call just before its reply is written: a client that has its
    reply always finds the call in ``stats`` (counting after the write raced with it)."""

    def __init__(self, service, handler, state):
        super().__init__(service, handler)
        self.state = state

    def _count(self):
        with self.state.lock:
            self.state.calls += 1

    def send_result(self, oprot, api, result, seqid):
        self._count()
        return super().send_result(oprot, api, result, seqid)

    def send_exception(self, oprot, api, exc, seqid):
        self._count()
        return super().send_exception(oprot, api, exc, seqid)


def serve_connection(sock, state, processor, trans_factory, proto_factory, tls=None):
    raw = sock  # what the state tracks, and what "drop" shuts down
    if tls is not None:
        try:
            sock = tls.wrap_socket(sock, server_side=True)
        except (ssl.SSLError, OSError):
            with state.lock:
                state.tls_failures += 1
                state.conns.discard(sock)
            sock.close()
            return
    tsock = TSocket(sock=sock)
    trans = trans_factory.get_transport(tsock)
    prot = proto_factory.get_protocol(trans)
    try:
        while True:
            processor.process(prot, prot)
    except Exception:
        pass
    finally:
        with state.lock:
            state.conns.discard(raw)
        try:
            sock.close()
        except OSError:
            pass


def accept_loop(listener, state, processor, trans_factory, proto_factory, tls=None):
    while True:
        sock, _ = listener.accept()
        with state.lock:
            state.conns.add(sock)
            state.accepted += 1
            state.peak = max(state.peak, len(state.conns))
        threading.Thread(target=serve_connection, daemon=True,
                         args=(sock, state, processor, trans_factory, proto_factory,
                               tls)).start()


def control_loop(listener, state):
    while True:
        sock, _ = listener.accept()
        with sock, sock.makefile("rw") as f:
            for line in f:
                cmd = line.strip()
                if cmd == "stats":
                    with state.lock:
                        reply = {"open": len(state.conns), "accepted": state.accepted,
                                 "calls": state.calls, "peak": state.peak,
                                 "tls_failures": state.tls_failures,
                                 "notices": state.notices}
                elif cmd == "drop":
                    with state.lock:
                        conns = list(state.conns)
                    for c in conns:
                        try:
                            c.shutdown(socket.SHUT_RDWR)
                        except OSError:
                            pass
                    reply = {"dropped": len(conns)}
                elif cmd == "peers":
                    with state.lock:
                        conns = list(state.conns)
                    ports = []
                    for c in conns:
                        try:
                            ports.append(c.getpeername()[1])
                        except OSError:
                            pass
                    reply = {"peers": ports}
                elif cmd == "reset_peak":
                    with state.lock:
                        state.peak = len(state.conns)
                    reply = {"peak": state.peak}
                else:
                    reply = {"error": f"unknown command {cmd!r}"}
                f.write(json.dumps(reply) + "\n")
                f.flush()


def listen(port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port))
    s.listen(512)
    return s


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--name", default=None)
    parser.add_argument("--transport", choices=["buffered", "framed"], default="buffered")
    parser.add_argument("--protocol", choices=["binary", "compact"], default="binary")
    parser.add_argument("--certfile", help="serve TLS with this certificate")
    parser.add_argument("--keyfile")
    parser.add_argument("--client-ca", help="require client certificates signed by this CA")
    args = parser.parse_args()
    tls = None
    if args.certfile:
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(args.certfile, args.keyfile)
        if args.client_ca:
            tls.verify_mode = ssl.CERT_REQUIRED
            tls.load_verify_locations(args.client_ca)
    trans_factory = {"buffered": TBufferedTransportFactory,
                     "framed": TFramedTransportFactory}[args.transport]()
    proto_factory = {"binary": TBinaryProtocolFactory,
                     "compact": TCompactProtocolFactory}[args.protocol]()
    listener = listen(args.port)
    port = listener.getsockname()[1]
    control = listen(0)
    state = State()
    processor = CountingProcessor(echo_thrift.Echo,
                                  Handler(args.name or f"127.0.0.1:{port}", state), state)
    threading.Thread(target=control_loop, args=(control, state), daemon=True).start()
    print(f"READY {port} {control.getsockname()[1]}", flush=True)
    accept_loop(listener, state, processor, trans_factory, proto_factory, tls)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(0)
