"""The bench's paired rounds: medians per level, and ratios as the median of per-round ratios."""

from __future__ import annotations

from typing import Any

import pytest

from bench.report import merge_rounds, paired_ratio


def level(images_per_s: float, cpu_ms: float, p50_ms: float = 1.0) -> dict[str, Any]:
    return {
        "concurrency": 64,
        "images_per_s": images_per_s,
        "p50_ms": p50_ms,
        "p99_ms": 3 * p50_ms,
        "server_cpu_ms_per_request": cpu_ms,
    }


def test_a_single_round_is_the_level_itself() -> None:
    only = level(100.0, 0.5)
    assert merge_rounds([only]) == only


def test_rounds_merge_to_medians_and_keep_every_turn() -> None:
    merged = merge_rounds([level(100.0, 0.5, 1.0), level(300.0, 0.7, 2.0), level(200.0, 0.9, 9.0)])
    assert merged["images_per_s"] == 200.0
    assert merged["server_cpu_ms_per_request"] == 0.7
    assert merged["p50_ms"] == 2.0
    assert merged["concurrency"] == 64
    assert [r["images_per_s"] for r in merged["rounds"]] == [100.0, 300.0, 200.0]
    assert merged["failed_rounds"] == 0


def test_failed_rounds_are_left_out_and_counted() -> None:
    failed = {"concurrency": 64, "error": "load failed"}
    merged = merge_rounds([failed, level(100.0, 0.5), level(300.0, 0.5)])
    assert merged["images_per_s"] == 200.0
    assert merged["failed_rounds"] == 1
    assert merge_rounds([failed, failed]) == failed


def test_paired_ratio_cancels_a_load_change_that_hits_both_servers() -> None:
    # Round 2 ran while the machine was busy: both servers halved. The ratio of the medians would
    # mix rounds (200/150 = 1.33); the paired ratios are 2.0, 2.0 and 1.0 -> median 2.0.
    genserve = merge_rounds([level(400.0, 0.4), level(200.0, 0.4), level(100.0, 0.4)])
    naive = merge_rounds([level(200.0, 0.8), level(100.0, 0.8), level(100.0, 0.8)])
    ratio, spread = paired_ratio(genserve, naive, "images_per_s")
    assert ratio == 2.0
    assert spread == (1.0, 2.0)
    cpu, _ = paired_ratio(genserve, naive, "server_cpu_ms_per_request")
    assert cpu == 0.5


def test_unpaired_levels_fall_back_to_the_ratio_of_their_values() -> None:
    ratio, spread = paired_ratio(level(300.0, 0.5), level(200.0, 0.5), "images_per_s")
    assert ratio == 1.5
    assert spread is None
    assert paired_ratio(None, level(200.0, 0.5), "images_per_s") == (None, None)


def test_the_cache_bench_draws_every_seed_from_its_pool_and_repeats_them() -> None:
    from bench.cache import GalleryPayloads
    from genserve.v1 import genserve_pb2

    payloads = GalleryPayloads("m", "png", pool=5)
    requests = [genserve_pb2.SampleRequest.FromString(payloads()) for _ in range(200)]
    seeds = [tuple(r.seeds) for r in requests]
    assert all(len(s) == 1 and 0 <= s[0] < 5 for s in seeds)
    assert len(set(seeds)) == 5  # every seed of the pool comes up, and so repeats
    assert {r.model for r in requests} == {"m"}


def test_the_cache_bench_refuses_a_model_it_cannot_find_before_starting_a_server(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # `--model dcgan-digitz` (a typo): every round started a server, sent calls that all failed and
    # printed "0.0 img/s p50 None ms", then the summary died with a ZeroDivisionError traceback.
    from bench import cache

    rounds: list[object] = []
    monkeypatch.setattr(cache, "one_round", lambda *a: rounds.append(a) or {})
    with pytest.raises(SystemExit) as exited:
        cache.main(["--model", "dcgan-digitz", "--rounds", "1", "--duration-s", "0.1"])
    assert exited.value.code != 0 and "--model: no model dcgan-digitz" in capsys.readouterr().err
    assert rounds == []


def test_genserve_is_judged_against_the_better_naive_server_per_level() -> None:
    from bench.report import better_naive

    def entry(server: str, c1: float, c64: float) -> dict[str, Any]:
        levels = [{**level(c1, 0.5), "concurrency": 1}, {**level(c64, 0.5), "concurrency": 64}]
        return {"server": server, "model": "m", "format": "raw", "levels": levels}

    serving = [
        entry("genserve", 900.0, 1500.0),
        entry("naive", 500.0, 1000.0),
        entry("naive-sync", 700.0, 800.0),
    ]
    best = better_naive(serving, "m", "raw")
    assert (best[1]["server"], best[1]["images_per_s"]) == ("naive-sync", 700.0)
    assert (best[64]["server"], best[64]["images_per_s"]) == ("naive", 1000.0)
