"""A fault-injecting TCP proxy for the tests, and a recorder of this process's connects.

:class:`FaultProxy` runs in threads of the test process, on loopback, between the pool
and a real echo server (after psycopg's ``tests/fix_proxy.py``, without the external
``pproxy``).  Its port stays the same through every mode, so the pool keeps one address:

- :meth:`~FaultProxy.passthrough`: forward bytes both ways (the default);
- :meth:`~FaultProxy.slow`: forward, delaying each chunk by ``ms`` milliseconds;
- :meth:`~FaultProxy.blackhole`: accept connections but never forward or answer; open
  links stop forwarding too (nothing is read, so a large send blocks, as with a hung
  server);
- :meth:`~FaultProxy.reset`: accept each connection and close it with a RST as soon as
  the client sends anything (a server that dies on every request; the client's connect
  always succeeds, its call always fails);
- :meth:`~FaultProxy.refuse`: stop listening, so connects are refused (``ECONNREFUSED``);
- :meth:`~FaultProxy.deaf`: listen with a full accept queue, so connects hang until the
  client's connect timeout (SYNs are dropped);
- :meth:`~FaultProxy.cut`: close every current link (FIN, or RST with ``rst=True``).

``accepted`` counts the connections the proxy accepted (in every listening mode).  A
refused or a hanging connect never reaches any listener, so no proxy can count it;
:class:`ConnectLog` counts those where they start, by recording each ``connect()`` that
this process's sockets make to the watched ports (real syscalls on real sockets).
"""

from __future__ import annotations

import errno
import random
import select
import socket
import struct
import threading
import time
from typing import Any, Iterable, List, NamedTuple, Optional, Set, Tuple, Union

__all__ = ["ConnectLog", "FaultProxy"]

_POLL_CLOSED = getattr(select, "POLLRDHUP", 0x2000) | select.POLLHUP | select.POLLERR


