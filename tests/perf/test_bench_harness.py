"""The bench's own arithmetic: what a level counts, how rounds pair, in what order an A/B measures.

No server runs here: the load generator's results and the server's CPU clock are stand-ins, so
that each figure can be checked against numbers known in advance.
"""

from __future__ import annotations

import contextlib
import json
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from bench import ab, fairness, run, servers
from bench.report import merge_rounds, paired_ratio, tail_ratio
from bench.servers import BenchError


class FakeServer:
    """What measured_level reads of a server: a name, a target, a pid whose CPU the fakes advance."""

    name = "genserve"
    target = "127.0.0.1:1"
    pid = 4242

    def __init__(self) -> None:
        self.cpu_s = 0.0

    def check_alive(self) -> None:
        pass


def _client_result(requests: int, failed: dict[str, int], window_s: float = 1.0) -> dict[str, Any]:
    """The load generator's JSON for one closed-loop level (genserve_client.bench.BenchResult)."""
    ok = requests - sum(failed.values())
    latencies = np.linspace(1.0, 2.0, ok)  # ms

    def pct(q: float) -> float | None:
        return float(np.percentile(latencies, q)) if ok else None

    return {
        "mode": "closed",
        "concurrency": 1,
        "rate": None,
        "duration_s": window_s,
        "requests": requests,
        "images": ok,
        "images_per_s": ok / window_s,
        "p50_ms": pct(50),
        "p95_ms": pct(95),
        "p99_ms": pct(99),
        "errors": failed,
    }


class FakeLoad:
    """client_bench's stand-in: 1000 requests a second of warm-up and of level, each costing the
    server 1 ms of CPU; `failed` of the level's requests fail."""

    def __init__(self) -> None:
        self.server = FakeServer()
        self.failed: dict[str, int] = {}

    def client_bench(
        self, target: str, model: str, concurrency: int, duration_s: float, fmt: str, **kwargs: Any
    ) -> dict[str, Any]:
        warmup_s = float(kwargs.get("warmup_s", 0.0))
        self.server.cpu_s += 1e-3 * round(1000 * (warmup_s + duration_s))  # the warm-up's work too
        return _client_result(round(1000 * duration_s), dict(self.failed), duration_s)


@pytest.fixture
def fake_load(monkeypatch: pytest.MonkeyPatch) -> FakeLoad:
    load = FakeLoad()
    monkeypatch.setattr(servers, "client_bench", load.client_bench)
    monkeypatch.setattr(servers, "cpu_seconds", lambda pid: load.server.cpu_s)
    return load


def test_the_cpu_per_request_of_a_level_is_its_own_requests_cpu_not_its_warm_ups(
    fake_load: FakeLoad,
) -> None:
    # bench.ab measures every level with a 0.3-s warm-up: its requests are not in the level's count,
    # so its CPU must not be in the level's CPU either (before: 1.15 ms a request for 1 ms, +15 %;
    # with a warm-up as long as the level, 2x).
    server = fake_load.server
    level = servers.measured_level(server, "m", 1, 2.0, "raw", warmup_s=0.3)  # type: ignore[arg-type]
    assert level["server_cpu_ms_per_request"] == pytest.approx(1.0)
    level = servers.measured_level(server, "m", 1, 1.0, "raw", warmup_s=1.0)  # type: ignore[arg-type]
    assert level["server_cpu_ms_per_request"] == pytest.approx(1.0)
    level = servers.measured_level(server, "m", 1, 1.0, "raw")  # type: ignore[arg-type]
    assert level["server_cpu_ms_per_request"] == pytest.approx(1.0)


def test_a_levels_cpu_utilisation_is_over_its_measured_window_not_the_clients_start_up(
    fake_load: FakeLoad, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The server's CPU clock is read around the whole client process: its start-up (imports,
    # GetModel, 0.5-1 s on these cores, the server idle) and then the level. The server's CPU over
    # that wall read 0.47 cores for a 1-s level that kept it 0.8 cores busy (bench.run --quick).
    clock = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])  # whatever clock the level reads
    level_only = fake_load.client_bench

    def client_bench(*args: Any, **kwargs: Any) -> dict[str, Any]:
        result = level_only(*args, **kwargs)
        clock[0] += 0.8 + float(result["duration_s"])  # start-up, then the level itself
        return result

    monkeypatch.setattr(servers, "client_bench", client_bench)
    # 1000 requests a second, 1 ms of server CPU each: one core busy throughout the level.
    level = servers.measured_level(fake_load.server, "m", 1, 2.0, "raw")  # type: ignore[arg-type]
    assert level["server_cpu_utilisation"] == pytest.approx(1.0)
    assert level["server_cpu_ms_per_request"] == pytest.approx(1.0)


