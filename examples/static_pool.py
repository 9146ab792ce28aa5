"""thriftpool's main example: a pool over static addresses, no ZooKeeper needed.

Starts three echo servers on loopback, builds a pool over their addresses, drives calls
from several threads (through ``pool.checkout()`` and through ``pool.client()``), shows an
IDL exception leaving the pool intact, prints the pool's stats and stops the servers.

    python examples/static_pool.py
"""

from __future__ import annotations

import collections
import json
import logging
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import thriftpool  # noqa: E402
from echo_server import echo_thrift, start_echo_server  # noqa: E402

THREADS = 8
CALLS_PER_THREAD = 500


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    servers = [start_echo_server(name=f"server-{i}") for i in range(3)]
    addresses = [s.address for s in servers]
    print(f"echo servers on {', '.join(addresses)}")

    answered: collections.Counter = collections.Counter()
    lock = threading.Lock()
    with thriftpool.ThriftPool(echo_thrift.Echo, addresses, min_size=1, initial_size=2,
                               max_size=4, checkout_timeout=2.0) as pool:
        proxy = pool.client()

        def worker(n: int) -> None:
            seen: collections.Counter = collections.Counter()
            for i in range(CALLS_PER_THREAD):
                message = f"thread {n} call {i}"
                if i % 2:
                    with pool.checkout() as client:
                        assert client.echo(message) == message
                        seen[client.whoami()] += 1
                else:
                    assert proxy.echo(message) == message
            with lock:
                answered.update(seen)

        started = time.monotonic()
        threads = [threading.Thread(target=worker, args=(n,)) for n in range(THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - started
        calls = THREADS * CALLS_PER_THREAD * 3 // 2
        print(f"{calls} calls from {THREADS} threads in {elapsed:.2f}s "
              f"({calls / elapsed:.0f} calls/s)")
        print("whoami answers per server:", dict(sorted(answered.items())))

        try:
            proxy.fail("an IDL-declared exception")
        except echo_thrift.EchoError as exc:
            print(f"EchoError passed through unchanged: {exc.message!r}")

        print("pool stats:")
        print(json.dumps(pool.stats(), indent=2))
    for s in servers:
        s.stop()
    print("done")


if __name__ == "__main__":
    main()
