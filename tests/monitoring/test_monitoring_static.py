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
    REPO,
    RULES,
    RULES_TEST,
    SCRAPE_CONFIG,
    ContractMetric,
    Expr,
    _walk_panels,
    contract_metrics,
    contract_name_for,
    dashboard_exprs,
    grafana_to_promql,
    load_dashboard,
    metric_names,
    relabel,
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


def test_the_kubernetes_scrape_config_scrapes_the_annotated_port_of_ipv4_and_ipv6_pods() -> None:
    """kubernetes_sd gives a declared container port's target `__address__` "<pod IP>:<port>", an
    IPv6 pod IP in brackets: the annotated port replaces the port, both families."""
    (job,) = yaml.safe_load((PROMETHEUS_DIR / "kubernetes-scrape.yml").read_text())["scrape_configs"]
    pod = {
        "__meta_kubernetes_pod_label_app_kubernetes_io_name": "genserve",
        "__meta_kubernetes_pod_annotation_prometheus_io_scrape": "true",
        "__meta_kubernetes_pod_annotation_prometheus_io_port": "50052",
        "__meta_kubernetes_pod_annotation_prometheus_io_path": "/metrics",
    }
    for address, expected in (
        ("10.0.0.7:50051", "10.0.0.7:50052"),
        ("10.0.0.7:50053", "10.0.0.7:50052"),
        ("[fd00::1]:50051", "[fd00::1]:50052"),
        ("[fd00:10:244::7]:50053", "[fd00:10:244::7]:50052"),
        ("[::ffff:10.0.0.7]:50051", "[::ffff:10.0.0.7]:50052"),
    ):
        target = relabel({**pod, "__address__": address}, job["relabel_configs"])
        assert target is not None and target["__address__"] == expected, (address, target)
        assert target["__metrics_path__"] == "/metrics"
    opted_out = {**pod, "__meta_kubernetes_pod_annotation_prometheus_io_scrape": "false"}
    assert relabel(opted_out, job["relabel_configs"]) is None


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


def test_the_error_ratio_leaves_out_streams_ended_for_unread_clients_in_alert_dashboard_and_docs() -> None:
    """A stream the server ends because its client stopped reading is RESOURCE_EXHAUSTED, a
    server-side code, and also a drop `unread`: the alert, the dashboard's ratio and the docs' query
    subtract those drops, so that one client that stopped reading does not page as a server fault."""
    from genserve_server.metrics import DROP_REASONS

    data = yaml.safe_load(RULES.read_text())
    (alert,) = [r for g in data["groups"] for r in g["rules"] if r.get("alert") == "GenserveErrorRateHigh"]
    (ratio,) = [p for p in load_dashboard()["panels"] if "error ratio" in p["title"].lower()]
    queries = METRICS_DOC.read_text().split("### Useful queries", 1)[1].split("```", 2)[1]
    unread = re.compile(r'genserve_requests_dropped_total\{[^}]*reason="unread"')
    exprs = {"alert": alert["expr"], "dashboard": ratio["targets"][0]["expr"], "docs": queries}
    for where, promql in exprs.items():
        assert unread.search(promql), f"{where}: does not subtract the unread drops: {promql}"
    assert "unread" in DROP_REASONS


def test_dashboard_shows_the_image_cache_and_the_runtime() -> None:
    exprs = " ".join(e.promql for e in _panel_exprs())
    for name in (
        "genserve_image_cache_lookups_total",
        "genserve_image_cache_bytes",
        "genserve_model_runtime_info",
        "genserve_batch_max_rows",
    ):
        assert name in exprs, name


# --- label names and values -------------------------------------------------------------------

# Labels Prometheus adds to every series of a target (the shipped scrape configs and the PodMonitor).
TARGET_LABELS = frozenset({"job", "instance", "namespace", "pod", "container", "endpoint", "service", "node"})
_SELECTOR = re.compile(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^}]*)\}")
_MATCHER = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*,?')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")