def test_a_level_whose_requests_failed_is_not_published_as_a_measurement(
    fake_load: FakeLoad,
) -> None:
    # 300 of 1000 requests ran into their deadline: they are in no latency (the slowest requests
    # leave the p99), and the CPU they cost was divided over them as if served. Before, the level
    # came back as a clean one and its figures went into the ratios and the targets with no trace.
    server = fake_load.server
    fake_load.failed = {"DEADLINE_EXCEEDED": 300}
    with pytest.raises(BenchError, match=r"300 of 1000 requests failed.*DEADLINE_EXCEEDED"):
        servers.measured_level(server, "m", 64, 1.0, "raw")  # type: ignore[arg-type]
    # bench.run keeps it as a failed turn, which merge_rounds counts and leaves out.
    model = SimpleNamespace(name="m", client_options=lambda: {})
    level = run._measure(server, model, "raw", 64, 1.0)  # type: ignore[arg-type]
    assert "images_per_s" not in level and "DEADLINE_EXCEEDED" in level["error"]


def test_a_level_where_every_image_request_failed_fails_without_crashing_the_run(
    fake_load: FakeLoad,
) -> None:
    # bench.image_load exited 0 when every request failed (p50 None); the run's progress line then
    # formatted None as a float and the whole run died with a TypeError, its results unwritten.
    server = fake_load.server
    fake_load.failed = {"UNAVAILABLE": 1000}
    model = SimpleNamespace(name="m", client_options=lambda: {})
    level = run._measure(server, model, "raw", 64, 1.0)  # type: ignore[arg-type]
    assert run._describe(level).startswith("FAILED")


def _level(images_per_s: float, p50: float = 1.0) -> dict[str, Any]:
    return {
        "concurrency": 64,
        "images_per_s": images_per_s,
        "p50_ms": p50,
        "p99_ms": 2 * p50,
        "server_cpu_ms_per_request": 1.0,
    }


FAILED = {"concurrency": 64, "error": "load failed"}


def test_paired_rounds_stay_paired_when_a_round_failed() -> None:
    # Round by round: genserve -, 100, 300; naive 100, 150, -. The only pair both ran is round 2:
    # 100 / 150. Before, the failed turns were dropped and the survivors paired by position
    # (100 / 100 and 300 / 150): 1.5, not 0.67.
    genserve = merge_rounds([FAILED, _level(100.0), _level(300.0)])
    naive = merge_rounds([_level(100.0), _level(150.0), FAILED])
    ratio, spread = paired_ratio(genserve, naive, "images_per_s")
    assert ratio == pytest.approx(100.0 / 150.0)
    assert spread == (pytest.approx(100.0 / 150.0), pytest.approx(100.0 / 150.0))
    assert genserve["failed_rounds"] == 1 and genserve["images_per_s"] == 200.0
    assert tail_ratio(genserve) == pytest.approx(2.0)  # a failed round has no tail to count


def test_a_levels_figures_are_the_medians_of_its_rounds() -> None:
    rounds = [_level(ips, p50) for ips, p50 in ((100.0, 4.0), (400.0, 1.0), (250.0, 2.0), (300.0, 3.0))]
    merged = merge_rounds(rounds)
    assert merged["images_per_s"] == statistics.median([100.0, 400.0, 250.0, 300.0]) == 275.0
    assert merged["p50_ms"] == 2.5 and merged["p99_ms"] == 5.0
    assert tail_ratio(merged) == pytest.approx(2.0)


def test_the_load_generators_percentiles_are_over_the_successful_calls_of_the_measured_window() -> None:
    from genserve_client.bench import BenchResult, _Recorder

    rec = _Recorder()
    rec.latencies_s = [i / 1000 for i in range(1, 101)]  # 1..100 ms
    rec.errors["UNAVAILABLE"] = 7
    rec.last_ok = 10.0
    got = rec.result(BenchResult("closed", 4, None, 10.0), started=5.0, end=9.0)
    assert (got.p50_ms, got.p99_ms) == (pytest.approx(50.5), pytest.approx(99.01))
    assert got.requests == 107 and got.images == 100
    assert got.images_per_s == pytest.approx(100 / 5.0)  # over the window, first start to last success
    assert got.errors == {"UNAVAILABLE": 7}


