"""The two Thrift stacks, as the parametrised tests see them.

:func:`generate_apache` runs Debian's ``thrift --gen py`` on ``idl/echo.thrift`` into a
directory (once per session, from the ``apache_gen`` fixture).  :class:`Stack` holds what
a scenario needs to run on one stack: the service to give the pool, the stack's
exception classes, and how to start echo servers of that stack in subprocesses
(:class:`ApacheEchoServer` runs tests/apache_server.py on Apache's own servers).
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
from typing import Any, List

from servers import IDL, ROOT, EchoServer, ServerFarm, echo_thrift

APACHE_SCRIPT = os.path.join(ROOT, "tests", "apache_server.py")


def generate_apache(out_dir: str) -> str:
    """``thrift --gen py`` the echo IDL into ``out_dir``; returns it (for ``sys.path``)."""
    compiler = shutil.which("thrift")
    if compiler is None:
        raise FileNotFoundError("Apache Thrift's compiler (Debian: thrift-compiler) is "
                                "not installed")
    subprocess.run([compiler, "--gen", "py", "-out", out_dir, IDL], check=True,
                   capture_output=True, timeout=60)
    return out_dir


class ApacheEchoServer(EchoServer):
    """tests/apache_server.py in a subprocess: Apache's own ``TThreadedServer``,
    ``TThreadPoolServer`` or ``TNonblockingServer``."""

    def __init__(self, gen_dir: str, server: str = "threaded", **kwargs: Any) -> None:
        self.gen_dir = gen_dir
        self.server = server
        super().__init__(**kwargs)

    def command_line(self) -> List[str]:
        cmd = [sys.executable, APACHE_SCRIPT, "--gen-dir", self.gen_dir,
               "--server", self.server, "--transport", self.transport,
               "--protocol", self.protocol]
        if self.name:
            cmd += ["--name", self.name]
        return cmd

    def restart(self) -> None:
        # Apache's server socket picks a new port; tests that restart use thriftpy2's.
        raise NotImplementedError("restart an ApacheEchoServer by starting another")


class Stack:
    """One stack's service, exception classes and echo servers."""

    def __init__(self, name: str, gen_dir: str = "") -> None:
        self.name = name
        self.gen_dir = gen_dir
        if name == "apache":
            from thrift.protocol.TProtocol import TProtocolException
            from thrift.Thrift import TApplicationException
            from thrift.transport.TTransport import TTransportException

            if gen_dir not in sys.path:
                sys.path.insert(0, gen_dir)
            self.module = importlib.import_module("echo.Echo")
            self.ttypes = importlib.import_module("echo.ttypes")
            self.service: Any = self.module
            self.EchoError: Any = self.ttypes.EchoError
        else:
            from thriftpy2.protocol.exc import TProtocolException
            from thriftpy2.thrift import TApplicationException
            from thriftpy2.transport import TTransportException

            self.service = echo_thrift.Echo
            self.EchoError = echo_thrift.EchoError
        self.TApplicationException: Any = TApplicationException
        self.TTransportException: Any = TTransportException
        self.TProtocolException: Any = TProtocolException

    def start(self, farm: ServerFarm, n: int = 1, **kwargs: Any) -> List[EchoServer]:
        """Start ``n`` echo servers of this stack (Apache's ``TThreadedServer`` by
        default, ``server=`` picks another); ``farm`` kills them at teardown."""
        if self.name == "apache":
            started: List[EchoServer] = [ApacheEchoServer(self.gen_dir, **kwargs)
                                         for _ in range(n)]
            farm.servers.extend(started)
            return started
        return farm.start(n, **kwargs)

    def __repr__(self) -> str:
        return self.name
