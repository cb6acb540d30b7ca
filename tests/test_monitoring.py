"""The chart's monitoring objects: the PrometheusRule passes `promtool check rules` and its alerts fire
when they should (`promtool test rules`, tests/data/promtool/alerts-test.yaml: the missed nightly
merge first); the Grafana dashboard is valid JSON, with unique panel ids, and asks only for metrics
the operator exports; the ServiceMonitor takes relabelings."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from privatefm_testing.cluster import BIN

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "privatefm-operator"
DASHBOARD = CHART / "files" / "dashboards" / "privatefm.json"
PROMTOOL = BIN / "promtool"


def render(*args: str) -> list[dict[str, Any]]:
    out = subprocess.run([str(BIN / "helm"), "template", "privatefm-operator", str(CHART), "--namespace",
                          "privatefm-system", *args], capture_output=True, text=True, check=True, timeout=120).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def of_kind(objs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objs if o.get("kind") == kind]


def exported_metrics() -> set[str]:
    """Every sample name the operator's registry can expose (counters as _total, histograms as
    _bucket/_sum/_count)."""
    from privatefm_operator import metrics
    from prometheus_client import REGISTRY

    assert metrics.LEARNER_GAUGES  # imported: registered
    names = set()
    for family in REGISTRY.collect():
        if not family.name.startswith("privatefm_"):
            continue
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(family.type, [""])
        names |= {family.name + s for s in suffixes}
    return names


@pytest.fixture(scope="module")
def rules(tmp_path_factory: pytest.TempPathFactory) -> Path:
    objs = render("--set", "prometheusRule.enabled=true")
    (rule,) = of_kind(objs, "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    work = tmp_path_factory.mktemp("promtool")
    (work / "rules.yaml").write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    shutil.copy(REPO / "tests" / "data" / "promtool" / "alerts-test.yaml", work / "alerts-test.yaml")
    return work


def promtool(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    if not PROMTOOL.exists():
        pytest.fail(f"{PROMTOOL} is missing: run scripts/build-tools.sh")
    return subprocess.run([str(PROMTOOL), *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_no_monitoring_objects_by_default() -> None:
    objs = render()
    assert not of_kind(objs, "PrometheusRule") and not of_kind(objs, "ServiceMonitor")
    assert not [o for o in of_kind(objs, "ConfigMap") if o["metadata"]["name"].endswith("-dashboard")]


def test_the_rule_has_every_promised_alert(rules: Path) -> None:
    groups = yaml.safe_load((rules / "rules.yaml").read_text())["groups"]
    alerts = {r["alert"]: r for g in groups for r in g["rules"]}
    assert set(alerts) == {"PrivatefmMergeMissed", "PrivatefmMergesFailing", "PrivatefmVersionLagAboveLimit",
                           "PrivatefmFallbackSpike", "PrivatefmOperatorDown", "PrivatefmReconcileErrors"}
    assert "> 26 * 3600" in alerts["PrivatefmMergeMissed"]["expr"]
    assert 'up{job="privatefm-operator", namespace="privatefm-system"}' in alerts["PrivatefmOperatorDown"]["expr"]
    for alert in alerts.values():
        used = set(re.findall(r"\bprivatefm_[a-z_]+", alert["expr"]))
        assert used <= exported_metrics(), (alert["alert"], used - exported_metrics())


def test_promtool_check_rules(rules: Path) -> None:
    proc = promtool("check", "rules", "rules.yaml", cwd=rules)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS: 6 rules found" in proc.stdout, proc.stdout


def test_promtool_test_rules_the_missed_merge_alert_fires(rules: Path) -> None:
    proc = promtool("test", "rules", "alerts-test.yaml", cwd=rules)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_promtool_test_rules_fails_when_the_alert_would_not_fire(rules: Path) -> None:
    """The evaluation test has teeth: with a 48 h threshold the missed-merge expectation fails."""
    text = (rules / "rules.yaml").read_text().replace("> 26 * 3600", "> 48 * 3600")
    (rules / "rules.yaml").write_text(text)
    try:
        proc = promtool("test", "rules", "alerts-test.yaml", cwd=rules)
        assert proc.returncode != 0 and "PrivatefmMergeMissed" in proc.stdout + proc.stderr
    finally:
        (rules / "rules.yaml").write_text(text.replace("> 48 * 3600", "> 26 * 3600"))


def panel_exprs(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def test_dashboard_lint() -> None:
    dashboard = json.loads(DASHBOARD.read_text())  # valid JSON
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    assert dashboard["uid"] and dashboard["title"]
    exported = exported_metrics()
    exprs = panel_exprs(dashboard) + [v["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    assert exprs
    for expr in exprs:
        used = set(re.findall(r"\bprivatefm_[a-z_]+", expr))
        assert used or re.search(r"\bup\{", expr), f"{expr!r} reads none of the operator's metrics (nor its up)"
        assert used <= exported, f"{expr!r} reads {used - exported}, which the operator does not export"
    # every per-learner gauge is on the dashboard
    text = DASHBOARD.read_text()
    assert all(name in text for name in ("privatefm_learner_last_merge_success_timestamp_seconds",
                                         "privatefm_learner_version_lag", "privatefm_learner_checkpoint_version"))


def test_dashboard_configmap_carries_the_file() -> None:
    (cm,) = [o for o in of_kind(render("--set", "grafanaDashboard.enabled=true"), "ConfigMap")
             if o["metadata"]["name"].endswith("-dashboard")]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["privatefm.json"]) == json.loads(DASHBOARD.read_text())


def test_service_monitor_relabelings() -> None:
    (monitor,) = of_kind(render("-f", str(CHART / "ci" / "monitoring-values.yaml")), "ServiceMonitor")
    endpoint = monitor["spec"]["endpoints"][0]
    assert endpoint["relabelings"][0]["targetLabel"] == "node"
    assert endpoint["metricRelabelings"][0]["action"] == "drop"
    (plain,) = of_kind(render("--set", "serviceMonitor.enabled=true"), "ServiceMonitor")
    assert "relabelings" not in plain["spec"]["endpoints"][0]


def test_healthz_is_what_kopf_liveness_says() -> None:
    """/healthz passes kopf's liveness answer on: 200 only when kopf answers 200; a probe handler that
    raises (kopf answers 500) or a loop that does not answer makes it 503."""
    import threading
    import urllib.error
    import urllib.request
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from privatefm_operator import metrics
    from privatefm_testing.cluster import free_port

    answer = {"code": 200}

    class Kopf(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b'{"reconcilers": true}' if answer["code"] == 200 else b"probe failed"
            self.send_response(answer["code"])
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    kopf_server = ThreadingHTTPServer(("127.0.0.1", free_port()), Kopf)
    threading.Thread(target=kopf_server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{kopf_server.server_address[1]}/healthz"
    live = {"url": url}
    ours = metrics.start_http_server(free_port(), ready=lambda: True,
                                     alive=lambda: metrics.kopf_liveness(live["url"], timeout=2), host="127.0.0.1")
    healthz = f"http://127.0.0.1:{ours.server_address[1]}/healthz"

    def status() -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(healthz, timeout=5) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()
    try:
        assert status() == (200, b'{"reconcilers": true}')
        answer["code"] = 500
        code, body = status()
        assert code == 503 and b"HTTP 500" in body
        live["url"] = f"http://127.0.0.1:{free_port()}/healthz"  # nothing listens: the loop is gone
        code, body = status()
        assert code == 503 and b"does not answer" in body
    finally:
        ours.shutdown()
        kopf_server.shutdown()
