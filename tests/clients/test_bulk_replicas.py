"""A bulk job over three real server processes on loopback (an address list, round_robin): every
replica computes part of the job, a replica killed mid-job costs nothing, and the files are the
bytes of the same job on one server."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from client_fakes import cli_main
from server_support import ServerProcess, start_server, wait_until, write_tiny_generator

from genserve_client.bulk import BulkJob, read_manifest
from genserve_client.channel import ChannelConfig, address_list_target

MODEL = "gen"
JOB = ("bulk", "--model", MODEL, "--n", "72", "--seed", "900", "--chunk-size", "2")


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[ServerProcess]]:
    """Three servers over one repository (one model file, so one sha256), started side by side."""
    repo = tmp_path_factory.mktemp("replica-models")
    write_tiny_generator(repo, MODEL)
    work = tmp_path_factory.mktemp("replicas")
    with ThreadPoolExecutor(3) as pool:
        started = list(pool.map(lambda i: start_server(repo, work / f"r{i}"), range(3)))
    yield started
    for server in started:
        server.stop()


def images_computed(server: ServerProcess) -> float:
    return server.metric("genserve_images_total", model=MODEL)


def job_files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "images").iterdir())}


def manifest(out: Path) -> list[dict[str, Any]]:
    return sorted(read_manifest(out / "manifest.jsonl")[0], key=lambda e: int(e["index"]))


def test_a_job_spreads_over_every_replica_and_survives_one_killed_mid_job(
    replicas: list[ServerProcess],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    before = [images_computed(s) for s in replicas]
    targets = ",".join(s.target for s in replicas)
    spread, single = tmp_path / "spread", tmp_path / "single"
    # The job stops before writing its first chunk until a replica has been killed: the kill lands
    # while the job is running, whatever the machine's speed.
    killed = threading.Event()
    write_chunk = BulkJob._write_chunk

    def after_the_kill(self: BulkJob, chunk: Any, sink: Any) -> None:
        killed.wait(120)
        write_chunk(self, chunk, sink)

    monkeypatch.setattr(BulkJob, "_write_chunk", after_the_kill)
    result: list[tuple[int, str, str]] = []
    run = (*JOB, "--concurrency", "3", "--stream-images", "6", "--retry-window", "60")
    job = threading.Thread(
        target=lambda: result.append(cli_main(capsys, "--target", targets, *run, "--out", str(spread)))
    )
    job.start()
    try:
        # The victim: a replica that is computing (or has computed) part of this job.
        wait_until(
            lambda: any(images_computed(s) > b for s, b in zip(replicas, before, strict=True)),
            60,
            "a replica to compute images of the job",
        )
        victim = next(s for s, b in zip(replicas, before, strict=True) if images_computed(s) > b)
        survivors = [s for s in replicas if s is not victim]
        os.kill(victim.pid, signal.SIGKILL)
        victim.proc.wait(30)
    finally:
        killed.set()
        job.join(180)
    assert not job.is_alive()
    [(code, out, err)] = result
    assert code == 0, err
    assert "72 images" in out
    # Every replica computed part of the job: the victim before it died, the others after.
    for server, count in zip(survivors, [before[replicas.index(s)] for s in survivors], strict=True):
        assert images_computed(server) > count, f"replica {server.target} got no work"
    monkeypatch.undo()
    # The same job on one server: the same entries, the same bytes.
    code, _, err = cli_main(capsys, "--target", survivors[0].target, *JOB, "--out", str(single))
    assert code == 0, err
    assert manifest(spread) == manifest(single)
    assert [e["index"] for e in manifest(spread)] == list(range(72))
    assert job_files(spread) == job_files(single)
    code, _, err = cli_main(capsys, "verify", str(spread), "--hashes")
    assert code == 0, err


def test_a_dead_address_in_the_list_is_skipped(
    replicas: list[ServerProcess], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A replica that is down when the job starts (the one killed above, or any) never gets the
    job stuck: round_robin sends every stream to the replicas that answer."""
    dead = next((s for s in replicas if s.proc.poll() is not None), None)
    alive = [s for s in replicas if s.proc.poll() is None]
    if dead is None:  # run alone: kill one here
        dead, alive = alive[0], alive[1:]
        os.kill(dead.pid, signal.SIGKILL)
        dead.proc.wait(30)
    before = [images_computed(s) for s in alive]
    targets = ",".join(s.target for s in [dead, *alive])
    out = tmp_path / "job"
    # Other seeds than the test above: images the servers computed then may be in their caches.
    run = (*JOB, "--seed", "5000", "--concurrency", "2", "--stream-images", "6", "--retry-window", "30")
    code, _, err = cli_main(capsys, "--target", targets, *run, "--out", str(out))
    assert code == 0, err
    assert [e["index"] for e in manifest(out)] == list(range(72))
    assert all(images_computed(s) > b for s, b in zip(alive, before, strict=True))


