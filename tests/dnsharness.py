"""A real DNS server for the tests: Debian's ``dnsmasq`` on a loopback port.

Each ``dns_server`` fixture starts its own ``dnsmasq`` (``/usr/sbin/dnsmasq``, package
``dnsmasq-base``) in the foreground on ``127.0.0.1:<free port>``, with no upstream
servers (``--no-resolv``), no ``/etc/hosts`` (``--no-hosts``), authoritative for
``.test`` (``--local=/test/``: an unknown name is NXDOMAIN, not REFUSED) and a fixed TTL
for its own records (``--local-ttl``).  A and AAAA records live in an ``--addn-hosts``
file that :meth:`DnsServer.set_hosts` rewrites and reloads with SIGHUP (dnsmasq re-reads
addn-hosts files on SIGHUP, but not its configuration); SRV records are configuration
(``--srv-host`` in a ``--conf-file``), so :meth:`DnsServer.set_srv` restarts the server
on the same port.  :meth:`DnsServer.stop` makes a failure period: queries time out
until :meth:`DnsServer.start` brings it back on the same port.

Tests using the fixture are marked ``dns`` automatically.  The fixture fails (never
skips) when dnsmasq is missing; its log is printed when a test fails.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import pytest

DNSMASQ = os.environ.get("DNSMASQ") or shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"
DNS_FIXTURES = ("dns_server",)


def free_udp_and_tcp_port() -> int:
    """A loopback port free for both UDP and TCP (dnsmasq listens on both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port = udp.getsockname()[1]
            with socket.socket() as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return int(port)
    raise RuntimeError("no free port for dnsmasq")


class DnsServer:
    """One dnsmasq process serving records the test edits.

    :param directory: where its files live (made readable for dnsmasq's ``nobody``).
    :param ttl: the TTL of every record it serves.
    """

    def __init__(self, directory: str, ttl: int = 30) -> None:
        if not os.path.exists(DNSMASQ):
            pytest.fail(f"{DNSMASQ} is missing: the DNS tests need Debian's dnsmasq-base "
                        "package (apt-get install -y dnsmasq-base; .ci/test installs it)",
                        pytrace=False)
        self.directory = directory
        os.chmod(directory, 0o755)  # dnsmasq drops to nobody before re-reading files
        self.ttl = ttl
        self.port = free_udp_and_tcp_port()
        self.hosts_file = os.path.join(directory, "hosts")
        self.conf_file = os.path.join(directory, "dnsmasq.conf")
        self.log_file = os.path.join(directory, "dnsmasq.log")
        self.proc: Optional[subprocess.Popen] = None
        self.hosts: Dict[str, List[str]] = {}
        self.srv: List[Tuple[str, str, int, int, int]] = []
        self._write_hosts()
        self._write_conf()

    @property
    def nameserver(self) -> str:
        """``"127.0.0.1:<port>"``, for ``DnsDiscovery(nameservers=[...])``."""
        return f"127.0.0.1:{self.port}"

    # -- records ---------------------------------------------------------------------

    def set_hosts(self, hosts: Dict[str, Sequence[str]], wait: bool = True) -> None:
        """Serve exactly these A/AAAA records (``{name: [ip, ...]}``); reload with SIGHUP
        and, with ``wait``, poll the server until it answers them."""
        self.hosts = {name: list(ips) for name, ips in hosts.items()}
        self._write_hosts()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGHUP)
            if wait:
                for name, ips in self.hosts.items():
                    self.wait_answer(name, sorted(ips))

    def set_srv(self, records: Sequence[Tuple[str, str, int, int, int]]) -> None:
        """Serve exactly these SRV records ``(name, target, port, priority, weight)``;
        restarts the server (SRV records are configuration, which SIGHUP does not
        reload)."""
        self.srv = list(records)
        self._write_conf()
        if self.proc is not None:
            self.stop()
            self.start()

    def _write_hosts(self) -> None:
        lines = [f"{ip} {name}\n" for name, ips in self.hosts.items() for ip in ips]
        tmp = self.hosts_file + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(lines)
        os.chmod(tmp, 0o644)
        os.replace(tmp, self.hosts_file)

    def _write_conf(self) -> None:
        with open(self.conf_file, "w") as f:
            for name, target, port, priority, weight in self.srv:
                f.write(f"srv-host={name},{target},{port},{priority},{weight}\n")
        os.chmod(self.conf_file, 0o644)

    # -- the process -----------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> None:
        cmd = [DNSMASQ, "--keep-in-foreground", f"--port={self.port}",
               "--listen-address=127.0.0.1", "--bind-interfaces", "--no-resolv",
               "--no-hosts", f"--addn-hosts={self.hosts_file}",
               f"--conf-file={self.conf_file}", "--local=/test/",
               f"--local-ttl={self.ttl}", "--pid-file=", "--log-queries",
               f"--log-facility={self.log_file}", "--cache-size=0"]
        if os.getuid() == 0:
            cmd += ["--user=nobody"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + timeout
        while not self._answers():
            if self.proc.poll() is not None:
                err = self.proc.stderr.read() if self.proc.stderr else ""
                raise RuntimeError(f"dnsmasq exited with {self.proc.returncode}: {err}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"dnsmasq did not answer within {timeout}s")
            time.sleep(0.02)

    def stop(self) -> None:
        """Stop the server: queries fail until :meth:`start` (same port)."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        if proc.stderr:
            proc.stderr.close()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- queries ---------------------------------------------------------------------

    def resolver(self, lifetime: float = 1.0) -> Any:
        import dns.nameserver
        import dns.resolver

        r = dns.resolver.Resolver(configure=False)
        r.nameservers = [dns.nameserver.Do53Nameserver("127.0.0.1", self.port)]
        r.lifetime = lifetime
        return r

    def _answers(self) -> bool:
        import dns.exception
        import dns.resolver

        try:
            self.resolver(0.2).resolve("probe.test", "A")
        except dns.resolver.NXDOMAIN:
            return True  # it answers
        except dns.exception.DNSException:
            return False
        return True

    def addresses(self, name: str) -> List[str]:
        """The A and AAAA records the server answers for ``name`` now."""
        import dns.resolver

        found: List[str] = []
        for rdtype in ("A", "AAAA"):
            try:
                answer = self.resolver().resolve(name, rdtype, raise_on_no_answer=False)
            except dns.resolver.NXDOMAIN:
                continue
            if answer.rrset is not None:
                found.extend(r.address for r in answer.rrset)
        return sorted(found)

    def wait_answer(self, name: str, expected: List[str], timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while self.addresses(name) != sorted(expected):
            if time.monotonic() > deadline:
                raise AssertionError(f"dnsmasq still answers {self.addresses(name)} for "
                                     f"{name}, not {sorted(expected)}")
            time.sleep(0.02)

    def log_tail(self, lines: int = 40) -> str:
        try:
            with open(self.log_file) as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""


@pytest.fixture
def dns_server(request: Any) -> Iterator[DnsServer]:
    """A running dnsmasq of this test's own (``set_hosts``, ``set_srv``, ``stop``,
    ``start``); stopped at teardown, its log printed if the test failed."""
    failed_before = request.session.testsfailed
    # Not tmp_path: pytest's directories are private (0700), and dnsmasq re-reads its
    # files as nobody.
    directory = tempfile.mkdtemp(prefix="thriftpool-dns-")
    try:
        server = DnsServer(directory)
        server.start()
        try:
            yield server
        finally:
            server.stop()
            if request.session.testsfailed > failed_before:
                sys.stderr.write(f"\n--- dnsmasq log ---\n{server.log_tail()}\n")
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.hookimpl(specname="pytest_collection_modifyitems")
def pytest_dnsharness_mark_items(items: List[Any]) -> None:
    """Mark every test that uses a DNS fixture ``dns`` (``-m "not dns"``)."""
    for item in items:
        if any(name in DNS_FIXTURES for name in getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.dns)
