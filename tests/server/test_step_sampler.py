"""Step-level (continuous) batching of code priors: step_sampler.py through the core, and SampleCodes
through an in-process gRPC server. Tiny synthetic priors (code_models.py), nothing trained."""

from __future__ import annotations

import asyncio
import gc
import shutil
import time
import weakref
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from code_models import prior_graph, write_code_models
from server_support import fill_queue, gate, hold_runs, run_with_core, write_model

from genserve.kserve import grpc_service_pb2 as kpb
from genserve.kserve import grpc_service_pb2_grpc as kpb_grpc
from genserve.v1 import genserve_pb2 as pb
from genserve.v1 import genserve_pb2_grpc as pb_grpc
from genserve.v1 import types_pb2 as tpb
from genserve_contract.config import SamplingConfig
from genserve_server import code_sampling, validate
from genserve_server.batch_keys import CodeRows
from genserve_server.code_sampling import CodeSamples
from genserve_server.config import ServerConfig
from genserve_server.core import Call, GenerationCore
from genserve_server.errors import DeadlineExceeded, Internal, InvalidArgument, ResourceExhausted, Unavailable
from genserve_server.kserve import InferenceService
from genserve_server.metrics import Metrics
from genserve_server.reload import Reloader
from genserve_server.repository import ModelState, ModelVersion, Repository
from genserve_server.service import GenerationService
from genserve_server.step_sampler import (
    SamplingOptions,
    StepScheduler,
    check_grids,
    sample_codes,
    uniforms,
)

GRID = (6, 6)
POSITIONS = GRID[0] * GRID[1]
MAX_ROWS = 8
PNG = validate.output_spec(1, 0, None, False)