def test_an_ab_run_takes_turns_model_by_model(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # bench.ab's docstring: "measured in turns, level by level (A, B, B, A, ...)", so that a change
    # of the machine's load "lands on both sides within seconds". Before, a side measured every
    # model in a round before the other side measured any: the two measurements of one model were
    # a whole side's sweep apart (3 models x ~9 s by default), not seconds.
    order: list[tuple[str, str]] = []

    @contextlib.contextmanager
    def serve(tree: Path, models: Path, config: Path | None = None) -> Iterator[SimpleNamespace]:
        yield SimpleNamespace(side="A" if tree == tmp_path else "B")

    def measure(server: SimpleNamespace, model: SimpleNamespace, duration_s: float) -> dict[str, float]:
        order.append((server.side, model.name))
        return dict.fromkeys(ab.FIGURES, 1.0)

    models = [SimpleNamespace(name=n) for n in ("m1", "m2", "m3")]
    monkeypatch.setattr(ab, "_serve", serve)
    monkeypatch.setattr(ab, "_measure", measure)
    monkeypatch.setattr(ab, "_subset", lambda models_dir, names, into: into)
    monkeypatch.setattr(ab, "find_models", lambda root, names: models)
    argv = ["bench.ab", "--base-tree", str(tmp_path), "--models", "m1", "m2", "m3", "--rounds", "2"]
    monkeypatch.setattr(sys, "argv", argv)
    ab.main()
    assert order[:6] == [("A", "m1"), ("B", "m1"), ("B", "m2"), ("A", "m2"), ("A", "m3"), ("B", "m3")]
    for name in ("m1", "m2", "m3"):  # every round measures each model on both sides, back to back
        turns = [i for i, (_, m) in enumerate(order) if m == name]
        assert len(turns) == 4 and turns[1] == turns[0] + 1 and turns[3] == turns[2] + 1


@pytest.mark.parametrize("names", [("m1",), ("m1", "m2"), ("m1", "m2", "m3"), ("m1", "m2", "m3", "m4")])
def test_an_ab_run_alternates_which_side_measures_each_model_first(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, names: tuple[str, ...]
) -> None:
    # The side measured second finds the machine as the first left it (caches, clocks, the other
    # server's idle spin): bench.ab alternates the first side so that each model is measured first
    # by A in half of its rounds and by B in the other half, whatever the number of models.
    firsts: dict[str, list[str]] = {name: [] for name in names}
    last: list[str] = []

    @contextlib.contextmanager
    def serve(tree: Path, models: Path, config: Path | None = None) -> Iterator[SimpleNamespace]:
        yield SimpleNamespace(side="A" if tree == tmp_path else "B")

    def measure(server: SimpleNamespace, model: SimpleNamespace, duration_s: float) -> dict[str, float]:
        if last != [model.name]:  # the first of the model's two turns in this round
            firsts[model.name].append(server.side)
            last[:] = [model.name]
        else:
            last.clear()
        return dict.fromkeys(ab.FIGURES, 1.0)

    models = [SimpleNamespace(name=n) for n in names]
    monkeypatch.setattr(ab, "_serve", serve)
    monkeypatch.setattr(ab, "_measure", measure)
    monkeypatch.setattr(ab, "_subset", lambda models_dir, names, into: into)
    monkeypatch.setattr(ab, "find_models", lambda root, names: models)
    argv = ["bench.ab", "--base-tree", str(tmp_path), "--models", *names, "--rounds", "4"]
    monkeypatch.setattr(sys, "argv", argv)
    ab.main()
    alternating = (["A", "B", "A", "B"], ["B", "A", "B", "A"])
    assert firsts == {name: alternating[i % 2] for i, name in enumerate(names)}


@pytest.mark.parametrize("bulk_fails", [True, False])
def test_the_priority_targets_are_not_met_by_a_bulk_stream_that_never_ran(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, bulk_fails: bool
) -> None:
    # The bulk worker dies (its stream refused, say) and writes nothing: the "loaded" level then
    # measured an idle server, p99 about the idle one, and both issue-8 targets read "yes".
    from bench import priority

    class Server:
        target, pid = "127.0.0.1:1", 4242

        def __enter__(self) -> Server:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

    class Worker:
        returncode = 1

        def __init__(self, command: list[str]) -> None:
            out = Path(command[command.index("--out") + 1])
            if not bulk_fails:
                out.write_text('{"images": 6400, "images_per_s": 640.0}')

        def poll(self) -> int | None:
            return 1 if bulk_fails else None

        def wait(self, timeout: float | None = None) -> int:
            return 1

        def kill(self) -> None:
            pass

    monkeypatch.setattr(priority.ServerProcess, "genserve", classmethod(lambda cls, repo: Server()))
    monkeypatch.setattr(priority, "client_bench", lambda *a, **k: {"p99_ms": 5.0, "p50_ms": 4.0})
    monkeypatch.setattr(priority, "cpu_seconds", lambda pid: 0.0)
    monkeypatch.setattr(priority.subprocess, "Popen", Worker)
    monkeypatch.setattr(priority.time, "sleep", lambda s: None)
    model = SimpleNamespace(name="m", kind=SimpleNamespace(conditional=False), max_batch_size=64)
    raw = {"points": [{"batch": 64, "latency_p50_ms": 80.0}]}
    result = priority.run_priority(tmp_path, model, duration_s=1.0, raw=raw)  # type: ignore[arg-type]
    if bulk_fails:
        assert result["target_ratio_1_2_met"] is None and result["target_one_batch_met"] is None
        assert "not measured" in priority.describe(result)
    else:
        assert result["target_ratio_1_2_met"] is True and result["target_one_batch_met"] is True


def test_the_fairness_bench_refuses_a_level_whose_requests_failed(
    fake_load: FakeLoad, monkeypatch: pytest.MonkeyPatch
) -> None:
    # bench.fairness read p50 and p99 straight from the client's JSON: refused or expired calls were
    # in neither, so a server that shed the slow half of its load read as a fair one.
    monkeypatch.setattr(fairness, "client_bench", fake_load.client_bench)
    model = SimpleNamespace(name="m", client_options=lambda: {"labels": []})
    level = fairness._level(fake_load.server, model, 32, 1.0)  # type: ignore[arg-type]
    assert level["p99_ms"] > level["p50_ms"] > 0
    fake_load.failed = {"RESOURCE_EXHAUSTED": 10}
    with pytest.raises(BenchError, match=r"m c=32: 10 of 1000 requests failed.*RESOURCE_EXHAUSTED"):
        fairness._level(fake_load.server, model, 32, 1.0)  # type: ignore[arg-type]


def test_the_fairness_bench_refuses_a_model_it_cannot_find_before_measuring(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # `--other-model cgan-digitz` (a typo): the round started a server, measured every saturation
    # level and the idle small client of the heavy model, then died with KeyError: 'cgan-digitz'.
    rounds: list[object] = []
    monkeypatch.setattr(fairness, "one_round", lambda *a: rounds.append(a) or {})
    argv = ["--saturate", "cgan-digits", "--heavy-model", "dcgan-digits", "--other-model", "cgan-digitz"]
    with pytest.raises(SystemExit) as exited:
        fairness.main([*argv, "--rounds", "1", "--duration-s", "0.1"])
    assert exited.value.code != 0 and "no model cgan-digitz" in capsys.readouterr().err
    assert rounds == []


def test_a_fairness_run_stopped_while_linking_the_base_sides_models_removes_its_worktree(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # `--base REV` checks REV out into a temporary worktree, then links (a bench-only model missing
    # from --models-dir: exports, minutes) side A's models outside the try that removes it: Ctrl-C
    # or a failed export there left the worktree registered, its folder deleted with the temp dir.
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "base"], check=True)

    def worktrees() -> list[str]:
        listed = subprocess.run([*git, "worktree", "list"], capture_output=True, text=True, check=True)
        return listed.stdout.splitlines()

    def subset(models_dir: Path, names: list[str], into: Path) -> Path:
        if into.name == "A":
            raise KeyboardInterrupt  # Ctrl-C while side A's models are exported
        return into

    before = worktrees()
    monkeypatch.setattr(fairness, "REPO_ROOT", repo)
    monkeypatch.setattr(fairness, "_subset", subset)
    assert fairness.main(["--base", "HEAD", "--rounds", "1"]) == 130
    assert capsys.readouterr().err.splitlines() == ["bench.fairness: interrupted"]
    assert worktrees() == before


@pytest.mark.parametrize("command", ["bench.ab", "bench.fairness"])
def test_a_base_run_stopped_while_git_adds_its_worktree_leaves_no_worktree_registered(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    # Ctrl-C (a SIGINT to the bench alone: `kill -INT`, an IDE's stop) while `git worktree add` ran
    # came outside the try that removes the worktree, and subprocess.run killed git: its worktree
    # stayed registered ('locked' where git was killed mid-checkout, 'prunable' once the temp dir
    # went), and the checkout's orphaned child wrote on into the temp dir being removed.
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "base"], check=True)
    adding, signalled = tmp_path / "adding", tmp_path / "signalled"
    hook = repo / ".git" / "hooks" / "post-checkout"  # git worktree add runs it, the worktree made
    # git stays in the hook until the SIGINT was sent (at most 30 s), whatever the machine's load.
    wait = f"i=0; while [ ! -e '{signalled}' ] && [ $i -lt 600 ]; do sleep 0.05; i=$((i+1)); done"
    hook.write_text(f"#!/bin/sh\ntouch '{adding}'\n{wait}\n")
    hook.chmod(0o755)

    def worktrees() -> list[str]:
        listed = subprocess.run([*git, "worktree", "list"], capture_output=True, text=True, check=True)
        return listed.stdout.splitlines()

    main_thread = threading.main_thread().ident
    assert main_thread is not None

    def ctrl_c_while_adding() -> None:
        for _ in range(600):
            if adding.exists():
                # To the main thread: os.kill may land on another thread, and the main thread,
                # waiting for git, would not see it until git ended.
                signal.pthread_kill(main_thread, signal.SIGINT)
                signalled.touch()
                return
            time.sleep(0.05)

    before = worktrees()
    monkeypatch.setattr(ab, "REPO_ROOT", repo)
    monkeypatch.setattr(fairness, "REPO_ROOT", repo)
    sender = threading.Thread(target=ctrl_c_while_adding, daemon=True)
    sender.start()
    if command == "bench.ab":
        monkeypatch.setattr(sys, "argv", ["bench.ab", "--base", "HEAD", "--models", "m"])
        assert ab.main() == 130
    else:
        assert fairness.main(["--base", "HEAD", "--rounds", "1"]) == 130
    sender.join()
    err = capsys.readouterr().err  # grpc's fork warnings in this process may come first
    assert err.splitlines()[-1] == f"{command}: interrupted" and "Traceback" not in err, err
    assert worktrees() == before
    assert not list((repo / ".git").glob("worktrees/*"))


