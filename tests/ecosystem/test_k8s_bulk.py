"""deploy/k8s/bulk/: the Indexed Job that runs a bulk job's shards against the genserve pods, and
the Job that verifies their union, validate offline and agree with the client and the server.

Strict schema validation (kubernetes-validate) as for deploy/k8s/; then what the schemas cannot
see: the rules the API server adds for Indexed Jobs and pod failure policies, the container args
parse with the real `genserve-client` parser, --shard takes its index from the Indexed Job and its
count from `completions`, the target is the headless Service's gRPC port, the bulk pods are not
selected by the server's Services, and the verify Job checks the folder the shards write.
"""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from ecosystem_helpers import K8S_DIR, ROOT

from genserve_client.bulk import SHARD_ENV, Shard
from genserve_client.cli import build_parser

BULK_DIR = K8S_DIR / "bulk"
Manifest = dict[str, Any]


def _load(path: Path) -> list[Manifest]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _objects(directory: Path) -> dict[tuple[str, str], Manifest]:
    found: dict[tuple[str, str], Manifest] = {}
    for path in sorted(directory.glob("*.yaml")):
        if path.name in ("kustomization.yaml", "prometheus-adapter-rules.yaml"):  # not API objects
            continue
        for doc in _load(path):
            found[(doc["kind"], doc["metadata"]["name"])] = doc
    return found


@pytest.fixture(scope="module")
def bulk() -> dict[tuple[str, str], Manifest]:
    return _objects(BULK_DIR)


@pytest.fixture(scope="module")
def server() -> dict[tuple[str, str], Manifest]:
    return _objects(K8S_DIR)


def _container(job: Manifest) -> Manifest:
    [container] = job["spec"]["template"]["spec"]["containers"]
    return dict(container)


def _client_args(job: Manifest) -> argparse.Namespace:
    container = _container(job)
    assert container["command"] == ["genserve-client"]
    return build_parser().parse_args(container["args"])


