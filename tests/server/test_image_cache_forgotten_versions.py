"""The image cache and versions that unload while a call still computes with them: a style
generator's mapping whose drain passed drain_grace_s while the call was in synthesis was forgotten
(GenerationCore.forget_version dropped its entries), then the call stored its images keyed with the
dead mapping's load_id: entries no request can reach, held (and counted in
genserve_image_cache_bytes) until traffic pushed them out."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path

from server_support import hold_runs, run_with_core
from style_models import write_style_models
from test_style_two_stage import PNG, until

from genserve_server.batcher import Lane
from genserve_server.config import ServerConfig
from genserve_server.core import Call, GenerationCore
from genserve_server.repository import Repository

# Room for a few images: the tests look at what a call stores.
CACHING = dataclasses.replace(ServerConfig(), image_cache_bytes=1 << 20)


def test_a_style_sample_whose_mapping_unloaded_during_its_synthesis_stores_nothing(tmp_path: Path) -> None:
    names = write_style_models(tmp_path)

    async def body(repo: Repository, core: GenerationCore) -> None:
        cache = core.image_cache
        assert cache is not None
        mapping = repo.get(names["mapping"]).resolve("")
        generator = repo.get(names["generator"]).resolve("")
        assert generator.batcher is not None
        free_synthesis = hold_runs(generator.batcher)
        call = Call("Sample", "test", time.monotonic(), core.metrics.unresolved())
        mv = core.resolve(call, names["generator"], "", ("style_generator",), "Sample")

        async def sample() -> object:
            try:
                return await core.sample(mv, call, [1, 2, 3], None, None, PNG, Lane.INTERACTIVE)
            finally:
                if call.batcher is not None:
                    call.batcher.release()
                call.release_uses()

        task = asyncio.ensure_future(sample())
        # Mapped, now in the (held) synthesis batch: the mapping's drain grace passes, it unloads.
        await until(lambda: generator.batcher._batches_in_flight > 0 or task.done())  # type: ignore[union-attr]
        assert not task.done(), task.exception()
        core.forget_version(mapping)
        free_synthesis.set()
        await asyncio.wait_for(task, 20)
        # The images were served, but none kept: no request can ask for the dead mapping's again.
        assert len(cache) == 0 and cache.nbytes == 0

    run_with_core(tmp_path, body, config=CACHING)


def test_a_style_sample_whose_mappings_version_is_live_is_cached(tmp_path: Path) -> None:
    names = write_style_models(tmp_path)

    async def body(repo: Repository, core: GenerationCore) -> None:
        call = Call("Sample", "test", time.monotonic(), core.metrics.unresolved())
        mv = core.resolve(call, names["generator"], "", ("style_generator",), "Sample")
        try:
            await core.sample(mv, call, [1, 2, 3], None, None, PNG, Lane.INTERACTIVE)
        finally:
            if call.batcher is not None:
                call.batcher.release()
            call.release_uses()
        assert core.image_cache is not None and len(core.image_cache) == 3

    run_with_core(tmp_path, body, config=CACHING)


def test_a_mapping_unloading_drops_the_style_images_made_through_it(tmp_path: Path) -> None:
    """A style generator's images are keyed by its load_id and its mapping's (loaded_versions): when
    the mapping's version is forgotten, the entries made through it go too (no request can reach them
    again), their bytes given back, though the generator itself is still loaded."""
    names = write_style_models(tmp_path)

    async def body(repo: Repository, core: GenerationCore) -> None:
        cache = core.image_cache
        assert cache is not None
        call = Call("Sample", "test", time.monotonic(), core.metrics.unresolved())
        mv = core.resolve(call, names["generator"], "", ("style_generator",), "Sample")
        try:
            await core.sample(mv, call, [1, 2, 3], None, None, PNG, Lane.INTERACTIVE)
        finally:
            if call.batcher is not None:
                call.batcher.release()
            call.release_uses()
        assert len(cache) == 3 and cache.nbytes > 0
        core.forget_version(repo.get(names["mapping"]).resolve(""))
        assert len(cache) == 0 and cache.nbytes == 0

    run_with_core(tmp_path, body, config=CACHING)