def _emitted_values() -> dict[tuple[str, str], frozenset[str]]:
    """{(metric, label): every value the server can give that label}, from the server's own tuples."""
    from genserve_contract.config import KNOWN_PROVIDERS
    from genserve_server import metrics as m
    from genserve_server.batch_events import BATCH_CLOSE_REASONS
    from genserve_server.batcher import Lane

    methods = frozenset(m.METHODS)
    return {
        ("genserve_requests_total", "code"): frozenset(m.GRPC_CODES),
        ("genserve_requests_total", "method"): methods | {m.UNKNOWN_METHOD_LABEL},
        ("genserve_request_duration_seconds", "method"): methods,
        ("genserve_requests_in_flight", "method"): methods,
        ("genserve_queue_duration_seconds", "lane"): frozenset(lane.name.lower() for lane in Lane),
        ("genserve_encode_duration_seconds", "format"): frozenset(m.FORMATS),
        ("genserve_requests_rejected_total", "reason"): frozenset(m.REJECT_REASONS),
        ("genserve_requests_dropped_total", "reason"): frozenset(m.DROP_REASONS),
        ("genserve_batches_closed_total", "reason"): frozenset(BATCH_CLOSE_REASONS),
        ("genserve_image_cache_lookups_total", "result"): frozenset({"hit", "miss"}),
        ("genserve_model_runtime_info", "gpu_requested"): frozenset({"true", "false"}),
        ("genserve_model_runtime_info", "provider"): frozenset(KNOWN_PROVIDERS),
        ("genserve_model_runtime_info", "precision"): frozenset({"fp32", "fp16"}),
    }


def _alternatives(value: str) -> list[str] | None:
    """The literal values a matcher names (`A|B|C`), or None for a pattern that is not a plain list."""
    if "$" in value or re.search(r"[.*+?()\[\]{}^\\]", value):
        return None
    return value.split("|")


def test_every_label_in_dashboard_and_rules_is_one_the_metric_has_with_a_value_it_takes() -> None:
    """Metric names alone are not enough: `code="INTERNAL_ERROR"`, `reason="queue-full"` or `by (modle)`
    select nothing, and a panel or an alert over nothing is silently empty."""
    contract = contract_metrics()
    values = _emitted_values()
    problems = []
    for expr in all_exprs():
        labels_in_expr: set[str] = set(TARGET_LABELS)
        for match in _SELECTOR.finditer(expr.promql):
            sample_name, body = match[1], match[2]
            name = contract_name_for(sample_name, contract)
            if name is None:
                continue  # up, process_*: Prometheus' and the client library's own
            allowed = set(contract[name].labels) | TARGET_LABELS
            if sample_name.endswith("_bucket"):
                allowed.add("le")
            labels_in_expr |= allowed
            matchers = _MATCHER.findall(body)
            assert "".join(f'{k}{op}"{v}",' for k, op, v in matchers).replace(",", "") == re.sub(
                r"[\s,]", "", body
            ), f"{expr.where}: cannot read the matchers of {body!r}"
            for label, op, value in matchers:
                if label not in allowed:
                    problems.append(f"{expr.where}: {sample_name} has no label {label!r}")
                    continue
                known = values.get((name, label))
                alternatives = _alternatives(value) if known is not None and op in ("=", "=~", "!~") else None
                for alt in alternatives or []:
                    if known is not None and alt and alt not in known:
                        problems.append(f"{expr.where}: {name} never has {label}={alt!r}")
        for sample_name in metric_names(expr.promql):  # bare names too: `x == 0 unless on (model) y`
            name = contract_name_for(sample_name, contract)
            if name is not None:
                labels_in_expr |= set(contract[name].labels) | (
                    {"le"} if sample_name.endswith("_bucket") else set()
                )
        for group in _GROUPING.findall(expr.promql):
            for label in (g.strip() for g in group.split(",")):
                if label and label not in labels_in_expr:
                    problems.append(f"{expr.where}: groups by {label!r}, a label none of its metrics has")
    assert not problems, "\n".join(problems)


def test_the_label_check_is_not_vacuous() -> None:
    contract = contract_metrics()
    assert set(contract["genserve_requests_total"].labels) >= {"code", "method"}
    values = _emitted_values()
    assert "INTERNAL" in values[("genserve_requests_total", "code")]
    assert "INTERNAL_ERROR" not in values[("genserve_requests_total", "code")]
    assert _alternatives("INTERNAL|UNKNOWN") == ["INTERNAL", "UNKNOWN"]
    assert _alternatives("$method") is None and _alternatives("(.+/)?genserve.*") is None
    assert _MATCHER.findall('job=~"$job", code!="OK"') == [("job", "=~", "$job"), ("code", "!=", "OK")]


