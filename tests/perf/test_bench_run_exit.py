"""bench.run's exit code and README: a run whose levels failed is no result to publish."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from exec_support import exec_wrapped

from bench import run
from bench.common import DEFAULT_MODELS, REPO_ROOT, find_models


class _Server:
    def __init__(self, name: str) -> None:
        self.name, self.pid, self.port, self.target = name, 1, 1, "127.0.0.1:1"

    def __enter__(self) -> _Server:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


@dataclass
class FakeRun:
    readme: Path
    out: Path


@pytest.fixture
def fake_run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> FakeRun:
    """bench.run with no server, no ONNX Runtime and no README: dcgan-digits, every level served."""
    model = next(m for m in find_models(DEFAULT_MODELS) if m.name == "dcgan-digits")
    raw = {
        "model": model.name,
        "kind": str(model.kind),
        "input_shapes": {"z": [100]},
        "max_batch_size": 64,
        "points": [{"batch": 1, "images_per_s": 9000.0, "latency_p50_ms": 0.11, "ms_per_image": 0.11}],
        "concurrent_points": [],
    }
    fake = FakeRun(tmp_path / "README.md", tmp_path / "out.json")
    monkeypatch.setattr(run, "assemble_repository", lambda *a: tmp_path)
    monkeypatch.setattr(run, "find_models", lambda repo: [model])
    monkeypatch.setattr(run.raw_limit, "measure_model", lambda m, duration_s: raw)
    monkeypatch.setattr(run, "client_bench", lambda *a, **k: {})
    monkeypatch.setattr(run.ServerProcess, "genserve", classmethod(lambda cls, repo: _Server("genserve")))
    monkeypatch.setattr(run.ServerProcess, "naive", classmethod(lambda cls, repo: _Server("naive")))
    monkeypatch.setattr(run.ServerProcess, "naive_sync", classmethod(lambda cls, repo: _Server("naive-sync")))

    def served(server: Any, name: str, c: int, *a: Any, **k: Any) -> dict[str, Any]:
        return {
            "concurrency": c,
            "images_per_s": 1000.0,
            "p50_ms": 1.0,
            "p99_ms": 1.2,
            "server_cpu_ms_per_request": 0.1,
        }

    monkeypatch.setattr(run, "measured_level", served)
    monkeypatch.setattr(run, "update_readme", lambda path, table: fake.readme.write_text(table))
    return fake


def test_a_run_whose_levels_were_all_served_exits_0_and_publishes(fake_run: FakeRun) -> None:
    assert run.main(["--quick", "--no-priority", "--out", str(fake_run.out)]) == 0
    assert fake_run.out.exists() and fake_run.readme.exists()


def test_a_run_whose_levels_all_failed_exits_non_zero_and_leaves_the_readme(
    fake_run: FakeRun, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every call refused (a model that does not load, a server out of memory): bench.run printed a
    # table of "–", rewrote bench/README.md's results with it and exited 0, so `make bench` passed.
    def refused(server: Any, name: str, c: int, *a: Any, **k: Any) -> dict[str, Any]:
        raise run.BenchError(f"{server.name} {name} c={c}: 10 of 10 requests failed (UNAVAILABLE x10)")

    monkeypatch.setattr(run, "measured_level", refused)
    code = run.main(["--quick", "--no-priority", "--out", str(fake_run.out)])
    assert code != 0
    assert fake_run.out.exists()  # what was measured (the raw limit, the failures) is still written
    assert not fake_run.readme.exists()  # a failed run does not replace the published figures


def test_a_priority_bench_that_fails_keeps_the_runs_serving_results(
    fake_run: FakeRun, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The priority bench runs last (after ~20 min of levels on a full run). Its interactive level
    # had a refused call (check_no_failures) or its server did not start: the BenchError went
    # through bench.run's main as a traceback and nothing was written, every level measured lost.
    def priority_fails(*a: Any, **k: Any) -> dict[str, Any]:
        raise run.BenchError(
            "dcgan-digits c=1 under the bulk stream: 3 of 900 requests failed (UNAVAILABLE x3)"
        )

    monkeypatch.setattr(run.priority, "run_priority", priority_fails)
    code = run.main(["--quick", "--out", str(fake_run.out)])
    assert code != 0  # the priority figures are missing: no complete result
    results = json.loads(fake_run.out.read_text())
    assert {e["server"] for e in results["serving"]} == {"genserve", "naive", "naive-sync"}
    assert "3 of 900 requests failed" in results["priority"]["error"]
    targets = [t for t in results["summary"]["targets"] if t["target"].startswith("interactive p99")]
    assert targets and all(t["met"] is False and t["value"] is None for t in targets)
    assert not fake_run.readme.exists()


def test_a_warm_up_that_fails_is_a_failed_level_not_a_lost_run(
    fake_run: FakeRun, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each model's unmeasured warm-up ran outside the levels' error handling: a server refusing every
    # call of one model made `genserve-client bench` exit 1, the BenchError went through main and the
    # levels of every model measured before were never written.
    def refused(server: Any, name: str, c: int, *a: Any, **k: Any) -> dict[str, Any]:
        raise run.BenchError(f"{server.name} {name} c={c}: 10 of 10 requests failed (UNAVAILABLE x10)")

    def warm_up_refused(target: str, *a: Any, **k: Any) -> dict[str, Any]:
        raise run.BenchError("load failed (1): genserve-client bench: no successful request")

    monkeypatch.setattr(run, "client_bench", warm_up_refused)
    monkeypatch.setattr(run, "measured_level", refused)
    code = run.main(["--quick", "--no-priority", "--out", str(fake_run.out)])
    assert code != 0
    results = json.loads(fake_run.out.read_text())
    assert {e["server"] for e in results["serving"]} == {"genserve", "naive", "naive-sync"}


def test_a_run_refuses_a_model_name_it_cannot_find_before_measuring(
    fake_run: FakeRun, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # `--models dcgan-digits cgan-digitz` (a typo): the scratch repository links only what exists, so
    # the run measured dcgan-digits alone, exited 0 and rewrote bench/README.md's table without the
    # model asked for, saying nothing about it.
    measured: list[str] = []

    def raw(model: Any, duration_s: float) -> dict[str, Any]:
        measured.append(model.name)
        return {}

    monkeypatch.setattr(run.raw_limit, "measure_model", raw)
    argv = ["--quick", "--no-priority", "--out", str(fake_run.out), "--models", "dcgan-digits", "cgan-digitz"]
    with pytest.raises(SystemExit) as exited:
        run.main(argv)
    assert exited.value.code != 0 and "--models: no model cgan-digitz" in capsys.readouterr().err
    assert measured == [] and not fake_run.out.exists() and not fake_run.readme.exists()


def test_report_only_recomputes_a_run_on_another_models_dir_from_its_own_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # bench/README.md's sr-free-x4 run (`--models-dir /tmp/srfree`, bench/results/sr-free-cpu-*.json):
    # `--report-only` looked its models up in models/ alone and died with KeyError: 'sr-free-x4'.
    from bench import free_sr

    source = json.loads((REPO_ROOT / "bench" / "results" / "sr-free-cpu-after.json").read_text())
    free_sr.write(tmp_path / "srfree")
    source["settings"]["models_dir"] = str(tmp_path / "srfree")
    earlier = tmp_path / "earlier.json"
    earlier.write_text(json.dumps(source))
    monkeypatch.setattr(run, "SCRATCH", tmp_path / "scratch")
    out = tmp_path / "out.json"
    argv = ["--report-only", str(earlier), "--out", str(out), "--no-readme", "--no-bench-models"]
    assert run.main(argv) == 0
    rows = json.loads(out.read_text())["summary"]["rows"]
    assert [(r["model"], r["class"]) for r in rows] == [("sr-free-x4", "compute-bound")]


def test_the_documented_report_only_command_recomputes_its_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # bench/README.md's `python -m bench.run --report-only bench/results/latest.json` named a run of
    # dcgan-photos-256 and pix2pix-denoise, models no longer in models/: it stopped at once.
    import re
    import shlex

    readme = (REPO_ROOT / "bench" / "README.md").read_text(encoding="utf-8")
    found = re.search(r"`python -m bench\.run (--report-only [^`]*)`", readme.replace("\n", " "))
    assert found, "bench/README.md documents no --report-only command"
    argv = shlex.split(found.group(1))
    source = REPO_ROOT / argv[argv.index("--report-only") + 1]
    before = source.read_bytes()
    out = tmp_path / "out.json"
    if "--out" in argv:
        argv[argv.index("--out") + 1] = str(out)
    else:  # its default is bench/results/latest.json, a committed run
        argv += ["--out", str(out)]
    if "--no-readme" not in argv:  # the README's table is the committed run's
        argv.append("--no-readme")
    monkeypatch.setattr(run, "SCRATCH", tmp_path / "scratch")
    monkeypatch.chdir(REPO_ROOT)
    earlier = json.loads(before)
    named = {r["model"] for r in earlier["raw"]} | {e["model"] for e in earlier["serving"]}
    if not any(name.startswith("bench-") for name in named):
        argv.append("--no-bench-models")  # bench-dcgan-64 would be exported for nothing
    assert run.main(argv) == 0
    rows = json.loads(out.read_text())["summary"]["rows"]
    assert {r["model"] for r in rows} == {e["model"] for e in earlier["serving"]}
    assert source.read_bytes() == before


def test_report_only_without_out_leaves_the_last_runs_results_as_they_were(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--report-only JSON` measures nothing and prints the recomputed tables; without --out it wrote
    them over bench/results/latest.json (its run's default), the last run's results, with another
    run's. It writes a JSON only where --out names one, and leaves the source as it was."""
    from bench import free_sr

    source = json.loads((REPO_ROOT / "bench" / "results" / "sr-free-cpu-after.json").read_text())
    free_sr.write(tmp_path / "srfree")
    source["settings"]["models_dir"] = str(tmp_path / "srfree")
    earlier = tmp_path / "earlier.json"
    earlier.write_text(json.dumps(source))
    latest = tmp_path / "bench" / "results" / "latest.json"
    latest.parent.mkdir(parents=True)
    latest.write_text('{"the last run": true}\n')
    monkeypatch.setattr(run, "SCRATCH", tmp_path / "scratch")
    monkeypatch.chdir(tmp_path)
    before = earlier.read_bytes()
    assert run.main(["--report-only", str(earlier), "--no-readme", "--no-bench-models"]) == 0
    assert "sr-free-x4" in capsys.readouterr().out
    assert latest.read_text() == '{"the last run": true}\n' and earlier.read_bytes() == before
    assert sorted(p.name for p in latest.parent.iterdir()) == ["latest.json"]


