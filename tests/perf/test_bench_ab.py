"""bench.ab gives each side its own server config file (an A/B of one setting of one tree) and refuses
models it cannot find."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from exec_support import exec_wrapped

from bench import ab
from bench.common import REPO_ROOT
from bench.servers import BenchError


def test_each_side_starts_with_its_own_server_config(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    config = tmp_path / "server.json"
    config.write_text(json.dumps({"idle_spin_s": 0.5}))  # out of range: the server must refuse it
    with pytest.raises(BenchError, match="idle_spin_s"), ab._serve(REPO_ROOT, models, config):
        pass
    assert "--config" not in ab._serve(REPO_ROOT, models).command


def test_an_ab_run_refuses_a_model_it_cannot_find_before_measuring(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # `--models dcgan-digits cgan-digitz` (a typo): the link to the missing model dangles, find_models
    # skips it, every round measures the other model on both sides, and the report then died with a
    # KeyError: minutes of measuring, no table, no JSON.
    measured: list[str] = []

    @contextlib.contextmanager
    def serve(tree: Path, models: Path, config: Path | None = None) -> Iterator[SimpleNamespace]:
        yield SimpleNamespace()

    def measure(server: SimpleNamespace, model: SimpleNamespace, duration_s: float) -> dict[str, float]:
        measured.append(model.name)
        return dict.fromkeys(ab.FIGURES, 1.0)

    monkeypatch.setattr(ab, "_serve", serve)
    monkeypatch.setattr(ab, "_measure", measure)
    monkeypatch.setattr(ab, "_subset", lambda models_dir, names, into: into)
    monkeypatch.setattr(ab, "find_models", lambda root, names: [SimpleNamespace(name="dcgan-digits")])
    out = tmp_path / "ab.json"
    argv = ["bench.ab", "--base-tree", str(tmp_path), "--models", "dcgan-digits", "cgan-digitz"]
    monkeypatch.setattr(sys, "argv", [*argv, "--rounds", "2", "--json", str(out)])
    with pytest.raises(SystemExit) as exited:
        ab.main()
    assert exited.value.code != 0 and "--models: no model cgan-digitz" in capsys.readouterr().err
    assert measured == []


def test_a_sides_tree_and_config_given_relative_to_the_callers_directory_are_its_servers_too(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # The servers run in the repository root: `--base-tree base --base-config a.json`, given from
    # another directory, named REPO_ROOT/base/server on side A's PYTHONPATH (absent, so side A ran
    # the code found after it, this tree's or the installed one) and REPO_ROOT/a.json as its config.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "base" / "server" / "genserve_server").mkdir(parents=True)
    server = ab._serve(Path("base"), Path("models"), Path("a.json"))
    assert server.env is not None
    assert server.env["PYTHONPATH"].split(":")[:2] == [
        str(tmp_path / "base" / "server"),
        str(tmp_path / "base" / "api"),
    ]
    command = server.command
    assert command[command.index("--config") + 1] == str(tmp_path / "a.json")
    assert command[command.index("--models") + 1] == str(tmp_path / "models")


def test_a_side_whose_tree_holds_no_server_is_refused_not_run_as_another_tree(tmp_path: Path) -> None:
    """A --base-tree without server/genserve_server (a typo, the wrong folder) put a path to nothing
    first on side A's PYTHONPATH, and side A ran the next genserve_server found: this tree's or the
    installed one, B against itself, reported as an A/B."""
    with pytest.raises(BenchError, match="no server/genserve_server"):
        ab._serve(tmp_path / "elsewhere", tmp_path / "models")


AB_INTERRUPTED = """
import os, signal, sys, time
from bench import ab

enter, pids = ab.ServerProcess.__enter__, sys.argv[1]


def started(server):  # each server's pid, once it serves
    enter(server)
    with open(pids, "a") as f:
        f.write(f"{server.pid}\\n")
    return server


def measure(server, model, duration_s):  # Ctrl-C once both servers serve, as the first turn begins
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(30)


ab.ServerProcess.__enter__ = started
ab._measure = measure
sys.argv = ["bench.ab", "--base", "HEAD", "--models", "dcgan-digits", "--rounds", "1"]
raise SystemExit(ab.main())
"""


def _worktrees() -> set[str]:
    listed = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "worktree", "list", "--porcelain"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {line.split(" ", 1)[1] for line in listed.splitlines() if line.startswith("worktree ")}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_an_ab_run_stopped_by_ctrl_c_stops_both_servers_and_removes_its_worktree(tmp_path: Path) -> None:
    # `python -m bench.ab --base REV` checks REV out into a temporary worktree and serves both
    # sides: Ctrl-C mid-run must leave neither server running nor the worktree registered.
    before = _worktrees()
    started = tmp_path / "started.jsonl"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        exec_wrapped([sys.executable, "-c", AB_INTERRUPTED, str(started)], sigint="default"),  # as a terminal
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO_ROOT,
        env=env,
    )
    assert proc.returncode == 130, f"exit {proc.returncode}:\n{proc.stderr}"
    assert proc.stderr.splitlines() == ["bench.ab: interrupted"], proc.stderr
    assert started.exists(), "the run was interrupted before its first turn"
    pids = [int(line) for line in started.read_text().splitlines()]
    assert len(pids) == 2 and not [pid for pid in pids if _alive(pid)]
    assert _worktrees() == before


def test_an_ab_runs_json_keeps_every_rounds_figures_and_the_order_of_its_turns(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # The JSON held the medians only: whether a side read low in one position of a round (the first
    # model, the side measured first after the other's turn) could not be checked after a run
    # (bench/profile.md, thirty-first round: the first-listed model's B/A read 0.82-0.89).
    figure = iter(range(1, 1000))

    @contextlib.contextmanager
    def serve(tree: Path, models: Path, config: Path | None = None) -> Iterator[SimpleNamespace]:
        yield SimpleNamespace(side="A" if tree == tmp_path else "B")

    def measure(server: SimpleNamespace, model: SimpleNamespace, duration_s: float) -> dict[str, float]:
        return dict.fromkeys(ab.FIGURES, float(next(figure)))

    monkeypatch.setattr(ab, "_serve", serve)
    monkeypatch.setattr(ab, "_measure", measure)
    monkeypatch.setattr(ab, "_subset", lambda models_dir, names, into: into)
    models = [SimpleNamespace(name="m1"), SimpleNamespace(name="m2")]
    monkeypatch.setattr(ab, "find_models", lambda root, names: models)
    out = tmp_path / "ab.json"
    argv = ["bench.ab", "--base-tree", str(tmp_path), "--models", "m1", "m2", "--rounds", "2"]
    monkeypatch.setattr(sys, "argv", [*argv, "--json", str(out)])
    ab.main()
    report = json.loads(out.read_text())
    turns = [["m1", "A"], ["m1", "B"], ["m2", "B"], ["m2", "A"]]
    turns += [["m1", "B"], ["m1", "A"], ["m2", "A"], ["m2", "B"]]
    assert report["turns"] == turns
    # The figures of the n-th turn are n: each round's figure is found under its side and model.
    for n, (name, side) in enumerate(turns, start=1):
        assert report["per_round"][side][(n - 1) // 4][name] == dict.fromkeys(ab.FIGURES, float(n))
