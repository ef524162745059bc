"""deploy/: the Kubernetes manifests, the Grafana dashboard and the Prometheus rules.

- Every manifest is valid against the Kubernetes OpenAPI schema (strict: no
  unknown field), using the schemas kubernetes-validate bundles (no network),
  for the oldest version the manifests need (1.27: gRPC probes) and the newest.
- The manifests agree with the code: ports, health names, the migrate command,
  the shutdown budget, and every Deployment has its Service and budget.
- Every metric the dashboard and the alert rules name is exported by the
  services: the names come from the /metrics endpoints of the three services
  running as processes, not from a list kept by hand.
- The alert rules are well-formed: structure and keys read from the YAML here,
  and `promtool check rules` when promtool is found (PROMTOOL or PATH); promtool
  also parses every dashboard query, wrapped as a rule.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]  # ships no py.typed
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from devtools.ports import free_port
from devtools.processes import ServiceProcess, start_service_process
from services.common import tracing
from services.common.server import LIVENESS
from services.common.settings import DEFAULT_METRICS_PORTS, DEFAULT_PORTS
from services.messages.service import DEFINITION as MESSAGES
from services.threads.service import DEFINITION as THREADS
from services.users.service import DEFINITION as USERS

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
MANIFESTS = sorted((DEPLOY / "kubernetes").glob("*.yaml"))
RULES = DEPLOY / "prometheus" / "chat-alerts.yaml"
DASHBOARD = DEPLOY / "grafana" / "chat-dashboard.json"
SERVICES = {d.name: d.full_name for d in (USERS, THREADS, MESSAGES)}
# gRPC probes are GA from 1.27; the newest is whatever the installed package bundles.
KUBERNETES_VERSIONS = ("1.27.0", kubernetes_validate.latest_version())


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def resources() -> dict[tuple[str, str], dict[str, Any]]:
    """Every resource under deploy/kubernetes by (kind, name)."""
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for path in MANIFESTS:
        for doc in documents(path):
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in found, f"{key} defined twice"
            found[key] = doc
    return found


# -- manifests ---------------------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_is_valid_kubernetes(path: Path, version: str) -> None:
    docs = documents(path)
    assert docs, f"{path.name} holds no resource"
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{path.name} {doc['kind']}/{doc['metadata']['name']}: {exc.message}")


def test_the_schema_check_refuses_a_broken_manifest() -> None:
    """The validation above would catch a typo (strict) and a wrong type."""
    deployment = resources()[("Deployment", "chat-users")]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    typo = {**container, "readinesProbe": container["readinessProbe"]}
    wrong_type = {**container, "ports": [{"containerPort": "grpc"}]}
    for broken in (typo, wrong_type):
        doc = json.loads(json.dumps(deployment))
        doc["spec"]["template"]["spec"]["containers"][0] = broken
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(doc, KUBERNETES_VERSIONS[-1], strict=True)


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    container: dict[str, Any] = containers[0]
    return container


def test_deployments_agree_with_the_services() -> None:
    found = resources()
    config = found[("ConfigMap", "chat-config")]["data"]
    secret = found[("Secret", "chat-database")]
    assert "DATABASE_URL" in secret["stringData"]
    for name, full_name in SERVICES.items():
        deployment = found[("Deployment", f"chat-{name}")]
        labels = deployment["spec"]["selector"]["matchLabels"]
        assert deployment["spec"]["template"]["metadata"]["labels"].items() >= labels.items()
        pod = deployment["spec"]["template"]["spec"]
        container = _container(deployment)
        assert container["command"] == ["python", "-m", f"services.{name}"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports == {"grpc": DEFAULT_PORTS[name], "metrics": DEFAULT_METRICS_PORTS[name]}
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/port"] == str(DEFAULT_METRICS_PORTS[name])

        # Liveness ignores the database; readiness is the service's own name.
        for probe in ("startupProbe", "livenessProbe"):
            assert container[probe]["grpc"] == {"port": DEFAULT_PORTS[name], "service": LIVENESS}
        assert container["readinessProbe"]["grpc"] == {
            "port": DEFAULT_PORTS[name],
            "service": full_name,
        }

        refs = {
            ref.get("configMapRef", ref.get("secretRef"))["name"] for ref in container["envFrom"]
        }
        assert refs == {"chat-config", "chat-database"}
        for kind in ("requests", "limits"):
            assert set(container["resources"][kind]) == {"cpu", "memory"}, (name, kind)

        # SIGTERM comes after preStop; then up to the grace for calls and as long
        # again for the pool to close (RunningService.stop), then the last spans'
        # export (tracing.EXIT_FLUSH_S) before SIGKILL.
        pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
        assert pre_stop[0] == "sleep"
        grace = float(config["SHUTDOWN_GRACE_PERIOD"])
        assert pod["terminationGracePeriodSeconds"] >= (
            float(pre_stop[1]) + 2 * grace + tracing.EXIT_FLUSH_S
        )

        service = found[("Service", f"chat-{name}")]
        assert service["spec"]["selector"] == labels
        assert {p["port"] for p in service["spec"]["ports"]} == set(ports.values())
        budget = found[("PodDisruptionBudget", f"chat-{name}")]
        assert budget["spec"]["selector"]["matchLabels"] == labels
        assert deployment["spec"]["replicas"] > budget["spec"]["maxUnavailable"]


def test_migrate_job_runs_db_up_once_at_a_time() -> None:
    job = resources()[("Job", "chat-migrate")]
    spec = job["spec"]["template"]["spec"]
    assert spec["restartPolicy"] == "Never"
    assert job["spec"].get("parallelism", 1) == 1
    container = _container(job)
    assert container["command"] == ["python", "-m", "db", "up"]
    env = {e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in container["env"]}
    assert env == {"DATABASE_URL": "chat-database"}


# -- metric names ------------------------------------------------------------

# Functions, keywords and aggregation modifiers PromQL names without braces.
_PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset",
    "and", "or", "unless", "inf", "nan",
}  # fmt: skip
_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"')
_LABEL_LISTS = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENTIFIER = re.compile(r"(?<![\w$.])([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects."""
    text = _STRINGS.sub('""', expr)  # label values and regexes
    text = _LABEL_LISTS.sub(" ", text)  # by (method), ignoring (state), ...
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges, $__rate_interval included
    text = re.sub(r"\$\w+", " ", text)  # Grafana variables
    return {name for name in _IDENTIFIER.findall(text) if name.lower() not in _PROMQL_WORDS}


