"""In-process raw-socket Thrift servers whose replies lie.

A :class:`LiarServer` reads each request with thriftpy2's pure-Python codec (so it knows
the method name and sequence id), then answers with the bytes of the next *lie* in its
queue, or honestly once the queue is empty.  Every lie is built by hand, byte by byte,
for the binary and compact protocols and the buffered and framed transports:

- ``garbage``: 64 bytes that are no Thrift message;
- ``http``: an HTTP/1.1 400 response;
- ``truncated``: the first half of an honest reply, then the server shuts its side;
- ``frame_len``: (framed) a frame header of 2**31 - 1;
- ``frame_negative``: (framed) a frame header of -5;
- ``string_len``: an honest header, then a string claiming 2**31 - 1 bytes;
- ``string_1g``: ... claiming 2**30 bytes;
- ``negative_len``: ... a string of length -5;
- ``list_len``: (echo's result holds no list, so in an unknown field, which is skipped)
  a list claiming 2**31 - 1 elements;
- ``deep``: the result's exception struct nested 100,000 deep;
- ``unknown_type``: the right name and sequence id, message type 7;
- ``trickle``: an honest reply, one byte every ``trickle_interval`` seconds;
- ``stall_close``: nothing for ``trickle_interval`` seconds, then the server hangs up.

After a lie the server waits for the client to close the connection and counts it in
``closes_seen``: the proof that the client discarded the connection.
"""

from __future__ import annotations

import collections
import select
import socket
import struct
import threading
import time
from typing import Any, Deque, List, Optional, Tuple

from thriftpy2.protocol.binary import TBinaryProtocol
from thriftpy2.protocol.compact import TCompactProtocol
from thriftpy2.thrift import TMessageType
from thriftpy2.transport import TSocket
from thriftpy2.transport.buffered import TBufferedTransport
from thriftpy2.transport.framed import TFramedTransport

from servers import echo_thrift

LIES = ("garbage", "http", "truncated", "string_len", "string_1g", "negative_len",
        "list_len", "deep", "unknown_type", "trickle")
OTHER_LIES = ("stall_close",)
FRAMED_LIES = ("frame_len", "frame_negative")

_VERSION_1 = -2147418112  # 0x80010000
_DEPTH = 100_000


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        if n < 0x80:
            out.append(n)
            return bytes(out)
        out.append((n & 0x7F) | 0x80)
        n >>= 7


class _Binary:
    """Hand-built binary-protocol messages."""

    @staticmethod
    def header(name: str, mtype: int, seqid: int) -> bytes:
        raw = name.encode()
        return struct.pack("!ii", _VERSION_1 | mtype, len(raw)) + raw + struct.pack("!i", seqid)

    @staticmethod
    def string_field(fid: int, length: int, payload: bytes) -> bytes:
        return b"\x0b" + struct.pack("!h", fid) + struct.pack("!i", length) + payload

    @staticmethod
    def result(name: str, args: Any) -> bytes:
        if name == "echo":
            raw = args.message.encode()
            return _Binary.string_field(0, len(raw), raw) + b"\x00"
        if name == "sleep":
            return b"\x08" + struct.pack("!hi", 0, args.ms) + b"\x00"
        return b"\x00"  # ping: an empty result struct

    @staticmethod
    def deep() -> bytes:
        # result field 1 (EchoError) holds field 2 (unknown: skipped) of type struct,
        # which holds field 2 of type struct, ... 100,000 deep.
        return b"\x0c\x00\x01" + b"\x0c\x00\x02" * _DEPTH + b"\x00" * (_DEPTH + 2)

    @staticmethod
    def list_field(length: int) -> bytes:
        return b"\x0f\x00\x09" + b"\x08" + struct.pack("!i", length) + b"\x00\x00\x00\x01"


