"""A real Apache Thrift echo server for the tests, run as a subprocess.

It serves ``idl/echo.thrift`` with the classes ``thrift --gen py`` generated into
``--gen-dir``, on one of Apache's own Python servers (``--server threaded``,
``threadpool`` or ``nonblocking``), with ``--transport buffered|framed`` and
``--protocol binary|compact|header`` (under THeader, ``echo`` sends each request
header back as ``echoed-<name>``).  Like tests/echo_server.py it prints
``READY <port> <control_port>`` and takes one-line commands on the control port:

- ``stats``: JSON ``{"accepted", "calls", "notices", "open"}`` (connections accepted,
  calls answered, one-way ``notify`` calls received, connections not yet seen closed);
- ``drop``: shut every client connection down from the server side.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import threading
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gen-dir", required=True)
    parser.add_argument("--server", choices=["threaded", "threadpool", "nonblocking"],
                        default="threaded")
    parser.add_argument("--transport", choices=["buffered", "framed"], default="buffered")
    parser.add_argument("--protocol", choices=["binary", "compact", "header"],
                        default="binary")
    parser.add_argument("--name", default=None)
    args = parser.parse_args()
    sys.path.insert(0, args.gen_dir)

    from echo import Echo
    from echo.ttypes import EchoError
    from thrift.protocol import TBinaryProtocol, TCompactProtocol, THeaderProtocol
    from thrift.server import TNonblockingServer, TServer
    from thrift.transport import TSocket, TTransport
    from thrift.transport.THeaderTransport import THeaderClientType

    lock = threading.Lock()
    state = {"accepted": 0, "calls": 0, "notices": 0}
    clients: list = []

    class Handler:
        def __init__(self) -> None:
            self.name = args.name

        def _count(self) -> None:
            with lock:
                state["calls"] += 1

        def echo(self, message):
            self._count()
            return message

        def ping(self):
            self._count()

        def sleep(self, ms):
            time.sleep(ms / 1000.0)
            self._count()
            return ms

        def whoami(self):
            self._count()
            return self.name

        def fail(self, message):
            self._count()
            if message == "undeclared":
                raise RuntimeError("boom")
            raise EchoError(message=message)

        def notify(self, message):
            with lock:
                state["notices"] += 1

    class ServerSocket(TSocket.TServerSocket):
        """Listens once (so the port is known before serve()) and tracks its clients."""

        def listen(self):
            if self.handle is None:
                super().listen()

        def accept(self):
            client = super().accept()
            if client is not None:
                with lock:
                    state["accepted"] += 1
                    clients.append(client.handle)
            return client

    server_socket = ServerSocket(host="127.0.0.1", port=0)
    server_socket.listen()
    port = server_socket.handle.getsockname()[1]
    handler = Handler()
    if handler.name is None:
        handler.name = f"127.0.0.1:{port}"
    class HeaderEchoingProcessor(Echo.Processor):
        """Under THeader, answers echo() with each request header ``k: v`` sent back
        as ``echoed-k: v``."""

        def __init__(self, handler):
            super().__init__(handler)
            # the generated map holds Processor.process_echo itself, not the override
            self._processMap["echo"] = HeaderEchoingProcessor.process_echo

        def process_echo(self, seqid, iprot, oprot):
            for key, value in iprot.get_headers().items():
                oprot.set_header(b"echoed-" + key, value)
            return super().process_echo(seqid, iprot, oprot)

    processor = (HeaderEchoingProcessor if args.protocol == "header"
                 else Echo.Processor)(handler)
    if args.protocol == "header":
        proto = THeaderProtocol.THeaderProtocolFactory(allowed_client_types=(
            THeaderClientType.HEADERS, THeaderClientType.FRAMED_BINARY,
            THeaderClientType.UNFRAMED_BINARY))
    elif args.protocol == "compact":
        proto = TCompactProtocol.TCompactProtocolAcceleratedFactory()
    else:
        proto = TBinaryProtocol.TBinaryProtocolAcceleratedFactory()
    trans = (TTransport.TFramedTransportFactory() if args.transport == "framed"
             else TTransport.TBufferedTransportFactory())
    if args.server == "nonblocking":
        # TNonblockingServer always frames its messages.
        server = TNonblockingServer.TNonblockingServer(processor, server_socket, proto,
                                                       threads=4)
    elif args.server == "threadpool":
        server = TServer.TThreadPoolServer(processor, server_socket, trans, proto)
        server.setNumThreads(16)
        server.daemon = True
    else:
        server = TServer.TThreadedServer(processor, server_socket, trans, proto,
                                         daemon=True)

    control = socket.socket()
    control.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    control.bind(("127.0.0.1", 0))
    control.listen(16)

    def control_loop() -> None:
        while True:
            sock, _ = control.accept()
            with sock, sock.makefile("rw") as f:
                for line in f:
                    cmd = line.strip()
                    if cmd == "stats":
                        with lock:
                            reply = dict(state)
                            reply["open"] = sum(1 for c in clients if c.fileno() >= 0)
                    elif cmd == "drop":
                        with lock:
                            conns = list(clients)
                        for c in conns:
                            try:
                                c.shutdown(socket.SHUT_RDWR)
                            except OSError:
                                pass
                        reply = {"dropped": len(conns)}
                    else:
                        reply = {"error": f"unknown command {cmd!r}"}
                    f.write(json.dumps(reply) + "\n")
                    f.flush()

    threading.Thread(target=control_loop, daemon=True).start()
    print(f"READY {port} {control.getsockname()[1]}", flush=True)
    server.serve()


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(0)
