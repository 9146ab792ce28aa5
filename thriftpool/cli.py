"""The ``thriftpool`` command: inspect a ZooKeeper service path, ping instances, run a load.

::

    thriftpool instances --zk 127.0.0.1:2181 --path /services/echo
    thriftpool ping  --idl idl/echo.thrift --address 127.0.0.1:9090 --address 127.0.0.1:9091
    thriftpool bench --idl idl/echo.thrift --zk 127.0.0.1:2181 --path /services/echo \\
                     --method echo --args '["hello"]' --threads 8 --duration 10

Exit status: 0 on success, 1 when an instance failed (ping) or every call failed (bench),
2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import ssl
import sys
import threading
import time
from collections import defaultdict
from typing import Any, Dict, List, Optional, Sequence, TextIO, Tuple

__all__ = ["main"]


class _Usage(Exception):
    """A bad argument that argparse could not catch by itself."""


def _load_service(idl: str, name: Optional[str]) -> Any:
    import thriftpy2

    if not os.path.isfile(idl):
        raise _Usage(f"--idl: no such file: {idl}")
    module_name = os.path.splitext(os.path.basename(idl))[0].replace("-", "_") + "_thrift"
    try:
        module = thriftpy2.load(idl, module_name=module_name)
    except Exception as exc:
        raise _Usage(f"--idl: cannot parse {idl}: {exc}") from None
    services = {k: v for k, v in vars(module).items()
                if isinstance(v, type) and hasattr(v, "thrift_services")}
    if name is None:
        if len(services) != 1:
            raise _Usage(f"--service: {idl} defines {len(services)} services "
                         f"({', '.join(sorted(services)) or 'none'}); name one")
        return next(iter(services.values()))
    if name not in services:
        raise _Usage(f"--service: {idl} has no service {name!r} "
                     f"(it has {', '.join(sorted(services)) or 'none'})")
    return services[name]


def _call_args(service: Any, method: str, args_json: Optional[str]) -> List[Any]:
    if method not in service.thrift_services:
        raise _Usage(f"--method: {service.__name__} has no method {method!r} "
                     f"(it has {', '.join(service.thrift_services)})")
    if args_json is None:
        return []
    try:
        args = json.loads(args_json)
    except ValueError as exc:
        raise _Usage(f"--args: not JSON: {exc}") from None
    if not isinstance(args, list):
        raise _Usage("--args: must be a JSON list of positional arguments")
    return args


def _auth(values: Optional[List[str]]) -> Optional[List[Tuple[str, str]]]:
    if not values:
        return None
    out = []
    for value in values:
        scheme, sep, credential = value.partition(":")
        if not sep or not scheme or not credential:
            raise _Usage(f"--auth: expected SCHEME:CREDENTIAL (digest:user:password), "
                         f"got {value!r}")
        out.append((scheme, credential))
    return out


def _ssl_context(args: argparse.Namespace) -> Optional[ssl.SSLContext]:
    if not (args.tls or args.tls_ca):
        return None
    try:
        ctx = ssl.create_default_context(cafile=args.tls_ca)
        if args.tls_cert:
            ctx.load_cert_chain(args.tls_cert, args.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise _Usage(f"--tls-ca/--tls-cert: {exc}") from None
    return ctx


def _discovery(args: argparse.Namespace) -> Any:
    from . import StaticDiscovery

    if args.address and args.zk:
        raise _Usage("give either --address or --zk/--path, not both")
    if args.address:
        try:
            return StaticDiscovery(args.address)
        except ValueError as exc:
            raise _Usage(f"--address: {exc}") from None
    if not (args.zk and args.path):
        raise _Usage("give --address HOST:PORT (repeatable), or --zk HOSTS with --path PATH")
    from .discovery.zookeeper import ZooKeeperDiscovery

    try:
        return ZooKeeperDiscovery(hosts=args.zk, path=args.path, auth_data=_auth(args.auth))
    except ValueError as exc:
        raise _Usage(str(exc)) from None


def _endpoints(args: argparse.Namespace, timeout: float) -> List[Any]:
    """The instances a --address list or a ZooKeeper path names, read once."""
    discovery = _discovery(args)
    got = threading.Event()
    seen: List[Any] = []

    def listener(endpoints: List[Any]) -> None:
        seen[:] = endpoints
        got.set()

    discovery.start(listener, "thriftpool-cli")
    try:
        if not got.wait(timeout):
            raise RuntimeError(f"no instance list from {args.zk}{args.path} within {timeout}s")
    finally:
        discovery.stop()
    return list(seen)


# -- instances -------------------------------------------------------------------------

def cmd_instances(args: argparse.Namespace, out: TextIO) -> int:
    from kazoo.client import KazooClient
    from kazoo.exceptions import NoNodeError

    from ._zookeeper import parse_record

    client = KazooClient(hosts=args.zk, auth_data=_auth(args.auth), timeout=10.0)
    try:
        client.start(timeout=args.timeout)
    except Exception as exc:
        print(f"thriftpool: cannot reach ZooKeeper at {args.zk}: {exc}", file=sys.stderr)
        return 1
    try:
        try:
            children = sorted(client.get_children(args.path))
        except NoNodeError:
            print(f"thriftpool: {args.path} does not exist", file=sys.stderr)
            return 1
        rows = [("NODE", "ADDRESS", "WEIGHT", "TLS", "STATUS")]
        valid = 0
        for name in children:
            try:
                data, _ = client.get(f"{args.path.rstrip('/')}/{name}")
            except NoNodeError:
                continue  # deleted while we looked
            endpoint, problem = parse_record(name, data)
            if endpoint is not None:
                valid += 1
                status = "ok" if problem is None else f"ok (from its name: {problem})"
                rows.append((name, str(endpoint.address), str(endpoint.weight),
                             "yes" if getattr(endpoint, "tls", False) else "no", status))
            else:
                rows.append((name, "-", "-", "-", problem or "not serving (ServerSet status)"))
        _table(rows, out)
        print(f"{valid} valid of {len(children)} nodes under {args.path}", file=out)
        return 0
    finally:
        client.stop()
        client.close()


# -- ping ------------------------------------------------------------------------------

def cmd_ping(args: argparse.Namespace, out: TextIO) -> int:
    from . import ThriftPool

    service = _load_service(args.idl, args.service)
    call_args = _call_args(service, args.method, args.args)
    ctx = _ssl_context(args)
    endpoints = _endpoints(args, args.timeout)
    if not endpoints:
        print("thriftpool: no instances", file=sys.stderr)
        return 1
    rows = [("INSTANCE", "RESULT", "MS")]
    failures = 0
    for endpoint in endpoints:
        pool = ThriftPool(service, [endpoint.address], min_size=0, max_size=1, retries=0,
                          connect_timeout=args.timeout, socket_timeout=args.timeout,
                          backoff_initial=60.0, ssl_context=ctx)
        started = time.perf_counter()
        try:
            with pool.checkout() as client:
                result = getattr(client, args.method)(*call_args)
            rows.append((str(endpoint.address), f"ok {_short(result)}",
                         f"{(time.perf_counter() - started) * 1000:.2f}"))
        except Exception as exc:
            failures += 1
            cause = exc.__cause__ or exc
            rows.append((str(endpoint.address), f"FAIL {type(cause).__name__}: {cause}",
                         f"{(time.perf_counter() - started) * 1000:.2f}"))
        finally:
            pool.close()
    _table(rows, out)
    return 1 if failures else 0


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# -- bench -----------------------------------------------------------------------------

def _percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, int(round(q * (len(sorted_values) - 1)))))
    return sorted_values[k]


def cmd_bench(args: argparse.Namespace, out: TextIO, progress: TextIO) -> int:
    from . import ThriftPool

    service = _load_service(args.idl, args.service)
    call_args = _call_args(service, args.method, args.args)
    ctx = _ssl_context(args)
    discovery = _discovery(args)
    latencies: Dict[str, List[float]] = defaultdict(list)
    errors: Dict[str, int] = defaultdict(int)
    lock = threading.Lock()
    stop = threading.Event()
    deadline = time.monotonic() + args.duration
    budget = [args.calls]

    pool = ThriftPool(service, discovery, max_size=args.max_size, min_size=0,
                      ssl_context=ctx, checkout_timeout=max(1.0, args.duration),
                      balancer=args.balancer)
    try:
        pool.wait(timeout=10.0)
    except Exception:
        pool.close()
        raise RuntimeError("no instances found within 10s") from None

    def worker() -> None:
        mine: Dict[str, List[float]] = defaultdict(list)
        failed: Dict[str, int] = defaultdict(int)
        while not stop.is_set() and time.monotonic() < deadline:
            with lock:
                if budget[0] <= 0:
                    break
                budget[0] -= 1
            started = time.perf_counter()
            key = "(no instance)"
            try:
                with pool.checkout() as client:
                    key = str(client._conn.address) if client._conn is not None else key
                    getattr(client, args.method)(*call_args)
                mine[key].append(time.perf_counter() - started)
            except Exception:
                failed[key] += 1
            if len(mine[key]) >= 512:
                with lock:
                    latencies[key].extend(mine[key])
                mine[key].clear()
        with lock:
            for k, v in mine.items():
                latencies[k].extend(v)
            for k, n in failed.items():
                errors[k] += n

    threads = [threading.Thread(target=worker, name=f"thriftpool-bench-{i}", daemon=True)
               for i in range(args.threads)]
    started = time.monotonic()
    try:
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            for t in threads:
                t.join(0.5)
                break
            elapsed = time.monotonic() - started
            done = args.calls - budget[0]
            progress.write(f"\r{elapsed:6.1f}s  {done} calls  {done / max(elapsed, 1e-9):.0f}/s ")
            progress.flush()
    except KeyboardInterrupt:
        stop.set()
        for t in threads:
            t.join(5)
    finally:
        pool.close()
    elapsed = time.monotonic() - started
    progress.write("\n")
    rows = [("INSTANCE", "CALLS", "ERRORS", "CALLS/S", "P50 MS", "P90 MS", "P99 MS")]
    total_ok = 0
    for key in sorted(set(latencies) | set(errors)):
        lat = sorted(latencies.get(key, []))
        total_ok += len(lat)
        rows.append((key, str(len(lat)), str(errors.get(key, 0)), f"{len(lat) / elapsed:.0f}",
                     f"{_percentile(lat, 0.5) * 1000:.2f}", f"{_percentile(lat, 0.9) * 1000:.2f}",
                     f"{_percentile(lat, 0.99) * 1000:.2f}"))
    all_lat = sorted(x for v in latencies.values() for x in v)
    rows.append(("total", str(total_ok), str(sum(errors.values())), f"{total_ok / elapsed:.0f}",
                 f"{_percentile(all_lat, 0.5) * 1000:.2f}",
                 f"{_percentile(all_lat, 0.9) * 1000:.2f}",
                 f"{_percentile(all_lat, 0.99) * 1000:.2f}"))
    _table(rows, out)
    return 0 if total_ok else 1


# -- plumbing --------------------------------------------------------------------------

def _table(rows: Sequence[Sequence[str]], out: TextIO) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip(), file=out)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0: {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1: {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="thriftpool", description="Inspect and exercise Thrift services behind thriftpool.")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log the pools' state changes (connections, ejections) to stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def where(p: argparse.ArgumentParser, zk_required: bool = False) -> None:
        if not zk_required:
            p.add_argument("--address", action="append", metavar="HOST:PORT",
                           help="an instance (repeatable); or use --zk and --path")
        p.add_argument("--zk", metavar="HOSTS", required=zk_required,
                       help="ZooKeeper connection string, e.g. 127.0.0.1:2181,127.0.0.2:2181")
        p.add_argument("--path", required=zk_required, help="the service's ZooKeeper path")
        p.add_argument("--auth", action="append", metavar="SCHEME:CREDENTIAL",
                       help="ZooKeeper auth, e.g. digest:user:password (repeatable)")

    def call(p: argparse.ArgumentParser, method: str) -> None:
        p.add_argument("--idl", required=True, help="the .thrift file")
        p.add_argument("--service", help="service name (default: the IDL's only service)")
        p.add_argument("--method", default=method, help=f"method to call (default: {method})")
        p.add_argument("--args", metavar="JSON", help="positional arguments as a JSON list")
        p.add_argument("--tls", action="store_true", help="connect over TLS (system CAs)")
        p.add_argument("--tls-ca", metavar="FILE", help="connect over TLS, trusting this CA")
        p.add_argument("--tls-cert", metavar="FILE", help="client certificate (mutual TLS)")
        p.add_argument("--tls-key", metavar="FILE", help="client key")

    p = sub.add_parser("instances", help="list the nodes under a ZooKeeper service path")
    where(p, zk_required=True)
    p.add_argument("--timeout", type=_positive_float, default=10.0)

    p = sub.add_parser("ping", help="call a method once on every instance")
    where(p)
    call(p, "ping")
    p.add_argument("--timeout", type=_positive_float, default=3.0,
                   help="connect and call timeout in seconds (default 3)")

    p = sub.add_parser("bench", help="run a short load through a pool")
    where(p)
    call(p, "ping")
    p.add_argument("--threads", type=_positive_int, default=4)
    p.add_argument("--duration", type=_positive_float, default=10.0,
                   help="seconds to run at most (default 10)")
    p.add_argument("--calls", type=_positive_int, default=1_000_000,
                   help="calls to make at most (default 1000000)")
    p.add_argument("--max-size", type=_positive_int, default=8,
                   help="connections per instance (default 8)")
    p.add_argument("--balancer", default="least_loaded",
                   choices=["least_loaded", "round_robin", "random"])
    return parser


def main(argv: Optional[Sequence[str]] = None, out: TextIO = sys.stdout,
         progress: TextIO = sys.stderr) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.ERROR,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "instances":
            return cmd_instances(args, out)
        if args.command == "ping":
            return cmd_ping(args, out)
        return cmd_bench(args, out, progress)
    except _Usage as exc:
        parser.error(str(exc))
    except RuntimeError as exc:
        print(f"thriftpool: {exc}", file=sys.stderr)
        return 1
    return 2  # pragma: no cover - parser.error exits


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
