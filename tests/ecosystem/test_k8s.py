"""deploy/k8s/: every manifest validates offline against Kubernetes' schemas, and the objects agree.

Built-in kinds are validated strictly (unknown fields are errors, as with `kubectl apply`'s strict
field validation) by kubernetes-validate against the newest schemas it ships; the PodMonitor, a
custom resource kubernetes-validate cannot check, against tests/ecosystem/schemas/. Then the
cross-references a schema cannot see: selectors match the pod labels, probe and target ports
exist, the HPA scales this Deployment on the metric the adapter rule serves, and the grace period
outlasts the server's drain.
"""

from __future__ import annotations

import copy
import json
import re
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from ecosystem_helpers import K8S_DIR, ROOT, SCHEMA_DIR
from monitoring_support import PROMETHEUS_DIR, relabel

Manifest = dict[str, Any]
NOT_OBJECTS = {"kustomization.yaml", "prometheus-adapter-rules.yaml"}  # config files, not API objects
GRPC_PORT = 50051
METRICS_PORT = 50052
HEALTH_PORT = 50053  # --health-port: grpc.health.v1 alone, for the kubelet's probes
DRAIN_GRACE_S = 20  # the server's SIGTERM drain, `--drain-grace-s` in deployment.yaml


def _load(path: Path) -> list[Manifest]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _manifest_files() -> list[Path]:
    return sorted(p for p in K8S_DIR.glob("*.yaml") if p.name not in NOT_OBJECTS)


@pytest.fixture(scope="module")
def objects() -> dict[tuple[str, str], Manifest]:
    found: dict[tuple[str, str], Manifest] = {}
    for path in _manifest_files():
        for doc in _load(path):
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in found, f"{path.name}: duplicate {key}"
            found[key] = doc
    return found


def _validate_builtin(doc: Manifest) -> None:
    kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def _podmonitor_schema() -> dict[str, Any]:
    schema: dict[str, Any] = json.loads(
        (SCHEMA_DIR / "monitoring.coreos.com_v1_podmonitor.schema.json").read_text()
    )
    return schema


def _validate(doc: Manifest) -> None:
    if doc["apiVersion"].startswith("monitoring.coreos.com/"):
        assert doc["kind"] == "PodMonitor", f"no schema for {doc['kind']}; add one to {SCHEMA_DIR}"
        jsonschema.validate(doc, _podmonitor_schema())
    else:
        _validate_builtin(doc)


@pytest.mark.parametrize("path", _manifest_files(), ids=lambda p: p.name)
def test_manifest_validates_against_its_schema(path: Path) -> None:
    docs = _load(path)
    assert docs, f"{path.name} is empty"
    for doc in docs:
        _validate(doc)


def test_kustomization_lists_every_manifest() -> None:
    kustomization = _load(K8S_DIR / "kustomization.yaml")[0]
    assert sorted(kustomization["resources"]) == sorted(p.name for p in _manifest_files())


@pytest.mark.parametrize(
    ("kind", "mutate", "message"),
    [
        (
            "Deployment",
            lambda d: d["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"].update(
                prot=50051
            ),
            "prot",
        ),
        ("Deployment", lambda d: d["spec"].update(replicas="two"), "two"),
        (
            "HorizontalPodAutoscaler",
            lambda d: d["spec"]["metrics"][0]["pods"].update(metricName="x"),
            "metricName",
        ),
        ("PodMonitor", lambda d: d["spec"]["podMetricsEndpoints"][0].update(intervall="15s"), "intervall"),
        (
            "PodMonitor",
            lambda d: d["spec"]["podMetricsEndpoints"][0].update(interval="15 seconds"),
            "15 seconds",
        ),
        ("PodMonitor", lambda d: d["spec"].pop("selector"), "selector"),
        ("NetworkPolicy", lambda d: d["spec"]["ingress"][0].update(form=[]), "form"),
    ],
)
def test_validation_catches_mistakes(
    objects: dict[tuple[str, str], Manifest], kind: str, mutate: Any, message: str
) -> None:
    """The validators are not vacuous: a typo, a wrong type, a bad enum or duration is refused."""
    doc = copy.deepcopy(next(d for (k, _), d in objects.items() if k == kind))
    mutate(doc)
    with pytest.raises((kubernetes_validate.ValidationError, jsonschema.ValidationError)) as err:
        _validate(doc)
    assert message in str(err.value)


