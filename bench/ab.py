"""A/B of two versions of the server in one run: the interactive hot path before and after a change.

`python -m bench.ab --base REV` checks REV out into a temporary git worktree (or `--base-tree PATH`:
a source tree as it is, e.g. a copy with one constant changed) and serves the same
models from it and from this tree, two server processes running side by side for the whole run and
measured in turns, model by model (A, B, B, A, ...), under the same client (this tree's
`genserve-client bench`). Per model and side: p50 at concurrency 1, images/s and
p99/p50 at concurrency 64 (RAW_UINT8, one image per request), the server's CPU ms per request, and
the transport's floor (p50 of a trivial health Check at c=1 through the same load generator,
`servers.rpc_floor_ms`) with the c=1 p50 over it. `--base-config` / `--config` give either side a
server config file: with `--base-tree .` that is an A/B of one setting of this tree.
It prints the medians over the rounds and the ratios B / A. Same machine, same run, same files:
only the server's code differs (its PYTHONPATH points at the other tree's `server/` and `api/`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any

from bench.common import REPO_ROOT, BenchModel, ctrl_c_exits_130, find_models, temporary_worktree, write_line
from bench.models import link_repository
from bench.servers import BenchError, ServerProcess, measured_level, rpc_floor_ms
from genserve_server.launcher import genserve_command

DEFAULT_MODELS = ("vae-digits-decoder", "cgan-digits", "dcgan-digits")
FIGURES = (
    "p50_c1_ms",
    "floor_c1_ms",
    "p50_c1_over_floor_ms",
    "img_s_c64",
    "p99_over_p50_c64",
    "cpu_ms_c1",
    "cpu_ms_c64",
)


def _serve(tree: Path, models: Path, config: Path | None = None) -> ServerProcess:
    """`tree`'s server on `models`, with the server config file `config` (None: the defaults)."""
    # Absolute: the server runs in the repository root, not in the caller's directory.
    tree, models = tree.resolve(), models.resolve()
    config = config.resolve() if config is not None else None
    if not (tree / "server" / "genserve_server").is_dir():
        # Its PYTHONPATH entry would name nothing and the side would run the next genserve_server
        # on the path (this tree's, or the installed one): B against itself, reported as an A/B.
        raise BenchError(f"{tree} has no server/genserve_server: not a genserve source tree")
    # In front of the caller's path, not instead of it: a device's onnxruntime-gpu is on that path.
    inherited = os.environ.get("PYTHONPATH", "")
    env = {"PYTHONPATH": f"{tree / 'server'}:{tree / 'api'}" + (f":{inherited}" if inherited else "")}
    extra = ("--config", str(config)) if config is not None else ()
    return ServerProcess("genserve", genserve_command(models, *extra), env=env)


def _subset(models_dir: Path, names: list[str], into: Path) -> Path:
    """A model repository of links to `names` in `models_dir` (bench-only models exported if absent)."""
    return link_repository(models_dir, names, into)


def _measure(server: ServerProcess, model: BenchModel, duration_s: float) -> dict[str, float]:
    options = model.client_options()  # labels, the RPC (SuperResolve, Translate) and an input size
    # The floor right before the c=1 level it is subtracted from: the machine's drift between them
    # is seconds, not a whole round.
    floor = rpc_floor_ms(server)
    c1 = measured_level(server, model.name, 1, duration_s, "raw", warmup_s=0.3, **options)
    c64 = measured_level(server, model.name, 64, duration_s, "raw", warmup_s=0.3, **options)
    return {
        "p50_c1_ms": float(c1["p50_ms"]),
        "floor_c1_ms": floor,
        "p50_c1_over_floor_ms": float(c1["p50_ms"]) - floor,
        "img_s_c64": float(c64["images_per_s"]),
        "p99_over_p50_c64": float(c64["p99_ms"]) / float(c64["p50_ms"]),  # issue 20's tail at saturation
        "cpu_ms_c1": float(c1["server_cpu_ms_per_request"]),
        "cpu_ms_c64": float(c64["server_cpu_ms_per_request"]),
    }


