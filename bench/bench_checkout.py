"""Microseconds per checkout+checkin with no I/O: thriftpool against other Python pools.

One echo server process is started; every pool holds 8 open connections (or dummies)
and nothing is ever sent on them.  One operation is one checkout and one checkin:

- ``lifo``: ``queue.LifoQueue`` ``get()`` + ``put()`` of a pre-filled item (the floor);
- ``lifo_poll``: the same plus a ``poll(0)`` liveness check of a real idle socket, i.e.
  the floor for a pool that checks liveness the way thriftpool does;
- ``thriftpool``: ``with pool.checkout(): pass`` (1 instance, 8 idle connections); its
  liveness check (``poll(0)`` on the socket) is included;
- ``sqlalchemy``: ``QueuePool(creator=dummy, pool_size=8, max_overflow=0)``,
  ``pool.connect().close()``; no liveness check (``pre_ping`` would be a round trip), but
  its default reset-on-return calls the dummy's ``rollback()``;
- ``happybase``: ``ConnectionPool(size=8)`` over the echo server (happybase opens plain
  Thrift sockets, so it runs without HBase as long as nothing is called), ``with
  pool.connection(): pass``; its only check is ``transport.is_open()`` (no syscall);
- ``tc_heartbeat``: thrift_connector's ``HeartbeatClientPool`` ``get_client()`` +
  ``put_back_connection()`` (its ``ClientPool`` pings on every checkout, a round trip,
  so it has no place in a no-I/O benchmark).

Single thread: ``--ops`` operations in a row.  Contended: ``--contended`` threads start
together and share ``--ops`` operations; the cost is wall time over all operations (one
over the throughput), which is what a caller sees when 8 threads hammer one pool on this
2-core machine.  Kinds are interleaved and each result is the median of ``--reps``.

``--compare OTHER_TREE`` adds ``thriftpool_other``: the same pool built from another
source tree's package (copied as ``thriftpool_other``, e.g. a ``git archive`` of an older
commit), measured in the same process, interleaved with the others, so "before" and
"after" come from the same minutes of the same machine.

Run from the repository root::

    python bench/bench_checkout.py           # about two minutes
    git archive HEAD~1 thriftpool | (mkdir -p /tmp/base && tar -x -C /tmp/base)
    python bench/bench_checkout.py --kinds lifo_poll thriftpool --compare /tmp/base
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import select
import shutil
import socket
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

from _common import Echo, EchoServer, machine_line, median, print_table

import thriftpool

POOL_SIZE = 8


class Kind:
    name = "?"
    label = "?"
    check = "?"

    def __init__(self, server: EchoServer) -> None:
        self.server = server

    def op(self) -> Callable[[], None]:
        """The zero-argument function doing one checkout + checkin."""
        raise NotImplementedError

    def enter(self) -> None:
        """Called before each measurement of this kind."""

    def exit(self) -> None:
        """Called after each measurement of this kind."""

    def close(self) -> None:
        pass


class Lifo(Kind):
    name = "lifo"
    label = "queue.LifoQueue get/put (floor)"
    check = "none"

    def __init__(self, server: EchoServer) -> None:
        super().__init__(server)
        self.q: "queue.LifoQueue[object]" = queue.LifoQueue()
        for _ in range(POOL_SIZE):
            self.q.put(object())

    def op(self) -> Callable[[], None]:
        get, put = self.q.get, self.q.put

        def once() -> None:
            put(get())

        return once


class LifoPoll(Kind):
    name = "lifo_poll"
    label = "LifoQueue get/put + poll(0) of the socket"
    check = "poll(0)"

    def __init__(self, server: EchoServer) -> None:
        super().__init__(server)
        self.q: "queue.LifoQueue[Any]" = queue.LifoQueue()
        self.socks = []
        for _ in range(POOL_SIZE):
            s = socket.create_connection(server.address)
            p = select.poll()
            p.register(s.fileno(), select.POLLIN | select.POLLPRI | select.POLLHUP
                       | select.POLLERR)
            self.socks.append(s)
            self.q.put(p)

    def op(self) -> Callable[[], None]:
        get, put = self.q.get, self.q.put

        def once() -> None:
            p = get()
            if p.poll(0):
                raise RuntimeError("idle socket readable")
            put(p)

        return once

    def close(self) -> None:
        for s in self.socks:
            s.close()


class ThriftPoolKind(Kind):
    name = "thriftpool"
    label = "thriftpool checkout()"
    check = "poll(0)"

    package: Any = thriftpool

    def __init__(self, server: EchoServer) -> None:
        super().__init__(server)
        self.pool = self.package.ThriftPool(
            Echo, [f"{server.host}:{server.port}"], name="bench-checkout",
            min_size=POOL_SIZE, max_size=POOL_SIZE, checkout_timeout=10.0)
        deadline = time.monotonic() + 10
        while self.pool.stats()["idle"] < POOL_SIZE:
            if time.monotonic() > deadline:
                raise RuntimeError(f"pool did not fill: {self.pool.stats()}")
            time.sleep(0.01)

    def op(self) -> Callable[[], None]:
        checkout = self.pool.checkout

        def once() -> None:
            with checkout():
                pass

        return once

    def close(self) -> None:
        self.pool.close()


class SqlAlchemy(Kind):
    name = "sqlalchemy"
    label = "SQLAlchemy QueuePool"
    check = "none (pre_ping off)"

    def __init__(self, server: EchoServer) -> None:
        super().__init__(server)
        from sqlalchemy.pool import QueuePool

        class Dummy:
            def rollback(self) -> None:
                pass

            def commit(self) -> None:
                pass

            def close(self) -> None:
                pass

        self.pool = QueuePool(Dummy, pool_size=POOL_SIZE, max_overflow=0, timeout=10)
        held = [self.pool.connect() for _ in range(POOL_SIZE)]  # create all 8 up front
        for c in held:
            c.close()

    def op(self) -> Callable[[], None]:
        connect = self.pool.connect

        def once() -> None:
            connect().close()

        return once

    def close(self) -> None:
        self.pool.dispose()


class HappyBase(Kind):
    name = "happybase"
    label = "happybase ConnectionPool"
    check = "transport.is_open() (no syscall)"

    def __init__(self, server: EchoServer) -> None:
        super().__init__(server)
        import happybase

        self.pool = happybase.ConnectionPool(POOL_SIZE, host=server.host, port=server.port)
        # Connections open lazily: take all of them once so every socket is open.
        conns = [self.pool._acquire_connection() for _ in range(POOL_SIZE)]
        for c in conns:
            c.open()
        for c in conns:
            self.pool._return_connection(c)

    def op(self) -> Callable[[], None]:
        connection = self.pool.connection

        def once() -> None:
            with connection():
                pass

        return once

    def close(self) -> None:
        conns = [self.pool._acquire_connection() for _ in range(POOL_SIZE)]
        for c in conns:
            c.close()


class TcHeartbeat(Kind):
    name = "tc_heartbeat"
    label = "thrift_connector HeartbeatClientPool"
    check = "none"

    def __init__(self, server: EchoServer) -> None:
        super().__init__(server)
        from thrift_connector import HeartbeatClientPool, ThriftPyClient

        self.pool = HeartbeatClientPool(Echo, server.host, server.port, timeout=30,
                                        max_conn=POOL_SIZE, connection_class=ThriftPyClient)
        for _ in range(POOL_SIZE):
            self.pool.put_back_connection(self.pool.produce_client())

    def op(self) -> Callable[[], None]:
        get, put = self.pool.get_client, self.pool.put_back_connection

        def once() -> None:
            put(get())

        return once

    def close(self) -> None:
        self.pool.clear()


KINDS: Dict[str, type] = {k.name: k for k in (Lifo, LifoPoll, ThriftPoolKind,
                                              SqlAlchemy, HappyBase, TcHeartbeat)}


def other_tree_kind(tree: str, tmp: str) -> type:
    """The ``thriftpool`` kind over the package of source tree ``tree``, imported as
    ``thriftpool_other`` from a copy in ``tmp``."""
    import importlib
    import shutil

    shutil.copytree(os.path.join(os.path.abspath(tree), "thriftpool"),
                    os.path.join(tmp, "thriftpool_other"))
    sys.path.insert(0, tmp)
    package = importlib.import_module("thriftpool_other")

    class OtherTree(ThriftPoolKind):
        name = "thriftpool_other"
        label = f"thriftpool checkout(), {os.path.basename(os.path.abspath(tree))}"

    OtherTree.package = package
    return OtherTree


def time_single(once: Callable[[], None], ops: int) -> float:
    """Microseconds per operation, one thread."""
    t0 = time.perf_counter()
    for _ in range(ops):
        once()
    return (time.perf_counter() - t0) / ops * 1e6


def time_contended(once: Callable[[], None], ops: int, nthreads: int) -> float:
    """Microseconds of wall time per operation, ``nthreads`` threads sharing ``ops``."""
    per_thread = ops // nthreads
    start = threading.Barrier(nthreads + 1)
    errors: List[BaseException] = []

    def work() -> None:
        try:
            start.wait(30)
            for _ in range(per_thread):
                once()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, name=f"bench-checkout-{i}", daemon=True)
               for i in range(nthreads)]
    for t in threads:
        t.start()
    start.wait(30)
    t0 = time.perf_counter()
    for t in threads:
        t.join(120)
    elapsed = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"contended run failed: {errors[0]!r}") from errors[0]
    if any(t.is_alive() for t in threads):
        raise RuntimeError("a contended thread did not finish in 120 s")
    return elapsed / (per_thread * nthreads) * 1e6


def measure(kind: Kind, how: Callable[..., float], *args: Any) -> float:
    kind.enter()
    try:
        return how(kind.op(), *args)
    finally:
        kind.exit()


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    parser.add_argument("--ops", type=int, default=100_000,
                        help="operations per measurement (default 100,000)")
    parser.add_argument("--contended", type=int, default=8,
                        help="threads in the contended measurement (default 8)")
    parser.add_argument("--reps", type=int, default=7, help="repetitions (default 7)")
    parser.add_argument("--json", help="also write the raw results to this file")
    parser.add_argument("--compare", metavar="OTHER_TREE",
                        help="also measure thriftpool from this source tree")
    args = parser.parse_args(argv)
    tmp = tempfile.mkdtemp(prefix="bench-checkout-")
    if args.compare:
        KINDS["thriftpool_other"] = other_tree_kind(args.compare, tmp)
        if "thriftpool_other" not in args.kinds:
            args.kinds.append("thriftpool_other")

    header = machine_line()
    print(f"# bench_checkout: {header}")
    print(f"# {' '.join(sys.argv)}", flush=True)
    server = EchoServer()
    built: Dict[str, Kind] = {}
    single: Dict[str, List[float]] = {k: [] for k in args.kinds}
    contended: Dict[str, List[float]] = {k: [] for k in args.kinds}
    try:
        for name in args.kinds:
            built[name] = KINDS[name](server)
        for name in args.kinds:  # warm up every code path once
            measure(built[name], time_single, 1000)
        for rep in range(args.reps):
            shift = rep % len(args.kinds)
            order = args.kinds[shift:] + args.kinds[:shift]
            for name in order:
                single[name].append(measure(built[name], time_single, args.ops))
            for name in order:
                contended[name].append(
                    measure(built[name], time_contended, args.ops, args.contended))
    finally:
        for kind in built.values():
            try:
                kind.close()
            except Exception as exc:
                print(f"closing {kind.name} failed: {exc!r}", file=sys.stderr)
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    print()
    print(f"Microseconds per checkout+checkin, median of {args.reps} (min-max); "
          f"{args.contended} threads: wall time per operation.")
    print()
    rows = []
    for name in args.kinds:
        s, c = single[name], contended[name]
        rows.append([KINDS[name].label, KINDS[name].check,
                     f"{median(s):.2f} ({min(s):.2f}-{max(s):.2f})",
                     f"{median(c):.2f} ({min(c):.2f}-{max(c):.2f})"])
    print_table(["pool", "liveness check", "1 thread",
                 f"{args.contended} threads"], rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": header, "argv": sys.argv, "single": single,
                       "contended": contended}, f, indent=1)


if __name__ == "__main__":
    main()