def _deployment(objects: dict[tuple[str, str], Manifest]) -> Manifest:
    return objects[("Deployment", "genserve")]


def _container(objects: dict[tuple[str, str], Manifest]) -> Manifest:
    containers = _deployment(objects)["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    container: Manifest = containers[0]
    return container


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def test_selectors_match_the_pods(objects: dict[tuple[str, str], Manifest]) -> None:
    deployment = _deployment(objects)
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert _matches(deployment["spec"]["selector"]["matchLabels"], pod_labels)
    services = [d for (k, _), d in objects.items() if k == "Service"]
    assert services
    for service in services:
        assert _matches(service["spec"]["selector"], pod_labels), service["metadata"]["name"]
    assert _matches(
        objects[("PodDisruptionBudget", "genserve")]["spec"]["selector"]["matchLabels"], pod_labels
    )
    assert _matches(objects[("PodMonitor", "genserve")]["spec"]["selector"]["matchLabels"], pod_labels)


def test_ports_and_probes_exist(objects: dict[tuple[str, str], Manifest]) -> None:
    container = _container(objects)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": GRPC_PORT, "metrics": METRICS_PORT, "health": HEALTH_PORT}
    args = container["args"]
    assert args[0] == "serve"
    assert int(args[args.index("--port") + 1]) == ports["grpc"]
    assert int(args[args.index("--metrics-port") + 1]) == ports["metrics"]
    assert int(args[args.index("--health-port") + 1]) == ports["health"]
    for service in (d for (k, _), d in objects.items() if k == "Service"):
        for port in service["spec"]["ports"]:
            target = port["targetPort"]
            assert target in ports or target in ports.values(), f"{service['metadata']['name']}: {target}"
    for name in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container[name]
        assert set(probe) & {"grpc", "httpGet", "exec", "tcpSocket"} == {"grpc"}, (
            f"{name} must be a gRPC probe"
        )
        # The health listener: on the serving port a probe is closed at accept while clients hold
        # every max_connections connection (tests/reliability/test_probes_at_limits.py).
        assert probe["grpc"]["port"] == ports["health"], name
    # Readiness asks about the whole server: "" is SERVING only when every required model is READY.
    assert container["readinessProbe"]["grpc"].get("service", "") == ""
    # Startup and liveness ask whether the process is up and done loading, not whether every model
    # loaded: a model that failed must take the pod out of the Service, not restart it forever.
    from genserve_server.health import LIVE_KEY

    assert container["startupProbe"]["grpc"].get("service") == LIVE_KEY
    assert container["livenessProbe"]["grpc"].get("service") == LIVE_KEY
    endpoint = objects[("PodMonitor", "genserve")]["spec"]["podMetricsEndpoints"][0]
    assert endpoint["port"] in ports and ports[endpoint["port"]] == METRICS_PORT
    assert endpoint.get("path", "/metrics") == "/metrics"


def test_the_kubernetes_scrape_config_keeps_the_shipped_pods_metrics_port(
    objects: dict[tuple[str, str], Manifest],
) -> None:
    """deploy/prometheus/kubernetes-scrape.yml keeps only pods annotated prometheus.io/scrape "true"
    and the Deployment's pod template had no annotation: applied together they scraped nothing. Each
    target kubernetes_sd makes of the pod (one per declared container port) becomes the pod's
    metrics port at the PodMonitor's path, which the server serves (--metrics-port)."""
    (job,) = yaml.safe_load((PROMETHEUS_DIR / "kubernetes-scrape.yml").read_text())["scrape_configs"]
    template = _deployment(objects)["spec"]["template"]["metadata"]
    pod = {
        f"__meta_kubernetes_pod_label_{re.sub(r'[^a-zA-Z0-9_]', '_', k)}": v
        for k, v in template["labels"].items()
    }
    for key, value in template.get("annotations", {}).items():
        pod[f"__meta_kubernetes_pod_annotation_{re.sub(r'[^a-zA-Z0-9_]', '_', key)}"] = value
    endpoint = objects[("PodMonitor", "genserve")]["spec"]["podMetricsEndpoints"][0]
    for port in _container(objects)["ports"]:
        target = relabel({**pod, "__address__": f"10.0.0.7:{port['containerPort']}"}, job["relabel_configs"])
        assert target is not None, f"kubernetes-scrape.yml drops the pod's {port['name']} target"
        assert target["__address__"] == f"10.0.0.7:{METRICS_PORT}", port["name"]
        assert target.get("__metrics_path__", "/metrics") == endpoint.get("path", "/metrics")


def test_args_parse_with_the_server_cli(objects: dict[tuple[str, str], Manifest]) -> None:
    """The container args are accepted by the real `genserve-server` parser and listen outside the pod."""
    from genserve_server.main import build_parser

    args = build_parser().parse_args(_container(objects)["args"])
    assert (args.host, args.port, args.metrics_host, args.metrics_port) == (
        "0.0.0.0",
        GRPC_PORT,
        "::",
        METRICS_PORT,
    )
    assert args.drain_grace_s == DRAIN_GRACE_S
    assert args.health_port == HEALTH_PORT


def test_metrics_listen_on_the_pods_ipv4_and_ipv6_addresses(objects: dict[tuple[str, str], Manifest]) -> None:
    """The PodMonitor scrapes the pod IP, an IPv6 one on an IPv6 or dual-stack cluster: the
    Deployment's --metrics-host answers over both families (gRPC's --host 0.0.0.0 does already)."""
    import socket
    import urllib.request

    from prometheus_client import CollectorRegistry

    from genserve_server.main import build_parser
    from genserve_server.metrics_http import serve

    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("this host has no IPv6 loopback")
    args = build_parser().parse_args(_container(objects)["args"])
    httpd, thread = serve(args.metrics_host, 0, CollectorRegistry(), lambda: (True, ""))
    try:
        port = httpd.server_address[1]
        for host in ("127.0.0.1", "[::1]"):
            with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as response:
                assert response.status == 200, host
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)