def test_an_image_load_level_without_one_success_fails_the_run(capsys: pytest.CaptureFixture[str]) -> None:
    """bench.image_load exited 0 when every call failed (here SuperResolve, which the fake server
    does not serve: UNIMPLEMENTED), so a script took a run that measured nothing for a result: it
    exits 1 naming the level and the server's reason, as genserve-client bench; a run that served
    still exits 0."""
    from concurrent import futures

    import grpc
    from client_fakes import FakeService

    from bench import image_load
    from genserve.v1 import genserve_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    genserve_pb2_grpc.add_GenerationServiceServicer_to_server(FakeService(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        run = ["--target", f"127.0.0.1:{port}", "--model", "fake-i2i"]  # a model the fake serves
        run += ["--concurrency", "1", "--duration", "0.2"]
        assert image_load.main([*run, "--warmup", "0", "--method", "SuperResolve"]) == 1
        err = capsys.readouterr().err
        assert "UNIMPLEMENTED" in err and "no successful request at concurrency 1" in err, err
        assert image_load.main([*run, "--warmup", "0", "--method", "Translate", "--image-size", "4x4"]) == 0
    finally:
        server.stop(grace=None)


def test_a_bench_server_leaves_no_scratch_folder_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each ServerProcess ran its server in a mkdtemp folder (ready file, server.log) that nothing
    # removed: every bench run left a /tmp/bench-genserve-*, bench-naive-*, bench-naive-sync-* per
    # server, stopped or failed to start.
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    ready = "import json, os, sys, time; json.dump({'port': 1, 'pid': os.getpid()}, open(sys.argv[-1], 'w'))"
    with servers.ServerProcess("fake", [sys.executable, "-c", f"{ready}; time.sleep(60)"]) as server:
        assert server.running is not None and server.running.log_path.parent.parent == tmp_path
    assert list(tmp_path.iterdir()) == []
    with (
        pytest.raises(BenchError, match="no such model"),
        servers.ServerProcess("fake", [sys.executable, "-c", "import sys; sys.exit('no such model')"]),
    ):
        pass
    assert list(tmp_path.iterdir()) == []


def test_a_startup_bench_whose_server_does_not_start_says_so_in_one_line_naming_its_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A server that exited (here: no model repository) ended bench.startup in a RuntimeError
    # traceback, the log's tail pasted into it and the log itself deleted with its folder.
    import tempfile

    from bench import startup

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with pytest.raises(SystemExit) as exited:
        startup.main(["--models", str(tmp_path / "no-models"), "--timeout-s", "120"])
    message = str(exited.value.code)
    assert exited.value.code not in (0, None) and "\n" not in message
    log = next(p for p in tmp_path.rglob("*.log"))
    assert str(log) in message and "model repository directory not found" in log.read_text()


def test_a_soak_leaves_no_scratch_folder_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # bench.soak wrote its tiny repository into a mkdtemp("soak-") folder that nothing removed:
    # every soak, finished or failed, left a /tmp/soak-* behind.
    import tempfile

    from bench import soak

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    out = tmp_path / "soak.json"
    short = ["--duration-s", "0.2", "--warmup-s", "0", "--sample-s", "0.1", "--threads", "0"]
    short += ["--out", str(out)]
    assert soak.main(short) in (0, 1)  # its growth after 0.2 s is no verdict
    assert json.loads(out.read_text())["samples"]
    assert list(scratch.iterdir()) == []
    with pytest.raises(BenchError):
        soak.main([*short, "--models", str(tmp_path / "no-models")])
    assert list(scratch.iterdir()) == []


def test_a_metrics_overhead_run_whose_second_server_fails_to_start_stops_the_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # bench.metrics_overhead started both servers outside the try that stops them: the second
    # failing to start (its port, its log's 'did not start') left the first one running.
    from bench import metrics_overhead

    stopped: list[str] = []

    class Started:
        def __init__(self, name: str) -> None:
            self.name = name

        def stop(self) -> None:
            stopped.append(self.name)

    def start_server(models: Path, workdir: Path, *, metrics: bool) -> Started:
        if not metrics:
            raise RuntimeError("the metrics-off server did not start")
        return Started("on")

    monkeypatch.setattr(metrics_overhead, "start_server", start_server)
    with pytest.raises(RuntimeError, match="did not start"):
        metrics_overhead.main(["--models", str(tmp_path / "models")])
    assert stopped == ["on"]


def _profile_sections(lines: list[str]) -> dict[str, dict[str, float]]:
    sections: dict[str, dict[str, float]] = {}
    for line in lines[1:]:
        if not line.startswith(" "):
            current = sections.setdefault(line.rstrip(":"), {})
        elif "%" in line:
            share, name = line.strip().split("%", 1)
            current[name.strip()] = float(share)
    return sections


def test_a_profile_recorded_without_threads_counts_its_outermost_frame_as_a_function(tmp_path: Path) -> None:
    # bench/profile.md records with `py-spy record --format raw` and no --threads, so a line's first
    # frame is the outermost function (the main thread's <module>), not a thread: profile_summary
    # listed it under "threads:" and left it out of the inclusive and self shares (a sample of
    # <module> alone was "<idle>").
    from bench import profile_summary

    recorded = tmp_path / "prof.txt"
    recorded.write_text(
        "<module> (genserve_server/__main__.py:5);run (asyncio/runners.py:118) 6\n"
        "<module> (genserve_server/__main__.py:5) 1\n"
        "_bootstrap (threading.py:1002);run (threading.py:982);_worker (concurrent/futures/thread.py:83) 3\n"
    )
    got = _profile_sections(profile_summary.summarise(recorded))
    assert got["inclusive"]["<module> (__main__.py)"] == 70.0
    assert got["inclusive"]["_bootstrap (threading.py)"] == 30.0
    assert got["self"] == {
        "run (runners.py)": 60.0,
        "_worker (thread.py)": 30.0,
        "<module> (__main__.py)": 10.0,
    }
    assert got["threads"] == {}
    # With --threads, the root frame py-spy adds is the thread.
    recorded.write_text(
        "thread (4242): MainThread;<module> (genserve_server/__main__.py:5);run (asyncio/runners.py:118) 6\n"
        "thread (4243);_bootstrap (threading.py:1002);_worker (concurrent/futures/thread.py:83) 4\n"
    )
    got = _profile_sections(profile_summary.summarise(recorded))
    assert got["threads"] == {"thread (4242): MainThread": 60.0, "thread (4243)": 40.0}
    assert got["self"] == {"run (runners.py)": 60.0, "_worker (thread.py)": 40.0}