@pytest.fixture(scope="module")
def code_repo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("code-models")
    names = write_code_models(root, grid=GRID, k=16, max_rows=MAX_ROWS)
    # A prior whose config names a decoder of another shape (the two-level one): refused by name.
    names["misfit"] = "misfit-prior"
    write_model(
        root,
        "misfit-prior",
        "code_prior",
        prior_graph(*GRID, 16),
        {"grid": list(GRID), "codebook_size": 16, "output_range": None},
        config={"decoder": names["decoder2"]},
    )
    # A top prior and a chained bottom prior with their own sampling defaults (config.json sampling).
    names["tempered_top"], names["tempered"] = "tempered-top-prior", "tempered-prior"
    top = (GRID[0] // 2, GRID[1] // 2)
    write_model(
        root,
        names["tempered_top"],
        "code_prior",
        prior_graph(*top, 16, seed=1),
        {"grid": list(top), "codebook_size": 16, "output_range": None},
        config={"sampling": {"temperature": 0.3}},
    )
    write_model(
        root,
        names["tempered"],
        "code_prior",
        prior_graph(*GRID, 16, top=top, seed=2),
        {
            "grid": list(GRID),
            "codebook_size": 16,
            "top_grid": list(top),
            "top_codebook_size": 16,
            "output_range": None,
        },
        config={
            "decoder": names["decoder2"],
            "top_prior": names["tempered_top"],
            "sampling": {"temperature": 0.7, "top_k": 5},
        },
    )
    return root, names


@pytest.fixture(scope="module")
def deep_code_repo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """The same models with a MatMul layer in the prior: GEMM rows must not depend on the batch."""
    root = tmp_path_factory.mktemp("deep-code-models")
    return root, write_code_models(root, grid=GRID, k=16, max_rows=MAX_ROWS, iterations=1)


async def sample(
    core: GenerationCore,
    name: str,
    seeds: list[int],
    labels: list[int] | None = None,
    *,
    tops: np.ndarray | None = None,
    options: SamplingOptions | None = None,
    deadline: float | None = None,
    call: Call | None = None,
) -> CodeSamples:
    if call is None:
        call = Call("SampleCodes", "test", time.monotonic(), core.metrics.unresolved(), deadline=deadline)
    mv = core.resolve(call, name, "", ("code_prior",), "SampleCodes")
    if labels is not None and len(labels) == 1:
        labels = labels * len(seeds)
    try:
        return await code_sampling.sample_codes(
            core, mv, call, seeds, labels, tops, options or SamplingOptions(), PNG
        )
    finally:
        if call.batcher is not None:
            call.batcher.release()
        call.release_uses()


def count_calls(scheduler: StepScheduler, delay_s: float = 0.0) -> list[np.ndarray]:
    """Record each step's `codes` input (and optionally slow each call down)."""
    calls: list[np.ndarray] = []
    run = scheduler._run

    async def counted(inputs: dict[str, np.ndarray]) -> Mapping[str, np.ndarray]:
        calls.append(inputs["codes"].copy())
        if delay_s:
            await asyncio.sleep(delay_s)
        return await run(inputs)

    scheduler._run = counted
    return calls


async def until(predicate: Callable[[], bool]) -> None:
    while not predicate():
        await asyncio.sleep(0)


# ---------------------------------------------------------------------- sampling is a pure function


def test_uniforms_depend_on_seed_position_and_stream_only() -> None:
    alone = uniforms([7], [5], 0)
    batched = uniforms([3, 7, 9], [0, 5, 11], 0)
    assert alone[0] == batched[1]
    assert uniforms([7], [6], 0)[0] != alone[0]
    assert uniforms([7], [5], 1)[0] != alone[0]
    assert np.all((batched > 0) & (batched < 1))


def test_sample_codes_follows_temperature_and_top_k() -> None:
    logits = np.array([[0.0, 5.0, 1.0, 4.9]], np.float32)
    u = np.array([0.999])
    # top_k=1 keeps only the argmax whatever u is; a tiny temperature does the same.
    assert sample_codes(logits, u, np.array([1.0]), np.array([1]))[0] == 1
    assert sample_codes(logits, u, np.array([1e-3]), np.array([0]))[0] == 1
    # u near 1 with all codes kept picks the last code with weight.
    assert sample_codes(logits, u, np.array([1.0]), np.array([0]))[0] == 3
    rows = np.repeat(logits, 3, axis=0)
    us = np.array([0.1, 0.5, 0.999])
    together = sample_codes(rows, us, np.ones(3), np.zeros(3, np.int64))
    alone = [sample_codes(logits, us[i : i + 1], np.ones(1), np.zeros(1, np.int64))[0] for i in range(3)]
    assert together.tolist() == alone


def test_options_and_grids_are_checked_naming_the_field() -> None:
    with pytest.raises(InvalidArgument, match="temperature"):
        SamplingOptions.checked(0.0, 0, 16)
    with pytest.raises(InvalidArgument, match=r"top_k: must be in 0\.\.16"):
        SamplingOptions.checked(None, 17, 16)
    with pytest.raises(InvalidArgument, match=r"top_codes\.shape"):
        check_grids(np.zeros((2, 3), np.int64), 1, (3, 3), 16, "top_codes")
    with pytest.raises(InvalidArgument, match=r"top_codes: codes must be in \[0, 16\)"):
        check_grids(np.full((3, 3), 16, np.int64), 1, (3, 3), 16, "top_codes")


@pytest.mark.parametrize(("sent", "shown"), [(10.000001, "10.000001"), (1e38, "1e+38"), (-0.1, "-0.1")])
def test_a_temperature_refusal_names_the_float32_the_client_sent_as_it_wrote_it(
    sent: float, shown: str
) -> None:
    """SampleCodes' temperature is a proto float: 10.000001 arrives as 10.000000953674316, which
    the refusal quoted, a number the client never wrote (as truncation_psi's once did)."""
    with pytest.raises(InvalidArgument) as refused:
        SamplingOptions.checked(float(np.float32(sent)), 0, 16)
    assert str(refused.value).endswith(f"got {shown}"), refused.value


# ---------------------------------------------------------------------- the scheduler, through the core


@pytest.mark.parametrize("repo_fixture", ["code_repo", "deep_code_repo"])
def test_image_alone_equals_image_joined_mid_flight(
    repo_fixture: str, request: pytest.FixtureRequest
) -> None:
    root, names = request.getfixturevalue(repo_fixture)

    async def body(repo: Repository, core: GenerationCore) -> None:
        alone = await sample(core, names["prior"], [42], [1])
        scheduler = core.stepper(repo.get(names["prior"]).resolve(""))
        calls = count_calls(scheduler)
        busy = asyncio.ensure_future(sample(core, names["prior"], [1, 2, 3, 4, 5], [0, 1, 2, 0, 1]))
        await until(lambda: scheduler.stats.steps >= 7)  # the busy rows are at position 7 or beyond
        joined = await sample(core, names["prior"], [42], [1])
        await busy
        assert joined.images[0].data == alone.images[0].data
        assert np.array_equal(joined.codes, alone.codes)
        # The joiner shared the busy rows' calls at a different position: one call per step for all.
        assert any(len(c) == 6 for c in calls)
        assert len(calls) < 5 + POSITIONS + 7  # fewer calls than a call per request per position

    run_with_core(root, body)


def test_rows_at_different_positions_share_one_prior_call(code_repo: tuple[Path, dict[str, str]]) -> None:
    root, names = code_repo

    async def body(repo: Repository, core: GenerationCore) -> None:
        scheduler = core.stepper(repo.get(names["prior"]).resolve(""))
        calls = count_calls(scheduler)
        first = asyncio.ensure_future(sample(core, names["prior"], [10], [0]))
        await until(lambda: scheduler.stats.steps >= 3)
        second = asyncio.ensure_future(sample(core, names["prior"], [11], [2]))
        await asyncio.gather(first, second)
        # j steps alone (j >= 3: the second joined after them), then both rows share every call
        # until the first finishes, then the second finishes its last j positions alone:
        # POSITIONS + j calls for 2 * POSITIONS row-steps.
        sizes = [len(c) for c in calls]
        alone = sizes.index(2)
        assert alone >= 3
        assert sizes == [1] * alone + [2] * (POSITIONS - alone) + [1] * alone
        assert scheduler.stats.rows_stepped == 2 * POSITIONS
        # The shared calls held the two rows at different positions: the first row's grid had
        # `alone` more codes filled (unfilled positions hold 0; a sampled 0 cannot add any).
        first_filled = np.count_nonzero(calls[alone][0])
        assert first_filled <= alone and np.count_nonzero(calls[alone][1]) == 0

    run_with_core(root, body)


@pytest.mark.parametrize("repo_fixture", ["code_repo", "deep_code_repo"])
def test_stable_shapes_pad_every_call_to_one_bucket_and_keep_the_codes(
    repo_fixture: str, request: pytest.FixtureRequest
) -> None:
    """As on a GPU: rows joining and leaving do not change the call's shape; the padding rows'
    logits are dropped, so the grids are those of a lone request without padding."""
    root, names = request.getfixturevalue(repo_fixture)

    async def body(repo: Repository, core: GenerationCore) -> None:
        alone = await sample(core, names["prior"], [42], [1])
        busy_alone = await sample(core, names["prior"], [1, 2, 3, 4, 5], [0, 1, 2, 0, 1])
        scheduler = core.stepper(repo.get(names["prior"]).resolve(""))
        assert not scheduler.stable_shapes  # a CPU prior: no padding
        scheduler.stable_shapes = True
        calls = count_calls(scheduler)
        stats_before = (scheduler.stats.steps, scheduler.stats.reshapes, scheduler.stats.rows_stepped)
        busy = asyncio.ensure_future(sample(core, names["prior"], [1, 2, 3, 4, 5], [0, 1, 2, 0, 1]))
        await until(lambda: scheduler.stats.steps >= stats_before[0] + 7)
        joined = await sample(core, names["prior"], [42], [1])
        assert np.array_equal((await busy).codes, busy_alone.codes)
        assert np.array_equal(joined.codes, alone.codes)
        assert joined.images[0].data == alone.images[0].data
        # 5 rows, then 6, then 5 again after the joiner left: every call padded to 8 rows.
        assert {len(c) for c in calls} == {MAX_ROWS}
        assert scheduler.stats.reshapes == stats_before[1] + 1  # 1 row (the lone request) -> 8
        assert scheduler.stats.rows_stepped - stats_before[2] == 6 * POSITIONS
        assert scheduler.stats.padded == len(calls) * MAX_ROWS - 6 * POSITIONS
        # Padding rows repeat the first running row.
        assert all(np.array_equal(c[-1], c[0]) for c in calls)

    run_with_core(root, body)


def test_the_stable_bucket_grows_at_once_and_never_shrinks() -> None:
    async def never(inputs: dict[str, np.ndarray]) -> Mapping[str, np.ndarray]:
        raise AssertionError("not called")

    scheduler = StepScheduler(never, name="p", grid=(2, 3), codebook_size=4, max_rows=8, stable_shapes=True)
    assert [scheduler.call_rows(n) for n in (1, 3, 2, 1, 5, 8, 3)] == [1, 4, 4, 4, 8, 8, 8]
    assert scheduler.stats.reshapes == 2  # 1 -> 4 -> 8
    # However long fewer rows run, the call keeps its shape (a new shape costs ~50 steps on a GPU).
    assert {scheduler.call_rows(n) for n in [1, 3] * 10 * scheduler.positions} == {8}
    assert scheduler.stats.reshapes == 2
    # A row budget that is not a power of two caps the bucket; without stable shapes, no padding.
    capped = StepScheduler(never, name="p", grid=(2, 3), codebook_size=4, max_rows=6, stable_shapes=True)
    assert [capped.call_rows(n) for n in (5, 6, 3)] == [6, 6, 6]
    plain = StepScheduler(never, name="p", grid=(2, 3), codebook_size=4, max_rows=8)
    assert [plain.call_rows(n) for n in (1, 3, 2)] == [1, 3, 2] and plain.stats.reshapes == 2


def test_a_full_budget_refusal_names_the_rows_held_for_two_level_calls_apart_from_the_running_ones() -> None:
    """Rows a two-level call holds in its bottom prior while its top level runs (`reserved`) count
    against the budget, but none of them runs: the refusal said '3 of 4 rows running' on a prior
    with no row running (genserve_step_running_rows 0), sending an operator after a busy prior."""

    async def never(inputs: dict[str, np.ndarray]) -> Mapping[str, np.ndarray]:
        raise AssertionError("not called")

    scheduler = StepScheduler(never, name="p", grid=(2, 3), codebook_size=4, max_rows=4)
    with pytest.raises(RuntimeError, match="the top level failed"), scheduler.reserved(3):
        with pytest.raises(ResourceExhausted, match="row budget full") as refused:
            scheduler.check_room(2)
        message = str(refused.value)
        assert "3 of 4 rows running" not in message
        assert "3 of 4 rows taken: 0 running, 3 held for two-level calls" in message
        assert "2 asked" in message
        raise RuntimeError("the top level failed")
    assert scheduler.rows == 0  # given back however the top level ended
    scheduler.check_room(4)


def test_a_request_past_its_deadline_that_finds_the_row_budget_full_is_a_deadline_drop() -> None:
    """As the batcher's full queue: a request whose deadline had passed before it reached a full row
    budget was refused `queue_full` (RESOURCE_EXHAUSTED), though its client gets DEADLINE_EXCEEDED;
    with room it joined and left at the next step as `deadline`. Either way it is a deadline drop."""

    async def never(inputs: dict[str, np.ndarray]) -> Mapping[str, np.ndarray]:
        raise AssertionError("not called")

    async def body() -> None:
        registry = Metrics(enabled=True)
        metrics = registry.for_model("p", "1", 4, "code_prior")
        scheduler = StepScheduler(never, name="p", grid=(2, 3), codebook_size=4, max_rows=4, metrics=metrics)
        with scheduler.reserved(4):  # the budget full
            with pytest.raises(DeadlineExceeded, match="not computed"):
                await scheduler.sample([1], None, None, SamplingOptions(), deadline=time.monotonic() - 0.1)
        assert (scheduler.stats.refused, scheduler.stats.expired) == (0, 1)
        counted = [
            registry.registry.get_sample_value(name, {"model": "p", "version": "1", "reason": reason})
            for name, reason in (
                ("genserve_requests_rejected_total", "queue_full"),
                ("genserve_requests_dropped_total", "deadline"),
            )
        ]
        assert counted == [0, 1]

    asyncio.run(body())


@pytest.mark.parametrize(
    ("ending", "rejected", "deadline_drops", "cancelled_drops"),
    [("answered", 1.0, 0.0, 0.0), ("deadline", 0.0, 1.0, 0.0), ("client cancelled", 0.0, 0.0, 1.0)],
)
def test_a_full_row_budget_refusal_is_counted_under_the_status_its_client_gets(
    monkeypatch: pytest.MonkeyPatch,
    ending: str,
    rejected: float,
    deadline_drops: float,
    cancelled_drops: float,
) -> None:
    """A SampleCodesStream's sampling runs in a task of its own: its row budget refusal reaches the
    boundary a loop turn or more later, by when the client may have cancelled (CANCELLED) or the
    deadline passed (DEADLINE_EXCEEDED, the boundary sends nothing). check_room counted `queue_full`
    at once whatever the client got (the reviewer's 471 against 470 refused calls); now the boundary
    counts it as it answers: `queue_full` if RESOURCE_EXHAUSTED is sent, a `deadline` drop past the
    deadline, a `cancelled` drop for a call its client cancelled (counted CANCELLED)."""
    from genserve_server import batcher as batcher_module
    from genserve_server import boundary as boundary_module
    from genserve_server import step_sampler as step_sampler_module
    from genserve_server.boundary import Boundary

    clock = [1000.0]
    fake_time = type("FakeTime", (), {"monotonic": staticmethod(lambda: clock[0])})
    monkeypatch.setattr(boundary_module, "time", fake_time)
    monkeypatch.setattr(batcher_module, "time", fake_time)  # cancelled_by_deadline's clock
    monkeypatch.setattr(step_sampler_module, "time", fake_time)
    aborted: list[grpc.StatusCode] = []

    class Context:
        def time_remaining(self) -> float:
            return 0.5

        def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
            return ()

        def set_trailing_metadata(self, metadata: object) -> None:
            pass

        async def abort(self, code: grpc.StatusCode, details: str, trailing_metadata: object = ()) -> None:
            aborted.append(code)
            raise RuntimeError(details)

    async def never(inputs: dict[str, np.ndarray]) -> Mapping[str, np.ndarray]:
        raise AssertionError("not called")

    registry = Metrics(enabled=True)
    metrics = registry.for_model("p", "1", 4, "code_prior")
    scheduler = StepScheduler(never, name="p", grid=(2, 3), codebook_size=4, max_rows=4, metrics=metrics)

    async def handler(request: object, call: Call) -> None:
        call.metrics = metrics
        sampling = asyncio.ensure_future(
            scheduler.sample([1], None, None, SamplingOptions(), call.deadline, caller=call)
        )
        await asyncio.wait({sampling})  # refused: the budget is full
        if ending == "deadline":
            clock[0] += 1.0
        elif ending == "client cancelled":
            sampling.exception()
            raise asyncio.CancelledError
        sampling.result()

    async def body() -> None:
        with scheduler.reserved(4), pytest.raises((RuntimeError, asyncio.CancelledError)):
            await Boundary(registry).unary("SampleCodesStream", object(), Context(), handler)  # type: ignore[arg-type]

    asyncio.run(body())
    counted = [
        registry.registry.get_sample_value(name, {"model": "p", "version": "1", "reason": reason})
        for name, reason in (
            ("genserve_requests_rejected_total", "queue_full"),
            ("genserve_requests_dropped_total", "deadline"),
            ("genserve_requests_dropped_total", "cancelled"),
        )
    ]
    assert counted == [rejected, deadline_drops, cancelled_drops]
    assert aborted == ([grpc.StatusCode.RESOURCE_EXHAUSTED] if rejected else [])


def test_a_cancelled_row_leaves_at_the_next_step(code_repo: tuple[Path, dict[str, str]]) -> None:
    root, names = code_repo

    async def body(repo: Repository, core: GenerationCore) -> None:
        scheduler = core.stepper(repo.get(names["prior"]).resolve(""))
        calls = count_calls(scheduler, delay_s=0.002)
        stays = asyncio.ensure_future(sample(core, names["prior"], [1], [0]))
        leaves = asyncio.ensure_future(sample(core, names["prior"], [2], [0]))
        await until(lambda: scheduler.stats.steps >= 4)
        steps_at_cancel = len(calls)
        leaves.cancel()
        with pytest.raises(asyncio.CancelledError):
            await leaves
        await stays
        # The call in flight when it was cancelled may still hold it; the one after it does not.
        assert all(len(c) == 2 for c in calls[:steps_at_cancel])
        assert all(len(c) == 1 for c in calls[steps_at_cancel + 1 :])
        assert scheduler.stats.cancelled == 1 and scheduler.rows == 0

    run_with_core(root, body)


def test_a_cancelled_calls_rows_hold_no_room_while_the_step_in_flight_ends(
    code_repo: tuple[Path, dict[str, str]],
) -> None:
    """Rows whose caller left (or whose deadline passed) leave before the next step's joiners come
    in, so they take no room from a request sent while the step in flight ends: it was refused
    RESOURCE_EXHAUSTED 'row budget full (8 of 8 rows taken: 8 running ...)' though its rows fit
    that next step (the batcher lets go of a cancelled request's queue rows at once, too)."""
    root, names = code_repo

    async def body(repo: Repository, core: GenerationCore) -> None:
        scheduler = core.stepper(repo.get(names["prior"]).resolve(""))
        reached, go = gate(scheduler, 2)
        half = MAX_ROWS // 2
        deadline = time.monotonic() + 0.2
        gone = asyncio.ensure_future(sample(core, names["prior"], list(range(half)), [0]))
        expires = asyncio.ensure_future(
            sample(core, names["prior"], list(range(half, MAX_ROWS)), [0], deadline=deadline)
        )
        await reached.wait()  # their second step runs
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        await until(lambda: time.monotonic() >= deadline)
        assert scheduler.rows == 0
        whole = asyncio.ensure_future(sample(core, names["prior"], list(range(MAX_ROWS)), [0]))
        await asyncio.sleep(0)
        go.set()
        assert len((await whole).images) == MAX_ROWS
        with pytest.raises(DeadlineExceeded):
            await expires
        assert (scheduler.stats.cancelled, scheduler.stats.expired) == (half, half)

    run_with_core(root, body)


def test_a_row_past_its_deadline_leaves_with_deadline_exceeded(
    code_repo: tuple[Path, dict[str, str]],
) -> None:
    root, names = code_repo

    async def body(repo: Repository, core: GenerationCore) -> None:
        scheduler = core.stepper(repo.get(names["prior"]).resolve(""))
        count_calls(scheduler, delay_s=0.002)
        other = asyncio.ensure_future(sample(core, names["prior"], [3], [0]))
        with pytest.raises(DeadlineExceeded, match="deadline passed after"):
            await sample(core, names["prior"], [4], [0], deadline=time.monotonic() + 0.02)
        assert scheduler.stats.expired == 1
        assert (await other).images  # the others go on

    run_with_core(root, body)


def test_a_full_row_budget_is_refused_at_once(code_repo: tuple[Path, dict[str, str]]) -> None:
    root, names = code_repo

    async def body(repo: Repository, core: GenerationCore) -> None:
        scheduler = core.stepper(repo.get(names["prior"]).resolve(""))
        count_calls(scheduler, delay_s=0.002)
        full = asyncio.ensure_future(sample(core, names["prior"], list(range(MAX_ROWS - 1)), [0]))
        await until(lambda: scheduler.stats.steps >= 1)
        steps = scheduler.stats.steps
        with pytest.raises(ResourceExhausted, match=f"row budget full \\({MAX_ROWS - 1} of {MAX_ROWS}"):
            await sample(core, names["prior"], [100, 101], [0])
        assert scheduler.stats.steps == steps  # answered without waiting for a step
        one_more = await sample(core, names["prior"], [100], [0])  # what fits still joins
        assert one_more.images
        await full

    run_with_core(root, body)


def test_bottom_prior_takes_the_top_grid(code_repo: tuple[Path, dict[str, str]]) -> None:
    root, names = code_repo

    async def body(repo: Repository, core: GenerationCore) -> None:
        top = await sample(core, names["top"], [5, 6])
        assert top.images == [] and top.codes.shape == (2, 3, 3)  # no decoder: grids only
        bottom = await sample(core, names["bottom"], [5, 6], tops=top.codes)
        again = await sample(core, names["bottom"], [6], tops=top.codes[1:])
        assert bottom.images[1].data == again.images[0].data
        other_top = await sample(core, names["bottom"], [6], tops=(top.codes[1:] + 1) % 16)
        assert not np.array_equal(other_top.codes, again.codes)
        # A bottom prior with a top prior samples both levels in one call: the same grids and images.
        chain = await sample(core, names["chain"], [5, 6])
        assert chain.tops is not None and np.array_equal(chain.tops, top.codes)
        assert np.array_equal(chain.codes, bottom.codes)
        assert [im.data for im in chain.images] == [im.data for im in bottom.images]

    run_with_core(root, body)


def test_steps_are_the_priors_batches_in_the_metrics(code_repo: tuple[Path, dict[str, str]]) -> None:
    root, names = code_repo
    metrics = Metrics(enabled=True)

    async def body(repo: Repository, core: GenerationCore) -> None:
        scheduler = core.stepper(repo.get(names["prior"]).resolve(""))
        count_calls(scheduler, delay_s=0.002)
        running = asyncio.ensure_future(sample(core, names["prior"], list(range(MAX_ROWS)), [0]))
        await until(lambda: scheduler.stats.steps >= 2)
        refused = Call("SampleCodes", "test", time.monotonic(), core.metrics.unresolved())
        with pytest.raises(ResourceExhausted):
            await sample(core, names["prior"], [99], [0], call=refused)
        # The boundary counts it queue_full as it answers RESOURCE_EXHAUSTED (under the status its
        # client gets: test_a_full_row_budget_refusal_is_counted_under_the_status_its_client_gets).
        assert refused.refused == (scheduler.metrics, "queue_full")
        await running

    run_with_core(root, body, metrics)
    labels = {"model": names["prior"], "version": "1"}

    def value(name: str, **extra: str) -> float | None:
        return metrics.registry.get_sample_value(name, {**labels, **extra})

    assert value("genserve_batch_size_count") == POSITIONS  # one batch per step, all rows in each
    assert value("genserve_batch_size_sum") == POSITIONS * MAX_ROWS
    assert value("genserve_images_total") == MAX_ROWS
    assert value("genserve_step_running_rows") == 0
    assert value("genserve_queue_duration_seconds_count", lane="interactive") == 1  # one request


def test_the_running_rows_gauge_lets_go_of_the_rows_of_a_failed_step(
    code_repo: tuple[Path, dict[str, str]],
) -> None:
    """genserve_step_running_rows is the running set now (docs/metrics.md). It was set after a
    successful step only: the rows of a failed step, gone, stayed in it through the next step, run
    for a request that joined meanwhile, as if 3 rows ran where 1 did."""
    root, names = code_repo
    metrics = Metrics(enabled=True)
    gauge = {"model": names["prior"], "version": "1"}
    during_next_step: list[float | None] = []

    async def body(repo: Repository, core: GenerationCore) -> None:
        scheduler = core.stepper(repo.get(names["prior"]).resolve(""))
        run = scheduler._run
        calls = 0
        failing, fail, next_step, release = (asyncio.Event() for _ in range(4))

        async def scripted(inputs: dict[str, np.ndarray]) -> Mapping[str, np.ndarray]:
            nonlocal calls
            calls += 1
            if calls == 2:  # the first request's second step fails
                failing.set()
                await fail.wait()
                raise RuntimeError("prior failed")
            if calls == 3:  # the joiner's first step
                next_step.set()
                await release.wait()
            return await run(inputs)

        scheduler._run = scripted
        first = asyncio.ensure_future(sample(core, names["prior"], [1, 2, 3], [0]))
        await failing.wait()
        joiner = asyncio.ensure_future(sample(core, names["prior"], [4], [0]))
        await until(lambda: scheduler.rows == 4)  # its row waits to join
        fail.set()
        with pytest.raises(Internal, match="model call failed"):
            await first
        await next_step.wait()
        during_next_step.append(metrics.registry.get_sample_value("genserve_step_running_rows", gauge))
        release.set()
        await joiner

    run_with_core(root, body, metrics)
    assert during_next_step == [1]
    assert metrics.registry.get_sample_value("genserve_step_running_rows", gauge) == 0


def test_a_requests_join_wait_is_one_queue_observation_however_many_rows(
    code_repo: tuple[Path, dict[str, str]],
) -> None:
    """genserve_queue_duration_seconds observes one item (request slice) per wait, as a batcher
    does: a request's rows join the running set together, so its join wait is one observation."""
    root, names = code_repo
    metrics = Metrics(enabled=True)

    async def body(repo: Repository, core: GenerationCore) -> None:
        scheduler = core.stepper(repo.get(names["prior"]).resolve(""))
        count_calls(scheduler, delay_s=0.002)
        first = asyncio.ensure_future(sample(core, names["prior"], [1, 2, 3], [0]))
        await until(lambda: scheduler.stats.steps >= 1)
        # Two more requests (4 and 1 rows) join mid-flight, at the same step or at two.
        await asyncio.gather(
            sample(core, names["prior"], [4, 5, 6, 7], [0]), sample(core, names["prior"], [8], [0])
        )
        await first

    run_with_core(root, body, metrics)
    labels = {"model": names["prior"], "version": "1", "lane": "interactive"}
    count = metrics.registry.get_sample_value("genserve_queue_duration_seconds_count", labels)
    assert count == 3  # three requests, 8 rows


def test_a_decoder_that_does_not_fit_the_prior_is_refused_by_name(
    code_repo: tuple[Path, dict[str, str]],
) -> None:
    root, names = code_repo

    async def body(repo: Repository, core: GenerationCore) -> None:
        with pytest.raises(Unavailable, match=f"its decoder {names['decoder2']} .* top grid \\(3, 3\\)"):
            await sample(core, names["misfit"], [1])

    run_with_core(root, body)


# ---------------------------------------------------------------------- a reload while a call runs


@pytest.fixture
def reload_repo(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """Fresh code models per test: these tests publish new versions into the repository."""
    return tmp_path, write_code_models(tmp_path, grid=GRID, k=16, max_rows=MAX_ROWS)


# Every model call on the runner's pool, as a real VQ-VAE-2 prior's or decoder's is (the tiny models
# here would run inline on the event loop, where a closed runner does not show).
POOLED = ServerConfig(inline_compute_max_s=0.0)


def publish_copy(root: Path, name: str) -> None:
    """A new version 2 of `name`, a copy of version 1 (same outputs), as a deploy writes one."""
    shutil.copytree(root / name / "1", root / name / ".tmp-2")
    (root / name / ".tmp-2").rename(root / name / "2")


def held(mv: ModelVersion) -> bool:
    """Whether an RPC holds the version (what a reload's drain waits for)."""
    assert mv.batcher is not None
    return not mv.batcher._released.is_set()


async def reload_and_settle(reloader: Reloader, *retiring: ModelVersion) -> None:
    """Rescan, then wait until each retiring version's drain waits on a holder or has unloaded it."""
    report = await reloader.rescan()
    assert sorted(report.retired) == sorted(mv.label for mv in retiring), report
    models = reloader.repo.models
    await until(
        lambda: all(held(mv) or models[mv.name].versions.get(mv.version) is not mv for mv in retiring)
    )


@pytest.mark.parametrize("reloaded", ["decoder2", "top"])
def test_sample_codes_keeps_the_decoder_and_top_prior_it_resolved_through_a_reload(
    reload_repo: tuple[Path, dict[str, str]], reloaded: str
) -> None:
    """A two-level SampleCodes (top prior, bottom prior, decoder) while a reload publishes a new version
    of its decoder or of its top prior: the call finishes on the versions it resolved, and their
    drain ends once it does (the old version was unloaded under the call: UNAVAILABLE "is draining",
    or INTERNAL from the top prior's closed runner)."""
    root, names = reload_repo

    async def body(repo: Repository, core: GenerationCore) -> None:
        expected = await sample(core, names["chain"], [5, 6])
        old = repo.get(names[reloaded]).resolve("")
        # Pause the level that runs after the reloaded model was resolved and before it is used
        # again: the bottom prior's steps (decoder next), or the top prior's own steps.
        paused = repo.get(names["chain" if reloaded == "decoder2" else "top"]).resolve("")
        reached, go = gate(core.stepper(paused), at_step=2)
        running = asyncio.ensure_future(sample(core, names["chain"], [5, 6]))
        await reached.wait()
        publish_copy(root, names[reloaded])
        reloader = Reloader(repo, drain_grace_s=30)
        await reload_and_settle(reloader, old)
        assert repo.get(names[reloaded]).resolve("").version == "2"  # new calls get the new version
        still_loaded = old.state == ModelState.DRAINING and repo.get(names[reloaded]).versions.get("1") is old
        go.set()
        got = await running
        assert still_loaded, "the old version was unloaded while the call used it"
        assert got.tops is not None and expected.tops is not None
        assert np.array_equal(got.tops, expected.tops) and np.array_equal(got.codes, expected.codes)
        assert [im.data for im in got.images] == [im.data for im in expected.images]
        assert not held(old)  # released at the call's end: the drain goes on
        await reloader.close(10)
        assert "1" not in repo.get(names[reloaded]).versions  # drained and unloaded

    run_with_core(root, body, config=POOLED)


def test_code_rpcs_release_every_version_they_hold_on_each_exit_path(
    reload_repo: tuple[Path, dict[str, str]],
) -> None:
    """Through the gRPC boundary: a SampleCodes across a reload of its decoder and top prior succeeds
    with the answer it had before; a SampleCodesStream that the client leaves mid-call, and a
    SampleCodes that fails (its decoder does not fit), hold their versions while they run and release
    them all at their end, so that every drain finishes."""
    root, names = reload_repo
    names["misfit"] = "misfit-prior"
    write_model(
        root,
        "misfit-prior",
        "code_prior",
        prior_graph(*GRID, 16),
        {"grid": list(GRID), "codebook_size": 16, "output_range": None},
        config={"decoder": names["decoder2"]},
    )
    raw = tpb.OutputOptions(format=tpb.IMAGE_FORMAT_RAW_UINT8)
    request = pb.SampleCodesRequest(model=names["chain"], seeds=[5, 6], output=raw, return_codes=True)

    async def main() -> None:
        config = POOLED
        metrics = Metrics(enabled=False)
        repo = Repository(root, config, metrics)
        repo.scan()
        await repo.load_all()
        pool = ThreadPoolExecutor(1)
        server = grpc.aio.server()
        service = GenerationService(repo, config, metrics, pool)
        pb_grpc.add_GenerationServiceServicer_to_server(service, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        reloader = Reloader(repo, drain_grace_s=30)
        core = service.core
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pb_grpc.GenerationServiceStub(channel)
                expected = await stub.SampleCodes(request)

                def serving(key: str) -> ModelVersion:
                    return repo.get(names[key]).resolve("")

                # A unary call across a reload of both the decoder and the top prior.
                decoder, top, chain = serving("decoder2"), serving("top"), serving("chain")
                reached, go = gate(core.stepper(chain), at_step=2)
                unary = asyncio.ensure_future(stub.SampleCodes(request))
                await reached.wait()
                publish_copy(root, names["decoder2"])
                publish_copy(root, names["top"])
                await reload_and_settle(reloader, decoder, top)
                holding = held(decoder), held(top)
                go.set()
                got = await unary
                assert [g.image.data for g in got.images] == [g.image.data for g in expected.images]
                assert list(got.codes) == list(expected.codes)
                assert list(got.top_codes) == list(expected.top_codes)
                assert holding == (True, True), "the call did not hold the versions it used"
                await reloader.close(10)
                assert not held(decoder) and not held(top) and not held(chain)
                assert {"1"}.isdisjoint(repo.get(names["decoder2"]).versions)
                assert {"1"}.isdisjoint(repo.get(names["top"]).versions)

                # A stream the client leaves mid-call while a reload waits on it.
                decoder, top = serving("decoder2"), serving("top")
                reached, go = gate(core.stepper(chain), at_step=2)
                stream = stub.SampleCodesStream(request)
                first = await stream.read()  # the top level's progress: the call holds all three
                assert first.level == "top"
                await reached.wait()
                for key in ("decoder2", "top"):
                    shutil.copytree(root / names[key] / "2", root / names[key] / "3")
                await reload_and_settle(reloader, decoder, top)
                assert held(decoder) and held(top)
                stream.cancel()  # the client leaves
                go.set()
                await until(lambda: not held(decoder) and not held(top) and not held(chain))
                await reloader.close(10)
                assert {"2"}.isdisjoint(repo.get(names["decoder2"]).versions)

                # A call that fails once it has resolved its decoder releases it too.
                decoder = serving("decoder2")
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.SampleCodes(pb.SampleCodesRequest(model=names["misfit"], seeds=[1]))
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE
                assert decoder.batcher is not None and not held(decoder)
                batcher = decoder.batcher
                assert (batcher.callers, batcher.streams, batcher.dependents) == (0, 0, 0)
        finally:
            await reloader.close(1)
            await server.stop(None)
            await repo.close(1)
            pool.shutdown()

    asyncio.run(asyncio.wait_for(main(), 30))


# ---------------------------------------------------------------------- SampleCodes over gRPC


def test_sample_codes_rpc(code_repo: tuple[Path, dict[str, str]]) -> None:
    root, names = code_repo

    async def main() -> None:
        config = ServerConfig()
        metrics = Metrics(enabled=False)
        repo = Repository(root, config, metrics)
        repo.scan()
        await repo.load_all()
        pool = ThreadPoolExecutor(1)
        server = grpc.aio.server()
        service = GenerationService(repo, config, metrics, pool)
        pb_grpc.add_GenerationServiceServicer_to_server(service, server)
        infer = InferenceService(repo, service.core, service.boundary)
        kpb_grpc.add_GRPCInferenceServiceServicer_to_server(infer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pb_grpc.GenerationServiceStub(channel)
                await check_rpc(stub, names)
                with pytest.raises(grpc.aio.AioRpcError) as info:  # one model call cannot sample a grid
                    await kpb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
                        kpb.ModelInferRequest(model_name=names["prior"])
                    )
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                details = info.value.details() or ""
                assert "is a code_prior model" in details and "genserve.v1 SampleCodes" in details, details
        finally:
            await server.stop(None)
            await repo.close(1)
            pool.shutdown()

    asyncio.run(main())


def test_each_image_of_a_sample_codes_call_carries_its_own_rows_label(
    code_repo: tuple[Path, dict[str, str]],
) -> None:
    """A label per seed: each image (SampleCodes), each preview and each result image
    (SampleCodesStream) carries its own row's label and seed, not the first row's."""
    root, names = code_repo

    async def main() -> None:
        config = ServerConfig()
        metrics = Metrics(enabled=False)
        repo = Repository(root, config, metrics)
        repo.scan()
        await repo.load_all()
        pool = ThreadPoolExecutor(1)
        server = grpc.aio.server()
        pb_grpc.add_GenerationServiceServicer_to_server(
            GenerationService(repo, config, metrics, pool), server
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pb_grpc.GenerationServiceStub(channel)
                request = pb.SampleCodesRequest(
                    model=names["prior"],
                    seeds=[8, 9, 10],
                    labels=[0, 2, 1],
                    output=tpb.OutputOptions(format=tpb.IMAGE_FORMAT_RAW_UINT8),
                )
                reply = await stub.SampleCodes(request)
                assert [(g.seed, g.label) for g in reply.images] == [(8, 0), (9, 2), (10, 1)]
                request.preview_every = 9
                *progress, last = [chunk async for chunk in stub.SampleCodesStream(request)]
                assert progress
                for chunk in [*(c.previews for c in progress), last.result.images]:
                    assert [(g.seed, g.label) for g in chunk] == [(8, 0), (9, 2), (10, 1)]
        finally:
            await server.stop(None)
            await repo.close(1)
            pool.shutdown()

    asyncio.run(main())


async def check_rpc(stub: Any, names: dict[str, str]) -> None:
    raw = tpb.OutputOptions(format=tpb.IMAGE_FORMAT_RAW_UINT8)
    reply = await stub.SampleCodes(
        pb.SampleCodesRequest(
            model=names["prior"],
            seeds=[8, 9],
            labels=[2],
            top_k=4,
            temperature=0.7,
            output=raw,
            return_codes=True,
        )
    )
    assert [g.seed for g in reply.images] == [8, 9] and [g.label for g in reply.images] == [2, 2]
    assert reply.provenance.rng_algorithm == "philox4x32-10/code-sampling/v1"
    assert [(m.model, m.version) for m in reply.provenance.used_models] == [(names["decoder"], "1")]
    assert list(reply.codes[0].shape) == list(GRID) and reply.codes[0].dtype == tpb.DTYPE_INT64
    grid = np.frombuffer(reply.codes[0].data, "<i8").reshape(GRID)
    pixels = np.frombuffer(reply.images[0].image.data, np.uint8).reshape(*GRID, 1)[..., 0]
    assert np.array_equal(pixels, np.round(grid / 16 * 255).astype(np.uint8))  # the decoder's image
    top = await stub.SampleCodes(pb.SampleCodesRequest(model=names["top"], count=1, base_seed=3))
    assert not top.images and len(top.codes) == 1  # no decoder: the grid
    bottom = await stub.SampleCodes(
        pb.SampleCodesRequest(model=names["bottom"], seeds=[3], top_codes=top.codes[0], output=raw)
    )
    assert len(bottom.images) == 1
    chain = await stub.SampleCodes(
        pb.SampleCodesRequest(model=names["chain"], seeds=[3], output=raw, return_codes=True)
    )
    assert chain.top_codes[0] == top.codes[0] and chain.images[0].image.data == bottom.images[0].image.data
    # The top level at its own settings (top_temperature, top_top_k), the bottom at the defaults:
    # the top prior's grid at those, the bottom prior's image given it; the provenance says so.
    hot = await stub.SampleCodes(
        pb.SampleCodesRequest(model=names["top"], seeds=[3], temperature=3.0, top_k=5)
    )
    hot_bottom = await stub.SampleCodes(
        pb.SampleCodesRequest(model=names["bottom"], seeds=[3], top_codes=hot.codes[0], output=raw)
    )
    split = await stub.SampleCodes(
        pb.SampleCodesRequest(
            model=names["chain"], seeds=[3], output=raw, return_codes=True, top_temperature=3.0, top_top_k=5
        )
    )
    assert split.top_codes[0] == hot.codes[0] != top.codes[0]
    assert split.images[0].image.data == hot_bottom.images[0].image.data
    assert [
        (m.model, m.temperature, m.top_k) for m in split.provenance.used_models if m.HasField("temperature")
    ] == [(names["top"], 3.0, 5)]
    assert (split.provenance.temperature, split.provenance.top_k) == (chain.provenance.temperature, 16)
    await check_progress_stream(stub, names, reply, chain)
    for request, field in (
        (pb.SampleCodesRequest(model=names["prior"], count=1), "labels"),
        (pb.SampleCodesRequest(model=names["prior"], count=1, labels=[0], top_k=99), "top_k"),
        (pb.SampleCodesRequest(model=names["prior"], count=MAX_ROWS + 1, labels=[0]), "count"),
        (pb.SampleCodesRequest(model=names["bottom"], count=1), "top_codes"),
        (pb.SampleCodesRequest(model=names["decoder"], count=1), "model"),
        (pb.SampleCodesRequest(model=names["prior"], count=1, labels=[0], temperature=11), "temperature"),
        (pb.SampleCodesRequest(model=names["chain"], count=1, top_temperature=0), "top_temperature: must be"),
        (
            # 0 there is not the top prior's default but the request's top_k (SamplingOptions.top_level)
            pb.SampleCodesRequest(model=names["chain"], count=1, top_top_k=17),
            "top_top_k: must be in 0..16 (0: the request's top_k; 16: every code), got 17",
        ),
        (
            pb.SampleCodesRequest(model=names["prior"], count=1, labels=[0], top_top_k=2),
            "top_top_k: only for a bottom prior whose top prior samples",
        ),
        (
            pb.SampleCodesRequest(model=names["chain"], count=1, top_codes=top.codes[0], top_temperature=2),
            "top_temperature: only for a bottom prior whose top prior samples",
        ),
        (pb.SampleCodesRequest(model=names["prior"], count=1, labels=[3]), "labels[0]"),
        (
            pb.SampleCodesRequest(model=names["prior"], count=1, labels=[0], preview_every=POSITIONS + 1),
            "preview_every",
        ),
        (
            pb.SampleCodesRequest(
                model=names["bottom"],
                count=1,
                top_codes=tpb.Tensor(shape=[2**40, 2**40, 2**40], dtype=tpb.DTYPE_INT64, data=b"12345678"),
            ),
            "top_codes.data",
        ),
        (
            pb.SampleCodesRequest(
                model=names["bottom"],
                count=1,
                top_codes=tpb.Tensor(shape=[3, 3], dtype=tpb.DTYPE_INT64, data=b"x" * 72),
            ),
            "top_codes: codes must be in",
        ),
        (
            pb.SampleCodesRequest(
                model=names["prior"],
                count=1,
                labels=[0],
                top_codes=tpb.Tensor(shape=[3, 3], dtype=tpb.DTYPE_INT64),
            ),
            "top_codes",
        ),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.SampleCodes(request)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (info.value.details() or "").startswith(field), info.value.details()


async def check_progress_stream(
    stub: Any, names: dict[str, str], reply: pb.SampleCodesResponse, chain: pb.SampleCodesResponse
) -> None:
    """SampleCodesStream: progress chunks whose previews are the grids so far, decoded, then the
    same answer as SampleCodes; a two-level call reports its top level first, without previews."""
    raw = tpb.OutputOptions(format=tpb.IMAGE_FORMAT_RAW_UINT8)
    request = pb.SampleCodesRequest(
        model=names["prior"],
        seeds=[8, 9],
        labels=[2],
        top_k=4,
        temperature=0.7,
        output=raw,
        return_codes=True,
        preview_every=9,
    )
    chunks = [chunk async for chunk in stub.SampleCodesStream(request)]
    *progress, last = chunks
    assert [g.image.data for g in last.result.images] == [g.image.data for g in reply.images]
    assert list(last.result.codes) == list(reply.codes) and last.filled == last.positions == POSITIONS
    assert progress, "no progress chunk"
    filled = [c.filled for c in progress]
    assert filled == sorted(set(filled)) and all(f % 9 == 0 and 0 < f < POSITIONS for f in filled)
    for chunk in progress:
        assert chunk.level == "codes" and chunk.positions == POSITIONS
        assert [g.seed for g in chunk.previews] == [8, 9] and [g.label for g in chunk.previews] == [2, 2]
        for g, final in zip(chunk.previews, reply.codes, strict=True):
            so_far = np.frombuffer(final.data, "<i8").copy()
            so_far[chunk.filled :] = 0  # raster order: the first `filled` positions are the final codes
            pixels = np.frombuffer(g.image.data, np.uint8).reshape(GRID)
            assert np.array_equal(pixels, np.round(so_far.reshape(GRID) / 16 * 255).astype(np.uint8))
    two_level = pb.SampleCodesRequest(model=names["chain"], seeds=[3], output=raw, preview_every=2)
    chunks = [chunk async for chunk in stub.SampleCodesStream(two_level)]
    levels = [c.level for c in chunks[:-1]]
    assert levels and levels == sorted(levels, key=lambda level: level != "top")  # top first
    assert all(not c.previews for c in chunks[:-1] if c.level == "top")
    assert chunks[-1].result.images[0].image.data == chain.images[0].image.data


def test_a_slow_consumer_still_sees_each_level_of_a_two_level_call(
    code_repo: tuple[Path, dict[str, str]],
) -> None:
    """Previews never hold the prior back, so a consumer that takes its first preview late misses
    the ones in between; but the report still untaken when the sampling ends is sent before the
    result: the bottom level, which ran whole meanwhile, shows (it did not, and a CLI test flaked)."""
    root, names = code_repo

    async def body(repo: Repository, core: GenerationCore) -> None:
        call = Call("SampleCodesStream", "test", time.monotonic(), core.metrics.unresolved())
        mv = core.resolve(call, names["chain"], "", ("code_prior",), "SampleCodesStream")
        sampled = asyncio.Event()  # the sampling under the stream (both levels, decoded) has ended
        sample_codes = code_sampling.sample_codes

        async def watched(*args: Any, **kwargs: Any) -> CodeSamples:
            try:
                return await sample_codes(*args, **kwargs)
            finally:
                sampled.set()

        code_sampling.sample_codes = watched  # type: ignore[assignment]
        stream = code_sampling.sample_codes_stream(
            core, mv, call, [3], None, None, SamplingOptions(), PNG, every=2
        )
        try:
            first = await anext(stream)
            assert isinstance(first, code_sampling.CodeProgress) and first.level == "top"
            await sampled.wait()  # the consumer comes back only once everything has run
            rest = [item async for item in stream]
        finally:
            code_sampling.sample_codes = sample_codes  # type: ignore[assignment]
            if call.batcher is not None:
                call.batcher.release()
            call.release_uses()
        assert isinstance(rest[-1], CodeSamples)
        levels = [item.level for item in rest[:-1] if isinstance(item, code_sampling.CodeProgress)]
        assert levels and levels[-1] == "codes", levels

    run_with_core(root, body)


def test_a_two_level_streams_previews_decode_each_rows_grid_so_far_with_its_own_top_grid(
    code_repo: tuple[Path, dict[str, str]],
) -> None:
    """A bottom-level preview of a two-level SampleCodesStream is the decoder's image of that row's
    codes so far and of the top grid sampled for that row (decoder2: (codes / K + mean(top) / K) / 2)."""
    root, names = code_repo
    seeds = [3, 4]
    f32 = validate.output_spec(tpb.IMAGE_FORMAT_TENSOR_F32, 0, None, False)

    async def body(repo: Repository, core: GenerationCore) -> None:
        call = Call("SampleCodesStream", "test", time.monotonic(), core.metrics.unresolved())
        mv = core.resolve(call, names["chain"], "", ("code_prior",), "SampleCodesStream")
        stream = code_sampling.sample_codes_stream(
            core, mv, call, seeds, None, None, SamplingOptions(), f32, every=9
        )
        try:
            items = [item async for item in stream]
        finally:
            if call.batcher is not None:
                call.batcher.release()
            call.release_uses()
        result = items[-1]
        assert isinstance(result, CodeSamples) and result.tops is not None
        top_means = result.tops.reshape(len(seeds), -1).mean(axis=1) / 16
        assert top_means[0] != top_means[1]  # the rows' top grids tell them apart
        previews = [
            item
            for item in items[:-1]
            if isinstance(item, code_sampling.CodeProgress) and item.level == "codes"
        ]
        assert previews, "no bottom-level preview"
        for progress in previews:
            assert len(progress.previews) == len(seeds)
            for i, image in enumerate(progress.previews):
                so_far = result.codes[i].reshape(-1).copy()
                so_far[progress.filled :] = 0  # raster order: the first `filled` positions are final
                want = (so_far.reshape(GRID) / 16 + top_means[i]) / 2
                got = np.frombuffer(image.data, "<f4").reshape(GRID)
                np.testing.assert_allclose(got, want, atol=1e-6)

    run_with_core(root, body)


@pytest.mark.parametrize("every", [4, 9, 12])
def test_progress_chunks_come_at_multiples_of_preview_every_short_of_each_levels_last_step(
    code_repo: tuple[Path, dict[str, str]], every: int
) -> None:
    """docs/server.md: a level reports after each multiple of preview_every short of its last step
    (a level's finished grids are not a chunk: the bottom's are the answer, the top's the bottom's
    start), so a two-level call with preview_every at or past the top's 9 positions sends no `top`
    chunk at all, only `codes` ones, then the answer."""
    root, names = code_repo
    top_positions = (GRID[0] // 2) * (GRID[1] // 2)

    async def body(repo: Repository, core: GenerationCore) -> None:
        call = Call("SampleCodesStream", "test", time.monotonic(), core.metrics.unresolved())
        mv = core.resolve(call, names["chain"], "", ("code_prior",), "SampleCodesStream")
        stream = code_sampling.sample_codes_stream(
            core, mv, call, [3], None, None, SamplingOptions(), PNG, every=every
        )
        try:
            items = [item async for item in stream]
        finally:
            if call.batcher is not None:
                call.batcher.release()
            call.release_uses()
        *progress, last = items
        assert isinstance(last, CodeSamples)
        chunks = [
            (p.level, p.filled, p.positions) for p in progress if isinstance(p, code_sampling.CodeProgress)
        ]
        assert len(chunks) == len(progress)
        levels = {"top": top_positions, "codes": POSITIONS}
        assert [level for level, _, _ in chunks] == sorted((c[0] for c in chunks), key=lambda lv: lv != "top")
        for level, filled, positions in chunks:
            assert positions == levels[level] and filled % every == 0 and 0 < filled < positions, chunks
        assert ("top" in {c[0] for c in chunks}) == (every < top_positions), chunks
        assert any(level == "codes" for level, _, _ in chunks), chunks

    run_with_core(root, body)


def test_a_stream_left_after_its_sampling_failed_does_not_log_a_lost_exception(
    code_repo: tuple[Path, dict[str, str]],
) -> None:
    """A SampleCodesStream whose client leaves (its deadline) just after the sampling under it failed:
    the failure is the stream's to retrieve, not asyncio's "Task exception was never retrieved" with a
    traceback in the server's log."""
    root, names = code_repo
    reported: list[dict[str, Any]] = []

    async def body(repo: Repository, core: GenerationCore) -> None:
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: reported.append(context))
        call = Call("SampleCodesStream", "test", time.monotonic(), core.metrics.unresolved())
        mv = core.resolve(call, names["chain"], "", ("code_prior",), "SampleCodesStream")
        sample_codes = code_sampling.sample_codes

        sent = asyncio.Event()  # the consumer holds the first preview

        async def fails_after_a_report(*args: Any, **kwargs: Any) -> CodeSamples:
            report = args[8]
            report("top", 1, 49, np.zeros((1, 7, 7), np.int64), None)
            await sent.wait()
            raise DeadlineExceeded("deadline passed after 1 of 49 positions")

        code_sampling.sample_codes = fails_after_a_report  # type: ignore[assignment]
        stream = code_sampling.sample_codes_stream(
            core, mv, call, [3], None, None, SamplingOptions(), PNG, every=1
        )
        try:
            first = await anext(stream)
            assert isinstance(first, code_sampling.CodeProgress)
            sent.set()
            for _ in range(5):
                await asyncio.sleep(0)  # the sampling fails while the stream waits at its yield
            await stream.aclose()  # the client left before reading the failure
        finally:
            code_sampling.sample_codes = sample_codes  # type: ignore[assignment]
            if call.batcher is not None:
                call.batcher.release()
            call.release_uses()
        del stream
        gc.collect()
        await asyncio.sleep(0)

    run_with_core(root, body)
    assert not [c for c in reported if "never retrieved" in str(c.get("message"))], reported


def test_a_request_without_options_gets_each_priors_config_defaults(
    code_repo: tuple[Path, dict[str, str]],
) -> None:
    """Unset temperature and top_k: the bottom prior's sampling defaults for the bottom grid, the top
    prior's for the top grid, byte-identical to asking for them (0.7 goes through the proto's float)."""
    root, names = code_repo

    async def main() -> None:
        config = ServerConfig()
        metrics = Metrics(enabled=False)
        repo = Repository(root, config, metrics)
        repo.scan()
        await repo.load_all()
        pool = ThreadPoolExecutor(1)
        server = grpc.aio.server()
        pb_grpc.add_GenerationServiceServicer_to_server(
            GenerationService(repo, config, metrics, pool), server
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pb_grpc.GenerationServiceStub(channel)
                seeds = [1, 2, 3, 4]
                plain = await stub.SampleCodes(
                    pb.SampleCodesRequest(model=names["tempered"], seeds=seeds, return_codes=True)
                )
                top = await stub.SampleCodes(
                    pb.SampleCodesRequest(model=names["tempered_top"], seeds=seeds, temperature=0.3)
                )
                assert [t.data for t in plain.top_codes] == [t.data for t in top.codes]
                for i, seed in enumerate(seeds):
                    asked = await stub.SampleCodes(
                        pb.SampleCodesRequest(
                            model=names["tempered"],
                            seeds=[seed],
                            temperature=0.7,
                            top_k=5,
                            top_codes=top.codes[i],
                            return_codes=True,
                        )
                    )
                    assert asked.codes[0].data == plain.codes[i].data
                    assert asked.images[0].image.data == plain.images[i].image.data
                at_one = await stub.SampleCodes(
                    pb.SampleCodesRequest(
                        model=names["tempered"], seeds=seeds, temperature=1.0, top_k=16, return_codes=True
                    )
                )
                # the defaults are not the protocol's 1 and every code: some grid differs
                assert [t.data for t in at_one.top_codes] != [t.data for t in plain.top_codes]
        finally:
            await server.stop(None)
            await repo.close(1)
            pool.shutdown()

    asyncio.run(main())


def test_a_default_temperature_is_the_value_a_request_would_carry() -> None:
    # The proto's temperature is a float32: 0.7 arrives as 0.699999988...; the default must too.
    sent = pb.SampleCodesRequest(temperature=0.7).temperature
    assert sent != 0.7
    assert SamplingOptions().resolved(SamplingConfig(0.7, 3)) == (sent, 3)
    assert SamplingOptions.checked(sent, 5, 16).resolved(SamplingConfig(0.3, 3)) == (sent, 5)


def test_sampling_defaults_are_checked_naming_the_field(tmp_path: Path) -> None:
    import json

    from genserve_server.config import ConfigError, load_model_config

    config = tmp_path / "config.json"
    for sampling, match in (
        ({"temperature": 0}, r"sampling\.temperature must be a number > 0 and <= 10, got 0"),
        ({"temperature": 11}, r"sampling\.temperature must be a number > 0 and <= 10, got 11"),
        ({"temperature": "0.7"}, r"sampling\.temperature must be a number"),
        ({"top_k": -1}, r"sampling\.top_k must be >= 0, got -1"),
        ({"top_k": 1.5}, r"sampling\.top_k must be an integer"),
        ({"temp": 0.7}, r"sampling\.temp is not a known field"),
    ):
        config.write_text(json.dumps({"kind": "code_prior", "sampling": sampling}))
        with pytest.raises(ConfigError, match=match) as info:
            load_model_config(config)
        assert info.value.field is not None and info.value.field.startswith("sampling")
    config.write_text(json.dumps({"kind": "generator", "sampling": {"temperature": 0.7}}))
    with pytest.raises(ConfigError, match="sampling applies to kind code_prior only"):
        load_model_config(config)
    config.write_text(json.dumps({"kind": "code_prior", "sampling": {"temperature": 0.7, "top_k": 3}}))
    assert load_model_config(config).sampling == SamplingConfig(0.7, 3)
    config.write_text(json.dumps({"kind": "code_prior"}))
    assert load_model_config(config).sampling == SamplingConfig(1.0, 0)


def test_a_default_top_k_beyond_the_codebook_fails_the_load_naming_the_field(tmp_path: Path) -> None:
    write_model(
        tmp_path,
        "wide-prior",
        "code_prior",
        prior_graph(*GRID, 16),
        {"grid": list(GRID), "codebook_size": 16, "output_range": None},
        config={"sampling": {"top_k": 17}},
    )

    async def body(repo: Repository, core: GenerationCore) -> None:
        with pytest.raises(Unavailable, match=r"sampling\.top_k must be <= the card's codebook_size \(16\)"):
            repo.get("wide-prior").resolve("")

    run_with_core(tmp_path, body)


def test_config_and_card_rules_of_the_code_kinds(tmp_path: Path) -> None:
    import json

    from genserve_server.config import ConfigError, load_card, load_model_config

    config = tmp_path / "config.json"
    config.write_text(json.dumps({"kind": "generator", "decoder": "dec"}))
    with pytest.raises(ConfigError, match="decoder.*applies to kind code_prior only"):
        load_model_config(config)
    config.write_text(json.dumps({"kind": "code_prior", "decoder": "Bad Name"}))
    with pytest.raises(ConfigError, match="decoder.*must be a model name"):
        load_model_config(config)
    config.write_text(json.dumps({"kind": "image_to_image", "top_prior": "top"}))
    with pytest.raises(ConfigError, match="top_prior.*applies to kind code_prior only"):
        load_model_config(config)
    config.write_text(json.dumps({"kind": "code_prior"}))
    assert load_model_config(config).decoder == ""  # a top prior: grids only
    card = tmp_path / "card.json"
    tensors = {
        "inputs": [{"name": "codes", "shape": [-1, 2, 2]}],
        "outputs": [{"name": "logits", "shape": [-1]}],
    }
    card.write_text(json.dumps({"kind": "code_prior", "codebook_size": 4, **tensors}))
    with pytest.raises(ConfigError, match="grid.*is required for kind code_prior"):
        load_card(card)
    card.write_text(
        json.dumps({"kind": "code_prior", "codebook_size": 4, "grid": [2, 2], "top_grid": [1, 1], **tensors})
    )
    with pytest.raises(ConfigError, match="top_codebook_size"):
        load_card(card)
    card.write_text(
        json.dumps(
            {"kind": "code_prior", "codebook_size": 4, "grid": [2, 2], "class_names": ["a"], **tensors}
        )
    )
    assert load_card(card).graph_inputs == ("codes", "label")


def test_sampling_matches_the_algorithm_written_in_the_proto() -> None:
    """A plain-Python reading of the comment above SampleCodesRequest gives the same codes."""
    import math

    from genserve_server.latents import philox4x32_10

    def reference(
        row: np.ndarray, seed: int, position: int, stream: int, temperature: float, top_k: int
    ) -> int:
        words = philox4x32_10(
            np.array([position, stream, 0, 0], np.uint32), np.array([seed % 2**32, seed // 2**32], np.uint32)
        )
        u = (float(words[0]) + 0.5) / 2**32
        scaled = [float(v) / temperature for v in row]
        order = sorted(range(len(scaled)), key=lambda j: (-scaled[j], j))
        kept = set(order[: top_k or len(scaled)])
        top = max(scaled[j] for j in kept)
        weights = [math.exp(scaled[j] - top) if j in kept else 0.0 for j in range(len(scaled))]
        total = sum(weights)
        running = 0.0
        for j, weight in enumerate(weights):
            running += weight
            if running > u * total:
                return j
        return len(weights) - 1

    rng = np.random.default_rng(3)
    n, k = 64, 12
    logits = rng.normal(0, 2, (n, k)).astype(np.float32)
    logits[:, 5] = logits[:, 4]  # ties
    seeds = [int(s) for s in rng.integers(0, 2**63 - 1, n)]
    positions = [int(p) for p in rng.integers(0, 4096, n)]
    temperatures = rng.uniform(0.2, 3.0, n)
    top_ks = rng.integers(0, k + 1, n)
    codes = sample_codes(logits, uniforms(seeds, positions, 1), temperatures, top_ks)
    expected = [
        reference(logits[i], seeds[i], positions[i], 1, float(temperatures[i]), int(top_ks[i]))
        for i in range(n)
    ]
    assert codes.tolist() == expected


WIDE = (3, 5)  # a grid that is not square: rows and columns cannot be confused
WIDE_TOP = (2, 3)


@pytest.fixture(scope="module")
def wide_code_repo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """A class-conditional prior, and a top prior chained to a bottom prior, of grids that are not square;
    grids only (no decoder). Returns the root and each name's graph."""
    root = tmp_path_factory.mktemp("wide-code-models")
    k = 16
    graphs = {
        "wide-prior": prior_graph(*WIDE, k, n_classes=3, seed=4),
        "wide-top": prior_graph(*WIDE_TOP, k, seed=5),
        "wide-chain": prior_graph(*WIDE, k, top=WIDE_TOP, seed=6),
    }
    card: dict[str, Any] = {"grid": list(WIDE), "codebook_size": k, "output_range": None}
    write_model(
        root, "wide-prior", "code_prior", graphs["wide-prior"], {**card, "class_names": ["a", "b", "c"]}
    )
    write_model(root, "wide-top", "code_prior", graphs["wide-top"], {**card, "grid": list(WIDE_TOP)})
    write_model(
        root,
        "wide-chain",
        "code_prior",
        graphs["wide-chain"],
        {**card, "top_grid": list(WIDE_TOP), "top_codebook_size": k},
        config={"top_prior": "wide-top"},
    )
    return root, graphs


def proto_grid(
    graph: Any,
    seed: int,
    stream: int,
    *,
    label: int | None = None,
    top: np.ndarray | None = None,
    temperature: float = 1.0,
    top_k: int = 0,
) -> np.ndarray:
    """A grid sampled as the comment above SampleCodesRequest writes it, one prior call per position
    of the raster order (p = r * W + c) on the graph itself (ONNX Runtime), in plain Python."""
    import math

    import onnxruntime as ort

    from genserve_server.latents import philox4x32_10

    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    k, h, w = (int(d.dim_value) for d in graph.graph.output[0].type.tensor_type.shape.dim[1:])
    codes = np.zeros((1, h, w), np.int64)
    for p in range(h * w):
        feeds = {"codes": codes}
        if label is not None:
            feeds["label"] = np.array([label], np.int64)
        if top is not None:
            feeds["top_codes"] = top[np.newaxis].astype(np.int64)
        logits = session.run(["logits"], feeds)[0]
        r, c = divmod(p, w)
        words = philox4x32_10(
            np.array([p, stream, 0, 0], np.uint32), np.array([seed % 2**32, seed // 2**32], np.uint32)
        )
        u = (float(words[0]) + 0.5) / 2**32
        scaled = [float(v) / temperature for v in logits[0, :, r, c]]
        kept = set(sorted(range(k), key=lambda j: (-scaled[j], j))[: top_k or k])
        high = max(scaled[j] for j in kept)
        weights = [math.exp(scaled[j] - high) if j in kept else 0.0 for j in range(k)]
        running, code = 0.0, k - 1
        for j, weight in enumerate(weights):
            running += weight
            if running > u * sum(weights):
                code = j
                break
        codes[0, r, c] = code
    return codes[0]


def test_a_grid_is_the_protos_algorithm_run_in_raster_order_on_the_prior(
    wide_code_repo: tuple[Path, dict[str, Any]],
) -> None:
    """Position p = r * W + c of a grid takes its code from the prior's logits at (r, c), with the
    draw of p: on a 3x5 grid, rows sampled together (three seeds, three labels) are each the grid
    of one prior call per position in that order."""
    root, graphs = wide_code_repo
    seeds, labels = [3, 8, 21], [0, 2, 1]

    async def body(repo: Repository, core: GenerationCore) -> None:
        plain = await sample(core, "wide-prior", seeds, labels)
        tempered = await sample(
            core, "wide-prior", seeds, labels, options=SamplingOptions(temperature=0.6, top_k=4)
        )
        for i, seed in enumerate(seeds):
            assert np.array_equal(plain.codes[i], proto_grid(graphs["wide-prior"], seed, 0, label=labels[i]))
            want = proto_grid(graphs["wide-prior"], seed, 0, label=labels[i], temperature=0.6, top_k=4)
            assert np.array_equal(tempered.codes[i], want)
        assert len({g.tobytes() for g in plain.codes}) == len(seeds)  # not one code everywhere

    run_with_core(root, body)


def test_requests_of_other_options_sharing_steps_each_sample_with_their_own(
    wide_code_repo: tuple[Path, dict[str, Any]],
) -> None:
    """A request at temperature 0.5 and top_k 3 and one joining it mid-flight at temperature 2 with
    every code share the prior's calls; each row's codes are drawn with its own request's options."""
    root, graphs = wide_code_repo
    cold = SamplingOptions(temperature=0.5, top_k=3)
    hot = SamplingOptions(temperature=2.0, top_k=16)

    async def body(repo: Repository, core: GenerationCore) -> None:
        scheduler = core.stepper(repo.get("wide-prior").resolve(""))
        calls = count_calls(scheduler)
        first = asyncio.ensure_future(sample(core, "wide-prior", [3, 8], [0, 2], options=cold))
        await until(lambda: scheduler.stats.steps >= 3)
        second = await sample(core, "wide-prior", [21, 5], [1, 1], options=hot)
        assert any(len(c) == 4 for c in calls)  # the two requests' rows in one call
        for grid, seed, label in zip((await first).codes, [3, 8], [0, 2], strict=True):
            assert np.array_equal(
                grid, proto_grid(graphs["wide-prior"], seed, 0, label=label, temperature=0.5, top_k=3)
            )
        for grid, seed in zip(second.codes, [21, 5], strict=True):
            assert np.array_equal(grid, proto_grid(graphs["wide-prior"], seed, 0, label=1, temperature=2.0))

    run_with_core(root, body)


def test_a_two_level_call_draws_the_bottom_grid_from_stream_1_given_its_top_grid(
    wide_code_repo: tuple[Path, dict[str, Any]],
) -> None:
    """The proto's stream: 0 for the top prior, 1 for a bottom prior (whose grid then does not reuse
    the draws of the top grid's positions), the bottom prior conditioned on the call's own top grid."""
    root, graphs = wide_code_repo
    seeds = [3, 8, 21]

    async def body(repo: Repository, core: GenerationCore) -> None:
        chain = await sample(core, "wide-chain", seeds)
        assert chain.tops is not None
        for i, seed in enumerate(seeds):
            assert np.array_equal(chain.tops[i], proto_grid(graphs["wide-top"], seed, 0))
            want = proto_grid(graphs["wide-chain"], seed, 1, top=chain.tops[i])
            assert np.array_equal(chain.codes[i], want)
        # Stream 0 would have given other bottom grids: the stream is what the test looks at.
        assert any(
            not np.array_equal(chain.codes[i], proto_grid(graphs["wide-chain"], seed, 0, top=chain.tops[i]))
            for i, seed in enumerate(seeds)
        )

    run_with_core(root, body)


def test_a_top_prior_with_other_classes_is_refused_before_any_step(tmp_path: Path) -> None:
    """A chained bottom prior of 4 classes whose top prior has 2: a label valid for the bottom (3) went
    into the top prior's shared step and failed every request's rows in it (ONNX Runtime's Gather out
    of bounds). The pair is refused like any other misfit of config.json top_prior, before a step."""
    top_grid = (GRID[0] // 2, GRID[1] // 2)
    batching = {"max_batch_size": 8, "preferred_batch_sizes": [1, 8], "max_queue_size": 64}
    write_model(
        tmp_path,
        "top2",
        "code_prior",
        prior_graph(*top_grid, 16, n_classes=2, seed=1),
        {"grid": list(top_grid), "codebook_size": 16, "class_names": ["a", "b"], "output_range": None},
        config={"batching": batching},
    )
    write_model(
        tmp_path,
        "bottom4",
        "code_prior",
        prior_graph(*GRID, 16, n_classes=4, top=top_grid, seed=2),
        {"grid": list(GRID), "codebook_size": 16, "top_grid": list(top_grid), "top_codebook_size": 16,
         "class_names": ["a", "b", "c", "d"], "output_range": None},
        config={"top_prior": "top2", "batching": batching},
    )  # fmt: skip

    async def body(repo: Repository, core: GenerationCore) -> None:
        top = core.stepper(repo.get("top2").resolve(""))
        for labels in ([0], [3]):
            with pytest.raises(Unavailable, match="class-conditional only on the prior's own classes"):
                await sample(core, "bottom4", [1], labels)
        assert top.stats.steps == 0

    run_with_core(tmp_path, body)


def test_a_two_level_call_is_refused_at_once_when_the_bottom_budget_is_full(tmp_path: Path) -> None:
    """The bottom prior's budget is asked before the top level runs: a full one refused the call only
    after its whole top grid had been sampled (and its rows had held the top prior's budget)."""
    names = write_code_models(tmp_path, grid=GRID, k=16, max_rows=MAX_ROWS)

    async def body(repo: Repository, core: GenerationCore) -> None:
        bottom = core.stepper(repo.get(names["chain"]).resolve(""))
        top = core.stepper(repo.get(names["top"]).resolve(""))
        reached, go = gate(bottom, at_step=2)  # hold the bottom's 2nd step: its rows stay running
        tops = np.zeros((MAX_ROWS, GRID[0] // 2, GRID[1] // 2), np.int64)
        full = asyncio.ensure_future(sample(core, names["chain"], list(range(MAX_ROWS)), tops=tops))
        await reached.wait()
        assert bottom.rows == MAX_ROWS and top.stats.steps == 0
        try:
            with pytest.raises(ResourceExhausted):
                await sample(core, names["chain"], [100])
            assert top.stats.steps == 0
        finally:
            go.set()
            await full

    run_with_core(tmp_path, body)


def test_a_dropped_request_of_several_rows_counts_once_in_the_metrics(
    code_repo: tuple[Path, dict[str, str]],
) -> None:
    """genserve_requests_dropped_total counts requests (docs/metrics-contract.md), as the batcher
    does: a cancelled call of 3 samples, or one of 2 past its deadline, is one dropped request."""
    root, names = code_repo
    metrics = Metrics(enabled=True)

    async def body(repo: Repository, core: GenerationCore) -> None:
        scheduler = core.stepper(repo.get(names["prior"]).resolve(""))
        count_calls(scheduler, delay_s=0.002)
        leaves = asyncio.ensure_future(sample(core, names["prior"], [1, 2, 3], [0]))
        await until(lambda: scheduler.stats.steps >= 2)
        leaves.cancel()
        with pytest.raises(asyncio.CancelledError):
            await leaves
        with pytest.raises(DeadlineExceeded):
            await sample(core, names["prior"], [4, 5], [0], deadline=time.monotonic() + 0.02)

    run_with_core(root, body, metrics)
    labels = {"model": names["prior"], "version": "1"}
    dropped = {
        reason: metrics.registry.get_sample_value(
            "genserve_requests_dropped_total", {**labels, "reason": reason}
        )
        for reason in ("cancelled", "deadline")
    }
    assert dropped == {"cancelled": 1, "deadline": 1}


def test_an_rpc_whose_requests_all_leave_counts_one_drop_across_them(
    code_repo: tuple[Path, dict[str, str]],
) -> None:
    """One RPC may hold several sample() calls at once (a SampleCodesStream's chunks computed ahead;
    its decoder's batch beside them): cancelled together they are one dropped request, as the
    batcher counts them (Caller.counted_out). Each counted one before."""
    root, names = code_repo
    metrics = Metrics(enabled=True)

    async def body(repo: Repository, core: GenerationCore) -> None:
        prior = repo.get(names["prior"]).resolve("")
        scheduler = core.stepper(prior)
        count_calls(scheduler, delay_s=0.002)
        rpc = Call("SampleCodesStream", "test", time.monotonic(), prior.metrics)  # a call of the prior
        chunks = [
            asyncio.ensure_future(scheduler.sample([seed], [0], None, SamplingOptions(), None, caller=rpc))
            for seed in (1, 2)
        ]
        await until(lambda: scheduler.stats.steps >= 2)
        for chunk in chunks:
            chunk.cancel()
        for chunk in chunks:
            with pytest.raises(asyncio.CancelledError):
                await chunk
        await until(lambda: scheduler.stats.cancelled >= 2)  # both left at a step

    run_with_core(root, body, metrics)
    value = metrics.registry.get_sample_value(
        "genserve_requests_dropped_total", {"model": names["prior"], "version": "1", "reason": "cancelled"}
    )
    assert value == 1


def test_a_sample_codes_longer_than_the_drain_grace_on_a_replaced_prior_ends_unavailable(
    reload_repo: tuple[Path, dict[str, str]],
) -> None:
    """docs/operations.md, Hot reload: "Calls longer than drain_grace_s on a retired version (a
    SampleStream, a large SampleCodes) end with UNAVAILABLE". A prior's steps call its runner
    directly (no batcher refuses them), so once the drain closed the runner the next step failed
    with the pool's RuntimeError, which the client saw as INTERNAL "internal error"."""
    root, names = reload_repo

    async def body(repo: Repository, core: GenerationCore) -> None:
        old = repo.get(names["prior"]).resolve("")
        reached, go = gate(core.stepper(old), at_step=2)
        running = asyncio.ensure_future(sample(core, names["prior"], [1, 2], [0, 1]))
        await reached.wait()
        publish_copy(root, names["prior"])
        reloader = Reloader(repo, drain_grace_s=0.2, file_check_interval_s=None)
        await reloader.rescan()
        await until(lambda: names["prior"] not in repo.models or "1" not in repo.get(names["prior"]).versions)
        go.set()  # the next step runs on the unloaded version's closed runner
        with pytest.raises(Unavailable, match=f"{old.label}"):
            await running
        await reloader.close(5)

    run_with_core(root, body, config=POOLED)


def test_a_prior_that_left_the_repository_is_freed_with_its_step_scheduler(
    reload_repo: tuple[Path, dict[str, str]],
) -> None:
    """The core keeps a step scheduler per prior version, and the scheduler holds the version's
    runner (its ONNX Runtime sessions). Stale schedulers were forgotten only when another prior
    version got its first call: a prior removed from the repository (or replaced, its new version
    not called yet) kept its sessions in memory, for ever where no other prior was ever reloaded."""
    root, names = reload_repo

    async def body(repo: Repository, core: GenerationCore) -> None:
        await sample(core, names["top"], [1, 2])
        mv = repo.get(names["top"]).resolve("")
        assert mv.runner is not None
        version, runner = weakref.ref(mv), weakref.ref(mv.runner)
        del mv
        reloader = Reloader(repo, drain_grace_s=2.0)
        try:
            shutil.rmtree(root / names["top"])
            await reloader.rescan()
            await until(lambda: names["top"] not in repo.models and not reloader._draining)
            for _ in range(100):
                gc.collect()
                if version() is None:
                    break
                await asyncio.sleep(0.02)
            assert version() is None, "the removed prior's version is still alive"
            assert runner() is None, "the removed prior's runner (its sessions) is still alive"
            await sample(core, names["prior"], [3], [0])  # the other priors still serve
        finally:
            await reloader.close(2.0)

    run_with_core(root, body)


def test_a_two_level_call_keeps_its_bottom_rows_while_its_top_level_runs(tmp_path: Path) -> None:
    """A two-level call that found room in the bottom prior's budget keeps it while its top level
    runs: rows that joined the bottom meanwhile (a call with top_codes, another two-level call whose
    top grids finished first) made it RESOURCE_EXHAUSTED after its whole top grid was sampled, and
    under steady traffic the same call retried lost its top level again and again."""
    names = write_code_models(tmp_path, grid=GRID, k=16, max_rows=MAX_ROWS)

    async def body(repo: Repository, core: GenerationCore) -> None:
        bottom = core.stepper(repo.get(names["chain"]).resolve(""))
        top = core.stepper(repo.get(names["top"]).resolve(""))
        top_reached, top_go = gate(top, at_step=1)  # the two-level call's top level, held
        bottom_reached, bottom_go = gate(bottom, at_step=2)  # a later bottom call's rows stay running
        two_level = asyncio.ensure_future(sample(core, names["chain"], list(range(MAX_ROWS))))
        await top_reached.wait()
        tops = np.zeros((1, GRID[0] // 2, GRID[1] // 2), np.int64)
        later = asyncio.ensure_future(sample(core, names["chain"], [100], tops=tops))
        joined = asyncio.ensure_future(bottom_reached.wait())
        await asyncio.wait({later, joined}, return_when=asyncio.FIRST_COMPLETED)
        top_go.set()
        if later.done():  # refused: the bottom's 2nd step is the two-level call's own, not held
            bottom_go.set()
        try:
            done = await asyncio.gather(two_level, return_exceptions=True)
            assert not isinstance(done[0], BaseException), done[0]
            assert done[0].codes.shape == (MAX_ROWS, *GRID)
            # The later call found the bottom's rows promised: refused at once, as a full budget is.
            assert later.done() and isinstance(later.exception(), ResourceExhausted)
        finally:
            bottom_go.set()
            joined.cancel()
            await asyncio.gather(later, return_exceptions=True)

    run_with_core(tmp_path, body)


def decode_row(two_level: bool) -> dict[str, np.ndarray]:
    """One Decode-like row for a decoder (of the two-level models when `two_level`)."""
    one = {"codes": np.zeros((1, *GRID), np.int64)}
    if two_level:
        one["top_codes"] = np.zeros((1, GRID[0] // 2, GRID[1] // 2), np.int64)
    return one


async def stream_result(
    core: GenerationCore, name: str, seeds: list[int], labels: list[int] | None
) -> CodeSamples:
    """SampleCodesStream through the core: every item taken, the CodeSamples returned."""
    call = Call("SampleCodesStream", "test", time.monotonic(), core.metrics.unresolved())
    mv = core.resolve(call, name, "", ("code_prior",), "SampleCodesStream")
    try:
        stream = code_sampling.sample_codes_stream(
            core, mv, call, seeds, labels, None, SamplingOptions(), PNG
        )
        items = [item async for item in stream]
    finally:
        if call.batcher is not None:
            call.batcher.release()
        call.release_uses()
    assert isinstance(items[-1], CodeSamples)
    return items[-1]


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
@pytest.mark.parametrize("prior", ["prior", "chain"])
def test_a_call_keeps_room_in_its_decoders_queue_while_it_samples(
    tmp_path: Path, prior: str, stream: bool
) -> None:
    """A code prior's grids are decoded in one request to its decoder's batcher, queued only once every
    grid is sampled (seconds of steps for a real prior): Decode traffic that filled the decoder's
    queue meanwhile made the call RESOURCE_EXHAUSTED after all its work, its grids lost (a stream's
    previews too). The call holds its rows of the decoder's queue from admission to its end."""
    names = write_code_models(tmp_path, grid=GRID, k=16, max_rows=MAX_ROWS)
    two_level = prior == "chain"
    decoder_name = names["decoder2" if two_level else "decoder"]
    labels = None if two_level else [0, 1, 2]

    async def body(repo: Repository, core: GenerationCore) -> None:
        bottom = core.stepper(repo.get(names[prior]).resolve(""))
        batcher = repo.get(decoder_name).resolve("").batcher
        reached, go = gate(bottom, at_step=2)  # the call is sampling: admitted, nothing to decode yet
        free = hold_runs(batcher)
        if stream:
            call = asyncio.ensure_future(stream_result(core, names[prior], [1, 2, 3], labels))
        else:
            call = asyncio.ensure_future(sample(core, names[prior], [1, 2, 3], labels))
        await reached.wait()
        others = await fill_queue(batcher, CodeRows(), decode_row(two_level))
        filled = batcher.queued_rows
        go.set()
        try:
            # Its decode (or a stream's first preview) is queued behind the others, not refused.
            await until(lambda: call.done() or batcher.queued_rows > filled)
            assert not call.done() or call.exception() is None, call.exception()
        finally:
            free.set()
            done = await asyncio.gather(call, *others, return_exceptions=True)
        assert not any(isinstance(d, BaseException) for d in done), done
        result = done[0]
        assert isinstance(result, CodeSamples) and len(result.images) == 3

    run_with_core(tmp_path, body)


def test_a_unary_calls_rows_computing_in_the_decoder_no_longer_take_its_queue(tmp_path: Path) -> None:
    """A unary SampleCodes holds its rows of the decoder's queue from admission to its decode: once
    they are taken into a decoder batch they are no longer in the queue, and its whole room is there
    for other requests while that batch computes (as a style call's synthesis rows)."""
    names = write_code_models(tmp_path, grid=GRID, k=16, max_rows=MAX_ROWS)

    async def body(repo: Repository, core: GenerationCore) -> None:
        batcher = repo.get(names["decoder"]).resolve("").batcher
        free = hold_runs(batcher)
        call = asyncio.ensure_future(sample(core, names["prior"], [1, 2, 3], [0, 1, 2]))
        await until(lambda: batcher._batches_in_flight > 0 or call.done())
        assert not call.done(), call.exception()
        assert batcher.queued_rows == 0
        whole = {"codes": np.zeros((batcher.max_queue_size, *GRID), np.int64)}
        other = asyncio.ensure_future(batcher.submit(CodeRows(), whole, batcher.max_queue_size, caller=None))
        for _ in range(3):
            await asyncio.sleep(0)
        try:
            assert not other.done() or other.exception() is None, other.exception()
        finally:
            free.set()
            done = await asyncio.gather(call, other, return_exceptions=True)
        assert not any(isinstance(d, BaseException) for d in done), done

    run_with_core(tmp_path, body)


def test_a_call_is_refused_before_any_step_when_its_decoders_queue_is_full(tmp_path: Path) -> None:
    """Room in the decoder's queue is asked at admission, as the prior's row budget is: a full queue
    refuses the call at once (RESOURCE_EXHAUSTED, retry with backoff), not after every grid was
    sampled."""
    names = write_code_models(tmp_path, grid=GRID, k=16, max_rows=MAX_ROWS)

    async def body(repo: Repository, core: GenerationCore) -> None:
        scheduler = core.stepper(repo.get(names["prior"]).resolve(""))
        batcher = repo.get(names["decoder"]).resolve("").batcher
        free = hold_runs(batcher)
        others = await fill_queue(batcher, CodeRows(), decode_row(two_level=False))
        try:
            with pytest.raises(ResourceExhausted, match="queue full"):
                await sample(core, names["prior"], [1, 2], [0])
            assert scheduler.stats.steps == 0
        finally:
            free.set()
            await asyncio.gather(*others)

    run_with_core(tmp_path, body)


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
def test_a_call_past_its_deadline_that_finds_its_decoders_queue_full_is_a_deadline_drop(
    tmp_path: Path, stream: bool
) -> None:
    """As the prior's full row budget and the batcher's full queue: a SampleCodes whose deadline had
    passed before it asked for its rows of the decoder's queue (Batcher.reserved), finding it full,
    was refused RESOURCE_EXHAUSTED and counted `queue_full`, though its client gets DEADLINE_EXCEEDED
    (docs/metrics.md: a deadline that passed before a queue or row budget, full or not, is never
    `queue_full`). It is a deadline drop, counted once, and no step runs."""
    names = write_code_models(tmp_path, grid=GRID, k=16, max_rows=MAX_ROWS)
    metrics = Metrics(enabled=True)

    async def body(repo: Repository, core: GenerationCore) -> None:
        scheduler = core.stepper(repo.get(names["prior"]).resolve(""))
        batcher = repo.get(names["decoder"]).resolve("").batcher
        free = hold_runs(batcher)
        others = await fill_queue(batcher, CodeRows(), decode_row(two_level=False))
        past = time.monotonic() - 0.1
        try:
            with pytest.raises(DeadlineExceeded):
                if stream:
                    started = time.monotonic()
                    rpc_metrics = core.metrics.unresolved()
                    call = Call("SampleCodesStream", "test", started, rpc_metrics, deadline=past)
                    mv = core.resolve(call, names["prior"], "", ("code_prior",), "SampleCodesStream")
                    try:
                        items = code_sampling.sample_codes_stream(
                            core, mv, call, [1, 2], [0, 0], None, SamplingOptions(), PNG
                        )
                        _ = [item async for item in items]
                    finally:
                        if call.batcher is not None:
                            call.batcher.release()
                        call.release_uses()
                else:
                    await sample(core, names["prior"], [1, 2], [0], deadline=past)
            assert scheduler.stats.steps == 0
        finally:
            free.set()
            await asyncio.gather(*others)

    run_with_core(tmp_path, body, metrics)

    def total(name: str, reason: str) -> float:
        return sum(
            sample.value
            for family in metrics.registry.collect()
            for sample in family.samples
            if sample.name == name and sample.labels.get("reason") == reason
        )

    # fill_queue's own refused probe is the one queue_full of the decoder.
    assert total("genserve_requests_rejected_total", "queue_full") == 1
    assert total("genserve_requests_dropped_total", "deadline") == 1


def test_a_two_level_call_past_its_deadline_that_finds_the_bottom_budget_full_is_a_deadline_drop(
    tmp_path: Path,
) -> None:
    """A two-level call asks its bottom prior's budget before its top level (StepScheduler.reserved):
    one whose deadline had passed, finding that budget full, was refused RESOURCE_EXHAUSTED and
    counted `queue_full` there, though its client gets DEADLINE_EXCEEDED (the case `sample` itself
    counts as a deadline drop, docs/metrics.md: never `queue_full`). A prior without a decoder, so
    that no decoder queue is asked first."""
    names = write_code_models(tmp_path, grid=GRID, k=16, max_rows=MAX_ROWS)
    top = (GRID[0] // 2, GRID[1] // 2)
    write_model(
        tmp_path,
        "bare-chain",
        "code_prior",
        prior_graph(*GRID, 16, top=top, seed=2),
        {
            "grid": list(GRID),
            "codebook_size": 16,
            "top_grid": list(top),
            "top_codebook_size": 16,
            "output_range": None,
        },
        config={"top_prior": names["top"], "batching": {"max_batch_size": MAX_ROWS}},
    )
    metrics = Metrics(enabled=True)

    async def body(repo: Repository, core: GenerationCore) -> None:
        bottom = core.stepper(repo.get("bare-chain").resolve(""))
        top_stepper = core.stepper(repo.get(names["top"]).resolve(""))
        with bottom.reserved(MAX_ROWS):  # the bottom budget full
            with pytest.raises(DeadlineExceeded):
                await sample(core, "bare-chain", [1], deadline=time.monotonic() - 0.1)
        assert top_stepper.stats.steps == 0 and bottom.stats.refused == 0

    run_with_core(tmp_path, body, metrics)

    def total(name: str, reason: str) -> float:
        return sum(
            sample.value
            for family in metrics.registry.collect()
            for sample in family.samples
            if sample.name == name and sample.labels.get("reason") == reason
        )

    assert total("genserve_requests_rejected_total", "queue_full") == 0
    assert total("genserve_requests_dropped_total", "deadline") == 1