def test_grpc_needs_a_token_from_a_secret_and_health_stays_open_for_the_probes(
    objects: dict[tuple[str, str], Manifest],
) -> None:
    """The shipped default authenticates: a token file from a Secret (no token in the manifests), and
    grpc.health.v1 open, because the kubelet's gRPC probes send no token."""
    from genserve_server.config import ServerConfig
    from genserve_server.main import _apply_security_flags, build_parser

    container = _container(objects)
    args = build_parser().parse_args(container["args"])
    security = _apply_security_flags(ServerConfig(), args).security
    assert security.auth or security.tls, "the manifest must name a token or TLS"
    assert security.auth and security.token_file is not None and security.open_health
    assert not container.get("env"), "tokens come from the Secret's file, not the manifest"
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    token_dir = str(security.token_file.parent)
    assert token_dir in mounts and mounts[token_dir].get("readOnly") is True
    volumes = {v["name"]: v for v in _deployment(objects)["spec"]["template"]["spec"]["volumes"]}
    secret = volumes[mounts[token_dir]["name"]]["secret"]
    assert secret["secretName"] == "genserve-auth"
    assert not secret.get("optional", False), "a missing Secret must stop the pod, not open it"
    assert {i["key"]: i["path"] for i in secret["items"]} == {"tokens": security.token_file.name}
    assert ("Secret", "genserve-auth") not in objects, "the token is the operator's, never shipped"
    assert "create secret generic genserve-auth" in (ROOT / "docs" / "deploy.md").read_text()


def test_metrics_stay_off_the_services_and_only_the_monitoring_namespace_reaches_them(
    objects: dict[tuple[str, str], Manifest],
) -> None:
    container = _container(objects)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for (kind, name), service in objects.items():
        if kind != "Service":
            continue
        targets = {p["targetPort"] for p in service["spec"]["ports"]}
        assert targets <= {"grpc", ports["grpc"]}, f"Service {name} exposes {targets}"
        assert all(p["port"] != METRICS_PORT for p in service["spec"]["ports"]), name
    policy = objects[("NetworkPolicy", "genserve")]["spec"]
    pod_labels = _deployment(objects)["spec"]["template"]["metadata"]["labels"]
    assert _matches(policy["podSelector"]["matchLabels"], pod_labels)
    assert policy["policyTypes"] == ["Ingress"]
    by_port: dict[str | int, list[Manifest]] = {}
    for rule in policy["ingress"]:
        for port in rule["ports"]:
            by_port.setdefault(port["port"], []).append(rule)
    assert set(by_port) == {"grpc", "metrics"}
    # gRPC from anywhere (clients); metrics only from a namespace selected by name, never all.
    assert any("from" not in rule for rule in by_port["grpc"])
    for rule in by_port["metrics"]:
        sources = rule.get("from")
        assert sources, "the metrics port must not be open to every peer"
        for source in sources:
            assert set(source) == {"namespaceSelector"}, source
            assert source["namespaceSelector"]["matchLabels"].get("kubernetes.io/metadata.name")
    # The PodMonitor still scrapes the pod's metrics port, bound outside the pod's loopback.
    endpoint = objects[("PodMonitor", "genserve")]["spec"]["podMetricsEndpoints"][0]
    assert endpoint["port"] == "metrics"


