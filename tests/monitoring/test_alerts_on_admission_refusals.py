"""The alert rules on an overload that the server refuses at admission (a `max_concurrent_*` limit).

Such a call is answered RESOURCE_EXHAUSTED before any handler runs, so it has no model: it is counted
only in genserve_requests_rejected_total{model="", reason="concurrency"}, never in
genserve_requests_total, which GenserveErrorRateHigh and the dashboard's error panels read. With the
default limits (max_concurrent_rpcs 1024, max_queue_size 1024 items) an overload of one-image calls
meets the concurrency limit before the queue is full, and the queue sits flat below its cap.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from monitoring_support import RULES, skip_or_fail_without_prometheus

pytestmark = pytest.mark.prometheus

TARGET = (
    'job="serving/genserve",namespace="serving",pod="genserve-7c9d5-x2k4q",container="genserve",'
    'endpoint="metrics",instance="10.0.0.7:50052"'
)
ALERT = "GenserveRefusedAtAdmission"


def alert_names() -> list[str]:
    rules = yaml.safe_load(RULES.read_text())
    return [r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r]


def expected_alert(labels: dict[str, str], percent: str) -> dict[str, Any]:
    """The alert with its annotations rendered as Prometheus renders the rule's templates."""
    rules = yaml.safe_load(RULES.read_text())
    (rule,) = [r for g in rules["groups"] for r in g["rules"] if r.get("alert") == ALERT]
    values = {"{{ $labels.instance }}": labels["instance"], "{{ $labels.job }}": labels["job"]}
    values["{{ $value | humanizePercentage }}"] = percent
    annotations = {}
    for key, text in rule["annotations"].items():
        for template, value in values.items():
            text = text.replace(template, value)
        annotations[key] = text
    return {"exp_labels": labels, "exp_annotations": annotations}


def run_promtool(tmp_path: Path, cases: list[dict[str, Any]]) -> subprocess.CompletedProcess[str]:
    promtool = skip_or_fail_without_prometheus()[1]
    (tmp_path / RULES.name).write_text(RULES.read_text())
    test_file = tmp_path / "admission.test.yml"
    test_file.write_text(
        yaml.safe_dump({"rule_files": [RULES.name], "evaluation_interval": "1m", "tests": cases})
    )
    return subprocess.run(
        [promtool, "test", "rules", test_file.name], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )


def series(name: str, labels: str, values: str) -> dict[str, str]:
    return {"series": f"{name}{{{TARGET},{labels}}}", "values": values}


def test_an_overload_refused_at_the_concurrency_limit_pages(tmp_path: Path) -> None:
    """3 of every 5 calls refused at max_concurrent_rpcs for 30 minutes: the clients see 60%
    RESOURCE_EXHAUSTED, the model serves 2 calls/s OK with its queue flat at 1000 items."""
    overload = [
        series("genserve_requests_total", 'model="m",version="1",method="Sample",code="OK"', "0+120x30"),
        series(
            "genserve_request_duration_seconds_bucket",
            'model="m",version="1",method="Sample",le="1"',
            "0+120x30",
        ),
        series(
            "genserve_request_duration_seconds_bucket",
            'model="m",version="1",method="Sample",le="+Inf"',
            "0+120x30",
        ),
        series("genserve_queue_depth", 'model="m",version="1"', "1000x30"),
        series("genserve_model_ready", 'model="m",version="1"', "1x30"),
        series("genserve_model_loading", 'model="m",version="1"', "0x30"),
        series("genserve_requests_rejected_total", 'model="",version="",reason="concurrency"', "0+180x30"),
        series("genserve_requests_rejected_total", 'model="m",version="1",reason="queue_full"', "0x30"),
        series("up", 'service="genserve"', "1x30"),
    ]
    labels = {
        "severity": "critical",
        "job": "serving/genserve",
        "instance": "10.0.0.7:50052",
    }
    checks: list[dict[str, Any]] = [
        {"eval_time": "25m", "alertname": name, "exp_alerts": []} for name in alert_names() if name != ALERT
    ]
    checks.append({"eval_time": "3m", "alertname": ALERT, "exp_alerts": []})
    checks.append({"eval_time": "25m", "alertname": ALERT, "exp_alerts": [expected_alert(labels, "60%")]})
    # Every call refused (none accepted since the start: genserve_requests_total has no series at all).
    refused_only = [
        series("genserve_model_ready", 'model="m",version="1"', "1x30"),
        series("genserve_requests_rejected_total", 'model="",version="",reason="concurrency"', "0+60x30"),
    ]
    # A few refusals in a busy server (1 in 100) and a quiet one (1 refusal in 5 minutes): no page.
    few = [
        series("genserve_requests_total", 'model="m",version="1",method="Sample",code="OK"', "0+600x30"),
        series("genserve_requests_rejected_total", 'model="",version="",reason="concurrency"', "0+6x30"),
    ]
    quiet = [
        series("genserve_requests_total", 'model="q",version="1",method="Sample",code="OK"', "0x30"),
        series(
            "genserve_requests_rejected_total",
            'model="",version="",reason="concurrency"',
            "0 0 0 0 0 1 1 1 1 1 2x20",
        ),
    ]
    cases = [
        {"interval": "1m", "input_series": overload, "alert_rule_test": checks},
        {
            "interval": "1m",
            "input_series": refused_only,
            "alert_rule_test": [
                {"eval_time": "25m", "alertname": ALERT, "exp_alerts": [expected_alert(labels, "100%")]}
            ],
        },
        {
            "interval": "1m",
            "input_series": few,
            "alert_rule_test": [{"eval_time": "25m", "alertname": ALERT, "exp_alerts": []}],
        },
        {
            "interval": "1m",
            "input_series": quiet,
            "alert_rule_test": [{"eval_time": "25m", "alertname": ALERT, "exp_alerts": []}],
        },
    ]
    result = run_promtool(tmp_path, cases)
    assert result.returncode == 0, result.stdout + result.stderr
