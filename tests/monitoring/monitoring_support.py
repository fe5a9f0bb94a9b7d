"""Helpers for the monitoring tests: PromQL extraction from deploy/, a tiny model repository, a
genserve-server subprocess, /metrics scraping and Prometheus discovery."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy" / "grafana" / "genserve-dashboard.json"
PROMETHEUS_DIR = REPO / "deploy" / "prometheus"
RULES = PROMETHEUS_DIR / "genserve-alerts.yml"
RULES_TEST = PROMETHEUS_DIR / "genserve-alerts.test.yml"
SCRAPE_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
CONTRACT = REPO / "docs" / "metrics-contract.md"
METRICS_DOC = REPO / "docs" / "metrics.md"

GPU_METRICS = frozenset({"genserve_gpu_utilization_ratio", "genserve_gpu_memory_used_bytes"})
# Series only a server with TLS on exports (tests/reliability/test_tls_startup.py checks them).
TLS_METRICS = frozenset({"genserve_tls_certificate_expiry_timestamp_seconds"})
# Series only a code prior exports; the tiny repository has none (test_series.py checks them).
CODE_PRIOR_METRICS = frozenset({"genserve_step_running_rows"})
# Series Prometheus itself makes for every target; no exporter exports them.
PROMETHEUS_SYNTHETIC = frozenset({"up", "scrape_duration_seconds", "scrape_samples_scraped"})
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_METRIC = re.compile(r"(?<![\w$:])((?:genserve|process|python)_[a-zA-Z0-9_]+|up)\b(?!\s*\()")


# --- the PromQL of deploy/ -------------------------------------------------------------------


@dataclass(frozen=True)
class Expr:
    where: str
    promql: str


def _walk_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _walk_panels(panel.get("panels", []))


def load_dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(?:(?P<series>.+),\s*)?(?P<label>\w+)\s*\)\s*$", re.S)


def dashboard_exprs() -> list[Expr]:
    """Every PromQL expression of the dashboard: panel targets and template-variable queries
    (``label_values(series, label)`` becomes ``group by (label) (series)``)."""
    dash = load_dashboard()
    out: list[Expr] = []
    for panel in _walk_panels(dash["panels"]):
        for target in panel.get("targets", []):
            out.append(Expr(f"panel {panel['title']!r} target {target['refId']}", target["expr"]))
    for var in dash["templating"]["list"]:
        if var["type"] != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        match = _LABEL_VALUES.match(query)
        if match is None or match["series"] is None:
            raise AssertionError(
                f"variable {var['name']}: expected label_values(series, label), got {query!r}"
            )
        out.append(Expr(f"variable ${var['name']}", f"group by ({match['label']}) ({match['series']})"))
    return out


def rule_exprs() -> list[Expr]:
    data = yaml.safe_load(RULES.read_text())
    return [
        Expr(f"rule {rule.get('alert') or rule.get('record')}", rule["expr"])
        for group in data["groups"]
        for rule in group["rules"]
    ]


def metric_names(promql: str) -> set[str]:
    """Metric names used in one expression (string literals, label names and functions excluded)."""
    without_strings = _STRING.sub('""', promql)
    without_matchers = re.sub(r"\{[^}]*\}", "{}", without_strings)
    return set(_METRIC.findall(without_matchers))


def grafana_to_promql(promql: str, rate_interval: str = "1m") -> str:
    """Substitute Grafana's variables with values that select everything."""
    out = promql
    for name, value in (
        ("__rate_interval", rate_interval),
        ("__interval", "15s"),
        ("__range", "1h"),
        ("job", ".*"),
        ("model", ".*"),
        ("version", ".*"),
        ("method", ".*"),
        ("instance", ".*"),
    ):
        out = out.replace("${" + name + "}", value).replace("$" + name, value)
    if "$" in out:
        raise AssertionError(f"unsubstituted Grafana variable in {promql!r}")
    return out


@dataclass(frozen=True)
class ContractMetric:
    name: str
    type: str
    labels: tuple[str, ...]


