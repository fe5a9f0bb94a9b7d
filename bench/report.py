"""Ratios, targets and the Markdown tables of a benchmark run (bench/README.md, between markers)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import BenchModel
from bench.raw_limit import best_within

BEGIN = "<!-- bench:results:begin -->"
END = "<!-- bench:results:end -->"

# Model classes of issue 8: image-input kinds (super-resolution, translation) are compute-bound;
# generators are tiny below TINY_MS raw ms per image at the best batch size, else mid-size. Issue 8
# names "the 256x256 default" a mid-size generator, and a measured class would flip between runs
# for a generator near 2 ms an image (bench-dcgan-256: 1.9-2.1 ms on these cores).
TINY_MS = 0.5


def model_class(model: BenchModel, ms_per_image: float) -> str:
    if model.kind.fully_convolutional:  # super-resolution, translation
        return "compute-bound"
    return "tiny" if ms_per_image < TINY_MS else "mid-size"


def _levels(
    serving: Sequence[dict[str, Any]], server: str, model: str, fmt: str, *, failed: bool = False
) -> dict[int, dict[str, Any]]:
    """The server's measured levels by concurrency; with `failed`, its failed ones too (no figures)."""
    for entry in serving:
        if entry["server"] == server and entry["model"] == model and entry["format"] == fmt:
            return {lvl["concurrency"]: lvl for lvl in entry["levels"] if failed or "images_per_s" in lvl}
    return {}


NAIVE_SERVERS = ("naive", "naive-sync")  # bench.naive_server: asyncio, and --sync (grpc.server + threads)


def better_naive(serving: Sequence[dict[str, Any]], model: str, fmt: str) -> dict[int, dict[str, Any]]:
    """Per concurrency level, the naive server that served more images/s (issue 20: genserve is
    judged against the better baseline); each level names it under "server"."""
    best: dict[int, dict[str, Any]] = {}
    for server in NAIVE_SERVERS:
        for c, level in _levels(serving, server, model, fmt).items():
            if c not in best or level["images_per_s"] > best[c]["images_per_s"]:
                best[c] = {**level, "server": server}
    return best


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


# What each round keeps in the JSON next to the medians.
ROUND_KEYS = ("images_per_s", "p50_ms", "p99_ms", "server_cpu_ms_per_request")