def _result_labels(promql: str, contract: dict[str, ContractMetric]) -> set[str] | None:
    """The labels an expression's series carry, for the shapes the dashboard uses: an aggregation
    `agg by (L) (...)` (inside histogram_quantile or not, and also as the left side of `/`, `and`)
    carries L (less `le` under histogram_quantile), `agg (...)` nothing, a plain selector or rate its
    metric's labels, `label_replace(...)` those of its inner expression and its destination label;
    None when the shape is another one."""
    text = " ".join(promql.split()).lstrip("(")
    replaced = re.fullmatch(r'label_replace\((.*),\s*"(\w+)",\s*"[^"]*",\s*"\w*",\s*"[^"]*"\)', text)
    if replaced:
        inner = _result_labels(replaced[1], contract)
        return None if inner is None else inner | {replaced[2]}
    quantile = re.match(r"histogram_quantile\([^,]+,\s*", text)
    if quantile:
        text = text[quantile.end() :]
    agg = re.match(r"(?:sum|max|min|avg|count)\s*(?:by\s*\(([^)]*)\))?\s*\(", text)
    if agg:
        labels = {lbl.strip() for lbl in (agg[1] or "").split(",") if lbl.strip()}
        return labels - {"le"} if quantile else labels
    selector = re.match(r"(?:rate\()?([a-zA-Z_:][a-zA-Z0-9_:]*)\{", text)
    if selector:
        name = contract_name_for(selector[1], contract)
        return set(TARGET_LABELS) | (set(contract[name].labels) if name else set())
    return None


def test_every_legend_names_a_label_its_query_returns() -> None:
    """`{{model}}` over `sum by (method) (...)` is an empty legend: every series looks alike."""
    contract = contract_metrics()
    problems = []
    for panel in load_dashboard()["panels"]:
        for target in panel.get("targets", []):
            legend = target.get("legendFormat") or ""
            used = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", legend))
            if not used:
                continue
            returned = _result_labels(target["expr"], contract)
            assert returned is not None, f"{panel['title']!r} {target['refId']}: unknown query shape"
            if target.get("format") == "heatmap":
                returned = returned | {"le"}
            if used - returned:
                problems.append(
                    f"{panel['title']!r} {target['refId']}: legend {legend!r} needs {used - returned}"
                )
    assert not problems, "\n".join(problems)


def test_the_rejected_and_dropped_panel_says_what_they_count_today() -> None:
    """genserve_requests_rejected_total{reason="invalid"} also counts an INVALID_ARGUMENT found after
    the model ran (a response over the send limit), and genserve_requests_dropped_total a call that
    left while it waited for a memory budget and a code prior's rows leaving its running set between
    steps: neither is all "at admission" / "removed from the queue", as the panel said."""
    (panel,) = [
        p for p in _walk_panels(load_dashboard()["panels"]) if p["title"] == "Rejected, dropped and failed"
    ]
    text = panel["description"].lower()
    for words in ("after the model ran", "memory budget", "running set"):
        assert words in text, f"the panel's description does not say {words!r}: {panel['description']!r}"


def test_the_docs_server_side_error_ratio_counts_the_codes_of_the_alert() -> None:
    """docs/metrics.md's "Useful queries" gave a server-side error ratio without DATA_LOSS: another
    number than the one GenserveErrorRateHigh and the dashboard page on."""
    data = yaml.safe_load(RULES.read_text())
    (alert,) = [r for g in data["groups"] for r in g["rules"] if r.get("alert") == "GenserveErrorRateHigh"]
    codes = re.search(r'code=~"([^"]+)"', alert["expr"])
    assert codes is not None
    queries = METRICS_DOC.read_text().split("### Useful queries", 1)[1].split("```", 2)[1]
    found = re.findall(r'code=~"([^"]+)"', queries)
    assert found and all(set(f.split("|")) == set(codes[1].split("|")) for f in found), (found, codes[1])