def contract_metrics() -> dict[str, ContractMetric]:
    """The table of docs/metrics-contract.md: {name: (type, labels)}."""
    out: dict[str, ContractMetric] = {}
    for line in CONTRACT.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].startswith("`genserve_"):
            continue
        name = cells[0].strip("`")
        labels = tuple(lbl.strip() for lbl in cells[2].split(",") if lbl.strip())
        out[name] = ContractMetric(name, cells[1], labels)
    return out


def contract_name_for(sample_name: str, contract: Mapping[str, ContractMetric]) -> str | None:
    """The contract name a series name belongs to (histogram suffixes stripped), else None."""
    if sample_name in contract:
        return sample_name
    for suffix in HISTOGRAM_SUFFIXES:
        base = sample_name.removesuffix(suffix)
        if base != sample_name and contract.get(base, ContractMetric("", "", ())).type == "histogram":
            return base
    return None


# --- a tiny model repository and a server subprocess (tests/server/server_support.py) ----------

TINY_MODEL = "tiny"
TINY_LATENT_DIM = 8
TINY_IMAGE = (4, 4)
TINY_MAX_BATCH = 8


def write_tiny_repository(
    root: Path, *, max_batch_size: int = TINY_MAX_BATCH, queue_delay_ms: float = 20.0
) -> Path:
    """A one-model repository: generator z[N, 8] -> tanh(z @ W) as image[N, 3, 4, 4]."""
    from server_support import generator_graph, write_model

    height, width = TINY_IMAGE
    write_model(
        root,
        TINY_MODEL,
        "generator",
        generator_graph(TINY_LATENT_DIM, 3, height, width),
        {"latent_dim": TINY_LATENT_DIM, "channels": 3, "image_size": [height, width]},
        config={
            "batching": {
                "max_batch_size": max_batch_size,
                "max_queue_delay_ms": queue_delay_ms,
                "preferred_batch_sizes": [max_batch_size],
                "max_queue_size": 1024,
            }
        },
    )
    return root


@dataclass
class MonitoredServer:
    """A genserve-server subprocess (server_support.ServerProcess) plus what monitoring needs."""

    process: Any  # server_support.ServerProcess
    metrics_enabled: bool

    @property
    def target(self) -> str:
        return str(self.process.target)

    @property
    def metrics_port(self) -> int | None:
        return int(self.process.metrics_port) if self.metrics_enabled else None

    @property
    def pid(self) -> int:
        # server_support starts `python -m genserve_server` directly: the child is the server.
        return int(self.process.proc.pid)

    @property
    def log_path(self) -> Path:
        return Path(self.process.log_path)

    def metrics_url(self) -> str:
        if not self.metrics_enabled:
            raise RuntimeError("server runs with --no-metrics")
        return f"http://127.0.0.1:{self.process.metrics_port}/metrics"

    def cpu_seconds(self) -> float:
        """utime + stime of the server process from /proc/<pid>/stat."""
        return process_cpu_seconds(self.pid)

    def stop(self) -> None:
        self.process.stop()


def process_cpu_seconds(pid: int) -> float:
    stat = Path(f"/proc/{pid}/stat").read_text()
    # Fields after the parenthesised command name; utime and stime are fields 14 and 15 (1-based).
    fields = stat[stat.rindex(")") + 2 :].split()
    ticks = int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def start_server(
    models: Path,
    workdir: Path,
    *,
    metrics: bool = True,
    extra_args: tuple[str, ...] = (),
    timeout_s: float = 60.0,
) -> MonitoredServer:
    """Start genserve-server on 127.0.0.1 with OS-chosen ports (the shared server_support helper)."""
    from server_support import start_server as start_shared_server

    args = extra_args if metrics else ("--no-metrics", *extra_args)
    return MonitoredServer(
        start_shared_server(models, workdir, extra_args=args, timeout_s=timeout_s), metrics
    )


# --- scraping --------------------------------------------------------------------------------


@dataclass
class Scrape:
    text: str
    # (sample name, sorted label items) -> value
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float]
    family_types: dict[str, str]

    def names(self) -> set[str]:
        return {name for name, _ in self.samples}

    def value(self, name: str, **labels: str) -> float:
        """Sum of the samples named ``name`` whose labels include ``labels``."""
        return sum(
            v
            for (n, items), v in self.samples.items()
            if n == name and all(dict(items).get(k) == want for k, want in labels.items())
        )