def merge_rounds(rounds: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One level from several turns at it: the median of every number, and the turns themselves.

    Failed turns are left out of the medians (and counted); if every turn failed, the first failure
    is the level.
    """
    ok = [r for r in rounds if "images_per_s" in r]
    if len(rounds) == 1 or not ok:
        return dict(rounds[0])
    merged = dict(ok[0])
    for key, value in ok[0].items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            values = [r[key] for r in ok if isinstance(r.get(key), int | float)]
            merged[key] = statistics.median(values)
    # Every turn in its place, a failed one as None figures: paired_ratio pairs the servers' turns by
    # position, and a dropped turn would pair one server's round with the other's next.
    merged["rounds"] = [{k: r.get(k) for k in ROUND_KEYS} for r in rounds]
    merged["failed_rounds"] = len(rounds) - len(ok)
    return merged


def paired_ratio(
    a: dict[str, Any] | None, b: dict[str, Any] | None, key: str
) -> tuple[float | None, tuple[float, float] | None]:
    """a ÷ b for `key`: the median of the per-round ratios (with their range) when both levels ran the
    same number of rounds side by side, else the ratio of the two values."""
    if a is None or b is None:
        return None, None
    ra, rb = a.get("rounds"), b.get("rounds")
    if ra and rb and len(ra) == len(rb):
        pairs = zip(ra, rb, strict=True)
        ratios = [x[key] / y[key] for x, y in pairs if x.get(key) is not None and y.get(key)]
        if ratios:
            return statistics.median(ratios), (min(ratios), max(ratios))
    return _ratio(_get(a, key), _get(b, key)), None


# Concurrency levels whose p99/p50 the summary reports (issue 20: <= 1.5 at c=32 and c=64).
TAIL_LEVELS = (32, 64)
TAIL_RATIO_GOAL = 1.5


def tail_ratio(level: dict[str, Any] | None) -> float | None:
    """p99 ÷ p50 of one level: the median of its rounds' ratios where it ran several, else of its
    medians (a p99 and a p50 from different rounds are not one run's tail)."""
    if level is None:
        return None
    ratios = [
        r["p99_ms"] / r["p50_ms"] for r in level.get("rounds") or () if r.get("p99_ms") and r.get("p50_ms")
    ]
    if ratios:
        return float(statistics.median(ratios))
    return _ratio(_get(level, "p99_ms"), _get(level, "p50_ms"))


def _get(level: dict[str, Any] | None, key: str) -> float | None:
    if level is None or level.get(key) is None:
        return None
    return float(level[key])


def summarise(results: dict[str, Any], models: Sequence[BenchModel]) -> dict[str, Any]:
    """Per model and format: the three ratios of the issue, plus the targets and whether each is met."""
    raw = {r["model"]: r for r in results["raw"]}
    by_name = {m.name: m for m in models}
    rows: list[dict[str, Any]] = []
    targets: list[dict[str, Any]] = []
    pairs = sorted({(e["model"], e["format"]) for e in results["serving"]})
    for name, fmt in pairs:
        model = by_name[name]
        limit = best_within(raw[name], model.max_batch_size)
        b1 = next(p for p in raw[name]["points"] if p["batch"] == 1)
        gen = _levels(results["serving"], "genserve", name, fmt)
        # The levels genserve was driven at, failed ones included: the top is the run's top level,
        # not the highest one that succeeded (a failed c=64 judged at c=32 would read as met).
        ran = _levels(results["serving"], "genserve", name, fmt, failed=True)
        failed = sorted(c for c in ran if c not in gen)
        naive = better_naive(results["serving"], name, fmt)
        top = max(ran) if ran else None
        g_top, n_top = gen.get(top) if top else None, naive.get(top) if top else None
        g1, n1 = gen.get(1), naive.get(1)
        cls = model_class(model, float(limit["ms_per_image"]))
        speedup, speedup_range = paired_ratio(g_top, n_top, "images_per_s")
        cpu_ratio, cpu_ratio_range = paired_ratio(g_top, n_top, "server_cpu_ms_per_request")
        tail_levels = [c for c in TAIL_LEVELS if c in ran]
        row = {
            "model": name,
            "format": fmt,
            "class": cls,
            "raw_best_images_per_s": limit["images_per_s"],
            "raw_best_batch": limit["batch"],
            "raw_b1_p50_ms": b1["latency_p50_ms"],
            "concurrency_top": top,
            # Levels where genserve failed in every turn: their targets are not met.
            "genserve_failed_levels": failed,
            "genserve_images_per_s": _get(g_top, "images_per_s"),
            "naive_images_per_s": _get(n_top, "images_per_s"),
            "naive_server_top": None if n_top is None else n_top["server"],
            "naive_server_c1": None if n1 is None else n1["server"],
            "genserve_over_limit": _ratio(_get(g_top, "images_per_s"), limit["images_per_s"]),
            "naive_over_limit": _ratio(_get(n_top, "images_per_s"), limit["images_per_s"]),
            "genserve_over_naive": speedup,
            "genserve_over_naive_range": speedup_range,
            "genserve_p50_c1_ms": _get(g1, "p50_ms"),
            "naive_p50_c1_ms": _get(n1, "p50_ms"),
            "genserve_p50_c1_minus_raw_b1_ms": None
            if g1 is None
            else float(g1["p50_ms"]) - b1["latency_p50_ms"],
            "naive_p50_c1_minus_raw_b1_ms": None
            if n1 is None
            else float(n1["p50_ms"]) - b1["latency_p50_ms"],
            "genserve_cpu_ms_per_request": _get(g_top, "server_cpu_ms_per_request"),
            "naive_cpu_ms_per_request": _get(n_top, "server_cpu_ms_per_request"),
            "cpu_per_request_ratio": cpu_ratio,
            "cpu_per_request_ratio_range": cpu_ratio_range,
            # The saturated tail (issue 20), beside the better naive server's at the same level (a
            # batching server's p50 is lower, so its ratio reads higher for the same spread in ms);
            # keyed by the level as a string, as the JSON keeps it.
            "genserve_p99_over_p50": {str(c): tail_ratio(gen.get(c)) for c in tail_levels},
            "naive_p99_over_p50": {str(c): tail_ratio(naive.get(c)) for c in tail_levels},
            "genserve_p99_over_naive_p50_top": _ratio(_get(g_top, "p99_ms"), _get(n_top, "p50_ms")),
        }
        rows.append(row)
        targets.extend(_targets(row))
    prio = results.get("priority")
    if prio:
        missing = "error" in prio  # the priority bench failed: its targets have no value, none is met
        for target, key, digits, goal, met in (
            ("interactive p99 under bulk <= 1.2 x idle p99", "p99_ratio", 3, 1.2, "target_ratio_1_2_met"),
            (
                "interactive p99 under bulk <= idle p99 + one bulk batch (ms over idle)",
                "p99_excess_ms",
                2,
                None if missing else prio["bulk_batch_compute_ms"],
                "target_one_batch_met",
            ),
        ):
            targets.append(
                {
                    "model": prio["model"],
                    "format": "raw",
                    "target": target,
                    "value": None if missing else round(prio[key], digits),
                    "goal": goal,
                    "met": False if missing else prio[met],
                }
            )
    return {"rows": rows, "targets": targets}


def _targets(row: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    failed = set(row.get("genserve_failed_levels") or ())

    def add(target: str, value: float | None, goal: float, higher_is_better: bool, level: int | None) -> None:
        met = None if value is None else (value >= goal if higher_is_better else value <= goal)
        if level in failed:  # genserve's own level failed: no figure, and no target met
            met = False
        out.append(
            {
                "model": row["model"],
                "format": row["format"],
                "target": target,
                "value": None if value is None else round(value, 3),
                "goal": round(goal, 3),
                "met": met,
            }
        )

    cls, speedup, top = row["class"], row["genserve_over_naive"], row["concurrency_top"]
    if cls == "mid-size":
        add("images/s at top concurrency >= 1.3 x naive", speedup, 1.3, True, top)
    elif cls == "compute-bound":
        add("images/s at top concurrency >= 1.0 x naive", speedup, 1.0, True, top)
    else:
        add("images/s at c=64 >= 1.5 x naive", speedup, 1.5, True, top)
        add("server CPU s per request <= 0.6 x naive", row["cpu_per_request_ratio"], 0.6, False, top)
    for c, ratio in row.get("genserve_p99_over_p50", {}).items():
        add(f"p99/p50 at c={c} <= {TAIL_RATIO_GOAL}", ratio, TAIL_RATIO_GOAL, False, int(c))
    if row["naive_p50_c1_ms"] is not None:
        c1_goal = row["naive_p50_c1_ms"] + 0.3
        add("p50 at c=1 <= naive p50 + 0.3 ms", row["genserve_p50_c1_ms"], c1_goal, False, 1)
    return out


def _f(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _top_tail(row: dict[str, Any], key: str) -> str:
    """The p99/p50 of a summary row at its top concurrency ("–" where not measured)."""
    tails = row.get(key) or {}
    return _f(tails.get(str(row["concurrency_top"])), 2)


def _f_range(value: float | None, spread: Sequence[float] | None) -> str:
    """A paired ratio with the range of its rounds: 1.52 (1.40–1.61)."""
    if value is None or not spread:
        return _f(value, 2)
    return f"{value:.2f} ({spread[0]:.2f}–{spread[1]:.2f})"


def render_markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    s = results["settings"]
    lines = [
        f"Measured {m['date']} on {m['cpu_model']}, {m['cores']} cores, {m['memory_gib']} GiB, {_gpu(m)}; "
        f"Python {m['python']}, ONNX Runtime {m['onnxruntime']}. Load average {m['load_avg_1m_at_start']} "
        f"at the start, {s['load_avg_1m_at_end']} at the end; {s['duration_s_per_level']:g} s per level"
        f"{' (--quick)' if s['quick'] else ''}; c=1 and the top level {s.get('rounds', 1)} times per server, "
        f"the servers taking turns (medians; ratios are medians of the paired rounds, their range in "
        f"brackets); wall {s['wall_s']:.0f} s. Client, servers and the limit share the same cores.",
        "",
        "**The limit: raw ONNX Runtime in-process** (images/s with one caller and intra-op threads = "
        "cores (its p50 ms per call) / images/s with one caller per core, one intra-op thread each; "
        "the limit is the better of the two; images/s from the median call)",
        "",
        "| model | kind | input | batch 1 | batch 4 | batch 16 | batch 64 |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results["raw"]:
        concurrent = {p["batch"]: p for p in r.get("concurrent_points", [])}
        cells = [
            f"{p['images_per_s']:.0f} ({p['latency_p50_ms']:.2f})"
            + (f" / {concurrent[p['batch']]['images_per_s']:.0f}" if p["batch"] in concurrent else "")
            for p in r["points"]
        ]
        shapes = ", ".join(f"{k} {'x'.join(map(str, v))}" for k, v in r["input_shapes"].items())
        lines.append(f"| {r['model']} | {r['kind']} | {shapes} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "**Serving, closed loop, one image per request** (images/s; p50/p99 ms; server CPU ms per request)",
        "",
        "| model | format | server | c=1 img/s | c=1 p50 | c=8 | c=32 | c=64 img/s | c=64 p99 "
        "| CPU ms/req @64 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in results["serving"]:
        lv = {lvl["concurrency"]: lvl for lvl in e["levels"] if "images_per_s" in lvl}
        ran = {lvl["concurrency"] for lvl in e["levels"]}

        def cell(
            c: int | None, key: str, digits: int, lv: dict[int, dict[str, Any]] = lv, ran: set[int] = ran
        ) -> str:
            if c in ran and c not in lv:
                return "failed"  # every turn at this level failed: no figure, not "not measured"
            return _f(_get(lv.get(c) if c is not None else None, key), digits)

        top = 64 if 64 in ran else (max(ran) if ran else None)  # the run's top level, failed or not
        lines.append(
            f"| {e['model']} | {e['format']} | {e['server']} | {cell(1, 'images_per_s', 0)} | "
            f"{cell(1, 'p50_ms', 2)} | "
            f"{cell(8, 'images_per_s', 0)} | {cell(32, 'images_per_s', 0)} | {cell(64, 'images_per_s', 0)} | "
            f"{cell(top, 'p99_ms', 1)} | {cell(top, 'server_cpu_ms_per_request', 3)} |"
        )
    lines += [
        "",
        "**Ratios** (top concurrency; limit = best raw batch <= the model's max_batch_size; naive = the"
        " better of the asyncio and the synchronous naive servers at that level, named in brackets)",
        "",
        "| model | format | class | genserve ÷ limit | naive ÷ limit | genserve ÷ naive | p50 c=1 − raw b1 "
        "(genserve / naive) ms | CPU/req genserve ÷ naive | p99/p50 top (genserve / naive) "
        "| genserve p99 ÷ naive p50 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["summary"]["rows"]:
        lines.append(
            f"| {r['model']} | {r['format']} | {r['class']} | {_f(r['genserve_over_limit'], 2)} | "
            f"{_f(r['naive_over_limit'], 2)} ({r.get('naive_server_top') or '-'}) | "
            f"{_f_range(r['genserve_over_naive'], r.get('genserve_over_naive_range'))} | "
            f"{_f(r['genserve_p50_c1_minus_raw_b1_ms'], 2)} / {_f(r['naive_p50_c1_minus_raw_b1_ms'], 2)} | "
            f"{_f_range(r['cpu_per_request_ratio'], r.get('cpu_per_request_ratio_range'))} | "
            f"{_top_tail(r, 'genserve_p99_over_p50')} / {_top_tail(r, 'naive_p99_over_p50')} | "
            f"{_f(r.get('genserve_p99_over_naive_p50_top'), 2)} |"
        )
    lines += [
        "",
        "**Targets (issues 8 and 20)**",
        "",
        "| model | format | target | value | goal | met |",
        "|---|---|---|---|---|---|",
    ]
    for t in results["summary"]["targets"]:
        met = "–" if t["met"] is None else ("yes" if t["met"] else "**no**")
        lines.append(
            f"| {t['model']} | {t['format']} | {t['target']} | {_f(t['value'], 2)} | "
            f"{_f(t['goal'], 2)} | {met} |"
        )
    prio = results.get("priority")
    if prio and "error" in prio:
        lines += ["", f"**Priority** ({prio['model']}): failed: {prio['error'][-300:]}"]
    elif prio:
        lines += [
            "",
            f"**Priority** ({prio['model']}): interactive c=1 p99 idle {prio['idle']['p99_ms']:.2f} ms, "
            "under a "
            f"saturating SampleStream ({prio['bulk'].get('images_per_s', 0):.0f} img/s streamed, server CPU "
            f"{prio['server_cpu_utilisation_loaded']:.2f} cores) {prio['loaded']['p99_ms']:.2f} ms: "
            f"{prio['p99_ratio']:.2f}x idle, +{prio['p99_excess_ms']:.2f} ms; one bulk batch of "
            f"{prio['bulk_batch_size']} computes in {prio['bulk_batch_compute_ms']:.2f} ms.",
        ]
    return "\n".join(lines)


def update_readme(path: Path, table: str) -> None:
    """Replace what lies between the result markers of bench/README.md (append them if absent)."""
    text = path.read_text(encoding="utf-8") if path.exists() else "# genserve benchmark\n"
    block = f"{BEGIN}\n{table}\n{END}"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        text = head + block + tail
    else:
        text = text.rstrip("\n") + "\n\n## Latest results\n\n" + block + "\n"
    path.write_text(text, encoding="utf-8")


def _gpu(m: dict[str, Any]) -> str:
    gpu = m.get("gpu", "none")
    return "no GPU" if gpu in ("none", "", None) else f"GPU {gpu}"