def test_engine_cache_is_a_volume_and_the_startup_budget_fits_engine_builds(
    objects: dict[tuple[str, str], Manifest],
) -> None:
    """TensorRT engines go to a volume of their own (not the read-only root, not the small /tmp), and
    a cold start that builds engines is not killed by the startup probe."""
    container = _container(objects)
    args = container["args"]
    cache_dir = args[args.index("--trt-engine-cache-dir") + 1]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volume = next(
        (
            name
            for path, name in mounts.items()
            if cache_dir == path or cache_dir.startswith(path.rstrip("/") + "/")
        ),
        None,
    )
    assert volume is not None and volume != mounts.get("/tmp"), f"{cache_dir} is on no volume of its own"
    volumes = {v["name"]: v for v in _deployment(objects)["spec"]["template"]["spec"]["volumes"]}
    assert volume in volumes
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600  # engine builds: minutes per model


def test_requests_one_gpu_and_runs_as_the_images_user(objects: dict[tuple[str, str], Manifest]) -> None:
    container = _container(objects)
    resources = container["resources"]
    assert str(resources["limits"]["nvidia.com/gpu"]) == "1"
    # Extended resources cannot be overcommitted: a request, if given, equals the limit.
    assert str(resources["requests"].get("nvidia.com/gpu", 1)) == "1"
    pod_security = _deployment(objects)["spec"]["template"]["spec"]["securityContext"]
    assert pod_security["runAsNonRoot"] is True
    assert f"USER {pod_security['runAsUser']}:" in (ROOT / "Dockerfile").read_text()


def test_grace_period_outlasts_the_drain(objects: dict[tuple[str, str], Manifest]) -> None:
    """The kubelet's SIGKILL comes terminationGracePeriodSeconds after termination starts (preStop
    included); the server needs the preStop pause plus its drain grace, with margin, before it."""
    spec = _deployment(objects)["spec"]["template"]["spec"]
    container = _container(objects)
    args = container["args"]
    drain_s = float(args[args.index("--drain-grace-s") + 1])
    assert drain_s == DRAIN_GRACE_S
    pre_stop = container.get("lifecycle", {}).get("preStop", {})
    pre_stop_s = 0.0
    if "exec" in pre_stop:
        command = pre_stop["exec"]["command"]
        assert command[0] == "sleep"
        pre_stop_s = float(command[1])
    elif "sleep" in pre_stop:
        pre_stop_s = float(pre_stop["sleep"]["seconds"])
    assert spec["terminationGracePeriodSeconds"] >= pre_stop_s + drain_s + 10


def test_hpa_scales_the_deployment_on_the_adapter_metric(objects: dict[tuple[str, str], Manifest]) -> None:
    hpa = objects[("HorizontalPodAutoscaler", "genserve")]
    target = hpa["spec"]["scaleTargetRef"]
    deployment = _deployment(objects)
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        deployment["apiVersion"],
        deployment["kind"],
        deployment["metadata"]["name"],
    )
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    [metric] = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    name = metric["pods"]["metric"]["name"]
    assert metric["pods"]["target"]["type"] == "AverageValue"
    # The adapter serves that name, from a series the server exports (docs/metrics-contract.md).
    rule = _adapter_rule(name)
    assert rule["name"]["as"] == name
    series = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)", rule["seriesQuery"])
    assert series is not None
    assert f"`{series.group(1)}` | gauge" in (ROOT / "docs" / "metrics-contract.md").read_text()
    assert rule["resources"]["overrides"]["pod"]["resource"] == "pod"
    assert rule["resources"]["overrides"]["namespace"]["resource"] == "namespace"
    # The PDB never blocks a drain forever: with minReplicas pods, one can always be evicted.
    pdb = objects[("PodDisruptionBudget", "genserve")]["spec"]
    if "minAvailable" in pdb:
        assert pdb["minAvailable"] < hpa["spec"]["minReplicas"]