@pytest.mark.parametrize("path", sorted(BULK_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_manifest_validates_against_its_schema(path: Path) -> None:
    if path.name == "kustomization.yaml":
        return
    for doc in _load(path):
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def test_the_kustomization_runs_the_job_and_leaves_verification_for_after() -> None:
    kustomization = _load(BULK_DIR / "kustomization.yaml")[0]
    # verify-job.yaml would run while the shards still write: it is applied once they completed.
    assert sorted(kustomization["resources"]) == ["job.yaml", "output-pvc.yaml"]
    assert (BULK_DIR / "verify-job.yaml").exists()


def test_the_validators_are_not_vacuous(bulk: dict[tuple[str, str], Manifest]) -> None:
    import copy

    job = copy.deepcopy(bulk[("Job", "genserve-bulk")])
    job["spec"]["parallelizm"] = 4  # a typo is an unknown field
    with pytest.raises(kubernetes_validate.ValidationError, match="parallelizm"):
        kubernetes_validate.validate(job, kubernetes_validate.latest_version(), strict=True)


def test_an_indexed_job_whose_pods_are_the_shards(bulk: dict[tuple[str, str], Manifest]) -> None:
    job = bulk[("Job", "genserve-bulk")]
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert 1 <= spec["parallelism"] <= spec["completions"]
    args = _client_args(job)
    assert args.command == "bulk"
    # `--shard N`: the pod's index comes from JOB_COMPLETION_INDEX, the count must be completions.
    assert args.shard == str(spec["completions"])
    for index in (0, spec["completions"] - 1):
        assert Shard.parse(args.shard, {SHARD_ENV: str(index)}) == Shard(index, spec["completions"])
    assert args.model and args.n and args.n >= spec["completions"]
    assert (ROOT / "models" / args.model).is_dir(), f"{args.model} is not a model of the image"
    assert args.concurrency >= 1 and args.retry_window > 0
    # The API server's rules for these fields (not in the OpenAPI schema).
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"  # required by podFailurePolicy
    assert spec["backoffLimitPerIndex"] >= 1  # per shard; needs completionMode Indexed
    assert spec.get("podReplacementPolicy") == "Failed"  # the only value with a podFailurePolicy
    rules = spec["podFailurePolicy"]["rules"]
    fail_index = [r for r in rules if r["action"] == "FailIndex"]
    assert fail_index and all(r["onExitCodes"]["containerName"] == "bulk" for r in fail_index)
    assert _container(job)["name"] == "bulk"
    # Exit 2 (a rejected request, bad arguments) repeats on every retry; 1 (outage) does not.
    failing = {code for r in fail_index for code in r["onExitCodes"]["values"]}
    assert failing == {2}
    assert _ignores_disruptions(rules)


def _ignores_disruptions(rules: list[Manifest]) -> bool:
    return any(
        r["action"] == "Ignore" and {"type": "DisruptionTarget"} in r.get("onPodConditions", [])
        for r in rules
    )


def test_the_shards_balance_over_the_headless_service(
    bulk: dict[tuple[str, str], Manifest], server: dict[tuple[str, str], Manifest]
) -> None:
    args = _client_args(bulk[("Job", "genserve-bulk")])
    scheme, _, rest = args.target.partition(":///")
    assert scheme == "dns", "a DNS name with one record per pod, so round_robin reaches every pod"
    host, _, port = rest.rpartition(":")
    service = server[("Service", host.split(".")[0])]
    assert service["spec"].get("clusterIP") == "None", f"{host} must be a headless Service"
    assert int(port) in {p["port"] for p in service["spec"]["ports"] if p["name"] == "grpc"}


def test_bulk_pods_are_not_server_pods(
    bulk: dict[tuple[str, str], Manifest], server: dict[tuple[str, str], Manifest]
) -> None:
    """No Service, PDB or PodMonitor of the server selects a bulk pod (a Service would send it RPCs)."""
    for job in (d for (k, _), d in bulk.items() if k == "Job"):
        labels = job["spec"]["template"]["metadata"]["labels"]
        for (kind, name), doc in server.items():
            selector = doc["spec"].get("selector")
            if not isinstance(selector, dict):
                continue
            match = selector.get("matchLabels", selector)
            assert not all(labels.get(k) == v for k, v in match.items()), f"{kind} {name} selects {labels}"


def test_same_image_and_user_as_the_server(
    bulk: dict[tuple[str, str], Manifest], server: dict[tuple[str, str], Manifest]
) -> None:
    deployment = server[("Deployment", "genserve")]["spec"]["template"]["spec"]
    for job in (d for (k, _), d in bulk.items() if k == "Job"):
        pod = job["spec"]["template"]["spec"]
        assert _container(job)["image"] == deployment["containers"][0]["image"]
        assert pod["securityContext"]["runAsUser"] == deployment["securityContext"]["runAsUser"]
        assert "nvidia.com/gpu" not in _container(job)["resources"].get("limits", {})


def test_verify_checks_the_folder_the_shards_write(bulk: dict[tuple[str, str], Manifest]) -> None:
    job, verify = bulk[("Job", "genserve-bulk")], bulk[("Job", "genserve-bulk-verify")]
    out = _client_args(job).out
    checked = _client_args(verify)
    assert checked.command == "verify" and checked.dirs == [out] and checked.hashes
    assert Path(checked.manifest_out).parent == Path(out)
    claims = {}
    for j in (job, verify):
        volumes = {v["name"]: v for v in j["spec"]["template"]["spec"]["volumes"]}
        [mount] = [
            m for m in _container(j)["volumeMounts"] if out.startswith(m["mountPath"].rstrip("/") + "/")
        ]
        claims[j["metadata"]["name"]] = volumes[mount["name"]]["persistentVolumeClaim"]["claimName"]
    [claim] = set(claims.values())
    pvc = bulk[("PersistentVolumeClaim", claim)]
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]  # the shards' pods write from many nodes


def test_the_shards_present_a_token_when_the_servers_require_one(
    bulk: dict[tuple[str, str], Manifest], server: dict[tuple[str, str], Manifest]
) -> None:
    [server_container] = server[("Deployment", "genserve")]["spec"]["template"]["spec"]["containers"]
    if "--token-file" not in server_container["args"]:
        pytest.skip("the shipped Deployment requires no token")
    job = bulk[("Job", "genserve-bulk")]
    token_file = Path(_client_args(job).token_file)
    mounts = {m["name"]: m["mountPath"] for m in _container(job)["volumeMounts"]}
    volumes = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
    [(name, mount_path)] = [(n, p) for n, p in mounts.items() if token_file.parent == Path(p)]
    secret = volumes[name]["secret"]
    assert secret["secretName"] == "genserve-auth"
    assert token_file.name in [item["path"] for item in secret["items"]]


def _containers(doc: Manifest) -> list[Manifest]:
    spec = doc.get("spec", {})
    pod = spec.get("template", {}).get("spec", {}) if doc["kind"] != "Pod" else spec
    return list(pod.get("containers", [])) + list(pod.get("initContainers", []))


def _deploy_commands() -> list[str]:
    """The shell commands of docs/deploy.md's bash blocks, in order: continuations joined, comments
    dropped, `a && b` split."""
    text = (ROOT / "docs" / "deploy.md").read_text()
    commands: list[str] = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                commands += [c.strip() for c in line.split("&&")]
    return commands


def test_the_documented_commands_give_every_genserve_pod_the_registry_image() -> None:
    """docs/deploy.md pushes the image to REGISTRY and points the manifests at it: every pod the
    documented commands then create must run REGISTRY's image. One left at the local tag
    `genserve:0.1.0` pulls docker.io/library/genserve (ImagePullBackOff): a Job's pods then wait
    forever and `kubectl wait --for=condition=complete` sits out its whole timeout."""
    cwd = ROOT
    images: dict[Path, dict[str, str]] = {}  # kustomization dir -> {image name: new image}
    applied: list[tuple[str, str]] = []  # (what, image)
    for command in _deploy_commands():
        words = shlex.split(command)
        if words[:1] == ["cd"]:
            cwd = ROOT if words[1:] == ["-"] else (cwd / words[1]).resolve()
        elif words[:4] == ["kustomize", "edit", "set", "image"]:
            for spec in words[4:]:
                name, _, new = spec.partition("=")
                images.setdefault(cwd, {})[name] = new
        elif words[:3] == ["kubectl", "apply", "-k"]:
            directory = (cwd / words[3]).resolve()
            override = images.get(directory, {})
            kustomization = _load(directory / "kustomization.yaml")[0]
            for resource in kustomization["resources"]:
                for doc in _load(directory / resource):
                    for container in _containers(doc):
                        name = container["image"].split(":")[0]
                        applied.append(
                            (f"{resource} {container['name']}", override.get(name, container["image"]))
                        )
        elif words[:2] == ["kubectl", "apply"] and "-f" in words and words[words.index("-f") + 1] != "-":
            path = (cwd / words[words.index("-f") + 1]).resolve()
            for doc in _load(path):
                for container in _containers(doc):
                    applied.append((f"{path.name} {container['name']}", container["image"]))
        elif words[:4] == ["kubectl", "set", "image", "--local"]:
            path = (cwd / words[words.index("-f") + 1]).resolve()
            new = dict(w.split("=", 1) for w in words if "=" in w and not w.startswith("-"))
            for doc in _load(path):
                for container in _containers(doc):
                    applied.append(
                        (f"{path.name} {container['name']}", new.get(container["name"], container["image"]))
                    )
    whats = {what for what, _ in applied}
    assert {"deployment.yaml genserve", "job.yaml bulk", "verify-job.yaml verify"} <= whats, whats
    local = [what for what, image in applied if image.startswith("genserve:")]
    assert not local, f"the documented commands run the local image tag in: {local}"


def test_the_documented_secret_holds_every_key_the_bulk_pods_mount(
    bulk: dict[tuple[str, str], Manifest],
) -> None:
    """The Job mounts the key `bulk-token` of the Secret genserve-auth: a Secret made with `tokens`
    alone (README.md's command for the servers) lacks it, and the shards' pods wait in
    ContainerCreating forever. The last Secret docs/deploy.md creates before it applies the Jobs
    must hold every key a bulk pod mounts, made in the batch jobs' own steps (after the servers are
    applied): a reader who made the Secret as README.md says comes to them with `tokens` alone."""
    mounted = {
        item["key"]
        for doc in bulk.values()
        for volume in doc.get("spec", {}).get("template", {}).get("spec", {}).get("volumes", [])
        if volume.get("secret", {}).get("secretName") == "genserve-auth"
        for item in volume["secret"].get("items", [])
    }
    assert mounted, "the bulk Jobs mount no key of genserve-auth: this test checks nothing"
    created: set[str] | None = None
    for command in _deploy_commands():
        words = shlex.split(command)
        if words[:5] == ["kubectl", "create", "secret", "generic", "genserve-auth"]:
            created = {w.split("=", 2)[1] for w in words if w.startswith("--from-file=")}
        elif words[:3] == ["kubectl", "apply", "-k"] and not words[3].rstrip("/").endswith("bulk"):
            created = None  # the servers' step: a Secret made before it may be README.md's
        elif words[:3] == ["kubectl", "apply", "-k"]:
            assert created is not None, "docs/deploy.md's batch-job steps make no Secret with bulk-token"
            assert mounted <= created, f"the Secret lacks {sorted(mounted - created)}"
            return
    pytest.fail("docs/deploy.md never applies deploy/k8s/bulk")
