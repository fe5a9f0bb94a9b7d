"""bench.report: the saturated tail of a run, read per round and beside the better naive server."""

from __future__ import annotations

import statistics
from typing import Any

import pytest

from bench.common import DEFAULT_MODELS, find_models
from bench.report import render_markdown, summarise, tail_ratio


def _level(c: int, ips: float, rounds: list[tuple[float, float]]) -> dict[str, Any]:
    """A merged level whose rounds had these (p50, p99); its own p50 and p99 are the medians."""
    return {
        "concurrency": c,
        "images_per_s": ips,
        "p50_ms": statistics.median(r[0] for r in rounds),
        "p99_ms": statistics.median(r[1] for r in rounds),
        "server_cpu_ms_per_request": 0.5,
        "rounds": [
            {"images_per_s": ips, "p50_ms": p50, "p99_ms": p99, "server_cpu_ms_per_request": 0.5}
            for p50, p99 in rounds
        ],
    }


def test_a_levels_tail_is_the_median_of_its_rounds_ratios_not_a_ratio_of_medians() -> None:
    # The medians (p50 20, p99 40) would read 2.0; the rounds themselves read 1.2, 2.0 and 1.25.
    level = _level(64, 1000.0, [(10.0, 12.0), (20.0, 40.0), (40.0, 50.0)])
    assert tail_ratio(level) == pytest.approx(1.25)
    assert tail_ratio({"p50_ms": 10.0, "p99_ms": 14.0}) == pytest.approx(1.4)  # one round: its own
    assert tail_ratio(None) is None


def test_the_summary_reports_the_saturated_tail_beside_the_better_naive_server() -> None:
    model = next(m for m in find_models(DEFAULT_MODELS) if m.name == "dcgan-digits")
    raw = {
        "model": model.name,
        "kind": str(model.kind),
        "input_shapes": {"z": [1, 100]},
        "points": [{"batch": 1, "images_per_s": 9000.0, "latency_p50_ms": 0.11, "ms_per_image": 0.11}],
    }

    def serving(server: str, ips: float, top: list[tuple[float, float]]) -> dict[str, Any]:
        return {
            "server": server,
            "model": model.name,
            "format": "raw",
            "levels": [
                _level(1, ips / 3, [(0.8, 1.0)]),
                _level(32, ips, [(10.0, 13.0)]),
                _level(64, ips, top),
            ],
        }

    results: dict[str, Any] = {
        "raw": [raw],
        "serving": [
            serving("genserve", 3000.0, [(16.0, 28.0), (20.0, 33.0)]),  # 1.75, 1.65
            serving("naive", 1500.0, [(40.0, 56.0), (42.0, 58.8)]),
            serving("naive-sync", 1800.0, [(35.0, 42.0), (34.0, 44.2)]),  # the better one: 1.2, 1.3
        ],
        "machine": {},
        "settings": {},
    }
    (row,) = summarise(results, [model])["rows"]
    assert row["genserve_p99_over_p50"] == {"32": pytest.approx(1.3), "64": pytest.approx(1.70)}
    assert row["naive_p99_over_p50"]["64"] == pytest.approx(1.25)  # naive-sync's, the faster naive
    assert row["genserve_p99_over_naive_p50_top"] == pytest.approx(30.5 / 34.5)
    targets = {t["target"]: t for t in summarise(results, [model])["targets"]}
    assert targets["p99/p50 at c=32 <= 1.5"]["met"] is True
    assert targets["p99/p50 at c=64 <= 1.5"]["met"] is False
    results["summary"] = summarise(results, [model])
    results["machine"] = {
        "date": "d",
        "cpu_model": "c",
        "cores": 2,
        "memory_gib": 4,
        "python": "3.11",
        "onnxruntime": "1",
        "load_avg_1m_at_start": 0.1,
    }
    results["settings"] = {"load_avg_1m_at_end": 0.1, "duration_s_per_level": 2, "quick": True, "wall_s": 1}
    table = render_markdown(results)
    assert "| 1.70 / 1.25 | 0.88 |" in table, table
