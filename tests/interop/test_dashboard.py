"""The Grafana dashboard and the Prometheus rules against a live nbdguard: every metric they
name has samples on a fresh server with one export (no "no data" panels on a healthy
server), every expression parses (promtool), and the alerts fire on what they are for."""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

from nbdguard.guard.signatures import RULE_SETS
from nbdguard.observability.metrics import (
    CHAIN_REFUSAL_REASONS,
    CLEAN_HANDSHAKE_ENDS,
    GUARDED_COMMANDS,
    HANDSHAKE_FAILURE_REASONS,
    HANDSHAKE_OUTCOMES,
    HTTP_ERROR_REASONS,
    LIMITS,
    NO_HEADER,
)
from nbdguard.server.admission import MAX_CONNECTIONS, MAX_PER_CLIENT
from tests.interop.conftest import ExportSpec, RunningServer, free_port, sample, start_server
from tests.interop.test_observability import exposed_names

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "grafana" / "dashboards" / "nbdguard.json"
RULES = ROOT / "config" / "prometheus" / "rules.yml"
# Grafana's variables, replaced by what they stand for so that Prometheus can parse the query.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h"}
SELECTOR = re.compile(r"\b(nbdguard_[a-z0-9_]+)(\{[^}]*\})?")
Query = Callable[..., list[Any]]
EQUALITY = re.compile(r'(\w+)\s*=\s*"([^"]*)"')  # `=` only: not =~, !=, !~


# Request errors are labelled by errno as well: their series appear with the first error
# (the dashboard's Errors panel adds an "or vector(0)" total so that it is never empty).
APPEAR_WITH_FIRST_EVENT = frozenset({"nbdguard_request_errors_total"})


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def dashboard_expressions() -> list[str]:
    return [t["expr"] for panel in dashboard()["panels"] for t in panel["targets"]]


