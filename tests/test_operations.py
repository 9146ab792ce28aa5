"""What operators run: the alerting example against a real SMTP server, the Prometheus
alert rules checked by promtool, the Grafana dashboard's metrics, the published name."""

from __future__ import annotations

import email
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import zipfile

import pytest
from prometheus_client import CollectorRegistry, generate_latest

import thriftpool
from servers import ROOT, echo_thrift, free_port, wait_for
from test_events import ManualDiscovery
from thriftpool.prometheus import PrometheusExporter

PROM_DIR = os.path.join(ROOT, "examples", "prometheus")
RULES = os.path.join(PROM_DIR, "thriftpool-alerts.yml")
DASHBOARD = os.path.join(PROM_DIR, "grafana-dashboard.json")


class Mailbox:
    """An aiosmtpd handler keeping every message with the time it arrived."""

    def __init__(self):
        self.lock = threading.Lock()
        self.messages = []

    async def handle_DATA(self, server, session, envelope):  # noqa: N802 - aiosmtpd's name
        message = email.message_from_bytes(envelope.content)
        with self.lock:
            self.messages.append((time.monotonic(), message))
        return "250 OK"


@pytest.fixture
def smtp():
    from aiosmtpd.controller import Controller

    mailbox = Mailbox()
    port = free_port()
    controller = Controller(mailbox, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield mailbox, f"127.0.0.1:{port}"
    finally:
        controller.stop()


def body(message) -> str:
    payload = message.get_payload(decode=True)
    return payload.decode() if isinstance(payload, bytes) else str(message.get_payload())


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_alerting_example_mails_each_exhausted_instance_at_most_once_per_interval(smtp):
    mailbox, address = smtp
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "alerting.py"), "--smtp", address,
         "--duration", "3.5", "--interval", "1.5"],
        capture_output=True, text=True, timeout=60, env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    alerts = summary["alerts"]
    # Every exhausted checkout reached the alerter: mailed, or suppressed by the rate limit.
    assert summary["exhausted"] == sum(alerts.values()) + summary["suppressed"]
    assert summary["suppressed"] > sum(alerts.values())
    assert alerts and sum(alerts.values()) == len(mailbox.messages)
    by_instance = {}
    for at, message in mailbox.messages:
        text = body(message)
        match = re.search(r"exhausted on (127\.0\.0\.1:\d+)$", message["Subject"])
        assert match, message["Subject"]
        instance = match.group(1)
        assert "'alerting-demo'" in message["Subject"]
        assert f"to instance {instance}" in text
        assert "max_size=2 per instance" in text and "in_use=" in text
        assert re.search(r"waiters: \d+ other checkouts", text)
        assert "holders (" in text and "thread 'overload-" in text and "in overload" in text
        by_instance.setdefault(instance, []).append(at)
    assert set(by_instance) == set(alerts)
    for instance, times in by_instance.items():
        assert len(times) == alerts[instance]
        # Sustained exhaustion: one mail per interval, not one per exhausted checkout.
        assert 1 <= len(times) <= 3, (instance, len(times))
        gaps = [b - a for a, b in zip(times, times[1:])]
        assert all(gap >= 1.5 - 0.3 for gap in gaps), gaps
    assert time.monotonic() - started < 60


def test_alerter_sends_one_mail_per_instance_per_minute(smtp):
    """The default interval: a burst of exhaustion on one instance is one mail."""
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    try:
        from alerting import ExhaustionAlerter
    finally:
        sys.path.pop(0)
    mailbox, address = smtp
    host, port = address.rsplit(":", 1)
    alerter = ExhaustionAlerter((host, int(port)), "a@example.com", ["b@example.com"])
    assert alerter.interval == 60.0
    events = [thriftpool.ExhaustedEvent(pool="p", address=f"10.0.0.{i % 2}:1", timeout=0.1,
                                        max_size=2, in_use=2, idle=0, opening=0, waiting=3)
              for i in range(10)]
    for event in events:
        alerter(event)
    alerter.close()
    wait_for(lambda: len(mailbox.messages) == 2, 10, message="two mails")
    assert alerter.suppressed == 8
    subjects = sorted(m["Subject"] for _, m in mailbox.messages)
    assert subjects == ["[thriftpool] pool 'p' exhausted on 10.0.0.0:1",
                        "[thriftpool] pool 'p' exhausted on 10.0.0.1:1"]
    assert "holders: unknown (set leak_timeout" in body(mailbox.messages[0][1])


@pytest.mark.promtool
def test_alert_rules_pass_promtool():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool (Debian: prometheus) is not installed")
    out = subprocess.run([promtool, "check", "rules", RULES], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS: 5 rules found" in out.stdout


def metric_names(expr: str):
    return set(re.findall(r"\b(thriftpool_[a-z_]+)", expr))


def exported_names(text: str):
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            names.add(name)
            if kind == "counter":
                names.add(name + "_total")
            if kind == "histogram":
                names.update({name + "_bucket", name + "_sum", name + "_count"})
    return names


@pytest.mark.timeout(30)
def test_rules_and_dashboard_use_only_metrics_the_exporter_exports(farm):
    server = farm.one()
    registry = CollectorRegistry()
    exporter = PrometheusExporter(registry=registry)

    class OnSnapshot(ManualDiscovery):
        def stats(self):
            return {"source": "snapshot"}

    with thriftpool.ThriftPool(echo_thrift.Echo, OnSnapshot([server.address]), name="ops",
                               listeners=[exporter], checkout_timeout=0.05,
                               max_size=1) as pool:
        pool.client().echo("x")
        with pool.checkout(), pytest.raises(thriftpool.PoolExhausted):
            with pool.checkout():
                pass
        pool.client().echo("closed below")
        text = generate_latest(registry).decode()
    exported = exported_names(text)
    assert 'thriftpool_discovery_on_snapshot{pool="ops"} 1.0' in text
    with open(RULES) as f:
        rules_text = f.read()
    used = metric_names(rules_text)
    with open(DASHBOARD) as f:
        dashboard = json.load(f)
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            used |= metric_names(target["expr"])
    used |= metric_names(json.dumps(dashboard["templating"]))
    assert len(used) >= 15
    assert used <= exported, sorted(used - exported)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_the_wheel_is_published_as_python_thriftpool(tmp_path):
    """The distribution name (python-thriftpool); the import name stays thriftpool."""
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--disable-pip-version-check", "-q", "-w", str(tmp_path), ROOT],
        capture_output=True, text=True, timeout=110)
    assert out.returncode == 0, out.stderr
    (wheel,) = tmp_path.glob("*.whl")
    assert wheel.name.startswith(f"python_thriftpool-{thriftpool.__version__}-")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
        metadata = z.read(meta).decode()
    assert "\nName: python-thriftpool\n" in metadata
    assert "Provides-Extra: otel" in metadata
    assert "thriftpool/__init__.py" in names and "thriftpool/py.typed" in names
    assert "thriftpool/otel.py" in names