class _Compact:
    """Hand-built compact-protocol messages."""

    @staticmethod
    def header(name: str, mtype: int, seqid: int) -> bytes:
        raw = name.encode()
        return b"\x82" + bytes([((mtype & 0x07) << 5) | 1]) + _varint(seqid) + \
            _varint(len(raw)) + raw

    @staticmethod
    def string_field(fid: int, length: int, payload: bytes) -> bytes:
        assert fid == 0  # the long form: type byte, then the zigzag field id
        return b"\x08\x00" + _varint(length) + payload

    @staticmethod
    def result(name: str, args: Any) -> bytes:
        if name == "echo":
            raw = args.message.encode()
            return _Compact.string_field(0, len(raw), raw) + b"\x00"
        if name == "sleep":
            zz = (args.ms << 1) ^ (args.ms >> 31)
            return b"\x05\x00" + _varint(zz) + b"\x00"
        return b"\x00"

    @staticmethod
    def deep() -> bytes:
        # field 1 (delta 1, struct) then field 2 (delta 2, struct) at every level.
        return b"\x1c" + b"\x2c" * _DEPTH + b"\x00" * (_DEPTH + 2)

    @staticmethod
    def list_field(length: int) -> bytes:
        # field 9 (delta 9, list) of i32 with the long size form
        return b"\x99" + b"\xf5" + _varint(length) + b"\x02"