def rule_expressions() -> list[str]:
    rules = yaml.safe_load(RULES.read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def template_queries() -> list[str]:
    return [v["query"] for v in dashboard()["templating"]["list"] if v.get("type") == "query"]


def selectors(expression: str) -> Iterator[tuple[str, dict[str, str]]]:
    """Each nbdguard metric the expression selects, with its exact-match label matchers."""
    for name, matchers in SELECTOR.findall(expression):
        yield name, {k: v for k, v in EQUALITY.findall(matchers) if "$" not in v}


def promtool() -> str:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.skip("promtool is not installed (Debian package prometheus)")
    return binary


@contextmanager
def running_prometheus(tmp_path: Path, target_port: int) -> Iterator[Query]:
    """A Prometheus scraping 127.0.0.1:target_port every second, and a query function."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("the prometheus binary is not installed (Debian package prometheus)")
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n"
        "scrape_configs:\n  - job_name: nbdguard\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{target_port}']\n"
    )
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def query(expression: str, *, deadline: float, wanted: bool = True) -> list[Any]:
        url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode(
            {"query": expression}
        )
        stop = time.monotonic() + deadline
        while True:
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    body = json.loads(response.read())
                assert body["status"] == "success", body
                if body["data"]["result"]:
                    return list(body["data"]["result"])
            except OSError:
                pass  # not listening yet
            if time.monotonic() > stop:
                assert not wanted, f"Prometheus never returned {expression}"
                return []
            time.sleep(0.5)

    try:
        yield query
    finally:
        process.terminate()
        process.wait(timeout=20)


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningServer, str]]:
    """A server with one export that has served nothing, and its first scrape."""
    pytest.importorskip("nbd", reason="python3-libnbd is not installed")
    server = start_server(
        tmp_path_factory.mktemp("fresh"), [ExportSpec("vm1", size=1 << 20)], metrics=True
    )
    try:
        status, text = server.scrape()
        assert status == 200
        yield server, text
    finally:
        assert server.stop() == 0, server.log()


@pytest.mark.interop
def test_every_referenced_metric_has_samples_on_a_fresh_server(
    fresh: tuple[RunningServer, str],
) -> None:
    _, text = fresh
    exposed = exposed_names(text)
    expressions = dashboard_expressions() + rule_expressions() + template_queries()
    checked = 0
    for expression in expressions:
        for name, labels in selectors(expression):
            assert name in exposed, f"{name!r} in {expression!r} is not exposed"
            if name not in APPEAR_WITH_FIRST_EVENT:
                assert sample(text, name, **labels) is not None, (
                    f"{name}{labels} in {expression!r} has no sample on a fresh server"
                )
            checked += 1
    assert checked >= len(expressions)  # each expression names at least one metric


@pytest.mark.interop
def test_every_dashboard_panel_has_data_on_a_fresh_server(
    fresh: tuple[RunningServer, str], tmp_path: Path
) -> None:
    """A real Prometheus scrapes the fresh server; each panel's queries, as Grafana would
    send them, must return something (a healthy server shows zeros, not "no data")."""
    server, _ = fresh
    panels = {
        p["title"]: [_substitute(t["expr"]) for t in p["targets"]] for p in dashboard()["panels"]
    }
    with running_prometheus(tmp_path, server.metrics_port) as query:
        # two scrapes: enough for rate() and increase() over any window
        query("count_over_time(nbdguard_build_info[1m]) >= 2", deadline=60)
        for title, expressions in panels.items():
            results = (query(e, deadline=0, wanted=False) for e in expressions)
            assert any(results), f"panel {title!r} shows no data: {expressions}"


@pytest.mark.interop
def test_known_label_sets_are_exposed_at_zero(fresh: tuple[RunningServer, str]) -> None:
    _, text = fresh
    expected: list[tuple[str, dict[str, str]]] = []
    expected += [("nbdguard_limit_hits_total", {"limit": limit}) for limit in LIMITS]
    expected += [("nbdguard_http_errors_total", {"reason": r}) for r in HTTP_ERROR_REASONS]
    for reason in HANDSHAKE_FAILURE_REASONS:
        if reason != "disconnected":  # start_server's readiness probe connected and left
            expected.append(("nbdguard_handshake_failures_total", {"reason": reason}))
    for outcome in HANDSHAKE_OUTCOMES:
        if outcome != "failed":  # the probe again
            expected.append(("nbdguard_handshakes_total", {"outcome": outcome}))
    expected += [
        ("nbdguard_chain_refused_total", {"export": "vm1", "reason": reason})
        for reason in CHAIN_REFUSAL_REASONS
    ]
    formats = {rule.format for rule in RULE_SETS["qemu"]}
    expected += [
        ("nbdguard_header_writes_blocked_total", {"export": "vm1", "format": f, "command": c})
        for f in formats
        for c in GUARDED_COMMANDS
    ]
    expected.append(("nbdguard_export_existing_header", {"export": "vm1", "format": NO_HEADER}))
    for name in ("nbdguard_sector0_lock_timeouts_total", "nbdguard_sector0_rmw_total"):
        expected.append((name, {"export": "vm1"}))
    for name in ("nbdguard_connections", "nbdguard_connections_opened_total"):
        expected.append((name, {"export": "vm1"}))
    missing = [(name, labels) for name, labels in expected if sample(text, name, **labels) != 0]
    assert not missing, f"not exposed at 0: {missing}"
    assert sample(text, "nbdguard_handshake_failures_total", reason="aborted") is None


def test_every_expression_parses(tmp_path: Path) -> None:
    """promtool checks the dashboard's queries written as recording rules; a broken query
    makes the same check fail, so the check is not vacuous."""
    binary = promtool()
    expressions = [_substitute(e) for e in dashboard_expressions()]
    good = _recording_rules(tmp_path / "dashboard.yml", expressions)
    checked = subprocess.run([binary, "check", "rules", str(good)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"{len(expressions)} rules found" in checked.stdout
    broken = _recording_rules(tmp_path / "broken.yml", [*expressions, "sum by (export ("])
    refused = subprocess.run([binary, "check", "rules", str(broken)], capture_output=True)
    assert refused.returncode != 0
    rules = subprocess.run([binary, "check", "rules", str(RULES)], capture_output=True, text=True)
    assert rules.returncode == 0, rules.stdout + rules.stderr


def _substitute(expression: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expression = expression.replace(variable, value)
    expression = expression.replace("$export", ".*")
    assert "$" not in expression, f"unknown Grafana variable in {expression!r}"
    return expression


def _recording_rules(path: Path, expressions: list[str]) -> Path:
    rules = [{"record": f"nbdguard:dashboard_{i}", "expr": e} for i, e in enumerate(expressions)]
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    return path


ALERT_TESTS: list[dict[str, Any]] = [
    {  # refused at startup: the series is born at 1, before any scrape saw it at 0
        "interval": "1m",
        "input_series": [
            {
                "series": 'nbdguard_chain_refused_total{export="vm1",reason="locked"}',
                "values": "1x40",
            },
            {
                "series": 'nbdguard_chain_refused_total{export="vm1",reason="dirty"}',
                "values": "0x40",
            },
        ],
        "alert_rule_test": [
            {
                "eval_time": "2m",
                "alertname": "NbdguardChainRefused",
                "exp_alerts": [
                    {
                        "exp_labels": {"severity": "warning", "export": "vm1", "reason": "locked"},
                        "exp_annotations": {
                            "summary": "A qcow2 backing-chain layer was refused (locked)"
                        },
                    }
                ],
            },
            {"eval_time": "30m", "alertname": "NbdguardChainRefused", "exp_alerts": []},
        ],
    },
    {  # the first blocked write: the series was exposed at 0 before it
        "interval": "1m",
        "input_series": [
            {
                "series": 'nbdguard_header_writes_blocked_total{export="vm1",format="qcow2",'
                'command="write"}',
                "values": "0 0 0 1 1 1 1 1 1 1 1 1 1 1 1",
            },
            {
                "series": 'nbdguard_header_writes_blocked_total{export="vm1",format="vmdk",'
                'command="write"}',
                "values": "0x14",
            },
        ],
        "alert_rule_test": [
            {"eval_time": "2m", "alertname": "NbdguardHeaderWriteBlocked", "exp_alerts": []},
            {
                "eval_time": "4m",
                "alertname": "NbdguardHeaderWriteBlocked",
                "exp_alerts": [
                    {
                        "exp_labels": {
                            "severity": "critical",
                            "export": "vm1",
                            "format": "qcow2",
                            "command": "write",
                        },
                        "exp_annotations": {
                            "summary": "A client tried to write a qcow2 header into sector 0",
                            "description": "Export vm1 refused a write that would have made "
                            "the raw image look like qcow2. Find the client in the "
                            "guard.header_write_blocked log event.",
                        },
                    }
                ],
            },
        ],
    },
    {  # many `nbdinfo --list` and a few failures: normal use, no alert
        "interval": "1m",
        "input_series": [
            {"series": 'nbdguard_handshakes_total{outcome="list"}', "values": "0+60x40"},
            {"series": 'nbdguard_handshakes_total{outcome="transmission"}', "values": "0+5x40"},
            {"series": 'nbdguard_handshakes_total{outcome="failed"}', "values": "0+1x40"},
        ],
        "alert_rule_test": [
            {"eval_time": "40m", "alertname": "NbdguardHandshakeFailures", "exp_alerts": []}
        ],
    },
    {  # most handshakes fail for a quarter of an hour
        "interval": "1m",
        "input_series": [
            {"series": 'nbdguard_handshakes_total{outcome="transmission"}', "values": "0+1x40"},
            {"series": 'nbdguard_handshakes_total{outcome="failed"}', "values": "0+10x40"},
        ],
        "alert_rule_test": [
            {
                "eval_time": "40m",
                "alertname": "NbdguardHandshakeFailures",
                "exp_alerts": [
                    {
                        "exp_labels": {"severity": "warning"},
                        "exp_annotations": {
                            "summary": "More than half of the NBD handshakes fail",
                            "description": "See nbdguard_handshake_failures_total by reason "
                            "and the handshake.failed log events.",
                        },
                    }
                ],
            }
        ],
    },
    {  # connections refused by a limit alert; idle connections being closed do not
        "interval": "1m",
        "input_series": [
            {"series": 'nbdguard_limit_hits_total{limit="max_connections"}', "values": "0 0 5 5"},
            {"series": 'nbdguard_limit_hits_total{limit="idle_timeout"}', "values": "0+3x3"},
        ],
        "alert_rule_test": [
            {"eval_time": "1m", "alertname": "NbdguardConnectionsRefused", "exp_alerts": []},
            {
                "eval_time": "3m",
                "alertname": "NbdguardConnectionsRefused",
                "exp_alerts": [
                    {
                        "exp_labels": {"severity": "warning", "limit": "max_connections"},
                        "exp_annotations": {
                            "summary": "Connections were refused: limit max_connections was reached"
                        },
                    }
                ],
            },
        ],
    },
]


def test_alerts_fire_on_what_they_are_for(tmp_path: Path) -> None:
    """promtool's rule unit tests, on the shipped rules file."""
    binary = promtool()
    tests = tmp_path / "alerts_test.yml"
    document = {"rule_files": [str(RULES)], "evaluation_interval": "1m", "tests": ALERT_TESTS}
    tests.write_text(yaml.safe_dump(document, sort_keys=False))
    result = subprocess.run([binary, "test", "rules", str(tests)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# -- the label values nbdguard pre-creates are the ones its code uses ---------------------


def _calls(*names: str, under: str = "") -> Iterator[ast.Call]:
    for path in (ROOT / "nbdguard" / under).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                func = node.func
                called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                if called in names:
                    yield node


def _strings(node: ast.AST) -> set[str]:
    return {
        leaf.value
        for leaf in ast.walk(node)
        if isinstance(leaf, ast.Constant) and isinstance(leaf.value, str)
    }


def _literal_args(names: tuple[str, ...], index: int | str, under: str = "") -> set[str]:
    """String literals passed as positional argument `index` (or keyword `index`)."""
    found = set()
    for call in _calls(*names, under=under):
        if isinstance(index, str):
            found.update(*(_strings(k.value) for k in call.keywords if k.arg == index))
        elif len(call.args) > index:
            found |= _strings(call.args[index])
    return found


def _reason_assignments(under: str) -> set[str]:
    """Reasons chosen before the call (`reason = "a" if ... else "b"`)."""
    found = set()
    for path in (ROOT / "nbdguard" / under).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "reason" for t in node.targets
            ):
                for leaf in ast.walk(node.value):
                    if isinstance(leaf, ast.Constant) and isinstance(leaf.value, str):
                        found.add(leaf.value)
    return found


def test_limit_names_are_the_ones_the_code_counts() -> None:
    used = _literal_args(("limit_hit", "on_limit"), 0) | {MAX_CONNECTIONS, MAX_PER_CLIENT}
    assert used == set(LIMITS)


def test_handshake_reasons_are_the_ones_the_code_reports() -> None:
    closed = _literal_args(("_close",), 1) | _literal_args(("_handshake_failed",), 0)
    assert closed - {"aborted"} == set(HANDSHAKE_FAILURE_REASONS)
    assert not set(CLEAN_HANDSHAKE_ENDS) & set(HANDSHAKE_FAILURE_REASONS)


def test_chain_refusal_reasons_are_the_ones_the_code_raises() -> None:
    raised = (
        _literal_args(("ChainRefused",), 3)
        | _literal_args(("refuse",), 2)
        | _literal_args(("HeaderError",), 0)
        | _reason_assignments("storage")
    )
    assert raised == set(CHAIN_REFUSAL_REASONS)


def test_http_error_reasons_are_the_ones_the_endpoint_counts() -> None:
    under = "observability"
    counted = (
        _literal_args(("_PeerError",), 0, under)
        | _literal_args(("labels",), "reason", under)
        | _reason_assignments(under)
    )
    assert counted == set(HTTP_ERROR_REASONS)