@ctrl_c_exits_130("bench.ab")
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="", help="git revision of side A (side B: this tree)")
    parser.add_argument(
        "--base-tree",
        type=Path,
        default=None,
        help="side A's source tree (its server/ and api/) instead of --base's worktree, e.g. a copy "
        "with one constant changed, or where there is no git history (a device machine)",
    )
    parser.add_argument("--models", nargs="*", default=list(DEFAULT_MODELS))
    parser.add_argument("--models-dir", type=Path, default=REPO_ROOT / "models")
    parser.add_argument(
        "--base-models-dir",
        type=Path,
        default=None,
        help="side A's models (default: REV's models/), e.g. this tree's model files under REV's config.json",
    )
    parser.add_argument(
        "--base-config",
        type=Path,
        default=None,
        help="side A's server config file (default: none), e.g. with `--base-tree .` an A/B of one "
        'setting: {"idle_spin_s": 0} against the default',
    )
    parser.add_argument("--config", type=Path, default=None, help="side B's server config file")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--duration-s", type=float, default=2.0)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    if bool(args.base) == (args.base_tree is not None):
        parser.error("give exactly one of --base REV and --base-tree PATH")
    label = (args.base or str(args.base_tree)) + (f" with {args.base_config}" if args.base_config else "")
    with tempfile.TemporaryDirectory(prefix="bench-ab-") as tmp:
        base = args.base_tree or Path(tmp) / "base"
        with contextlib.ExitStack() as stack:
            if args.base_tree is None:
                stack.enter_context(temporary_worktree(REPO_ROOT, args.base, base))
            # Each side serves its own tree's files (config.json fields change between versions),
            # and only the models measured: a server starts in seconds, whatever else is there.
            # A --base-tree holds no models: both sides serve --models-dir then.
            base_models = args.base_models_dir or (args.models_dir if args.base_tree else base / "models")
            repos = {"A": _subset(base_models, args.models, Path(tmp) / "A")}
            repos["B"] = _subset(args.models_dir, args.models, Path(tmp) / "B")
            found = {side: find_models(repo, args.models) for side, repo in repos.items()}
            measured = found["B"]  # how each is driven (kind, labels, input)
            for side, models in found.items():  # a name not found would be measured on neither side
                names = {m.name for m in models}
                if missing := [name for name in args.models if name not in names]:
                    parser.error(
                        f"--models: no model {', '.join(missing)} in side {side}'s models ({repos[side]})"
                    )
            sides: dict[str, list[dict[str, dict[str, float]]]] = {"A": [], "B": []}
            turns: list[list[str]] = []  # [model, side] in the order measured, every round
            # Both servers run for the whole comparison and take turns model by model (its floor, c=1
            # and c=64 on one side, then on the other), the first side alternating from model to
            # model and, for each model, from round to round (a count of turns alone would start an
            # even number of models' each on the same side every round): a change in the
            # machine's load lands on both sides within seconds. (Fresh servers per round, one after
            # the other, let minutes of drift decide the ratio.)
            a_side = _serve(base, repos["A"], args.base_config)
            with a_side as a_server, _serve(REPO_ROOT, repos["B"], args.config) as b_server:
                servers = {"A": a_server, "B": b_server}
                for r in range(args.rounds):
                    for side in sides:
                        sides[side].append({})
                    for i, m in enumerate(measured):
                        for side in ("A", "B") if (r + i) % 2 == 0 else ("B", "A"):
                            sides[side][-1][m.name] = _measure(servers[side], m, args.duration_s)
                            turns.append([m.name, side])
    b_label = "this tree" + (f" with {args.config}" if args.config else "")
    report: dict[str, Any] = {"base": label, "side_b": b_label, "rounds": args.rounds, "models": {}}
    write_line(f"A = {label}, B = {b_label}; medians of {args.rounds} rounds, RAW_UINT8, 1 image a request")
    write_line(f"{'model':<22}{'figure':<18}{'A':>10}{'B':>10}{'B/A':>8}")
    for name in args.models:
        report["models"][name] = {}
        for figure in FIGURES:
            a = statistics.median(r[name][figure] for r in sides["A"])
            b = statistics.median(r[name][figure] for r in sides["B"])
            report["models"][name][figure] = {"A": a, "B": b, "B/A": b / a if a else None}
            write_line(f"{name:<22}{figure:<18}{a:>10.3f}{b:>10.3f}{b / a if a else float('nan'):>8.3f}")
    # Every round's figures and the order of the turns: a bias of a position (the first model, the
    # first side of a turn) shows only there, not in the medians.
    report["per_round"] = sides
    report["turns"] = turns
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    raise SystemExit(main())
