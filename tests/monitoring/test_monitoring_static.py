"""deploy/ parses, uses only contract metric names, and covers what the issue asks for."""

from __future__ import annotations

import json
import re

import yaml
from monitoring_support import (
    DASHBOARD,
    METRICS_DOC,
    PROMETHEUS_DIR,
    PROMETHEUS_SYNTHETIC,
    RULES,
    RULES_TEST,
    SCRAPE_CONFIG,
    Expr,
    contract_metrics,
    contract_name_for,
    dashboard_exprs,
    grafana_to_promql,
    load_dashboard,
    metric_names,
    rule_exprs,
)

REQUIRED_ALERTS = {
    "GenserveP99LatencyHigh",
    "GenserveQueueDepthRising",
    "GenserveErrorRateHigh",
    "GenserveModelNotReady",
    "GenserveNoTraffic",
    "GenserveTargetDown",
    "GenserveGpuRequestedCpuRunning",
}


def all_exprs() -> list[Expr]:
    return dashboard_exprs() + rule_exprs()


def test_metric_name_extraction() -> None:
    expr = (
        "histogram_quantile(0.99, sum by (le, model) (rate(genserve_request_duration_seconds_bucket"
        '{job=~"genserve.*", model="process_x"}[5m]))) / on (job) group_left up{job="genserve_y"}'
        " + rate(process_cpu_seconds_total[1m])"
    )
    assert metric_names(expr) == {
        "genserve_request_duration_seconds_bucket",
        "up",
        "process_cpu_seconds_total",
    }
    assert grafana_to_promql('rate(x{model=~"$model"}[$__rate_interval])') == 'rate(x{model=~".*"}[1m])'


def test_contract_table_is_read() -> None:
    contract = contract_metrics()
    assert contract["genserve_requests_total"].labels == ("model", "version", "method", "code")
    assert contract["genserve_batch_size"].type == "histogram"
    assert len(contract) >= 18


def test_dashboard_is_a_grafana_dashboard_with_a_prometheus_datasource_variable() -> None:
    dash = load_dashboard()
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for panel in dash["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"


def test_dashboard_has_the_panels_the_issue_asks_for() -> None:
    exprs = " ".join(e.promql for e in dashboard_exprs())
    titles = " ".join(p["title"].lower() for p in load_dashboard()["panels"])
    for needle in (
        "rate(genserve_requests_total",  # throughput per model
        "histogram_quantile(0.5, sum by (le, model) (rate(genserve_request_duration_seconds_bucket",
        "histogram_quantile(0.95, sum by (le, model) (rate(genserve_request_duration_seconds_bucket",
        "histogram_quantile(0.99, sum by (le, model) (rate(genserve_request_duration_seconds_bucket",
        "genserve_queue_duration_seconds",
        "genserve_compute_duration_seconds",
        "genserve_encode_duration_seconds",
        "genserve_batch_size_bucket",  # distribution
        "genserve_queue_depth",
        'code!="OK"',  # errors by code
        "genserve_gpu_utilization_ratio",
        "genserve_gpu_memory_used_bytes",
        "genserve_model_ready",
    ):
        assert needle in exprs, needle
    for title in ("throughput", "latency", "batch size", "queue depth", "errors by code", "gpu"):
        assert title in titles, title
    heatmaps = [p for p in load_dashboard()["panels"] if p["type"] == "heatmap"]
    assert heatmaps and heatmaps[0]["targets"][0]["format"] == "heatmap"


def test_every_metric_name_in_dashboard_and_rules_is_in_the_contract() -> None:
    contract = contract_metrics()
    unknown = {}
    for expr in all_exprs():
        names = metric_names(expr.promql)
        assert names, f"{expr.where}: no metric name found in {expr.promql!r}"
        for name in names:
            if name in PROMETHEUS_SYNTHETIC or name.startswith(("process_", "python_")):
                continue
            if contract_name_for(name, contract) is None:
                unknown[name] = expr.where
    assert not unknown, f"metric names not in docs/metrics-contract.md: {unknown}"


def test_dashboard_exprs_select_by_the_variables() -> None:
    for expr in dashboard_exprs():
        if expr.where.startswith("variable"):
            continue
        assert "$job" in expr.promql, f"{expr.where} ignores $job"
        if "rate(" in expr.promql or "increase(" in expr.promql:
            assert "$__rate_interval" in expr.promql, f"{expr.where} hard-codes its rate window"
        grafana_to_promql(expr.promql)  # no unknown variable


def test_alert_rules_have_for_severity_and_annotations() -> None:
    data = yaml.safe_load(RULES.read_text())
    rules = {r["alert"]: r for g in data["groups"] for r in g["rules"] if "alert" in r}
    assert REQUIRED_ALERTS <= set(rules)
    for name, rule in rules.items():
        assert re.fullmatch(r"\d+[smh]", str(rule.get("for", ""))), f"{name}: needs for:"
        assert rule["labels"]["severity"] in {"info", "warning", "critical"}, name
        # runbook_url: the annotation name Alertmanager, Grafana and PagerDuty integrations link.
        for key in ("summary", "description", "runbook_url"):
            assert rule["annotations"].get(key), f"{name}: annotation {key} missing"
        assert "runbook" not in rule["annotations"], f"{name}: use runbook_url"
        anchor = rule["annotations"]["runbook_url"].split("#", 1)[1]
        assert anchor in runbook_anchors(), f"{name}: runbook anchor #{anchor} not in docs/metrics.md"


def runbook_anchors() -> set[str]:
    """GitHub-style anchors of the headings of docs/metrics.md."""
    anchors = set()
    for line in METRICS_DOC.read_text().splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^a-z0-9 _-]", "", title).replace(" ", "-"))
    return anchors


