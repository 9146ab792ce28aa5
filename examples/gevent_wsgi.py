"""A gevent worker that calls a Thrift service on every HTTP request through one pool.

The process is monkey-patched before anything else is imported, as gunicorn's gevent
worker does; the pool's watchdog then runs as a greenlet and a checkout that waits on a
full pool yields to other requests instead of blocking the hub.

    python examples/gevent_wsgi.py                       # starts 2 echo servers itself
    python examples/gevent_wsgi.py --backend 127.0.0.1:9090 --port 8080
    curl 'http://127.0.0.1:8080/echo?hello'
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
from typing import Any, Callable, Iterable, List  # noqa: E402

import gevent  # noqa: E402
from gevent.pywsgi import WSGIServer  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import thriftpool  # noqa: E402
from echo_server import echo_thrift, start_echo_server  # noqa: E402


def make_app(pool: thriftpool.ThriftPool) -> Callable[..., Iterable[bytes]]:
    """A WSGI app: ``/echo?text`` echoes through the pool, ``/stats`` shows the pool."""
    proxy = pool.client()

    def app(environ: dict, start_response: Callable[..., Any]) -> List[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path == "/stats":
            body = pool.stats()
            status = "200 OK"
        elif path == "/echo":
            text = environ.get("QUERY_STRING") or "hello"
            try:
                with pool.checkout() as client:
                    body = {"echo": client.echo(text), "server": client.whoami()}
                status = "200 OK"
            except (thriftpool.ThriftPoolError, OSError) as exc:
                body = {"error": f"{type(exc).__name__}: {exc}"}
                status = "503 Service Unavailable"
        elif path == "/ping":
            proxy.ping()
            body, status = {"ok": True}, "200 OK"
        else:
            body, status = {"error": "not found"}, "404 Not Found"
        data = json.dumps(body).encode()
        start_response(status, [("Content-Type", "application/json"),
                                ("Content-Length", str(len(data)))])
        return [data]

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=8080, help="HTTP port (0: any free port)")
    parser.add_argument("--backend", action="append", default=[],
                        help="echo server host:port (repeatable); default: start two")
    parser.add_argument("--max-size", type=int, default=4, help="connections per backend")
    args = parser.parse_args()

    servers = []
    backends = args.backend
    if not backends:
        servers = [start_echo_server(name=f"echo-{i}") for i in range(2)]
        backends = [s.address for s in servers]

    pool = thriftpool.ThriftPool(echo_thrift.Echo, backends, min_size=1,
                                 max_size=args.max_size, checkout_timeout=5.0)
    http = WSGIServer(("127.0.0.1", args.port), make_app(pool), log=None)
    http.start()
    print(f"LISTENING {http.server_port} backends={','.join(backends)}", flush=True)

    stop = gevent.event.Event()
    gevent.signal_handler(signal.SIGTERM, stop.set)
    gevent.signal_handler(signal.SIGINT, stop.set)
    stop.wait()
    http.stop(timeout=5)
    pool.close()
    for s in servers:
        s.stop()
    print("stopped", flush=True)


if __name__ == "__main__":
    main()