def _adapter_rule(metric: str) -> dict[str, Any]:
    config = _load(K8S_DIR / "prometheus-adapter-rules.yaml")[0]
    rules = [r for r in config["rules"] if r.get("name", {}).get("as") == metric]
    assert len(rules) == 1, f"one adapter rule must serve {metric}"
    return dict(rules[0])


def render_adapter_query(metric: str, namespace: str, pods: list[str]) -> str:
    """metricsQuery as the Prometheus Adapter renders it for an HPA's Pods metric in `namespace`."""
    rule = _adapter_rule(metric)
    series = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)", rule["seriesQuery"])
    assert series is not None
    matchers = f'namespace="{namespace}",pod=~"{"|".join(pods)}"'
    query: str = rule["metricsQuery"]
    return (
        query.replace("<<.Series>>", series.group(1))
        .replace("<<.LabelMatchers>>", matchers)
        .replace("<<.GroupBy>>", "pod")
    )


def _secret_volume(mount: Path, files: dict[str, str], mode: int) -> None:
    """A Secret volume as the kubelet lays it out: each key a link through `..data` to a
    timestamped folder, the files with the volume's defaultMode."""
    data = mount / "..2030_01_01_00_00_00.000000000"
    data.mkdir(parents=True)
    for name, text in files.items():
        (data / name).write_text(text)
        (data / name).chmod(mode)
        (mount / name).symlink_to(Path("..data") / name)
    (mount / "..data").symlink_to(data.name)


def test_the_deployments_args_run_as_written_and_answer_its_probes(
    objects: dict[tuple[str, str], Manifest], tmp_path: Path
) -> None:
    """The container args run, not only parse: with the pod's paths under tmp_path (the token file
    from a Secret-style mount) and ports 0, the server starts; its health port answers each probe's
    service SERVING without a token; its metrics port serves /metrics and /healthz; its gRPC port
    refuses a call without a token and serves one with the Secret's."""
    import urllib.request

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from server_support import write_tiny_generator

    from genserve.v1 import genserve_pb2, genserve_pb2_grpc
    from genserve_server.launcher import ServerSubprocess

    container = _container(objects)
    root = tmp_path / "pod"
    ports = {"--port", "--metrics-port", "--health-port"}
    args: list[str] = []
    for flag, value in zip(["", *container["args"]], container["args"], strict=False):
        args.append("0" if flag in ports else (str(root) + value if value.startswith("/") else value))
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in _deployment(objects)["spec"]["template"]["spec"]["volumes"]}
    for path, name in mounts.items():
        secret = volumes[name].get("secret")
        if secret is not None:
            files = {item["path"]: "genserve-test-token\n" for item in secret["items"]}
            _secret_volume(root / path.lstrip("/"), files, secret["defaultMode"])
        else:
            (root / path.lstrip("/")).mkdir(parents=True, exist_ok=True)
    write_tiny_generator(Path(args[args.index("--models") + 1]), "tiny-gen")

    server = ServerSubprocess.start(
        [sys.executable, "-m", "genserve_server", *args], tmp_path / "work", timeout_s=60
    )
    try:
        assert server.health_port, "the Deployment's probes need --health-port"
        with grpc.insecure_channel(f"127.0.0.1:{server.health_port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                service = container[probe]["grpc"].get("service", "")
                answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
                assert answer.status == health_pb2.HealthCheckResponse.SERVING, (probe, answer)
        for path in ("/metrics", "/healthz"):
            url = f"http://127.0.0.1:{server.metrics_port}{path}"
            with urllib.request.urlopen(url, timeout=10) as response:
                assert response.status == 200, path
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = genserve_pb2_grpc.GenerationServiceStub(channel)
            request = genserve_pb2.SampleRequest(model="tiny-gen", count=1, base_seed=1)
            with pytest.raises(grpc.RpcError) as refused:
                stub.Sample(request, timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            reply = stub.Sample(
                request, metadata=(("authorization", "Bearer genserve-test-token"),), timeout=10
            )
            assert len(reply.images) == 1
    finally:
        server.stop()