def test_rule_unit_tests_cover_latency_and_readiness() -> None:
    data = yaml.safe_load(RULES_TEST.read_text())
    assert data["rule_files"] == [RULES.name]
    firing: set[str] = set()
    silent: set[str] = set()
    for case in data["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check["exp_alerts"] else silent).add(check["alertname"])
    assert {"GenserveP99LatencyHigh", "GenserveModelNotReady"} <= firing
    assert silent, "at least one case must show an alert not firing"


def test_scrape_config_points_at_genserve_and_loads_the_rules() -> None:
    data = yaml.safe_load(SCRAPE_CONFIG.read_text())
    assert RULES.name in data["rule_files"]
    jobs = {job["job_name"]: job for job in data["scrape_configs"]}
    assert "genserve" in jobs
    k8s = yaml.safe_load((PROMETHEUS_DIR / "kubernetes-scrape.yml").read_text())
    (job,) = k8s["scrape_configs"]
    assert job["job_name"].startswith("genserve")
    assert job["kubernetes_sd_configs"] == [{"role": "pod"}]


def test_metrics_doc_documents_every_contract_metric() -> None:
    doc = METRICS_DOC.read_text()
    missing = [name for name in contract_metrics() if f"`{name}`" not in doc]
    assert not missing, f"docs/metrics.md does not document {missing}"


def test_dashboard_json_is_canonical() -> None:
    # Two-space JSON with a final newline, so diffs of UI exports stay readable.
    text = DASHBOARD.read_text()
    assert text == json.dumps(json.loads(text), indent=2) + "\n"


def _panel_exprs() -> list[Expr]:
    return [e for e in dashboard_exprs() if not e.where.startswith("variable")]


def test_dashboard_has_a_per_pod_variable_every_panel_selects_by() -> None:
    variables = {v["name"]: v for v in load_dashboard()["templating"]["list"]}
    assert "instance" in variables and variables["instance"]["includeAll"]
    for expr in _panel_exprs():
        assert 'instance=~"$instance"' in expr.promql, f"{expr.where} ignores the pod variable"


def test_dashboard_latency_leaves_out_sample_stream_like_the_alert() -> None:
    """A bulk SampleStream is one RPC of minutes: mixed into unary latency it hides everything."""
    latency = [e for e in _panel_exprs() if "genserve_request_duration_seconds" in e.promql]
    assert latency
    for expr in latency:
        assert re.search(r'method!~"[^"]*SampleStream', expr.promql), expr.where


def test_dashboard_error_ratio_counts_the_server_side_codes_of_the_alert() -> None:
    data = yaml.safe_load(RULES.read_text())
    (alert,) = [r for g in data["groups"] for r in g["rules"] if r.get("alert") == "GenserveErrorRateHigh"]
    codes = re.search(r'code=~"([^"]+)"', alert["expr"])
    assert codes is not None
    (ratio,) = [p for p in load_dashboard()["panels"] if "error ratio" in p["title"].lower()]
    (target,) = ratio["targets"]
    assert f'code=~"{codes[1]}"' in target["expr"]
    assert 'code!="OK"' not in target["expr"]


def test_dashboard_shows_the_image_cache_and_the_runtime() -> None:
    exprs = " ".join(e.promql for e in _panel_exprs())
    for name in (
        "genserve_image_cache_lookups_total",
        "genserve_image_cache_bytes",
        "genserve_model_runtime_info",
        "genserve_batch_max_rows",
    ):
        assert name in exprs, name