# --- the target: one address, a DNS name, or a list ------------------------------------------------


def test_an_address_list_becomes_one_balanced_channel_target() -> None:
    hosts = {"gpu-a": ["10.0.0.7"], "gpu-b": ["10.0.0.8", "fd00::8"], "v6-only": ["fd00::9"]}

    def resolve(host: str, port: int) -> list[str]:
        return hosts[host]

    assert (
        address_list_target("10.0.0.1:50051, 10.0.0.2:50052", resolve) == "ipv4:10.0.0.1:50051,10.0.0.2:50052"
    )
    assert address_list_target("gpu-a:1,gpu-b:2", resolve) == "ipv4:10.0.0.7:1,10.0.0.8:2"
    assert (
        address_list_target("[fd00::1]:1,v6-only:2,gpu-b:3", resolve)
        == "ipv6:[fd00::1]:1,[fd00::9]:2,[fd00::8]:3"
    )
    # One address, a DNS name, gRPC's own targets: unchanged.
    for target in ("gpu-a:50051", "dns:///genserve-headless:50051", "ipv4:10.0.0.1:1,10.0.0.2:1"):
        assert address_list_target(target, resolve) == target
    with pytest.raises(ValueError, match="--target: each address of a list must be host:port, got 'gpu-a'"):
        address_list_target("gpu-a,gpu-b:1", resolve)
    with pytest.raises(ValueError, match="mix IPv4 and IPv6"):
        address_list_target("gpu-a:1,v6-only:2", resolve)
    options = dict(ChannelConfig("gpu-a:1,gpu-b:2").options())
    assert options["grpc.lb_policy_name"] == "round_robin"
    assert options["grpc.default_authority"] == "gpu-a:1"  # what TLS checks: the name as written
    assert "grpc.default_authority" not in dict(ChannelConfig("dns:///svc:1").options())
    with pytest.raises(ValueError, match="lb_policy"):
        ChannelConfig(lb_policy="random")


def test_a_bad_address_list_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli_main(capsys, "--target", "127.0.0.1:1,nowhere", *JOB, "--out", str(tmp_path / "j"))
    assert code == 2
    assert "--target" in err and "'nowhere'" in err and "Traceback" not in err
    assert not (tmp_path / "j").exists()


def test_a_dns_target_works_like_an_address(
    replicas: list[ServerProcess], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`dns:///name:port` (a headless Service in Kubernetes) goes through gRPC's DNS resolver; here the
    name is localhost, which may also resolve to ::1 where no server listens: round_robin skips it."""
    alive = next(s for s in replicas if s.proc.poll() is None)
    out = tmp_path / "job"
    run = (*JOB, "--n", "12", "--seed", "7000", "--stream-images", "4", "--retry-window", "30")
    code, _, err = cli_main(capsys, "--target", f"dns:///localhost:{alive.port}", *run, "--out", str(out))
    assert code == 0, err
    assert [e["index"] for e in manifest(out)] == list(range(12))
