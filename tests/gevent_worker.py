"""Scenarios run in a gevent-patched subprocess by test_gevent.py.

``python gevent_worker.py SCENARIO JSON_ARGS`` patches everything *before* importing
thriftpool, runs the scenario, and prints one JSON line with what it observed.
"""

from gevent import monkey

monkey.patch_all()

import gc  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402
import greenlet  # noqa: E402
import thriftpy2  # noqa: E402

import thriftpool  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
echo_thrift = thriftpy2.load(os.path.join(ROOT, "idl", "echo.thrift"),
                             module_name="echo_thrift")


class Ticker:
    """A greenlet that ticks every 10 ms; a long gap means something blocked the hub."""

    def __init__(self) -> None:
        self.ticks = 0
        self.max_gap = 0.0
        self._last = time.monotonic()
        self._greenlet = gevent.spawn(self._run)

    def _run(self) -> None:
        while True:
            gevent.sleep(0.01)
            now = time.monotonic()
            self.max_gap = max(self.max_gap, now - self._last)
            self._last = now
            self.ticks += 1

    def stop(self) -> None:
        self._greenlet.kill()


def live_greenlets() -> list:
    hub = gevent.get_hub()
    main = greenlet.getcurrent()
    alive = []
    for obj in gc.get_objects():
        if isinstance(obj, greenlet.greenlet) and obj is not hub and obj is not main \
                and not obj.dead and bool(obj):
            alive.append(repr(obj))
    return alive


def scenario_load(args: dict) -> dict:
    ticker = Ticker()
    pool = thriftpool.ThriftPool(echo_thrift.Echo, args["addresses"], min_size=1,
                                 max_size=4, checkout_timeout=10.0, watchdog_interval=0.05)
    watchdog_is_greenlet = any(
        t.name.endswith("-watchdog") for t in __import__("threading").enumerate())
    proxy = pool.client()
    results = {"ok": 0, "errors": []}

    def worker(n: int) -> None:
        try:
            for i in range(args["calls"]):
                message = f"greenlet {n} call {i}"
                if i % 3 == 0:
                    with pool.checkout() as client:
                        assert client.sleep(2) == 2
                        assert client.echo(message) == message
                else:
                    assert proxy.echo(message) == message
            results["ok"] += 1
        except Exception as exc:  # reported, not raised: the test asserts on it
            results["errors"].append(repr(exc))

    started = time.monotonic()
    gevent.joinall([gevent.spawn(worker, n) for n in range(args["greenlets"])], timeout=60)
    elapsed = time.monotonic() - started
    stats = pool.stats()
    pool.close()
    ticker.stop()
    gevent.sleep(0.05)
    return {"ok": results["ok"], "errors": results["errors"][:5], "elapsed": elapsed,
            "max_gap": ticker.max_gap, "ticks": ticker.ticks, "in_use": stats["in_use"],
            "max_size_seen": max(s["size"] for s in stats["instances"].values()),
            "watchdog_thread": watchdog_is_greenlet,
            "live_greenlets": live_greenlets()}


def scenario_exhausted(args: dict) -> dict:
    events = []
    pool = thriftpool.ThriftPool(echo_thrift.Echo, args["addresses"][:1], min_size=0,
                                 max_size=1, checkout_timeout=0.3,
                                 on_exhausted=events.append)
    holding = gevent.event.Event()

    def holder() -> None:
        with pool.checkout() as client:
            holding.set()
            client.sleep(1500)

    hold = gevent.spawn(holder)
    holding.wait(5)
    ticker = Ticker()
    started = time.monotonic()
    error = None
    try:
        with pool.checkout():
            pass
    except thriftpool.PoolExhausted as exc:
        error = type(exc).__name__
    elapsed = time.monotonic() - started
    ticks_during_wait = ticker.ticks
    hold.join(5)
    ticker.stop()
    pool.close()
    gevent.sleep(0.05)
    return {"error": error, "elapsed": elapsed, "ticks_during_wait": ticks_during_wait,
            "max_gap": ticker.max_gap, "events": len(events),
            "live_greenlets": live_greenlets()}


def scenario_interrupt(args: dict) -> dict:
    """gevent.Timeout while waiting and in a listener; then a full round must succeed."""
    class Listener(thriftpool.PoolListener):
        armed = 0

        def checkout(self, pool, address, waited):
            if self.armed:
                self.armed -= 1
                raise gevent.Timeout()

    listener = Listener()
    pool = thriftpool.ThriftPool(echo_thrift.Echo, args["addresses"][:1], min_size=0,
                                 max_size=2, checkout_timeout=10.0, listeners=[listener])
    holding = gevent.event.Event()
    release = gevent.event.Event()

    def holder() -> None:
        with pool.checkout():
            holding.set()
            release.wait(10)

    holds = [gevent.spawn(holder) for _ in range(2)]
    holding.wait(5)
    gevent.sleep(0.05)
    timeouts = 0
    for _ in range(args["interrupts"]):
        try:
            with gevent.Timeout(0.02):
                with pool.checkout():
                    pass
        except gevent.Timeout:
            timeouts += 1
    during = pool.stats()
    release.set()
    gevent.joinall(holds, timeout=5)
    listener.armed = 5
    listener_timeouts = 0
    for _ in range(5):
        try:
            with pool.checkout():
                pass
        except gevent.Timeout:
            listener_timeouts += 1
    results = {"ok": 0}

    def worker() -> None:
        for i in range(10):
            with pool.checkout() as client:
                assert client.echo(str(i)) == str(i)
        results["ok"] += 1

    gevent.joinall([gevent.spawn(worker) for _ in range(50)], timeout=30)
    after = pool.stats()
    pool.close()
    return {"timeouts": timeouts, "listener_timeouts": listener_timeouts,
            "waiting_during": during["waiting"], "in_use_during": during["in_use"],
            "ok": results["ok"], "in_use": after["in_use"], "waiting": after["waiting"],
            "size": after["size"], "opening": after["opening"]}


def scenario_deadline(args: dict) -> dict:
    """Each greenlet has its own deadline; a call cut by one yields to the hub; a name is
    resolved through gevent's resolver within connect_timeout."""
    ticker = Ticker()
    host, port = args["addresses"][0].rsplit(":", 1)
    pool = thriftpool.ThriftPool(echo_thrift.Echo, [f"localhost:{port}"], min_size=0,
                                 max_size=4, socket_timeout=5.0)
    proxy = pool.client()
    out: dict = {}

    def unbounded() -> None:
        out["unbounded_deadline"] = thriftpool.deadlines.current() is None
        out["unbounded"] = proxy.sleep(600)

    spawned = []

    def bounded() -> None:
        started = time.monotonic()
        try:
            with thriftpool.deadline(0.3):
                # A greenlet started inside the block does not inherit the deadline.
                spawned.append(gevent.spawn(unbounded))
                proxy.sleep(1500)
            out["bounded"] = "returned"
        except thriftpool.DeadlineExceeded as exc:
            out["bounded"] = type(exc).__name__
        out["bounded_elapsed"] = time.monotonic() - started

    gevent.joinall([gevent.spawn(bounded)], timeout=20)
    gevent.joinall(spawned, timeout=20)
    pool.close()
    ticker.stop()
    out["max_gap"] = ticker.max_gap
    return out


def main() -> None:
    scenario = globals()["scenario_" + sys.argv[1]]
    args = json.loads(sys.argv[2])
    result = scenario(args)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
