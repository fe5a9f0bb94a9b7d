"""A real Prometheus scrapes a live genserve during traffic; the dashboard's and the rules' PromQL
runs against it, and promtool checks and unit-tests the rules.

Needs `prometheus` and `promtool` on PATH (scripts/install_prometheus.sh). Without them the tests
skip with the reason printed, except under CI=true, where they fail.
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from monitoring_support import (
    PROMETHEUS_DIR,
    REPO,
    RULES,
    RULES_TEST,
    MonitoredServer,
    TrafficStats,
    dashboard_exprs,
    drive_sample_traffic,
    grafana_to_promql,
    rule_exprs,
    skip_or_fail_without_prometheus,
)
from port_support import HeldPort

pytestmark = pytest.mark.prometheus

P99_QUERY = "histogram_quantile(0.99, sum by (le) (rate(genserve_request_duration_seconds_bucket[30s])))"


class Prometheus:
    def __init__(self, binary: str, workdir: Path, metrics_port: int) -> None:
        # Its web port, held (not listening) from here to stop(): Prometheus binds it with
        # SO_REUSEADDR, no one else can meanwhile (a port found free and let go could be the other
        # pytest worker's server's by then: "bind: address already in use").
        self._port = HeldPort(reuse_addr=True)
        self.port = self._port.port
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [
                {"job_name": "genserve", "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}]}
            ],
        }
        config_path = workdir / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config))
        self.log_path = workdir / "prometheus.log"
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config_path}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    f"--storage.tsdb.path={workdir / 'data'}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def wait_ready(self, timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"prometheus exited ({self.proc.returncode}):\n{self.log_path.read_text()}"
                )
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError):
                pass
            time.sleep(0.1)
        raise RuntimeError(f"prometheus not ready in {timeout_s} s:\n{self.log_path.read_text()}")

    def api(self, path: str, **params: str) -> dict[str, Any]:
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                body: dict[str, Any] = json.loads(response.read())
        except urllib.error.HTTPError as err:  # 400/422 carry the PromQL error as JSON
            body = json.loads(err.read())
        return body

    def query(self, promql: str) -> dict[str, Any]:
        return self.api("query", query=promql)

    def wait_for_result(self, promql: str, timeout_s: float) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout_s
        last: dict[str, Any] = {}
        while time.monotonic() < deadline:
            last = self.query(promql)
            assert last["status"] == "success", last
            if last["data"]["result"]:
                return list(last["data"]["result"])
            time.sleep(0.5)
        raise AssertionError(f"no result for {promql!r} in {timeout_s} s; last answer {last}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # by PID: Popen.terminate sends SIGTERM to this child only
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._port.close()


@pytest.fixture(scope="module")
def prometheus_paths() -> tuple[str, str]:
    """(prometheus, promtool): skipped, or failed under CI=true, before any server starts."""
    return skip_or_fail_without_prometheus()


@pytest.fixture(scope="module")
def promtool(prometheus_paths: tuple[str, str]) -> str:
    return prometheus_paths[1]


@pytest.fixture(scope="module")
def prometheus_with_traffic(
    prometheus_paths: tuple[str, str],
    monitored_server: MonitoredServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Prometheus, TrafficStats]]:
    """Prometheus scraping the server every second while Sample traffic runs for a few seconds."""
    assert monitored_server.metrics_port is not None
    prometheus = Prometheus(
        prometheus_paths[0], tmp_path_factory.mktemp("prometheus"), monitored_server.metrics_port
    )
    try:
        prometheus.wait_ready()
        prometheus.wait_for_result('up{job="genserve"} == 1', timeout_s=10)
        stats: list[TrafficStats] = []
        traffic = threading.Thread(
            target=lambda: stats.append(
                drive_sample_traffic(
                    monitored_server.target, [1, 3, 8, 2, 5], concurrency=4, stop_at=time.monotonic() + 6
                )
            )
        )
        traffic.start()
        # Two scrapes that both saw traffic give rate() something to work with.
        prometheus.wait_for_result(P99_QUERY + " > 0", timeout_s=15)
        traffic.join()
        ended = time.time()
        # One more scrape after the last request: Prometheus stamps a sample with its scrape's start.
        prometheus.wait_for_result(f'timestamp(up{{job="genserve"}}) > {ended:.3f}', timeout_s=15)
        yield prometheus, stats[0]
    finally:
        prometheus.stop()


def test_p99_latency_from_prometheus_is_non_empty(
    prometheus_with_traffic: tuple[Prometheus, TrafficStats],
) -> None:
    prometheus, stats = prometheus_with_traffic
    assert stats.ok_requests > 0 and set(stats.codes) == {"OK"}, stats.codes
    answer = prometheus.query(P99_QUERY)
    assert answer["status"] == "success", answer
    result = answer["data"]["result"]
    assert result, answer
    p99 = float(result[0]["value"][1])
    assert 0 < p99 <= 30, p99
    # Counters through Prometheus agree with the traffic too.
    requests = prometheus.query('sum(genserve_requests_total{method="Sample", code="OK"})')["data"]["result"]
    assert float(requests[0]["value"][1]) >= stats.ok_requests


def test_every_dashboard_and_rule_expression_runs(
    prometheus_with_traffic: tuple[Prometheus, TrafficStats],
) -> None:
    prometheus, _ = prometheus_with_traffic
    errors = {}
    empty = []
    for expr in dashboard_exprs() + rule_exprs():
        promql = grafana_to_promql(expr.promql, rate_interval="30s")
        answer = prometheus.query(promql)
        if answer.get("status") != "success":
            errors[expr.where] = f"{answer.get('errorType')}: {answer.get('error')} in {promql!r}"
        elif not answer["data"]["result"]:
            empty.append(expr.where)
    assert not errors, errors
    # Panels fed by the traffic just sent must show data.
    for where in (
        "panel 'Throughput per model' target A",
        "panel 'End-to-end latency p50 / p95 / p99' target C",
        "panel 'Batch size distribution' target A",
        "panel 'Where the time goes: mean per stage' target B",
    ):
        assert where not in empty, f"{where} returned no data after traffic"


def test_rules_load_and_evaluate_in_prometheus(
    prometheus_with_traffic: tuple[Prometheus, TrafficStats],
) -> None:
    prometheus, _ = prometheus_with_traffic
    deadline = time.monotonic() + 10
    while True:
        groups = prometheus.api("rules")["data"]["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        if rules and all(rule.get("lastEvaluation", "").startswith("20") for rule in rules):
            break
        assert time.monotonic() < deadline, f"rules not evaluated: {rules}"
        time.sleep(0.5)
    assert {r["name"] for r in rules} >= {
        "GenserveP99LatencyHigh",
        "GenserveModelNotReady",
        "GenserveNoTraffic",
    }
    bad = {r["name"]: r.get("lastError") for r in rules if r.get("health") != "ok"}
    assert not bad, bad
    # The tiny model is ready and serving: the readiness alert stays quiet.
    firing = {a["labels"]["alertname"] for a in prometheus.api("alerts")["data"]["alerts"]}
    assert "GenserveModelNotReady" not in firing


def test_promtool_check_rules(promtool: str) -> None:
    result = subprocess.run(
        [promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_test_rules_latency_and_readiness_fire(promtool: str) -> None:
    result = subprocess.run(
        [promtool, "test", "rules", RULES_TEST.name],
        cwd=RULES_TEST.parent,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def shipped_scrape_jobs() -> dict[str, str]:
    """The `job` label each shipped scrape config gives genserve's targets.

    prometheus-operator names a PodMonitor's job "<namespace>/<PodMonitor name>" (no jobLabel set):
    the namespace is wherever it is applied, so two usual ones are tried.
    """
    podmonitor = yaml.safe_load((REPO / "deploy" / "k8s" / "podmonitor.yaml").read_text())
    assert "jobLabel" not in podmonitor["spec"], "a jobLabel changes the job label: update this test"
    jobs = {f"PodMonitor in {ns}": f"{ns}/{podmonitor['metadata']['name']}" for ns in ("default", "serving")}
    for config in ("prometheus.yml", "kubernetes-scrape.yml"):
        data = yaml.safe_load((PROMETHEUS_DIR / config).read_text())
        for job in data["scrape_configs"]:
            jobs[config] = job["job_name"]
    return jobs


def test_target_down_fires_for_the_job_label_of_every_shipped_scrape_config(
    promtool: str, tmp_path: Path
) -> None:
    """GenserveTargetDown matched job=~"genserve.*" and so never fired under the PodMonitor."""
    jobs = shipped_scrape_jobs()
    rules = yaml.safe_load(RULES.read_text())
    (rule,) = [r for g in rules["groups"] for r in g["rules"] if r.get("alert") == "GenserveTargetDown"]
    cases = []
    for job in jobs.values():
        labels = {"job": job, "instance": "10.0.0.7:50052", "namespace": "serving", "pod": "genserve-0"}
        selector = ",".join(f'{k}="{v}"' for k, v in labels.items())
        cases.append(
            {
                "interval": "1m",
                "input_series": [{"series": f"up{{{selector}}}", "values": "1 1 0 0 0 0 0"}],
                "alert_rule_test": [
                    {
                        "eval_time": "6m",
                        "alertname": "GenserveTargetDown",
                        "exp_alerts": [
                            {
                                "exp_labels": {**labels, "severity": "critical"},
                                "exp_annotations": {
                                    key: re.sub(
                                        r"\{\{ \$labels\.(\w+) \}\}",
                                        lambda m, labels=labels: labels[m[1]],
                                        text,
                                    )
                                    for key, text in rule["annotations"].items()
                                },
                            }
                        ],
                    }
                ],
            }
        )
    (tmp_path / RULES.name).write_text(RULES.read_text())
    test_file = tmp_path / "target-down.test.yml"
    test_file.write_text(
        yaml.safe_dump({"rule_files": [RULES.name], "evaluation_interval": "1m", "tests": cases})
    )
    result = subprocess.run(
        [promtool, "test", "rules", test_file.name], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, f"jobs {jobs}:\n{result.stdout}{result.stderr}"


def test_the_model_load_time_panel_leaves_out_versions_that_never_loaded(
    promtool: str, tmp_path: Path
) -> None:
    """genserve_model_load_duration_seconds is 0 from a version's registration until its load ends
    READY: while it loads and after its load failed (a corrupt model.onnx). The panel showed those
    versions as loaded in 0 s beside the real load times."""
    (panel,) = [e for e in dashboard_exprs() if e.where.startswith("panel 'Model load time'")]
    target = 'job="serving/genserve", instance="10.0.0.7:50052"'
    series = [
        (f'genserve_model_load_duration_seconds{{{target}, model="cgan-digits", version="1"}}', "1.6x5"),
        (f'genserve_model_load_duration_seconds{{{target}, model="broken", version="1"}}', "0x5"),
        (f'genserve_model_load_duration_seconds{{{target}, model="big", version="2"}}', "0x5"),
    ]
    case = {
        "interval": "1m",
        "input_series": [{"series": s, "values": v} for s, v in series],
        "promql_expr_test": [
            {
                "expr": grafana_to_promql(panel.promql),
                "eval_time": "4m",
                "exp_samples": [{"labels": '{model="cgan-digits", version="1"}', "value": 1.6}],
            }
        ],
    }
    (tmp_path / RULES.name).write_text(RULES.read_text())
    test_file = tmp_path / "load-time.test.yml"
    test_file.write_text(
        yaml.safe_dump({"rule_files": [RULES.name], "evaluation_interval": "1m", "tests": [case]})
    )
    result = subprocess.run(
        [promtool, "test", "rules", test_file.name], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _panel_expr_case(
    promtool: str,
    tmp_path: Path,
    panel_title: str,
    series: list[tuple[str, str]],
    expected: list[list[dict[str, Any]]],
) -> None:
    """promtool evaluates each query of a panel over made-up series at 4m; `expected` is the
    samples of the queries, in their order."""
    exprs = [e for e in dashboard_exprs() if e.where.startswith(f"panel {panel_title!r}")]
    assert len(exprs) == len(expected), [e.where for e in exprs]
    case = {
        "interval": "1m",
        "input_series": [{"series": s, "values": v} for s, v in series],
        "promql_expr_test": [
            {"expr": grafana_to_promql(e.promql), "eval_time": "4m", "exp_samples": samples}
            for e, samples in zip(exprs, expected, strict=True)
        ],
    }
    (tmp_path / RULES.name).write_text(RULES.read_text())
    test_file = tmp_path / "panel.test.yml"
    test_file.write_text(
        yaml.safe_dump({"rule_files": [RULES.name], "evaluation_interval": "1m", "tests": [case]})
    )
    result = subprocess.run(
        [promtool, "test", "rules", test_file.name], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


TARGET = 'job="serving/genserve", instance="10.0.0.7:50052"'


def test_the_image_cache_hit_ratio_has_no_series_for_models_without_lookups(
    promtool: str, tmp_path: Path
) -> None:
    """The lookup counters exist at 0 for every model from its load, the cache on or off: a model
    with no lookup had a hit ratio of 0/0, a series of NaN, where the panel promises none."""
    lookups = "genserve_image_cache_lookups_total"
    series = [
        (f'{lookups}{{{TARGET}, model="{model}", version="1", result="{result}"}}', values)
        for model, result, values in (
            ("cgan-digits", "hit", "0+3x5"),
            ("cgan-digits", "miss", "0+1x5"),
            ("dcgan-digits", "hit", "0x5"),
            ("dcgan-digits", "miss", "0x5"),
        )
    ]
    expected = [[{"labels": '{model="cgan-digits"}', "value": 0.75}]]
    _panel_expr_case(promtool, tmp_path, "Image cache hit ratio", series, expected)


def test_the_throughput_and_error_ratio_panels_name_the_calls_that_resolved_no_model(
    promtool: str, tmp_path: Path
) -> None:
    """ListModels, GetModel, unknown model names and methods are counted under model="": the
    "Throughput per model" and "Server error ratio" panels showed them with an empty legend."""
    requests = "genserve_requests_total"
    series = [
        (f'{requests}{{{TARGET}, model="cgan-digits", version="1", method="Sample", code="OK"}}', "0+60x5"),
        (f'{requests}{{{TARGET}, model="", version="", method="ListModels", code="OK"}}', "0+30x5"),
        (f'{requests}{{{TARGET}, model="", version="", method="GetModel", code="INTERNAL"}}', "0+15x5"),
        (f'{requests}{{{TARGET}, model="", version="", method="", code="UNIMPLEMENTED"}}', "0+15x5"),
    ]
    throughput = [[{"labels": f'{{model="{m}"}}', "value": 1} for m in ("cgan-digits", "(no model)")]]
    _panel_expr_case(promtool, tmp_path, "Throughput per model", series, throughput)
    error_ratio = [[{"labels": '{model="(no model)"}', "value": 0.25}]]
    _panel_expr_case(promtool, tmp_path, "Server error ratio", series, error_ratio)


def test_the_per_model_latency_panel_leaves_out_the_calls_that_resolved_no_model(
    promtool: str, tmp_path: Path
) -> None:
    """A Sample of an unknown model name is timed under model="": the per-model latency panel
    showed its quantiles as 'p99 ' beside the models', which GenserveP99LatencyHigh leaves out."""
    series = []
    for model, version in (("cgan-digits", "1"), ("", "")):
        labels = f'{TARGET}, model="{model}", version="{version}", method="Sample"'
        for le, values in (("0.5", "0x5"), ("1", "0+60x5"), ("+Inf", "0+60x5")):
            series.append((f'genserve_request_duration_seconds_bucket{{{labels}, le="{le}"}}', values))
    expected = [[{"labels": '{model="cgan-digits"}', "value": 0.5 + 0.5 * q}] for q in (0.5, 0.95, 0.99)]
    _panel_expr_case(promtool, tmp_path, "End-to-end latency p50 / p95 / p99", series, expected)
