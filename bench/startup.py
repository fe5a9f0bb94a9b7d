"""Start-up time to READY per model: how long `genserve-server serve` takes until each model serves.

Starts the server on a model repository (`models/` by default) with `--log-json`, once per round,
and reads its own log: the wall time from the process start to each version's "ready in" line (the
moment it serves), its load time (load + warm-up, from that line, waits for the load gate
included), the seconds its warm-up spent timing batch sizes and which sizes it timed (the
"warmed batch sizes" line), the time until the whole server is SERVING (every model tried and
required ones READY) and until `--ready-file` appears, and the machine's load average around each
round (start-up is CPU-bound: on a shared machine the figures follow the other work).

    .venv/bin/python -m bench.startup [--models models] [--rounds 1] [--json out.json]

Not part of `make bench`: it measures start-up, not serving.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import DEFAULT_MODELS, ctrl_c_exits_130, write_line

READY = re.compile(r"^model (?P<model>\S+) version (?P<version>\S+) ready in (?P<load_s>[0-9.]+) s")
WARMED = re.compile(
    r"^model (?P<model>\S+) version (?P<version>\S+): warmed batch sizes (?P<sizes>\[[0-9, ]*\]) "
    r"in (?P<warm_s>[0-9.]+) s"
)


def load_average() -> float | None:
    """The 1-minute load average: the machine may be shared, and start-up times follow it."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


class StartFailed(RuntimeError):
    """The server exited or timed out before its ready file: the message names its kept log."""


def one_round(models: Path, timeout_s: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="genserve-startup-") as work:
        ready_file = Path(work) / "ready.json"
        log_path = Path(work) / "stderr.log"
        args = [
            sys.executable,
            "-m",
            "genserve_server",
            "serve",
            "--models",
            str(models),
            "--port",
            "0",
            "--metrics-port",
            "0",
            "--log-json",
            "--ready-file",
            str(ready_file),
        ]
        with log_path.open("wb") as log:
            spawned = time.time()
            proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=log)
        try:
            deadline = time.monotonic() + timeout_s
            while not ready_file.exists():
                if proc.poll() is not None or time.monotonic() > deadline:
                    code = proc.returncode
                    why = f"exited with {code}" if code is not None else f"was not ready in {timeout_s:g} s"
                    kept = Path(tempfile.mkdtemp(prefix="genserve-startup-failed-")) / "server.log"
                    shutil.copyfile(log_path, kept)  # `work` goes with the exception
                    raise StartFailed(f"bench.startup: the server {why}; its log: {kept}")
                time.sleep(0.05)
            all_tried_s = time.time() - spawned
        finally:
            proc.terminate()
            proc.wait(60)
        versions: dict[str, dict[str, Any]] = {}
        warmed: dict[str, dict[str, Any]] = {}
        serving_s = None
        loading_s = None  # imports, the provider probe, the scan and the bind come first
        for line in log_path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            msg = record.get("msg", "")
            match = READY.match(msg)
            if match:
                versions[f"{match['model']}:{match['version']}"] = {
                    "ready_after_start_s": round(record["ts"] - spawned, 3),
                    "load_s": float(match["load_s"]),
                }
            elif (warm := WARMED.match(msg)) is not None:
                warmed[f"{warm['model']}:{warm['version']}"] = {
                    "warmed_sizes": json.loads(warm["sizes"]),
                    "warm_s": float(warm["warm_s"]),
                }
            elif msg == "server SERVING" and serving_s is None:
                serving_s = round(record["ts"] - spawned, 3)
            elif msg.startswith("loading ") and loading_s is None:
                loading_s = round(record["ts"] - spawned, 3)
        for name, info in warmed.items():
            versions.setdefault(name, {}).update(info)
        return {
            "versions": versions,
            "loading_s": loading_s,
            "serving_s": serving_s,
            "all_tried_s": round(all_tried_s, 3),
        }


@ctrl_c_exits_130("bench.startup")
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", type=Path, default=DEFAULT_MODELS, help="model repository (default models/)"
    )
    parser.add_argument("--rounds", type=int, default=1, help="server starts (default 1)")
    parser.add_argument("--timeout-s", type=float, default=600.0, help="per start (default 600)")
    parser.add_argument("--json", type=Path, default=None, help="write the rounds here")
    args = parser.parse_args(argv)
    rounds = []
    for _ in range(args.rounds):
        before = load_average()
        try:
            result = one_round(args.models, args.timeout_s)
        except StartFailed as exc:
            raise SystemExit(str(exc)) from None
        result["load_average"] = {"before": before, "after": load_average()}
        rounds.append(result)
    names = sorted(
        {name for r in rounds for name in r["versions"] if "ready_after_start_s" in r["versions"][name]}
    )
    write_line(
        f"{'model:version':28} {'ready after start (s)':>22} {'load + warm-up (s)':>19} "
        f"{'timing (s)':>10}  timed batch sizes (last round)"
    )
    for name in sorted(
        names,
        key=lambda n: statistics.median(
            r["versions"][n]["ready_after_start_s"] for r in rounds if n in r["versions"]
        ),
    ):
        runs = [r["versions"][name] for r in rounds if "ready_after_start_s" in r["versions"].get(name, {})]
        ready = statistics.median(v["ready_after_start_s"] for v in runs)
        load = statistics.median(v["load_s"] for v in runs)
        warm = [v["warm_s"] for v in runs if "warm_s" in v]
        warm_text = f"{statistics.median(warm):10.2f}" if warm else f"{'-':>10}"
        write_line(f"{name:28} {ready:22.2f} {load:19.2f} {warm_text}  {runs[-1].get('warmed_sizes', '-')}")
    loading = [r["loading_s"] for r in rounds if r["loading_s"] is not None]
    if loading:
        write_line(
            f"loading started after {statistics.median(loading):.2f} s (imports, provider probe, bind)"
        )
    serving = [r["serving_s"] for r in rounds if r["serving_s"] is not None]
    write_line(
        f"whole server SERVING after {statistics.median(serving):.2f} s" if serving else "never SERVING"
    )
    write_line(
        f"every model tried (ready file) after {statistics.median(r['all_tried_s'] for r in rounds):.2f} s"
    )
    loads = ", ".join(f"{r['load_average']['before']} -> {r['load_average']['after']}" for r in rounds)
    write_line(f"1-minute load average before -> after each round (a shared machine slows start-up): {loads}")
    if args.json is not None:
        args.json.write_text(json.dumps({"models": str(args.models), "rounds": rounds}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
