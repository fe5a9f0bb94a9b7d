"""Helpers for the monitoring tests: PromQL extraction from deploy/, a tiny model repository, a
genserve-server subprocess, /metrics scraping and Prometheus discovery."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
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


# --- a tiny model repository -----------------------------------------------------------------

TINY_MODEL = "tiny"
TINY_LATENT_DIM = 8
TINY_IMAGE = (4, 4)
TINY_MAX_BATCH = 8


def write_tiny_repository(
    root: Path, *, max_batch_size: int = TINY_MAX_BATCH, queue_delay_ms: float = 20.0
) -> Path:
    """A one-model repository: generator z[N, 8] -> tanh(z @ W) as image[N, 3, 4, 4]."""
    import hashlib

    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    height, width = TINY_IMAGE
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((TINY_LATENT_DIM, 3 * height * width)).astype(np.float32) * 0.5
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["z", "W"], ["h"]),
            helper.make_node("Tanh", ["h"], ["t"]),
            helper.make_node("Reshape", ["t", "shape"], ["image"]),
        ],
        "tiny_generator",
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", TINY_LATENT_DIM])],
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, height, width])],
        initializer=[
            numpy_helper.from_array(weight, "W"),
            numpy_helper.from_array(np.array([-1, 3, height, width], dtype=np.int64), "shape"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)

    model_dir = root / TINY_MODEL
    version_dir = model_dir / "1"
    version_dir.mkdir(parents=True)
    onnx_path = version_dir / "model.onnx"
    onnx.save(model, onnx_path)
    card = {
        "format_version": 1,
        "name": TINY_MODEL,
        "version": "1",
        "kind": "generator",
        "description": "monitoring-test generator: tanh of a random linear map",
        "inputs": [{"name": "z", "dtype": "float32", "shape": [-1, TINY_LATENT_DIM]}],
        "outputs": [{"name": "image", "dtype": "float32", "shape": [-1, 3, height, width]}],
        "latent_dim": TINY_LATENT_DIM,
        "class_names": [],
        "channels": 3,
        "image_size": [height, width],
        "output_range": [-1.0, 1.0],
        "opset": 17,
        "sha256": {"model.onnx": hashlib.sha256(onnx_path.read_bytes()).hexdigest()},
    }
    (version_dir / "card.json").write_text(json.dumps(card, indent=2))
    config = {
        "kind": "generator",
        "batching": {
            "max_batch_size": max_batch_size,
            "max_queue_delay_ms": queue_delay_ms,
            "preferred_batch_sizes": [max_batch_size],
            "max_queue_size": 1024,
        },
        "instances": 1,
        "execution_providers": ["CPUExecutionProvider"],
        "precision": "fp32",
        "version_policy": {"latest": 1},
    }
    (model_dir / "config.json").write_text(json.dumps(config, indent=2))
    return root


# --- a genserve-server subprocess ------------------------------------------------------------


def server_command() -> list[str]:
    exe = Path(sys.executable).with_name("genserve-server")
    if exe.exists():
        return [str(exe)]
    return [sys.executable, "-m", "genserve_server.main"]


@dataclass
class ServerProcess:
    proc: subprocess.Popen[bytes]
    port: int
    metrics_port: int | None
    pid: int
    log_path: Path
    _stopped: bool = field(default=False)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def metrics_url(self) -> str:
        if self.metrics_port is None:
            raise RuntimeError("server runs with --no-metrics")
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def cpu_seconds(self) -> float:
        """utime + stime of the server process from /proc/<pid>/stat."""
        return process_cpu_seconds(self.pid)

    def stop(self, grace_s: float = 10.0) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


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
) -> ServerProcess:
    """Start genserve-server on 127.0.0.1 with OS-chosen ports; wait for its ready file."""
    workdir.mkdir(parents=True, exist_ok=True)
    ready = workdir / "ready.json"
    ready.unlink(missing_ok=True)
    log_path = workdir / "server.log"
    args = [*server_command(), "serve", "--models", str(models), "--host", "127.0.0.1", "--port", "0"]
    args += ["--metrics-port", "0"] if metrics else ["--no-metrics"]
    args += ["--ready-file", str(ready), *extra_args]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"genserve-server exited ({proc.returncode}) before ready:\n{log_path.read_text()}"
            )
        if ready.exists():
            try:
                info = json.loads(ready.read_text())
            except json.JSONDecodeError:  # written but not yet complete
                info = None
            if info is not None:
                metrics_port = info.get("metrics_port")
                return ServerProcess(
                    proc,
                    int(info["port"]),
                    int(metrics_port) if metrics_port else None,
                    int(info["pid"]),
                    log_path,
                )
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"genserve-server not ready in {timeout_s} s:\n{log_path.read_text()}")


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


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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
