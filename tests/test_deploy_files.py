"""The files operators deploy with: Prometheus config and rules, the Grafana dashboard and
provisioning, the Dockerfile, compose.yaml and the systemd units."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "grafana" / "dashboards" / "nbdguard.json"
RULES = ROOT / "config" / "prometheus" / "rules.yml"


def promql_expressions() -> list[str]:
    """Every PromQL expression in the dashboard and in the alerting rules."""
    dashboard = json.loads(DASHBOARD.read_text())
    found = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    rules = yaml.safe_load(RULES.read_text())
    found += [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    return found


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.skip("promtool is not installed (Debian package prometheus)")
    return subprocess.run([binary, *args], capture_output=True, text=True, check=False)


def test_promtool_accepts_config_and_rules() -> None:
    config = promtool("check", "config", str(ROOT / "config" / "prometheus" / "prometheus.yml"))
    assert config.returncode == 0, config.stdout + config.stderr
    rules = promtool("check", "rules", str(RULES))
    assert rules.returncode == 0, rules.stdout + rules.stderr


def test_alerts_cover_blocked_writes_export_down_and_errors() -> None:
    rules = yaml.safe_load(RULES.read_text())
    alerts = {rule["alert"]: rule for group in rules["groups"] for rule in group["rules"]}
    assert "nbdguard_header_writes_blocked_total" in alerts["NbdguardHeaderWriteBlocked"]["expr"]
    assert "nbdguard_export_up" in alerts["NbdguardExportDown"]["expr"]
    assert "nbdguard_request_errors_total" in alerts["NbdguardHighErrorRatio"]["expr"]


def test_dashboard_panels_all_query_something() -> None:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "nbdguard"
    titles = [panel["title"] for panel in dashboard["panels"]]
    for wanted in (
        "Throughput",
        "IOPS",
        "Latency",
        "Errors",
        "Connections",
        "Blocked header",
        "Chain refusals",
    ):
        assert any(wanted in title for title in titles), wanted
    for panel in dashboard["panels"]:
        assert panel["targets"] and all(target["expr"] for target in panel["targets"])
        assert all(target["datasource"]["uid"] == "prometheus" for target in panel["targets"])


def test_grafana_provisioning_matches_the_dashboard_location() -> None:
    datasources = yaml.safe_load(
        (ROOT / "grafana/provisioning/datasources/prometheus.yml").read_text()
    )
    assert datasources["datasources"][0]["uid"] == "prometheus"
    providers = yaml.safe_load((ROOT / "grafana/provisioning/dashboards/nbdguard.yml").read_text())
    path = providers["providers"][0]["options"]["path"]
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    assert f"./grafana/dashboards:{path}:ro" in compose["services"]["grafana"]["volumes"]


def test_compose_wires_three_services_to_existing_files() -> None:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    assert set(compose["services"]) == {"nbdguard", "prometheus", "grafana"}
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            host = volume.split(":")[0]
            if host != "./images":  # the operator's images, created by them
                assert (ROOT / host).exists(), host


def test_dockerfile_is_consistent_with_the_repository() -> None:
    text = (ROOT / "Dockerfile").read_text()
    for line in re.findall(r"^COPY (.+)$", text, flags=re.MULTILINE):
        *sources, _ = line.split()
        for source in sources:
            assert (ROOT / source).exists(), source
    assert re.search(r"^EXPOSE .*\b10809\b.*\b9109\b", text, flags=re.MULTILINE)
    user = re.search(r"^USER (\S+)", text, flags=re.MULTILINE)
    assert user and user.group(1) not in ("root", "0")
    assert "HEALTHCHECK" in text and "/healthz" in text
    entry = re.search(r"^ENTRYPOINT (.+)$", text, flags=re.MULTILINE)
    assert entry
    entrypoint = json.loads(entry.group(1))
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert entrypoint == ["nbdguard"] and "nbdguard" in scripts


def test_systemd_units() -> None:
    service = (ROOT / "deploy/systemd/nbdguard.service").read_text()
    socket = (ROOT / "deploy/systemd/nbdguard.socket").read_text()
    assert re.search(r"^ExecStart=\S*nbdguard serve ", service, flags=re.MULTILINE)
    assert "Requires=nbdguard.socket" in service and "KillSignal=SIGTERM" in service
    assert re.search(r"^ListenStream=10809$", socket, flags=re.MULTILINE)
