"""Alerts that reach a person: pool exhaustion mailed through logging's SMTPHandler.

``ExhaustionAlerter`` is an ``on_exhausted`` callback that turns each exhausted checkout
into a log record of an "alerts" logger, at most one per instance per ``interval``
seconds (the others are counted, and their number goes into the next mail).  The record
goes through a ``QueueHandler`` to a ``QueueListener`` thread whose ``SMTPHandler`` sends
the mail, so the checkout that timed out never waits on the mail server.  Each mail names
the pool and the instance, and gives the sizes, the waiters and (with ``leak_timeout``
set) the checkouts holding the instance's connections, with their stacks.

The demo starts two echo servers, builds a small pool (``max_size=2`` per instance),
overloads it from 12 threads for ``--duration`` seconds, prints a JSON summary and exits 0::

    python examples/alerting.py --smtp 127.0.0.1:8025 --duration 10
"""

from __future__ import annotations

import argparse
import json
import logging
import logging.handlers
import os
import queue
import sys
import threading
import time
from typing import Dict, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import thriftpool  # noqa: E402
from echo_server import echo_thrift, start_echo_server  # noqa: E402


class _SubjectSMTPHandler(logging.handlers.SMTPHandler):
    """An SMTPHandler whose subject names the pool and the instance."""

    def getSubject(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        return f"[thriftpool] pool {record.pool!r} exhausted on {record.instance}"  # type: ignore[attr-defined]


class ExhaustionAlerter:
    """An ``on_exhausted`` callback sending rate-limited alerts (see the module doc).

    :param mailhost: ``(host, port)`` of the SMTP server.
    :param fromaddr: the sender.
    :param toaddrs: the recipients.
    :param interval: at most one mail per instance per this many seconds.
    """

    def __init__(self, mailhost: Tuple[str, int], fromaddr: str, toaddrs: list,
                 interval: float = 60.0) -> None:
        self.interval = interval
        self._lock = threading.Lock()
        self._last: Dict[Tuple[str, str], float] = {}
        self._suppressed: Dict[Tuple[str, str], int] = {}
        self.sent: Dict[str, int] = {}
        self.suppressed = 0
        self.logger = logging.getLogger(f"thriftpool.alerts.{id(self)}")
        self.logger.propagate = False
        self.logger.setLevel(logging.ERROR)
        records: "queue.Queue[logging.LogRecord]" = queue.Queue()
        self.logger.addHandler(logging.handlers.QueueHandler(records))
        smtp = _SubjectSMTPHandler(mailhost, fromaddr, toaddrs, "", timeout=5.0)
        self._listener = logging.handlers.QueueListener(records, smtp)
        self._listener.start()

    def __call__(self, event: thriftpool.ExhaustedEvent) -> None:
        key = (event.pool, event.address)
        now = time.monotonic()
        with self._lock:
            last: Optional[float] = self._last.get(key)
            if last is not None and now - last < self.interval:
                self._suppressed[key] = self._suppressed.get(key, 0) + 1
                self.suppressed += 1
                return
            self._last[key] = now
            skipped = self._suppressed.pop(key, 0)
            self.sent[event.address] = self.sent.get(event.address, 0) + 1
        lines = [
            f"pool {event.pool!r}: a checkout waited {event.timeout:g}s for a connection "
            f"to instance {event.address} and gave up.",
            f"sizes: max_size={event.max_size} per instance; in_use={event.in_use} "
            f"idle={event.idle} opening={event.opening}",
            f"waiters: {event.waiting} other checkouts still waiting",
            f"alerts suppressed for this instance since the last mail: {skipped}",
        ]
        if event.holders:
            lines.append(f"holders ({len(event.holders)} oldest):")
            for holder in event.holders:
                lines.append(f"- thread {holder.thread!r}, held for {holder.age:.2f}s, "
                             f"checked out at:\n{holder.stack.rstrip()}")
        else:
            lines.append("holders: unknown (set leak_timeout to record them)")
        self.logger.error("\n".join(lines),
                          extra={"pool": event.pool, "instance": event.address})

    def close(self) -> None:
        """Send what is queued, then stop the mailing thread."""
        self._listener.stop()


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smtp", required=True, help="HOST:PORT of the SMTP server")
    parser.add_argument("--duration", type=float, default=10.0,
                        help="seconds to keep the pool overloaded")
    parser.add_argument("--interval", type=float, default=60.0,
                        help="at most one mail per instance per this many seconds")
    parser.add_argument("--to", default="oncall@example.com")
    args = parser.parse_args(argv)
    host, _, port = args.smtp.rpartition(":")
    alerter = ExhaustionAlerter((host, int(port)), "thriftpool@example.com", [args.to],
                                interval=args.interval)
    servers = [start_echo_server(name=f"server-{i}") for i in range(2)]
    failures = {"exhausted": 0}
    lock = threading.Lock()
    try:
        with thriftpool.ThriftPool(echo_thrift.Echo, [s.address for s in servers],
                                   name="alerting-demo", min_size=0, max_size=2,
                                   checkout_timeout=0.1, leak_timeout=0.05,
                                   on_exhausted=alerter) as pool:
            stop = time.monotonic() + args.duration

            def overload() -> None:
                while time.monotonic() < stop:
                    try:
                        with pool.checkout() as client:
                            client.sleep(300)
                    except thriftpool.PoolExhausted:
                        with lock:
                            failures["exhausted"] += 1

            threads = [threading.Thread(target=overload, name=f"overload-{i}")
                       for i in range(12)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
    finally:
        alerter.close()
        for s in servers:
            s.stop()
    print(json.dumps({"alerts": alerter.sent, "suppressed": alerter.suppressed,
                      "exhausted": failures["exhausted"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