def scrape(url: str, timeout_s: float = 5.0) -> Scrape:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        text = response.read().decode()
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return Scrape(text, samples, types)


# --- Prometheus ------------------------------------------------------------------------------


def prometheus_tools() -> tuple[str, str] | None:
    prometheus, promtool = shutil.which("prometheus"), shutil.which("promtool")
    if prometheus is None or promtool is None:
        return None
    return prometheus, promtool


def skip_or_fail_without_prometheus() -> tuple[str, str]:
    """Prometheus + promtool paths; skip when missing, except under CI=true where it fails."""
    import pytest

    tools = prometheus_tools()
    if tools is not None:
        return tools
    reason = "prometheus/promtool not on PATH: run scripts/install_prometheus.sh (Debian package prometheus)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: a missing Prometheus fails instead of skipping)")
    print(f"SKIP: {reason}")  # noqa: T201 - the issue asks for the reason to be printed
    pytest.skip(reason)


# --- traffic ---------------------------------------------------------------------------------


@dataclass
class TrafficStats:
    ok_requests: int = 0
    ok_images: int = 0
    codes: dict[str, int] = field(default_factory=dict)
    request_ids: list[str] = field(default_factory=list)

    def add(self, code: str, images: int) -> None:
        self.codes[code] = self.codes.get(code, 0) + 1
        if code == "OK":
            self.ok_requests += 1
            self.ok_images += images


def drive_sample_traffic(
    target: str,
    counts: list[int],
    *,
    model: str = TINY_MODEL,
    concurrency: int = 8,
    raw_output: bool = True,
    stop_at: float | None = None,
) -> TrafficStats:
    """Send one Sample RPC per entry of ``counts`` (its image count) over plain generated stubs,
    ``concurrency`` at a time; when ``stop_at`` (monotonic) is given, cycle ``counts`` until then."""
    import itertools
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import grpc

    from genserve.v1 import genserve_pb2, genserve_pb2_grpc, types_pb2

    stats = TrafficStats()
    lock = threading.Lock()
    output = types_pb2.OutputOptions(
        format=types_pb2.IMAGE_FORMAT_RAW_UINT8 if raw_output else types_pb2.IMAGE_FORMAT_PNG
    )
    source = itertools.cycle(enumerate(counts)) if stop_at is not None else iter(enumerate(counts))
    source_lock = threading.Lock()

    def next_count() -> tuple[int, int] | None:
        with source_lock:
            if stop_at is not None and time.monotonic() >= stop_at:
                return None
            return next(source, None)

    def worker(stub: genserve_pb2_grpc.GenerationServiceStub) -> None:
        while (item := next_count()) is not None:
            index, count = item
            request = genserve_pb2.SampleRequest(model=model, count=count, base_seed=index, output=output)
            try:
                response = stub.Sample(request, timeout=30)
                code, images = "OK", len(response.images)
            except grpc.RpcError as err:
                code, images = err.code().name, 0
            with lock:
                stats.add(code, images)

    with grpc.insecure_channel(target) as channel:
        stub = genserve_pb2_grpc.GenerationServiceStub(channel)
        with ThreadPoolExecutor(concurrency) as pool:
            for future in [pool.submit(worker, stub) for _ in range(concurrency)]:
                future.result()
    return stats


def relabel(labels: dict[str, str], configs: list[dict[str, Any]]) -> dict[str, str] | None:
    """Prometheus' keep/replace relabelling: the source labels joined by ';', the regex matched as
    RE2 does there (anchored: the whole string), $N of the replacement its groups; None = dropped."""
    labels = dict(labels)
    for config in configs:
        value = ";".join(labels.get(name, "") for name in config["source_labels"])
        match = re.fullmatch(str(config.get("regex", "(.*)")), value)
        action = config.get("action", "replace")
        if action == "keep":
            if match is None:
                return None
        elif action == "replace":
            if match is not None:
                replacement = str(config.get("replacement", "$1"))
                template = re.sub(r"\$\{?(\d+)\}?", r"\\g<\1>", replacement)
                labels[str(config["target_label"])] = match.expand(template)
        else:
            raise AssertionError(f"unexpected relabel action {action}")
    return labels