def test_the_model_readiness_panel_says_what_a_0_means_today() -> None:
    """genserve_model_ready is 0 also for a READY style generator (code prior) whose mapping
    (decoder) cannot serve, and a 0 pages (GenserveModelNotReady) only where no version of the model
    is ready; GenserveModelVersionNotReady warns for one beside a ready version. The panel said
    only "1 ready, 0 not ready", which a READY version in GetModel seems to contradict."""
    (panel,) = [p for p in _walk_panels(load_dashboard()["panels"]) if p["title"] == "Model readiness"]
    text = panel["description"]
    for words in ("mapping", "decoder", "GenserveModelNotReady", "GenserveModelVersionNotReady"):
        assert words in text, f"the panel's description does not say {words!r}: {text!r}"


def test_the_docs_latency_query_leaves_out_the_methods_the_alert_leaves_out() -> None:
    """docs/metrics.md's "Useful queries" gave the p99 per model over every method: a bulk
    SampleStream (one RPC of minutes), a SampleCodes (seconds of prior steps by design) and
    ListModels/GetModel mixed into it, another number than GenserveP99LatencyHigh and the
    dashboard's latency panels show."""
    data = yaml.safe_load(RULES.read_text())
    (alert,) = [r for g in data["groups"] for r in g["rules"] if r.get("alert") == "GenserveP99LatencyHigh"]
    excluded = re.search(r'method!~"([^"]+)"', alert["expr"])
    assert excluded is not None
    queries = METRICS_DOC.read_text().split("### Useful queries", 1)[1].split("```", 2)[1]
    latency = [line for line in queries.splitlines() if "genserve_request_duration_seconds" in line]
    assert latency
    for line in latency:
        found = re.search(r'method!~"([^"]+)"', line)
        assert found is not None and set(found[1].split("|")) == set(excluded[1].split("|")), line


def test_the_docs_list_every_dashboard_row_and_the_methods_its_latency_leaves_out() -> None:
    """docs/metrics.md's tour of the dashboard named seven of its nine rows (not "Code priors" nor
    "Batch caps and memory budgets") and said the latency panels leave out SampleStream, ListModels
    and GetModel only, where they, as the alert, also leave out SampleCodesStream and SampleCodes."""
    tour = METRICS_DOC.read_text().split("Its rows:", 1)[1].split("\n\n", 1)[0]
    tour = " ".join(tour.split())
    rows = [p["title"] for p in load_dashboard()["panels"] if p["type"] == "row"]
    missing = [title for title in rows if f"**{title.split(' (')[0]}**" not in tour]
    assert not missing, f"docs/metrics.md does not name the rows {missing}"
    latency = tour.split("**Latency**", 1)[1].split("**", 1)[0]
    data = yaml.safe_load(RULES.read_text())
    (alert,) = [r for g in data["groups"] for r in g["rules"] if r.get("alert") == "GenserveP99LatencyHigh"]
    excluded = re.search(r'method!~"([^"]+)"', alert["expr"])
    assert excluded is not None
    unnamed = [m for m in excluded[1].split("|") if not re.search(rf"\b{m}\b", latency)]
    assert not unnamed, f"the Latency row's text does not say it leaves out {unnamed}: {latency!r}"


def test_the_images_per_second_panel_and_the_docs_say_an_image_counts_under_each_model_it_passed() -> None:
    """genserve_images_total counts the rows each model computed: a code prior's image counts under
    the prior, its top prior and its decoder (a style generator's under its mapping too), so the
    models' rates added up are not the images clients got. The panel and the docs said only
    "images (or tiles) computed", which reads as images served."""
    (panel,) = [p for p in _walk_panels(load_dashboard()["panels"]) if p["title"] == "Images per second"]
    prefix = "| `genserve_images_total`"
    rows = {
        doc.name: [line for line in doc.read_text().splitlines() if line.startswith(prefix)]
        for doc in (METRICS_DOC, REPO / "README.md")
    }
    texts = {"panel": panel["description"], **{name: " ".join(lines) for name, lines in rows.items()}}
    assert all(len(lines) == 1 for lines in rows.values()), rows
    for where, text in texts.items():
        for words in ("top prior", "decoder", "mapping", "do not add up"):
            assert words in text, f"{where} does not say {words!r}: {text!r}"
