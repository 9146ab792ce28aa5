"""Where a pooled call's client CPU goes: its checkout, or the call itself.

One process, client pinned to CPU 0 and three echo servers to CPU 1.  For each stack
(thriftpy2, and Apache when ``thrift`` and its compiler are installed), one thread makes
``--calls`` 16-byte ``echo`` calls per measurement as:

- ``raw``: the stack's own client, one per server, rotated per call (the ceiling);
- ``checkout``: ``with pool.checkout() as c: c.echo(...)`` per call (what users write);
- ``held``: one ``pool.checkout()`` held around all the calls (the call path alone, on
  one connection).

Kinds alternate within each rep; the table gives each kind's median client CPU us/call
and its difference from the stack's raw client paired by rep.  ``checkout - held`` is what
a checkout per call adds (it includes rotating over three connections, which ``raw`` pays
too); ``held - raw`` is how much cheaper or dearer the pooled call path is than the raw
client's.  Bounded: ``--reps`` x kinds x ``--calls`` calls.

    python bench/bench_held.py                       # about a minute
    python bench/bench_held.py --transport framed    # framed servers, clients and pools
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

from _common import MESSAGE, Echo, machine_line, median, print_table, start_servers

import thriftpool

TIMEOUT_S = 5.0


def in_thread(body: Callable[[], None]) -> Callable[[], None]:
    """Run ``body`` on a fresh thread (as a worker thread of a service would)."""
    def run() -> None:
        thread = threading.Thread(target=body, name="bench-held", daemon=True)
        thread.start()
        thread.join(120)
        if thread.is_alive():
            raise RuntimeError("a measurement did not finish in 120 s")
    return run


def kinds_for(stack: str, service: Any, raws: List[Any], addresses: List[str],
              calls: int, transport: str) -> Dict[str, Callable[[], None]]:
    rotation = itertools.cycle(raws)
    pool = thriftpool.ThriftPool(service, addresses, name=f"bench-{stack}", min_size=0,
                                 max_size=1, socket_timeout=TIMEOUT_S,
                                 checkout_timeout=TIMEOUT_S, transport=transport)

    def raw() -> None:
        for _ in range(calls):
            next(rotation).echo(MESSAGE)

    def checkout() -> None:
        co = pool.checkout
        for _ in range(calls):
            with co() as client:
                client.echo(MESSAGE)

    def held() -> None:
        with pool.checkout() as client:
            for _ in range(calls):
                client.echo(MESSAGE)

    return {f"{stack} raw": in_thread(raw), f"{stack} checkout": in_thread(checkout),
            f"{stack} held": in_thread(held)}


def apache_clients(servers: List[Any], framed: bool) -> Optional[Any]:
    """The generated Apache module and one raw client per server, or ``None``."""
    try:
        from bench_pinned import generate_apache
        from thrift.protocol.TBinaryProtocol import TBinaryProtocolAccelerated
        from thrift.transport.TSocket import TSocket
        from thrift.transport.TTransport import TBufferedTransport, TFramedTransport
    except ImportError:
        return None
    module, _ = generate_apache()
    clients = []
    for s in servers:
        sock = TSocket(s.host, s.port)
        sock.setTimeout(TIMEOUT_S * 1000)
        transport = TFramedTransport(sock) if framed else TBufferedTransport(sock)
        transport.open()
        clients.append(module.Client(TBinaryProtocolAccelerated(transport)))
    return module, clients


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=3000, help="calls per measurement")
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--transport", choices=["buffered", "framed"], default="buffered",
                        help="the servers', the raw clients' and the pools' transport")
    args = parser.parse_args(argv)
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise SystemExit("needs 2 CPUs: the client on one, the servers on the other")
    servers = start_servers(3, args.transport)
    try:
        for s in servers:
            os.sched_setaffinity(s.proc.pid, {cpus[1]})
        os.sched_setaffinity(0, {cpus[0]})
        from thriftpy2.rpc import make_client
        from thriftpy2.transport import TBufferedTransportFactory, TFramedTransportFactory

        framed = args.transport == "framed"
        factory = TFramedTransportFactory() if framed else TBufferedTransportFactory()
        addresses = [f"{s.host}:{s.port}" for s in servers]
        raws = [make_client(Echo, s.host, s.port, timeout=TIMEOUT_S * 1000,
                            trans_factory=factory) for s in servers]
        kinds = kinds_for("thriftpy2", Echo, raws, addresses, args.calls, args.transport)
        apache = apache_clients(servers, framed)
        if apache is not None:
            kinds.update(kinds_for("apache", apache[0], apache[1], addresses, args.calls,
                                   args.transport))
        for run in kinds.values():  # warm up, and open the pools' connections
            run()
        results: Dict[str, List[float]] = {k: [] for k in kinds}
        for _ in range(args.reps):
            for name, run in kinds.items():
                cpu = time.process_time()
                run()
                results[name].append((time.process_time() - cpu) / args.calls * 1e6)
    finally:
        for s in servers:
            s.stop()
    print(f"\n{machine_line()}; client on CPU {cpus[0]}, servers on CPU {cpus[1]}; "
          f"{args.reps} reps x {args.calls} calls per kind, one thread, "
          f"{args.transport} transport\n")
    rows = []
    for name, values in results.items():
        raw = results[name.split()[0] + " raw"]
        diffs = [a - b for a, b in zip(values, raw)]
        rows.append([name, f"{median(values):.2f}", f"{median(diffs):+.2f}"])
    print_table(["kind", "us/call", "paired vs raw"], rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