def test_metric_names_parser() -> None:
    expr = (
        'sum by (le, method) (rate(chat_rpc_duration_seconds_bucket{method!~"/grpc\\\\..*"}'
        "[$__rate_interval])) / ignoring (state) chat_db_pool_waiting > 0.5 and on (instance) up"
    )
    assert metric_names(expr) == {"chat_rpc_duration_seconds_bucket", "chat_db_pool_waiting", "up"}


def rule_entries() -> list[dict[str, Any]]:
    loaded = yaml.safe_load(RULES.read_text())
    return [rule for group in loaded["groups"] for rule in group["rules"]]


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, expression) of every query of the dashboard, templating included."""
    board = json.loads(DASHBOARD.read_text())
    queries = [
        (panel["title"], target["expr"])
        for panel in board["panels"]
        for target in panel.get("targets", [])
    ]
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            inner = re.fullmatch(r"label_values\((\w+),\s*\w+\)", variable["definition"])
            assert inner, variable["definition"]
            queries.append((f"variable {variable['name']}", inner.group(1)))
    return queries


def _names_of(families: str) -> set[str]:
    """Every series name the exposition text makes queryable, with the suffixes
    Prometheus adds for each type, also for families that have no sample yet."""
    names: set[str] = set()
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_count", "_sum", "_created"),
        "summary": ("", "_count", "_sum", "_created"),
        "info": ("_info",),
    }
    for family in text_string_to_metric_families(families):
        names.update(family.name + s for s in suffixes.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        body: bytes = reply.read()
        return body.decode()


@pytest.fixture
async def exported_metrics(database_url: str) -> set[str]:
    """Every series name the three services export, read from their /metrics."""
    ports = {name: free_port() for name in SERVICES}
    procs: list[ServiceProcess] = []
    try:
        for name, port in ports.items():
            procs.append(await start_service_process(name, database_url, METRICS_PORT=str(port)))
        texts = await asyncio.gather(*(asyncio.to_thread(_scrape, p) for p in ports.values()))
    finally:
        for proc in procs:
            await proc.stop()
    names = set().union(*(_names_of(text) for text in texts))
    assert "chat_streams_open" in names  # the messages service's own metrics are there
    return names


async def test_dashboard_and_rules_name_only_exported_metrics(exported_metrics: set[str]) -> None:
    named: dict[str, set[str]] = {}
    sources = [(f"rule {r['alert']}", r["expr"]) for r in rule_entries()] + [
        (f"panel {title}", expr) for title, expr in dashboard_queries()
    ]
    for where, expr in sources:
        names = metric_names(expr)
        assert names, f"{where}: names no metric: {expr}"
        for name in names:
            named.setdefault(name, set()).add(where)
    missing = {name: sorted(where) for name, where in named.items() if name not in exported_metrics}
    assert not missing, f"named but not exported: {missing}"
    # What the issue asks them to cover: RPC errors and latency, pool saturation
    # and waiting, dropped stream events, NOTIFY queue usage.
    for wanted in (
        "chat_rpc_duration_seconds_count",
        "chat_rpc_duration_seconds_bucket",
        "chat_db_pool_connections",
        "chat_db_pool_waiting",
        "chat_stream_events_dropped_total",
        "chat_db_notify_queue_usage",
    ):
        assert any(w.startswith("rule") for w in named.get(wanted, ())), f"no rule on {wanted}"
        assert any(w.startswith("panel") for w in named.get(wanted, ())), f"no panel on {wanted}"


# -- alert rules -------------------------------------------------------------

_DURATION = re.compile(r"\d+[smhdwy]")


def _balanced(expr: str) -> bool:
    pairs = {")": "(", "]": "[", "}": "{"}
    stack: list[str] = []
    for char in _STRINGS.sub('""', expr):
        if char in "([{":
            stack.append(char)
        elif char in pairs and (not stack or stack.pop() != pairs[char]):
            return False
    return not stack


def test_alert_rules_are_well_formed() -> None:
    """The rule file's structure, read with PyYAML (promtool, when present, parses
    the expressions too: the test below)."""
    loaded = yaml.safe_load(RULES.read_text())
    assert set(loaded) == {"groups"}
    group_names = [group["name"] for group in loaded["groups"]]
    assert len(group_names) == len(set(group_names))
    alerts: list[str] = []
    for group in loaded["groups"]:
        assert set(group) <= {"name", "interval", "rules"}, group["name"]
        assert group["rules"], group["name"]
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
            assert re.fullmatch(r"Chat[A-Z][A-Za-z]+", rule["alert"]), rule["alert"]
            alerts.append(rule["alert"])
            assert isinstance(rule["expr"], str) and _balanced(rule["expr"]), rule["alert"]
            if "for" in rule:
                assert _DURATION.fullmatch(rule["for"]), rule["alert"]
            assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
            assert {"summary", "description"} <= set(rule["annotations"]), rule["alert"]
    assert len(alerts) == len(set(alerts)), "alert names repeat"


def _promtool() -> str:
    found = os.environ.get("PROMTOOL") or shutil.which("promtool")
    if not found:
        pytest.skip("promtool not found (set PROMTOOL or put it on PATH)")
    return found


def _check_rules(promtool: str, path: Path) -> None:
    result = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_accepts_the_rules() -> None:
    _check_rules(_promtool(), RULES)


def test_promtool_parses_every_dashboard_query(tmp_path: Path) -> None:
    promtool = _promtool()

    def rules() -> Iterator[dict[str, str]]:
        for i, (_, expr) in enumerate(dashboard_queries()):
            concrete = expr.replace("$__rate_interval", "5m").replace("$instance", ".*")
            yield {"record": f"chat:dashboard_query_{i}", "expr": concrete}

    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": list(rules())}]}))
    _check_rules(promtool, path)