class LiarServer:
    """A loopback Thrift server, one thread per connection, answering with queued lies.

    :param transport: ``"buffered"`` or ``"framed"``; :param protocol: ``"binary"`` or
    ``"compact"``, as the pool under test uses.
    """

    def __init__(self, transport: str = "buffered", protocol: str = "binary",
                 host: str = "127.0.0.1", trickle_interval: float = 0.5) -> None:
        self.transport = transport
        self.protocol = protocol
        self.trickle_interval = trickle_interval
        self._codec = _Binary if protocol == "binary" else _Compact
        self._lies: Deque[str] = collections.deque()
        self._lock = threading.Lock()
        self.accepted = 0
        self.requests = 0
        self.lies_told = 0
        self.closes_seen = 0
        #: (what, time.monotonic()) for every lie told and every close seen, in order.
        self.events: List[Tuple[str, float]] = []
        self._conns: List[socket.socket] = []
        self._threads: List[threading.Thread] = []
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((host, 0))
        self._listener.listen(64)
        self.host = host
        self.port = self._listener.getsockname()[1]
        self._stopped = threading.Event()
        self._acceptor = threading.Thread(target=self._accept_loop, name="liar-accept",
                                          daemon=True)
        self._acceptor.start()

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def lie(self, *lies: str) -> "LiarServer":
        """Answer the next requests with these lies (in order), then honestly."""
        with self._lock:
            self._lies.extend(lies)
        return self

    def stats(self) -> dict:
        with self._lock:
            return {"accepted": self.accepted, "requests": self.requests,
                    "lies": self.lies_told, "closes_seen": self.closes_seen,
                    "queued": len(self._lies)}

    def stop(self) -> None:
        self._stopped.set()
        self._acceptor.join(5)
        self._listener.close()
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()
        for t in list(self._threads):
            t.join(5)

    # -- serving ---------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._stopped.is_set():
            try:
                # A bounded wait: closing a listener does not wake a blocked accept().
                readable, _, _ = select.select([self._listener], [], [], 0.1)
                if not readable:
                    continue
                conn, _ = self._listener.accept()
            except (OSError, ValueError):
                return
            with self._lock:
                self.accepted += 1
                self._conns.append(conn)
            t = threading.Thread(target=self._serve, args=(conn,), name="liar-conn",
                                 daemon=True)
            self._threads.append(t)
            t.start()

    def _serve(self, conn: socket.socket) -> None:
        tsock = TSocket(sock=conn)
        trans: Any = TFramedTransport(tsock) if self.transport == "framed" \
            else TBufferedTransport(tsock)
        proto: Any = TBinaryProtocol(trans) if self.protocol == "binary" \
            else TCompactProtocol(trans)
        try:
            while not self._stopped.is_set():
                try:
                    name, _, seqid = proto.read_message_begin()
                    args = getattr(echo_thrift.Echo, name + "_args")()
                    proto.read_struct(args)
                except Exception:
                    self._saw_close()  # EOF (or a reset): the client closed
                    return
                with self._lock:
                    self.requests += 1
                    lie = self._lies.popleft() if self._lies else None
                if lie is None:
                    if name == "sleep" and self._stopped.wait(args.ms / 1000.0):
                        return
                    try:
                        conn.sendall(self._frame(self._honest(name, seqid, args)))
                    except OSError:
                        self._saw_close()  # the client gave up and closed
                        return
                    continue
                with self._lock:
                    self.lies_told += 1
                    self.events.append((lie, time.monotonic()))
                self._tell(conn, lie, name, seqid, args)
                self._wait_for_close(conn)
                return
        finally:
            with self._lock:
                if conn in self._conns:
                    self._conns.remove(conn)
            conn.close()

    def _honest(self, name: str, seqid: int, args: Any) -> bytes:
        c = self._codec
        return c.header(name, TMessageType.REPLY, seqid) + c.result(name, args)

    def _frame(self, message: bytes) -> bytes:
        if self.transport == "framed":
            return struct.pack("!i", len(message)) + message
        return message

    def reply_bytes(self, lie: str, name: str = "echo", seqid: int = 1,
                    args: Optional[Any] = None) -> bytes:
        """The bytes a lie sends (``truncated`` and ``trickle``: the whole honest reply)."""
        c = self._codec
        if args is None:
            args = echo_thrift.Echo.echo_args(message="x" * 200)
        head = c.header(name, TMessageType.REPLY, seqid)
        if lie == "garbage":
            return b"\xde\xad\xbe\xef\x00\x13\x37\xff" * 8
        if lie == "http":
            return (b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\n"
                    b"Content-Length: 11\r\n\r\nBad Request")
        if lie in ("truncated", "trickle", "stall_close"):
            return self._frame(self._honest(name, seqid, args))
        if lie == "frame_len":
            return struct.pack("!i", 2 ** 31 - 1) + self._honest(name, seqid, args)[:20]
        if lie == "frame_negative":
            return struct.pack("!i", -5) + self._honest(name, seqid, args)[:20]
        if lie == "string_len":
            return self._frame(head + c.string_field(0, 2 ** 31 - 1, b"abc"))
        if lie == "string_1g":
            return self._frame(head + c.string_field(0, 2 ** 30, b"abc"))
        if lie == "negative_len":
            length = -5 if c is _Binary else (1 << 32) - 5
            return self._frame(head + c.string_field(0, length, b"abc") + b"\x00")
        if lie == "list_len":
            return self._frame(head + c.list_field(2 ** 31 - 1))
        if lie == "deep":
            return self._frame(head + c.deep())
        if lie == "unknown_type":
            return self._frame(c.header(name, 7, seqid) + c.result(name, args))
        raise ValueError(f"unknown lie {lie!r}")

    def _tell(self, conn: socket.socket, lie: str, name: str, seqid: int, args: Any) -> None:
        data = self.reply_bytes(lie, name, seqid, args)
        try:
            if lie == "truncated":
                conn.sendall(data[:len(data) // 2])
                conn.shutdown(socket.SHUT_WR)
            elif lie == "stall_close":
                select.select([conn], [], [], self.trickle_interval)
                conn.shutdown(socket.SHUT_WR)
            elif lie == "trickle":
                for i in range(len(data)):
                    conn.sendall(data[i:i + 1])
                    readable, _, _ = select.select([conn], [], [], self.trickle_interval)
                    if readable:
                        return  # the client hung up (or wrote): _wait_for_close sees it
            else:
                conn.sendall(data)
        except OSError:
            pass

    def _wait_for_close(self, conn: socket.socket) -> None:
        end = time.monotonic() + 30
        while not self._stopped.is_set() and time.monotonic() < end:
            readable, _, _ = select.select([conn], [], [], 0.1)
            if not readable:
                continue
            try:
                data = conn.recv(65536)
            except OSError:
                data = b""
            if not data:
                self._saw_close()
                return

    def _saw_close(self) -> None:
        with self._lock:
            self.closes_seen += 1
            self.events.append(("close", time.monotonic()))
