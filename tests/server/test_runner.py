"""Unit tests of the runner: seed rows drawn per batch, inline vs pool execution, CPU fallback."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from server_support import (
    TINY_LATENT,
    conditional_graph,
    generator_graph,
    image_to_image_graph,
    slow_generator_graph,
    vae_encoder_graph,
)

from genserve_server import runner as runner_module
from genserve_server.batch_keys import SEED_INPUT, LatentRows, SeedRows
from genserve_server.errors import Unavailable
from genserve_server.latents import latents_for_seeds
from genserve_server.ort_session import RuntimeConfig
from genserve_server.runner import Runner, select_providers


def record_threads(runner: Runner) -> list[str]:
    """Wrap `runner.run_sync` so each model call appends the name of the thread it ran on."""
    threads: list[str] = []
    original = runner.run_sync

    def spy(inputs, **kwargs):  # type: ignore[no-untyped-def]
        threads.append(threading.current_thread().name)
        return original(inputs, **kwargs)

    runner.run_sync = spy  # type: ignore[method-assign]
    return threads


def make_runner(
    tmp_path: Path,
    inline_max_s: float,
    instances: int = 1,
    solo_threads: int = 0,
    providers: list[str] | None = None,
) -> Runner:
    path = tmp_path / "model.onnx"
    onnx.save(conditional_graph(TINY_LATENT, 10, 1, 8, 8), str(path))
    return Runner(
        path,
        label="t",
        providers=select_providers(providers or ["CUDAExecutionProvider", "CPUExecutionProvider"]),
        instances=instances,
        intra_op_threads=1,
        solo_intra_op_threads=solo_threads,
        inline_max_s=inline_max_s,
        latent_dim=TINY_LATENT,
    )


def test_seed_rows_become_batch_latents_identical_to_per_seed_latents(tmp_path: Path) -> None:
    runner = make_runner(tmp_path, inline_max_s=0.0)
    seeds = np.array([3, 1, 2], np.int64)
    labels = np.array([0, 5, 9], np.int64)

    async def body() -> None:
        for psi in (None, 0.5):
            out = await runner.run(SeedRows(psi), {SEED_INPUT: seeds, "label": labels})
            z = latents_for_seeds([3, 1, 2], TINY_LATENT, psi)
            np.testing.assert_array_equal(out["z"], z)
            direct = runner.run_sync({"z": z, "label": labels})["image"]
            np.testing.assert_array_equal(out["image"], direct)
            alone = await runner.run(SeedRows(psi), {SEED_INPUT: seeds[1:2], "label": labels[1:2]})
            np.testing.assert_array_equal(alone["image"][0], out["image"][1])  # batch-invariant

    asyncio.run(body())
    assert runner.provider == "CPUExecutionProvider"
    runner.close()


def test_warm_up_stops_between_its_calls_once_loading_is_cancelled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM during start-up (repository.cancel_loading): a warm-up of three calls ends after the
    call in progress, not after all three (a slow model's large batch takes seconds per call)."""
    runner = make_runner(tmp_path, inline_max_s=0.0)
    calls: list[int] = []
    real_call = runner._call

    def counting_call(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return real_call(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(runner, "_call", counting_call)
    checks: list[int] = []

    def check_stopping() -> None:
        checks.append(1)
        if len(checks) > 1:
            raise RuntimeError("loading cancelled")

    inputs = {"z": np.zeros((2, TINY_LATENT), np.float32), "label": np.zeros(2, np.int64)}
    with pytest.raises(RuntimeError, match="loading cancelled"):
        runner.warm(inputs, check_stopping=check_stopping)
    assert len(calls) == 1
    runner.warm(inputs, check_stopping=lambda: None)  # not cancelled: every call runs
    assert len(calls) == 4
    runner.close()


def test_a_batch_up_to_the_busy_limit_runs_inline_unless_the_solo_session_would_take_it(
    tmp_path: Path,
) -> None:
    """A measured batch above inline_max_s but within INLINE_BUSY_MAX_S runs on the loop, except when
    the pool would run it alone on the all-cores solo session (nothing running, nothing queued, no
    concurrent callers); inline_max_s = 0 keeps every batch on the pool."""
    from genserve_server.runner import INLINE_BUSY_MAX_S

    z = np.zeros((2, TINY_LATENT), np.float32)
    inputs = {"z": z, "label": np.zeros(2, np.int64)}
    cases = (
        # (inline_max_s, instances, solo threads, rows queued, callers overlap, expected)
        (1e-9, 1, 0, False, False, "loop"),  # no solo session: the loop
        (1e-9, 2, 2, False, False, "pool"),  # the solo session would take it: the pool
        (1e-9, 2, 2, True, False, "loop"),  # rows wait: no solo session for it, the loop
        (1e-9, 2, 2, False, True, "loop"),  # concurrent callers: the next batch is near, the loop
        (0.0, 1, 0, True, False, "pool"),  # always the pool
    )
    for inline_max_s, instances, solo, queued, overlap, expected in cases:
        runner = make_runner(tmp_path, inline_max_s=inline_max_s, instances=instances, solo_threads=solo)
        runner.warm(inputs)  # measures this signature: far below INLINE_BUSY_MAX_S, above 1 ns
        runner.more_work_queued = lambda queued=queued: queued  # type: ignore[misc]
        runner.callers_overlap = lambda overlap=overlap: overlap  # type: ignore[misc]
        # What the batcher asks before it splits a batch (Batcher._split_over_free): the same choice.
        assert runner.would_run_inline(LatentRows(), inputs) == (expected == "loop"), inline_max_s
        threads = record_threads(runner)
        asyncio.run(runner.run(LatentRows(), inputs))
        assert (threads[0] == "MainThread") == (expected == "loop"), (
            inline_max_s,
            instances,
            queued,
            threads,
        )
        runner.close()
    assert INLINE_BUSY_MAX_S >= 1e-3


def test_a_batch_whose_outputs_are_slow_to_finish_leaves_the_event_loop(tmp_path: Path) -> None:
    """The 2-ms inline rule weighs the model call and the outputs' conversion, not the call alone:
    SR on a GPU computes 16 images in ~1 ms but converts 16 x 256 x 256 x 3 floats to uint8 for
    several more. Here the model call is tiny and the finish step takes 2 x INLINE_BUSY_MAX_S."""
    from genserve_server.runner import INLINE_BUSY_MAX_S

    inputs = {"z": np.zeros((2, TINY_LATENT), np.float32), "label": np.zeros(2, np.int64)}
    for slow_finish, expected in ((False, "loop"), (True, "pool")):
        runner = make_runner(tmp_path, inline_max_s=1e-9)  # the 2-ms rule decides; no solo session
        if slow_finish:
            finish = runner._finish

            def slow(outputs, added, finish=finish):  # type: ignore[no-untyped-def]
                threading.Event().wait(2 * INLINE_BUSY_MAX_S)
                return finish(outputs, added)

            runner._finish = slow  # type: ignore[method-assign]
        runner.warm(inputs)
        threads = record_threads(runner)
        asyncio.run(runner.run(LatentRows(), inputs))
        assert (threads[0] == "MainThread") == (expected == "loop"), (slow_finish, threads)
        runner.close()


def test_while_callers_overlap_a_cpu_batch_up_to_the_overlap_bound_stays_on_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between INLINE_BUSY_MAX_S and OVERLAP_INLINE_MAX_S an interactive batch runs on the loop only
    while callers overlap, on a CPU with no more cores than instances (on a pool thread beside the
    busy loop it would finish after batches formed later); a bulk batch keeps its background thread,
    and above the overlap bound every batch goes to the pool. The batch's cost is set by a fake
    clock: a real 3-ms wait measured past the 5-ms overlap bound on a busy machine."""
    from genserve_server import runner as runner_module
    from genserve_server.runner import INLINE_BUSY_MAX_S, OVERLAP_INLINE_MAX_S

    assert OVERLAP_INLINE_MAX_S > 2 * INLINE_BUSY_MAX_S
    clock = {"now": 0.0}  # 1 us a read: the model call takes 1 us by it, with its outputs' wait_s more

    def perf_counter() -> float:
        clock["now"] += 1e-6
        return clock["now"]

    monkeypatch.setattr(runner_module, "time", SimpleNamespace(perf_counter=perf_counter))
    inputs = {"z": np.zeros((2, TINY_LATENT), np.float32), "label": np.zeros(2, np.int64)}
    cases = (
        # (finish step's wait, callers overlap, cores, bulk, expected)
        (1.5 * INLINE_BUSY_MAX_S, False, 2, False, "pool"),
        (1.5 * INLINE_BUSY_MAX_S, True, 2, False, "loop"),
        (1.5 * INLINE_BUSY_MAX_S, True, 2, True, "pool"),  # bulk: its background thread
        (1.5 * INLINE_BUSY_MAX_S, True, 16, False, "pool"),  # cores to spare: the 2-ms bound
        (1.5 * OVERLAP_INLINE_MAX_S, True, 2, False, "pool"),
    )
    for wait_s, overlap, cores, bulk, expected in cases:
        monkeypatch.setattr(runner_module, "cpu_count", lambda cores=cores: cores)
        runner = make_runner(tmp_path, inline_max_s=1e-9, instances=2, providers=["CPUExecutionProvider"])
        finish = runner._finish

        def slow(outputs, added, finish=finish, wait_s=wait_s):  # type: ignore[no-untyped-def]
            clock["now"] += wait_s
            return finish(outputs, added)

        runner._finish = slow  # type: ignore[method-assign]
        runner.warm(inputs)
        runner.callers_overlap = lambda overlap=overlap: overlap  # type: ignore[misc]
        runner.more_work_queued = lambda: True  # type: ignore[misc]  # no solo session either way
        signature = runner._signature(LatentRows(), inputs)
        inline = runner._runs_inline(LatentRows(), signature, inputs, bulk=bulk)
        assert inline == (expected == "loop"), (wait_s, overlap, cores, bulk)
        if not bulk:  # and the call itself runs where the rule says
            threads = record_threads(runner)
            asyncio.run(runner.run(LatentRows(), inputs))
            assert (threads[0] == "MainThread") == (expected == "loop"), (wait_s, overlap, cores, threads)
        runner.close()


def test_tiny_batches_run_inline_once_measured(tmp_path: Path) -> None:
    runner = make_runner(tmp_path, inline_max_s=1.0)  # everything counts as tiny
    z = np.zeros((2, TINY_LATENT), np.float32)
    labels = np.zeros(2, np.int64)
    runner.warm({"z": z, "label": labels})
    threads = record_threads(runner)

    async def body() -> None:
        await runner.run(LatentRows(), {"z": z, "label": labels})  # measured at warm-up: inline
        await runner.run(
            LatentRows(), {"z": np.zeros((40, TINY_LATENT), np.float32), "label": np.zeros(40, np.int64)}
        )

    asyncio.run(body())
    assert threads[0] == "MainThread"
    assert threads[1].startswith("ort-t")  # an unmeasured signature goes to the pool first
    runner.close()


def test_preempted_calls_do_not_push_a_tiny_model_off_the_event_loop(tmp_path: Path) -> None:
    # On a busy machine some calls are preempted: their wall time inflates the moving average,
    # which budgets batches, but the inline decision takes the fastest call seen (the compute).
    runner = make_runner(tmp_path, inline_max_s=0.01)
    z = np.zeros((2, TINY_LATENT), np.float32)
    inputs = {"z": z, "label": np.zeros(2, np.int64)}
    runner.warm(inputs)
    threads: list[str] = []
    original = runner.run_sync
    preempted = {"left": 12}

    def spy(feeds, **kwargs):  # type: ignore[no-untyped-def]
        threads.append(threading.current_thread().name)
        if preempted["left"]:
            preempted["left"] -= 1
            threading.Event().wait(0.05)  # a call that lost its core for 50 ms
        return original(feeds, **kwargs)

    runner.run_sync = spy  # type: ignore[method-assign]

    async def body() -> None:
        for _ in range(13):
            await runner.run(LatentRows(), inputs)

    asyncio.run(body())
    average_s = runner.measured_cost_s(inputs)
    assert average_s is not None and average_s > runner.inline_max_s  # the average says "slow"...
    assert threads == ["MainThread"] * 13  # ...yet every batch ran inline
    runner.close()


def test_a_strongly_truncated_batch_leaves_the_event_loop_even_when_its_model_call_is_tiny(
    tmp_path: Path,
) -> None:
    # The measured cost is the model call's; at a small psi each seed redraws its normals many
    # times over, work that must not run on the event loop.
    runner = make_runner(tmp_path, inline_max_s=1.0)  # every measured batch counts as tiny
    seeds = np.array([1, 2], np.int64)
    labels = np.zeros(2, np.int64)
    runner.warm({SEED_INPUT: seeds, "label": labels}, key=SeedRows())
    threads = record_threads(runner)

    async def body() -> None:
        for psi in (None, 1.5, 0.05):
            await runner.run(SeedRows(psi), {SEED_INPUT: seeds, "label": labels})

    asyncio.run(body())
    assert threads[:2] == ["MainThread", "MainThread"]  # no truncation, mild truncation: inline
    assert threads[2].startswith("ort-t")  # psi 0.05: ~100x the normals, on the pool
    runner.close()


def test_a_batch_alone_runs_on_the_all_cores_session_and_overlapping_ones_do_not(tmp_path: Path) -> None:
    runner = make_runner(tmp_path, inline_max_s=0.0, instances=2, solo_threads=2)
    assert runner.solo_session is not None
    assert runner.solo_session.get_session_options().intra_op_num_threads == 2
    assert runner.session.get_session_options().intra_op_num_threads == 1
    calls: list[tuple[int, bool]] = []
    first_started = threading.Event()
    second_started = threading.Event()
    original = runner.run_sync

    def spy(inputs, solo=False):  # type: ignore[no-untyped-def]
        rows = len(next(iter(inputs.values())))
        calls.append((rows, solo))
        if rows == 2:  # the first batch holds its instance until the second one runs beside it
            first_started.set()
            assert second_started.wait(5)
        if rows == 3:
            second_started.set()
        return original(inputs, solo=solo)

    runner.run_sync = spy  # type: ignore[method-assign]

    def batch(n: int) -> dict[str, np.ndarray]:
        return {"z": np.ones((n, TINY_LATENT), np.float32), "label": np.arange(n, dtype=np.int64)}

    async def body() -> dict[int, np.ndarray]:
        first = asyncio.ensure_future(runner.run(LatentRows(), batch(2)))
        assert await asyncio.to_thread(first_started.wait, 5)  # the first batch is running
        second = await runner.run(LatentRows(), batch(3))
        first_out = await first
        alone = await runner.run(LatentRows(), batch(4))  # nothing else running: solo again
        return {2: first_out["image"], 3: second["image"], 4: alone["image"]}

    images = asyncio.run(body())
    assert sorted(calls) == [(2, True), (3, False), (4, True)]
    for n, image in images.items():  # both sessions compute the same thing
        np.testing.assert_allclose(image, original(batch(n))["image"], atol=1e-6)
    runner.close()


def test_a_batch_alone_skips_the_all_cores_session_while_more_work_waits(tmp_path: Path) -> None:
    # The next batch would start beside it on the other instance: the solo call would then share
    # the cores for its whole duration.
    runner = make_runner(tmp_path, inline_max_s=0.0, instances=2, solo_threads=2)
    calls: list[bool] = []
    original = runner.run_sync

    def spy(inputs, solo=False):  # type: ignore[no-untyped-def]
        calls.append(solo)
        return original(inputs, solo=solo)

    runner.run_sync = spy  # type: ignore[method-assign]
    z = {"z": np.ones((2, TINY_LATENT), np.float32), "label": np.arange(2, dtype=np.int64)}
    queued = [True, False]

    async def body() -> None:
        for waiting in queued:
            runner.more_work_queued = lambda waiting=waiting: waiting  # type: ignore[misc]
            await runner.run(LatentRows(), z)

    asyncio.run(body())
    assert calls == [False, True]
    runner.close()


def test_a_failed_batch_leaves_the_all_cores_session_to_the_next_batch_alone(tmp_path: Path) -> None:
    """A pooled call that fails still counts itself out of the running batches: the next batch
    alone takes the solo session as before, not the one-thread one for the rest of the process."""
    runner = make_runner(tmp_path, inline_max_s=0.0, instances=2, solo_threads=2)
    calls: list[tuple[int, bool]] = []
    original = runner.run_sync

    def spy(inputs, solo=False):  # type: ignore[no-untyped-def]
        rows = len(next(iter(inputs.values())))
        calls.append((rows, solo))
        if rows == 3:
            raise RuntimeError("the model call failed")
        return original(inputs, solo=solo)

    runner.run_sync = spy  # type: ignore[method-assign]

    def batch(n: int) -> dict[str, np.ndarray]:
        return {"z": np.ones((n, TINY_LATENT), np.float32), "label": np.arange(n, dtype=np.int64)}

    async def body() -> None:
        with pytest.raises(RuntimeError, match="the model call failed"):
            await runner.run(LatentRows(), batch(3))
        await runner.run(LatentRows(), batch(2))
        await runner.run(LatentRows(), batch(2))

    asyncio.run(body())
    assert calls == [(3, True), (2, True), (2, True)]
    runner.close()


@pytest.mark.skipif(not hasattr(os, "sched_getscheduler"), reason="needs per-thread priorities (Linux)")
def test_bulk_model_calls_run_on_background_threads_and_leave_the_solo_session_to_interactive_ones(
    tmp_path: Path,
) -> None:
    runner = make_runner(tmp_path, inline_max_s=0.0, instances=2, solo_threads=2)
    assert runner.background_bulk
    calls: list[tuple[str, int, bool | None, int, int]] = []
    bulk_started = threading.Event()
    interactive_done = threading.Event()
    original_run, original_compute = runner.run_sync, runner._bulk_compute

    def where() -> tuple[int, int]:
        tid = threading.get_native_id()
        return os.sched_getscheduler(tid), os.getpriority(os.PRIO_PROCESS, tid)

    def spy_run(inputs, solo=False):  # type: ignore[no-untyped-def]
        calls.append(("run", len(next(iter(inputs.values()))), solo, *where()))
        return original_run(inputs, solo=solo)

    def spy_compute(feeds):  # type: ignore[no-untyped-def]
        calls.append(("bulk", len(feeds["z"]), None, *where()))
        bulk_started.set()
        assert interactive_done.wait(5)  # the bulk call holds its thread until the interactive one ran
        return original_compute(feeds)

    runner.run_sync = spy_run  # type: ignore[method-assign]
    runner._bulk_compute = spy_compute  # type: ignore[method-assign]

    def batch(n: int) -> dict[str, np.ndarray]:
        return {"z": np.ones((n, TINY_LATENT), np.float32), "label": np.arange(n, dtype=np.int64)}

    async def body() -> tuple[np.ndarray, np.ndarray]:
        bulk = asyncio.ensure_future(runner.run_bulk(LatentRows(), batch(5)))
        assert await asyncio.to_thread(bulk_started.wait, 5)
        interactive = await runner.run(LatentRows(), batch(2))  # only a bulk batch runs: solo all the same
        interactive_done.set()
        return (await bulk)["image"], interactive["image"]

    policy, nice = os.sched_getscheduler(0), os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    bulk_image, interactive_image = asyncio.run(body())
    (_, _, _, bulk_policy, bulk_nice), interactive_call = calls
    assert interactive_call == ("run", 2, True, policy, nice)
    # SCHED_IDLE where the kernel allows it (no privilege needed), else the niceness raised.
    assert bulk_policy == os.SCHED_IDLE or bulk_nice == min(19, nice + runner_module.BULK_THREAD_NICE)
    np.testing.assert_allclose(bulk_image, original_run(batch(5))["image"], atol=1e-6)
    np.testing.assert_allclose(interactive_image, original_run(batch(2))["image"], atol=1e-6)
    runner.close()


def test_bulk_runs_like_interactive_where_a_background_thread_would_not_hold_the_compute(
    tmp_path: Path,
) -> None:
    # One instance: an interactive batch waits for the bulk batch anyway. Two threads a call: ORT's
    # own worker threads would keep normal priority.
    for instances, threads in ((1, 1), (2, 2)):
        path = tmp_path / "model.onnx"
        onnx.save(conditional_graph(TINY_LATENT, 10, 1, 8, 8), str(path))
        runner = Runner(
            path,
            label="t",
            providers=["CPUExecutionProvider"],
            instances=instances,
            intra_op_threads=threads,
            latent_dim=TINY_LATENT,
        )
        assert not runner.background_bulk
        z = {"z": np.ones((3, TINY_LATENT), np.float32), "label": np.arange(3, dtype=np.int64)}
        out = asyncio.run(runner.run_bulk(LatentRows(), z))
        np.testing.assert_allclose(out["image"], runner.run_sync(z)["image"], atol=1e-6)
        runner.close()


def test_no_solo_session_with_one_instance_or_pinned_threads(tmp_path: Path) -> None:
    one = make_runner(tmp_path, inline_max_s=0.0, instances=1, solo_threads=2)
    assert one.solo_session is None
    one.close()
    pinned = make_runner(tmp_path, inline_max_s=0.0, instances=2, solo_threads=0)
    assert pinned.solo_session is None
    pinned.close()


def test_a_call_far_larger_than_the_warm_up_runs_with_arena_shrinkage_and_only_it(
    tmp_path: Path,
) -> None:
    """The shrink decision, seen where it acts: the run options ORT receives for each call."""
    path = tmp_path / "i2i.onnx"
    onnx.save(image_to_image_graph(1), str(path))
    runner = Runner(path, label="i2i", providers=["CPUExecutionProvider"], instances=1, intra_op_threads=1)
    seen: list[object] = []
    real_run = runner.session.run

    class SpySession:
        def run(self, names: object, feeds: object, options: object = None) -> object:
            seen.append(options)
            return real_run(names, feeds, options)  # type: ignore[arg-type]

    runner.session = SpySession()  # type: ignore[assignment]
    runner.run_sync({"image": np.zeros((1, 3, 64, 64), np.float32)})  # not warmed: never shrinks
    runner.warm({"image": np.zeros((2, 3, 32, 32), np.float32)})
    runner.run_sync({"image": np.zeros((16, 3, 256, 256), np.float32)})  # many usual rows: keeps its arena
    runner.run_sync({"image": np.zeros((1, 3, 1100, 1100), np.float32)})  # one rare large image
    runner.close()
    usual = runner._run_options  # no shrinkage; what abort() terminates
    assert seen[0] is usual and seen[-2] is usual, "usual calls must keep the arena for the next batch"
    assert seen[-1] is runner._shrink_options, "the large call must hand its growth back"
    assert seen[-1].get_run_config_entry("memory.enable_memory_arena_shrinkage") == "cpu:0"  # type: ignore[attr-defined]


def test_shrink_arena_after_warm_up_runs_each_cpu_session_with_arena_shrinkage(tmp_path: Path) -> None:
    path = tmp_path / "i2i.onnx"
    onnx.save(image_to_image_graph(1), str(path))
    runner = Runner(path, label="i2i", providers=["CPUExecutionProvider"], instances=1, intra_op_threads=1)
    seen: list[object] = []
    real_run = runner.session.run

    class SpySession:
        def run(self, names: object, feeds: object, options: object = None) -> object:
            seen.append(options)
            return real_run(names, feeds, options)  # type: ignore[arg-type]

    runner.warm({"image": np.zeros((8, 3, 64, 64), np.float32)})
    runner.session = SpySession()  # type: ignore[assignment]
    runner.shrink_arena({"image": np.zeros((1, 3, 8, 8), np.float32)})
    runner.close()
    assert seen == [runner_module._SHRINK_CPU]


def test_compare_rows_checks_a_row_alone_against_its_batch_and_the_solo_session(tmp_path: Path) -> None:
    """loader.check_rows' measurement: row 0 alone on the narrow session against row 0 of the batch
    and row 0 alone on the solo session; with one row given (no batch may hold two) no batch call."""
    runner = make_runner(
        tmp_path, inline_max_s=0.0, instances=2, solo_threads=2, providers=["CPUExecutionProvider"]
    )
    rng = np.random.default_rng(0)
    inputs: dict[str, np.ndarray] = {
        "z": rng.standard_normal((2, TINY_LATENT)).astype(np.float32),
        "label": np.array([3, 7], np.int64),
    }
    calls: list[tuple[int, bool]] = []
    original = runner.run_sync

    def spy(feeds, solo=False):  # type: ignore[no-untyped-def]
        calls.append((len(feeds["z"]), solo))
        return original(feeds, solo=solo)

    runner.run_sync = spy  # type: ignore[method-assign]
    try:
        assert runner.compare_rows(inputs) == runner_module.RowAgreement(solo_diff=0.0, batch_diff=0.0)
        assert calls == [(1, False), (2, False), (1, True)]
        calls.clear()
        one = {name: value[:1] for name, value in inputs.items()}
        assert runner.compare_rows(one) == runner_module.RowAgreement(solo_diff=0.0, batch_diff=None)
        assert calls == [(1, False), (1, True)]
    finally:
        runner.close()


@pytest.mark.parametrize("io_binding", [False, True], ids=["run", "io_binding"])
def test_each_output_of_a_graph_with_several_comes_back_under_its_own_name(
    tmp_path: Path, io_binding: bool
) -> None:
    """An encoder's mu and logvar (two outputs of one graph) are each the graph's own output of that
    name, on every call (IO binding's second call writes into preallocated outputs)."""
    path = tmp_path / "encoder.onnx"
    onnx.save(vae_encoder_graph(TINY_LATENT, 8, 8), str(path))
    runner = Runner(
        path,
        label="enc",
        providers=["CPUExecutionProvider"],
        instances=1,
        intra_op_threads=1,
        runtime=RuntimeConfig(io_binding=io_binding),
    )
    assert runner.outputs == ("mu", "logvar")
    reference = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    image = np.random.default_rng(0).random((3, 1, 8, 8), dtype=np.float32)
    expected = {name: reference.run([name], {"image": image})[0] for name in runner.outputs}
    assert not np.allclose(expected["mu"], expected["logvar"])
    for _ in range(2):
        outputs = runner.run_sync({"image": image})
        for name, value in expected.items():
            np.testing.assert_allclose(outputs[name], value, rtol=1e-5, atol=1e-6)
    runner.close()


@pytest.mark.parametrize("elem_type", [TensorProto.DOUBLE, TensorProto.INT8], ids=["float64", "int8"])
def test_io_binding_binds_each_output_in_the_graphs_own_element_type_on_every_call(
    tmp_path: Path, elem_type: int
) -> None:
    """IO binding's second call of a shape writes into preallocated outputs; they were float32 for
    any element type outside a short table, so a graph whose image output is float64 (a user's
    export of a float64 module) served its first call and failed every later one with ONNX
    Runtime's "Unexpected output data type": with `runtime.io_binding` the version failed its
    warm-up, UNAVAILABLE, where plain `run` serves it."""
    model = generator_graph(TINY_LATENT, 1, 8, 8)
    model.graph.node[-1].output[0] = "image_f32"
    model.graph.node.append(helper.make_node("Cast", ["image_f32"], ["image"], to=elem_type))
    model.graph.output[0].type.tensor_type.elem_type = elem_type
    path = tmp_path / "cast.onnx"
    onnx.save(model, str(path))
    runner = Runner(
        path,
        label="cast",
        providers=["CPUExecutionProvider"],
        instances=1,
        intra_op_threads=1,
        runtime=RuntimeConfig(io_binding=True),
    )
    z = np.random.default_rng(0).normal(size=(3, TINY_LATENT)).astype(np.float32)
    (expected,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["image"], {"z": z})
    for _ in range(3):
        image = runner.run_sync({"z": z})["image"]
        assert image.dtype == expected.dtype
        np.testing.assert_array_equal(image, expected)
    runner.close()


def test_warm_up_records_the_fastest_of_its_calls_as_the_batchs_cost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A busy moment during load does not stick: of warm-up's calls (30, 10 and 20 ms by a fake
    clock), the batch's measured cost is the fastest, not the last."""
    runner = make_runner(tmp_path, inline_max_s=0.0)
    clock = {"now": 0.0}
    durations = iter([0.030, 0.010, 0.020])
    original = runner.run_sync

    def spy(inputs, solo=False):  # type: ignore[no-untyped-def]
        clock["now"] += next(durations)
        return original(inputs, solo=solo)

    runner.run_sync = spy  # type: ignore[method-assign]
    monkeypatch.setattr(runner_module, "time", SimpleNamespace(perf_counter=lambda: clock["now"]))
    z = {"z": np.ones((2, TINY_LATENT), np.float32), "label": np.arange(2, dtype=np.int64)}
    runner.warm(z, times=3)
    assert runner.measured_cost_s(z) == pytest.approx(0.010)
    runner.close()


def test_max_diff_of_two_outputs() -> None:
    max_diff = runner_module._max_diff
    assert max_diff(np.array([1.0, np.nan]), np.array([1.0, np.nan])) == 0.0
    assert max_diff(np.array([1.0, np.inf]), np.array([1.5, np.inf])) == 0.5
    assert max_diff(np.array([1.0, np.nan]), np.array([1.0, 2.0])) == np.inf  # a NaN on one side only
    assert max_diff(np.array([3, 4]), np.array([3, 6])) == 2.0  # integer outputs (codes)
    assert max_diff(np.zeros((1, 2)), np.zeros((2, 1))) == np.inf


@pytest.mark.parametrize("io_binding", [False, True], ids=["run", "io_binding"])
def test_abort_ends_a_model_call_still_running_so_that_close_returns(
    tmp_path: Path, io_binding: bool
) -> None:
    """Shutdown's deadline (Repository.close): a call computing far past the drain grace held close,
    and with it the process's exit, until it ended; abort fails it at its next node (a Loop's next
    iteration here), and later calls at once."""
    path = tmp_path / "slow.onnx"
    # ~1 s a row per 55,000 iterations on an idle core: minutes, unless aborted.
    onnx.save(slow_generator_graph(TINY_LATENT, 10_000_000), str(path))
    runner = Runner(
        path,
        label="slow",
        providers=["CPUExecutionProvider"],
        instances=1,
        intra_op_threads=1,
        runtime=RuntimeConfig(io_binding=io_binding),
    )
    z = {"z": np.zeros((1, TINY_LATENT), np.float32)}
    failed: list[BaseException] = []
    # The abort must come once the model call is running, not before it starts (a call begun after
    # abort fails on ONNX Runtime's terminate flag too): the call says when it enters the model, and
    # the test waits until its thread has then spent CPU time in it.
    entered = threading.Event()
    model_call = runner._model_call

    def entering(feeds: dict[str, np.ndarray], solo: bool) -> list[object]:
        entered.set()
        return model_call(feeds, solo)

    runner._model_call = entering  # type: ignore[method-assign]

    def call() -> None:
        try:
            runner.run_sync(z)
        except Exception as exc:
            failed.append(exc)

    computing = threading.Thread(target=call)
    computing.start()
    assert entered.wait(30), "the call never reached the model"
    assert computing.ident is not None
    cpu_clock = time.pthread_getcpuclockid(computing.ident)
    at_entry = time.clock_gettime(cpu_clock)
    deadline = time.monotonic() + 30
    while time.clock_gettime(cpu_clock) - at_entry < 0.05:  # CPU time in the model call, not wall time
        assert computing.is_alive() and time.monotonic() < deadline, "the call must still be computing"
        time.sleep(0.01)
    assert computing.is_alive() and not failed, "the call must still be computing"
    runner.abort()
    computing.join(30)
    assert not computing.is_alive(), "abort must end the running call"
    assert len(failed) == 1 and isinstance(failed[0], Unavailable), failed
    assert "aborted: the server is shutting down" in str(failed[0])
    assert "terminate flag" in str(failed[0].__cause__)  # ONNX Runtime's own Fail
    with pytest.raises(Unavailable, match="shutting down"):
        runner.run_sync(z)
    runner.close()


def test_a_model_of_any_input_size_keeps_the_costs_and_output_shapes_of_a_bounded_number_of_sizes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fully convolutional model (Translate at any size, SR's tile sizes) has a batch signature per
    input size: the runner's costs (_costs: average, fastest, fastest with outputs) and its IO binding's
    output shapes gained an entry per size ever served, bounded only by max_input_pixels (thousands of
    sizes). Only the MAX_SHAPES_KEPT sizes used last are kept: a size in use all along keeps its
    measured cost, so its batches still run inline."""
    from genserve_server import session_runner

    monkeypatch.setattr(session_runner, "MAX_SHAPES_KEPT", 4, raising=False)
    path = tmp_path / "i2i.onnx"
    onnx.save(image_to_image_graph(1), str(path))
    runner = Runner(
        path,
        label="i2i",
        providers=["CPUExecutionProvider"],
        instances=1,
        intra_op_threads=1,
        runtime=RuntimeConfig(io_binding=True),
        inline_max_s=1.0,  # every measured batch counts as tiny
    )
    usual = {"image": np.zeros((1, 3, 8, 8), np.float32)}
    runner.warm(usual)
    threads = record_threads(runner)

    async def body() -> None:
        for side in range(9, 41):
            await runner.run(None, {"image": np.zeros((1, 3, side, side), np.float32)})
            await runner.run(None, usual)

    asyncio.run(body())
    runner.close()
    kept = {"_costs": len(runner._costs), "_output_shapes": len(runner.session_runners[0]._output_shapes)}
    assert kept == dict.fromkeys(kept, 4)
    assert threads[1::2] == ["MainThread"] * 32  # the usual size: measured all along, inline
    assert all(t.startswith("ort-i2i") for t in threads[0::2])  # each new size: unmeasured, on the pool