RUN_INTERRUPTED = """
import os, signal, sys, time
from bench import run
from bench.common import DEFAULT_MODELS


def measure_model(model, duration_s):  # Ctrl-C while the raw limit is measured
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(30)


run.assemble_repository = lambda *a: DEFAULT_MODELS
run.raw_limit.measure_model = measure_model
argv = ["--quick", "--no-priority", "--no-readme", "--models", "dcgan-digits", "--out", sys.argv[1]]
sys.exit(run.main(argv))
"""


def test_a_run_stopped_by_ctrl_c_exits_130_with_one_line_and_no_traceback(tmp_path: Path) -> None:
    # Ctrl-C ended `python -m bench.run` with a KeyboardInterrupt traceback, where every other
    # command of the project says one line and exits 130.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        exec_wrapped([sys.executable, "-c", RUN_INTERRUPTED, str(tmp_path / "out.json")], sigint="default"),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO_ROOT,
        env=env,
    )
    assert proc.returncode == 130, f"exit {proc.returncode}:\n{proc.stderr}"
    assert proc.stderr.splitlines() == ["bench.run: interrupted"], proc.stderr
    assert not (tmp_path / "out.json").exists()


CTRL_C_AS_IT_BEGINS = """
import argparse, os, runpy, signal, sys, time

parse_args = argparse.ArgumentParser.parse_args


def parsed_then_ctrl_c(self, *a, **k):  # Ctrl-C once its arguments are read, as its work begins
    args = parse_args(self, *a, **k)
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(30)
    return args


argparse.ArgumentParser.parse_args = parsed_then_ctrl_c
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""

# Every runnable bench module, with the arguments it needs to begin.
BENCH_COMMANDS = {
    "bench.ab": ["--base-tree", "."],
    "bench.arena_shrink": [],
    "bench.cache": [],
    "bench.fairness": [],
    "bench.footprint": [],
    "bench.free_sr": ["--out", "{tmp}/srfree"],
    "bench.image_load": ["--model", "sr-digits-x2", "--method", "SuperResolve"],
    "bench.metrics_overhead": [],
    "bench.naive_server": ["--models", "models"],
    "bench.priority": [],
    "bench.profile_summary": ["{tmp}/profile.json"],
    "bench.raw_limit": [],
    "bench.run": ["--quick"],
    "bench.scrape": [],
    "bench.soak": [],
    "bench.startup": [],
    "bench.step_batching": [],
}


def test_every_bench_module_has_its_arguments_here() -> None:
    runnable = {
        f"bench.{path.stem}"
        for path in (REPO_ROOT / "bench").glob("*.py")
        if 'if __name__ == "__main__"' in path.read_text(encoding="utf-8")
    }
    assert runnable == set(BENCH_COMMANDS)


@pytest.mark.parametrize("module", sorted(BENCH_COMMANDS))
def test_every_bench_command_stopped_by_ctrl_c_exits_130_with_one_line_and_no_traceback(
    module: str, tmp_path: Path
) -> None:
    # Ctrl-C ended python -m bench.soak (ab, cache, fairness, ...) with a KeyboardInterrupt traceback
    # and the naive server with exit 0, where bench.run and every other command say one line, exit 130.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    argv = [arg.format(tmp=tmp_path) for arg in BENCH_COMMANDS[module]]
    proc = subprocess.run(
        exec_wrapped([sys.executable, "-c", CTRL_C_AS_IT_BEGINS, module, *argv], sigint="default"),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO_ROOT,
        env=env,
    )
    assert proc.returncode == 130, f"exit {proc.returncode}:\n{proc.stderr}"
    assert proc.stderr.splitlines() == [f"{module}: interrupted"], proc.stderr


@pytest.mark.parametrize("mode", [[], ["--sync"]], ids=["asyncio", "sync"])
@pytest.mark.parametrize(
    ("sig", "code", "stderr"),
    [(signal.SIGINT, 130, ["bench.naive_server: interrupted"]), (signal.SIGTERM, 0, [])],
    ids=["ctrl-c", "sigterm"],
)
def test_a_serving_naive_server_stopped_by_ctrl_c_exits_130_and_by_sigterm_0(
    mode: list[str], sig: signal.Signals, code: int, stderr: list[str], tmp_path: Path
) -> None:
    # The naive server swallowed Ctrl-C and exited 0, as if it had ended of itself; SIGTERM (how
    # bench stops it) killed the asyncio one, exit -15, where the sync one and genserve exit 0.
    from bench.models import link_repository

    models = link_repository(DEFAULT_MODELS, ["dcgan-digits"], tmp_path / "models")
    ready = tmp_path / "ready.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "bench.naive_server", "--models", str(models), *mode]
    proc = subprocess.Popen(
        exec_wrapped([*command, "--ready-file", str(ready)], sigint="default"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO_ROOT,
        env=env,
    )
    try:
        while not ready.exists():
            assert proc.poll() is None, proc.communicate()[1]
            time.sleep(0.05)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == code, f"exit {proc.returncode}:\n{err}"
    # Its log lines go to stderr too: besides them, the one line or nothing (no traceback).
    assert [line for line in err.splitlines() if not re.match(r"\d{4}-\d\d-\d\d ", line)] == stderr, err


RUN_TERMINATED = """
import sys, time
from pathlib import Path
from bench import run
from bench.common import DEFAULT_MODELS, find_models
from bench.servers import ServerProcess

