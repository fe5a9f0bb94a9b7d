"""The Prometheus Adapter rule (deploy/k8s/prometheus-adapter-rules.yaml) runs on a real Prometheus.

A real Prometheus (the monitoring tests' `Prometheus` helper) scrapes a real genserve with the
`namespace` and `pod` target labels the Prometheus Operator's PodMonitor adds in a cluster. Then
the rule's seriesQuery finds the series, and its metricsQuery, rendered the way the adapter
renders it for the HPA's Pods metric, returns one value per pod.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from monitoring_support import skip_or_fail_without_prometheus
from test_k8s import _adapter_rule, render_adapter_query
from test_prometheus_integration import Prometheus

pytestmark = pytest.mark.prometheus

NAMESPACE, POD = "genserve-test", "genserve-7d9f8-abcde"
METRIC = "genserve_queue_depth"


@pytest.fixture(scope="module")
def labelled_prometheus(tiny_server: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    binary, _ = skip_or_fail_without_prometheus()
    workdir = tmp_path_factory.mktemp("adapter-prometheus")
    prometheus = Prometheus(binary, workdir, tiny_server.metrics_port)
    try:
        prometheus.wait_ready()
        # The helper scrapes without target labels; add the PodMonitor's and reload (SIGHUP to the
        # Prometheus this fixture started, by PID).
        config_path = workdir / "prometheus.yml"
        config = yaml.safe_load(config_path.read_text())
        config.pop("rule_files", None)
        for scrape in config["scrape_configs"]:
            for static in scrape["static_configs"]:
                static["labels"] = {"namespace": NAMESPACE, "pod": POD}
        config_path.write_text(yaml.safe_dump(config))
        prometheus.proc.send_signal(signal.SIGHUP)
        prometheus.wait_for_result(f'{METRIC}{{namespace="{NAMESPACE}",pod="{POD}"}}', timeout_s=20)
        yield prometheus
    finally:
        prometheus.stop()


def test_series_query_discovers_the_metric_with_pod_labels(labelled_prometheus: Prometheus) -> None:
    rule = _adapter_rule(METRIC)
    answer = labelled_prometheus.api("series", **{"match[]": rule["seriesQuery"]})
    assert answer["status"] == "success", answer
    series = answer["data"]
    assert series, f"seriesQuery {rule['seriesQuery']!r} found nothing"
    assert {s["__name__"] for s in series} == {METRIC}
    assert {(s["namespace"], s["pod"]) for s in series} == {(NAMESPACE, POD)}


def test_metrics_query_gives_one_value_per_pod(labelled_prometheus: Prometheus) -> None:
    query = render_adapter_query(METRIC, NAMESPACE, [POD, "genserve-7d9f8-other"])
    answer = labelled_prometheus.query(query)
    assert answer["status"] == "success", (query, answer)
    result = answer["data"]["result"]
    assert [r["metric"] for r in result] == [{"pod": POD}], (query, result)
    value = float(result[0]["value"][1])
    assert value >= 0  # queued items summed over the pod's model versions (idle here: 0)
