"""thriftpool imported and a pool built *before* gevent patches the process.

``python gevent_late.py MODE JSON_ARGS``:

- ``preload``: gunicorn ``--preload -k gevent`` order: the parent imports thriftpool and
  builds a pool (its watchdog thread runs), forks, and the child patches and serves.
- ``same``: one process builds the pool, then patches.

Then 50 greenlets share max_size=2 connections (so checkouts wait), while a 10 ms ticker
must never be starved; prints one JSON line.
"""

import json
import os
import sys
import time

import thriftpy2

import thriftpool

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
echo_thrift = thriftpy2.load(os.path.join(ROOT, "idl", "echo.thrift"),
                             module_name="echo_thrift")


def serve_greenlets(pool) -> dict:
    import gevent

    ticks = {"n": 0, "max_gap": 0.0, "last": time.monotonic()}

    def ticker() -> None:
        while True:
            gevent.sleep(0.01)
            now = time.monotonic()
            ticks["max_gap"] = max(ticks["max_gap"], now - ticks["last"])
            ticks["last"] = now
            ticks["n"] += 1

    tick = gevent.spawn(ticker)
    done = {"ok": 0, "errors": []}

    def worker(n: int) -> None:
        try:
            for _ in range(4):
                with pool.checkout() as client:
                    assert client.sleep(5) == 5
            done["ok"] += 1
        except Exception as exc:
            done["errors"].append(repr(exc))

    started = time.monotonic()
    gevent.joinall([gevent.spawn(worker, n) for n in range(50)], timeout=30)
    elapsed = time.monotonic() - started
    stats = pool.stats()
    import threading
    watchdog = [t for t in threading.enumerate()
                if t.name.endswith("-watchdog") and t.is_alive()]
    pool.close()
    tick.kill()
    return {"ok": done["ok"], "errors": done["errors"][:3], "elapsed": elapsed,
            "max_gap": ticks["max_gap"], "in_use": stats["in_use"],
            "watchdog_alive": stats["watchdog_alive"], "watchdogs": len(watchdog)}


def main() -> None:
    mode = sys.argv[1]
    args = json.loads(sys.argv[2])
    pool = thriftpool.ThriftPool(echo_thrift.Echo, args["addresses"], min_size=1,
                                 max_size=2, checkout_timeout=20, watchdog_interval=0.05)
    pool.wait(5)
    with pool.checkout() as client:  # used before patching, as a preloading app may
        client.echo("before")
    if mode == "preload":
        pid = os.fork()
        if pid:
            _, status = os.waitpid(pid, 0)
            pool.close()
            sys.exit(os.waitstatus_to_exitcode(status))
    import warnings

    from gevent import monkey

    warnings.simplefilter("ignore")  # MonkeyPatchWarning: patching late is the point
    monkey.patch_all()
    result = serve_greenlets(pool)
    print("RESULT " + json.dumps(result), flush=True)
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