empty, pids = Path(sys.argv[1]), Path(sys.argv[2])
model = next(m for m in find_models(DEFAULT_MODELS) if m.name == "dcgan-digits")
raw = {"points": [{"batch": 1, "images_per_s": 1.0, "latency_p50_ms": 1.0}], "concurrent_points": []}


def serve_pair(servers, *args, **kwargs):  # SIGTERM while the levels are measured
    pids.write_text(" ".join(str(s.pid) for s in servers if isinstance(s, ServerProcess)))
    time.sleep(60)


run.assemble_repository = lambda *a: empty
run.find_models = lambda repo: [model]
run.raw_limit.measure_model = lambda m, duration_s: raw

class Fake:
    name, pid, port = "naive", 1, 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


# One real server (a naive one on an empty repository: it starts in a second), two stand-ins.
naive = ServerProcess.naive
run.ServerProcess.genserve = classmethod(lambda cls, repo: naive(empty))
run.ServerProcess.naive = run.ServerProcess.naive_sync = classmethod(lambda cls, repo: Fake())
run.serve_pair = serve_pair
argv = ["--quick", "--no-priority", "--no-readme", "--no-bench-models", "--out", str(empty / "out.json")]
sys.exit(run.main(argv))
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_run_stopped_by_sigterm_stops_its_servers_and_exits_143(tmp_path: Path) -> None:
    # `timeout 600 python -m bench.run`, a CI job's cancel or `kill` sends SIGTERM: Python's default
    # ended the run at once, no `with` left, and its three servers ran on as orphans (with their
    # /tmp/bench-* folders) until someone found them.
    empty, pids = tmp_path / "models", tmp_path / "pids"
    empty.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    env["TMPDIR"] = str(tmp_path)  # a server's scratch folder, left behind or not, stays in tmp_path
    proc = subprocess.Popen(
        [sys.executable, "-c", RUN_TERMINATED, str(empty), str(pids)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO_ROOT,
        env=env,
    )
    servers: list[int] = []
    try:
        deadline = time.monotonic() + 90
        while not pids.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pids.exists(), f"the run's servers never started (exit {proc.poll()})"
        servers = [int(p) for p in pids.read_text().split()]
        assert len(servers) == 1 and all(_alive(p) for p in servers)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 143, f"exit {proc.returncode}:\n{err}"
        assert err.splitlines() == ["bench.run: terminated (SIGTERM)"], err
        assert [p for p in servers if _alive(p)] == []
    finally:
        for pid in servers:  # a server the run left behind: stopped here, by its pid
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