def _ephemeral_range() -> Tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = f.read().split()
            return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def _pick_port() -> int:
    """A free loopback port outside the ephemeral range.

    The proxy stops and starts listening on the same port; a port from the ephemeral
    range could meanwhile become the local end of some outgoing connection (then the
    rebind fails), or a connect to it could connect to itself (TCP simultaneous open).
    """
    low, high = _ephemeral_range()
    candidates = [p for p in range(10000, 30000) if not low <= p <= high] or \
        list(range(high + 1, 65535))
    for port in random.sample(candidates, 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free loopback port for the fault proxy")


def _rst_close(sock: socket.socket) -> None:
    """Close with a RST instead of a FIN (SO_LINGER on, zero timeout)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


def _fin_close(sock: socket.socket) -> None:
    # shutdown() wakes a thread blocked on the socket; close() alone may not.
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


class _Link:
    """One client connection through the proxy, and its upstream connection if any."""

    def __init__(self, client: socket.socket) -> None:
        self.client = client
        self.upstream: Optional[socket.socket] = None
        self.closed = False
        self.lock = threading.Lock()
        # Held while a chunk is read and forwarded: a mode switch waits on it, so no
        # chunk read under the old mode is forwarded after the switch returned.
        self.io_lock = threading.Lock()

    def close(self, rst: bool = False) -> None:
        with self.lock:
            if self.closed:
                return
            self.closed = True
        for sock in (self.client, self.upstream):
            if sock is not None:
                _rst_close(sock) if rst else _fin_close(sock)


class FaultProxy:
    """A TCP proxy from ``127.0.0.1:<port>`` to ``target`` whose faults a test controls.

    Thread-safe; every mode switch takes effect at once for new connections and within
    a few milliseconds for open links.  :meth:`stop` closes everything and joins the
    threads (a fixture calls it).

    :param target: ``"host:port"`` or ``(host, port)`` of the real server.
    """

    _POLL = 0.02  # how often an idle link or the accept loop looks at the mode

    def __init__(self, target: Union[str, Tuple[str, int]], name: str = "") -> None:
        if isinstance(target, str):
            host, _, port = target.rpartition(":")
            target = (host, int(port))
        self.target: Tuple[str, int] = target
        self.port = _pick_port()
        self.name = name or f"faultproxy-{self.port}"
        self._lock = threading.Lock()
        self._mode = "pass"
        self._delay = 0.0
        self._links: Set[_Link] = set()
        self._listener: Optional[socket.socket] = None
        self._accept_thread: Optional[threading.Thread] = None
        self._threads: List[threading.Thread] = []
        self._fillers: List[socket.socket] = []
        self._stopped = False
        self.accept_times: List[float] = []

    # -- inspection ----------------------------------------------------------------

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def mode(self) -> str:
        return self._mode

    @property
    def accepted(self) -> int:
        """Connections accepted so far (attempts that reached the listener)."""
        return len(self.accept_times)

    @property
    def open_links(self) -> int:
        """Client connections currently open through the proxy."""
        with self._lock:
            return sum(1 for link in self._links if not link.closed)

    # -- modes -----------------------------------------------------------------------

    def start(self) -> "FaultProxy":
        """Listen and forward (pass-through); returns ``self``."""
        self.passthrough()
        return self

    def passthrough(self) -> None:
        """Forward everything, without delay."""
        self._set("pass", 0.0)

    def slow(self, ms: float) -> None:
        """Forward, delaying every chunk (in either direction) by ``ms`` milliseconds."""
        self._set("slow", ms / 1000.0)

    def blackhole(self) -> None:
        """Accept connections, never forward or answer; open links stop forwarding."""
        self._set("blackhole", 0.0)

    def reset(self) -> None:
        """Accept each new connection; close it with a RST once the client sends data.

        (A RST right at accept would race with the client's own connect: a non-blocking
        connect that polls after the RST arrived fails, so the fault would sometimes be a
        connect failure and sometimes a call failure.)
        """
        self._set("reset", 0.0)

    def refuse(self) -> None:
        """Stop listening: connects to the port are refused.  Open links keep working."""
        with self._lock:
            self._mode = "refuse"
        self._close_listener()

    def deaf(self) -> None:
        """Listen with a full accept queue and never accept: connects hang (SYN dropped).

        A client's ``connect()`` then times out after its own connect timeout, as with a
        host that vanished.  Open links keep working.
        """
        with self._lock:
            self._mode = "deaf"
        self._close_listener()
        listener = self._bind()
        listener.listen(0)
        # With a backlog of 0 Linux queues one completed connection; fill that slot,
        # then every further SYN is dropped until the listener closes.
        for _ in range(4):
            filler = socket.socket()
            filler.settimeout(0.2)
            try:
                filler.connect(("127.0.0.1", self.port))
            except OSError:
                filler.close()
                break
            self._fillers.append(filler)
        with self._lock:
            self._listener = listener

    def cut(self, rst: bool = False) -> int:
        """Close every current link, both sides (FIN, or RST); returns how many."""
        with self._lock:
            links = [link for link in self._links if not link.closed]
        for link in links:
            link.close(rst)
        return len(links)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop listening, close every link and join every thread."""
        with self._lock:
            self._stopped = True
            self._mode = "refuse"
        self._close_listener()
        self.cut()
        with self._lock:
            threads = list(self._threads)
        deadline = time.monotonic() + timeout
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        alive = [t.name for t in threads if t.is_alive()]
        assert not alive, f"fault proxy threads did not stop: {alive}"

    # -- machinery -------------------------------------------------------------------

    def _set(self, mode: str, delay: float) -> None:
        with self._lock:
            if self._stopped:
                raise RuntimeError("the fault proxy was stopped")
            was = self._mode
            self._mode = mode
            self._delay = delay
            listening = self._accept_thread is not None and self._accept_thread.is_alive()
            links = list(self._links)
        for link in links:
            with link.io_lock:
                pass  # a chunk in flight under the old mode is done
        if was == "deaf":
            self._close_listener()
            listening = False
        if not listening:
            self._listen()

    def _bind(self) -> socket.socket:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        for _ in range(50):
            try:
                listener.bind(("127.0.0.1", self.port))
                return listener
            except OSError as exc:  # pragma: no cover - port briefly busy
                if exc.errno != errno.EADDRINUSE:
                    raise
                time.sleep(0.02)
        listener.close()
        raise RuntimeError(f"cannot listen again on port {self.port}")

    def _listen(self) -> None:
        listener = self._bind()
        listener.listen(128)
        listener.settimeout(0)
        with self._lock:
            self._listener = listener
            thread = threading.Thread(target=self._accept_loop, args=(listener,),
                                      name=f"{self.name}-accept", daemon=True)
            self._accept_thread = thread
            self._threads.append(thread)
        thread.start()

    def _close_listener(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            thread, self._accept_thread = self._accept_thread, None
            fillers, self._fillers = self._fillers, []
        if listener is not None:
            listener.close()
        if thread is not None and thread is not threading.current_thread():
            thread.join(5)
        for f in fillers:
            _rst_close(f)

    def _accept_loop(self, listener: socket.socket) -> None:
        while True:
            with self._lock:
                if self._listener is not listener:
                    return
            try:
                ready, _, _ = select.select([listener], [], [], self._POLL)
                if not ready:
                    continue
                client, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                return  # the listener was closed
            client.setblocking(True)
            self.accept_times.append(time.monotonic())
            mode = self._mode
            link = _Link(client)
            with self._lock:
                if self._stopped:
                    _rst_close(client)
                    return
                self._links.add(link)
                thread = threading.Thread(target=self._serve, args=(link, mode),
                                          name=f"{self.name}-link", daemon=True)
                self._threads.append(thread)
                self._threads = [t for t in self._threads if t.is_alive() or t is thread]
            thread.start()

    def _serve(self, link: _Link, mode: str) -> None:
        held = mode == "blackhole"
        try:
            if mode == "reset":
                # wait (up to 10 s) for the first bytes or a hang-up, then RST
                select.select([link.client], [], [], 10.0)
                link.close(rst=True)
                return
            if not held:
                try:
                    upstream = socket.create_connection(self.target, timeout=2.0)
                except OSError:
                    link.close(rst=True)  # the server is gone: so is this connection
                    return
                with link.lock:
                    cut_meanwhile = link.closed
                    if not cut_meanwhile:
                        link.upstream = upstream
                if cut_meanwhile:
                    _fin_close(upstream)
                    return
                upstream.settimeout(10.0)
            link.client.settimeout(10.0)
            self._pump(link, held)
        except (OSError, ValueError):  # a socket closed under us by cut() or stop()
            pass
        finally:
            link.close()
            with self._lock:
                self._links.discard(link)

    def _pump(self, link: _Link, held: bool) -> None:
        client, upstream = link.client, link.upstream
        poller = select.poll()
        poller.register(client.fileno(), _POLL_CLOSED)
        while not link.closed:
            if held or self._mode == "blackhole":
                # Read nothing, answer nothing; only notice that the client hung up
                # (POLLRDHUP needs no read, so unread requests stay unread).
                if poller.poll(self._POLL * 1000):
                    return
                continue
            assert upstream is not None
            ready, _, _ = select.select([client, upstream], [], [], self._POLL)
            for src in ready:
                dst = upstream if src is client else client
                with link.io_lock:
                    if self._mode == "blackhole":
                        break  # switched while we waited: leave the bytes unread
                    data = src.recv(65536)
                    if not data:
                        return
                    delay = self._delay
                    if delay:
                        time.sleep(delay)
                    if link.closed:
                        return
                    dst.sendall(data)

    def __repr__(self) -> str:
        return (f"<FaultProxy {self.address} -> {self.target[0]}:{self.target[1]} "
                f"{self._mode} accepted={self.accepted} open={self.open_links}>")


class Attempt(NamedTuple):
    """One ``connect()`` to a watched port: when it started and ended, and its error."""

    port: int
    start: float
    end: float
    error: Optional[BaseException]


class ConnectLog:
    """Records every ``connect()`` this process makes to the watched ports.

    A refused or timed-out connect reaches no listener, so the client side is the only
    place to count it.  This wraps ``socket.socket.connect`` (thriftpy2's ``TSocket``
    connects through it) and calls the real method: the attempts are real syscalls on
    real sockets.  Install it with ``monkeypatch`` (the ``connect_log`` fixture does).
    """

    def __init__(self, ports: Iterable[int] = ()) -> None:
        self.ports: Set[int] = set(ports)
        self.attempts: List[Attempt] = []
        self._lock = threading.Lock()

    def watch(self, port: int) -> None:
        self.ports.add(port)

    def install(self, monkeypatch: Any) -> "ConnectLog":
        real_connect = socket.socket.connect
        log = self

        def connect(sock: socket.socket, address: Any) -> None:
            port = address[1] if isinstance(address, tuple) and len(address) >= 2 else None
            if port not in log.ports:
                return real_connect(sock, address)
            start = time.monotonic()
            error: Optional[BaseException] = None
            try:
                return real_connect(sock, address)
            except BaseException as exc:
                error = exc
                raise
            finally:
                with log._lock:
                    log.attempts.append(Attempt(port, start, time.monotonic(), error))

        monkeypatch.setattr(socket.socket, "connect", connect)
        return self

    def of(self, port: int, since: float = 0.0) -> List[Attempt]:
        """Attempts to ``port`` that started at or after ``since`` (monotonic)."""
        with self._lock:
            return [a for a in self.attempts if a.port == port and a.start >= since]

    def count(self, port: int, since: float = 0.0) -> int:
        return len(self.of(port, since))

    def max_concurrent(self, port: int) -> int:
        """Most attempts to ``port`` that were in progress at the same moment."""
        events = sorted([(a.start, 1) for a in self.of(port)] +
                        [(a.end, -1) for a in self.of(port)], key=lambda e: (e[0], e[1]))
        most = now = 0
        for _, step in events:
            now += step
            most = max(most, now)
        return most
