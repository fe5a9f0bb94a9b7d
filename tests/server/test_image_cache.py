"""The image cache: a byte-bounded LRU (unit) and Sample through it on a real server (integration)."""

from __future__ import annotations

import json
import re
import shutil
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from server_support import ServerProcess, running_server, start_server

from genserve.v1 import genserve_pb2 as pb
from genserve.v1 import genserve_pb2_grpc as pb_grpc
from genserve.v1 import types_pb2 as tpb
from genserve_server.codecs import ImageFormat
from genserve_server.config import ConfigError, load_server_config
from genserve_server.encoding import EncodedImage
from genserve_server.image_cache import ENTRY_OVERHEAD_BYTES, ImageCache, ImageKey, image_key

PNG, JPEG, RAW = ImageFormat.PNG, ImageFormat.JPEG, ImageFormat.RAW_UINT8


def key(
    seed: int, fmt: int = RAW, quality: int = 90, compression: int = 1, label: int | None = None
) -> ImageKey:
    return image_key("load-1", seed, label, None, fmt, quality, compression)


def entry_bytes(data_len: int, z_dim: int = 4) -> int:
    return data_len + 4 * z_dim + ENTRY_OVERHEAD_BYTES


# ----------------------------------------------------------------------------- unit


def test_least_recently_used_images_leave_once_the_byte_budget_is_exceeded() -> None:
    cache = ImageCache(3 * entry_bytes(100))
    for seed in range(3):
        cache.put(key(seed), EncodedImage(PNG, bytes(100), ()), np.zeros(4, np.float32))
    assert len(cache) == 3 and cache.nbytes == 3 * entry_bytes(100)
    assert cache.get(key(0)) is not None  # 0 is now the most recently used
    cache.put(key(3), EncodedImage(PNG, bytes(100), ()), np.zeros(4, np.float32))
    assert [cache.get(key(s)) is not None for s in range(4)] == [True, False, True, True]
    assert cache.nbytes == 3 * entry_bytes(100)
    cache.put(key(4), EncodedImage(PNG, bytes(250), ()), np.zeros(4, np.float32))  # evicts two
    assert cache.nbytes <= cache.max_bytes and cache.get(key(4)) is not None


def test_an_image_larger_than_the_whole_cache_is_not_kept_and_evicts_nothing() -> None:
    cache = ImageCache(entry_bytes(100))
    cache.put(key(1), EncodedImage(PNG, bytes(100), ()), np.zeros(4, np.float32))
    cache.put(key(2), EncodedImage(PNG, bytes(101), ()), np.zeros(4, np.float32))
    assert cache.get(key(2)) is None and cache.get(key(1)) is not None


def test_putting_a_key_again_replaces_it_without_counting_it_twice() -> None:
    cache = ImageCache(10_000)
    cache.put(key(1), EncodedImage(PNG, bytes(100), ()), np.zeros(4, np.float32))
    cache.put(key(1), EncodedImage(PNG, bytes(200), ()), np.zeros(4, np.float32))
    assert len(cache) == 1 and cache.nbytes == entry_bytes(200)


def test_the_latent_is_copied_so_a_batch_array_is_not_pinned_or_changed_later() -> None:
    batch = np.arange(8, dtype=np.float32).reshape(2, 4)
    cache = ImageCache(10_000)
    cache.put(
        key(1),
        EncodedImage(
            RAW,
            b"xyz",
            (
                1,
                3,
                1,
            ),
        ),
        batch[1],
    )
    batch[1] = -1
    entry = cache.get(key(1))
    assert entry is not None and entry.latent().tolist() == [4, 5, 6, 7]
    assert entry.image(RAW) == EncodedImage(RAW, b"xyz", (1, 3, 1))


def test_the_byte_budget_counts_what_entries_really_hold_in_memory() -> None:
    # A 28x28 digit PNG (~700 B) and its 100-value latent: the cache's own count within 25 % of
    # what Python really allocates for the entries.
    cache = ImageCache(1 << 30)
    rng = np.random.default_rng(0)
    # Encoded bytes are made per response and then held by the cache alone: made inside the trace.
    pixels = [bytearray(rng.bytes(700)) for _ in range(2000)]
    latents = rng.normal(size=(2000, 100)).astype(np.float32)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(2000):
            cache.put(key(i, PNG), EncodedImage(PNG, bytes(pixels[i]), (28, 28, 1)), latents[i])
        real = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert 0.75 < cache.nbytes / real < 1.25, (cache.nbytes, real)


def test_keys_ignore_options_that_do_not_change_the_bytes_of_the_format() -> None:
    assert key(1, RAW, quality=80, compression=9) == key(1, RAW, quality=90, compression=1)
    assert key(1, PNG, quality=80) == key(1, PNG, quality=90)
    assert key(1, PNG, compression=1) != key(1, PNG, compression=6)
    assert key(1, JPEG, quality=80) != key(1, JPEG, quality=90)
    assert key(1, label=3) != key(1, label=4) != key(1)
    assert key(1) != image_key("load-2", 1, None, None, RAW, 0, 0)  # another loaded version
    assert key(1) != image_key("load-1", 1, None, 0.7, RAW, 0, 0)


def test_a_cache_of_no_bytes_is_refused() -> None:
    with pytest.raises(ValueError, match="max_bytes must be >= 1"):
        ImageCache(0)


# ----------------------------------------------------------------------------- a real server


@pytest.fixture(scope="module")
def cached_server(tiny_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = start_server(
        tiny_repo, tmp_path_factory.mktemp("cache-server"), config={"image_cache_bytes": 1 << 20}
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def stub(cached_server: ServerProcess) -> Iterator[pb_grpc.GenerationServiceStub]:
    with grpc.insecure_channel(cached_server.target) as channel:
        yield pb_grpc.GenerationServiceStub(channel)


def lookups(server: ServerProcess, model: str) -> tuple[float, float]:
    return tuple(  # type: ignore[return-value]
        server.metric("genserve_image_cache_lookups_total", model=model, result=r) for r in ("hit", "miss")
    )


def test_repeated_seeds_come_from_the_cache_and_only_new_seeds_are_computed(
    stub: pb_grpc.GenerationServiceStub, cached_server: ServerProcess
) -> None:
    out = tpb.OutputOptions(format=PNG, return_latents=True)
    hits0, misses0 = lookups(cached_server, "tiny-gen")
    images0 = cached_server.metric("genserve_images_total", model="tiny-gen")
    first = stub.Sample(pb.SampleRequest(model="tiny-gen", seeds=[11, 12, 13], output=out))
    again = stub.Sample(pb.SampleRequest(model="tiny-gen", seeds=[12, 13, 14], output=out))
    assert [g.from_cache for g in first.images] == [False, False, False]
    assert [g.from_cache for g in again.images] == [True, True, False]
    assert [g.seed for g in again.images] == [12, 13, 14] and [g.index for g in again.images] == [0, 1, 2]
    assert list(again.provenance.executed_batch_sizes) == [1]  # seed 14 alone was computed
    for cached, computed in ((again.images[0], first.images[1]), (again.images[1], first.images[2])):
        assert cached.image == computed.image and cached.latent == computed.latent
    assert lookups(cached_server, "tiny-gen") == (hits0 + 2, misses0 + 4)
    assert cached_server.metric("genserve_images_total", model="tiny-gen") == images0 + 4
    assert cached_server.metric("genserve_image_cache_bytes") > 0
    # A cached image is the image the model computes for that seed, bit for bit.
    fresh = stub.Sample(
        pb.SampleRequest(
            model="tiny-gen", seeds=[12], output=tpb.OutputOptions(format=PNG, png_compression=1)
        )
    )
    assert fresh.images[0].from_cache and fresh.images[0].image == first.images[1].image


def test_statistics_count_a_request_served_from_the_cache_as_a_cache_hit_not_a_computation(
    stub: pb_grpc.GenerationServiceStub, cached_server: ServerProcess
) -> None:
    """KServe ModelStatistics counted a Sample served wholly from the image cache as a computed
    request with zero compute time: compute_infer's average (ns / count, what tritonclient and
    perf_analyzer report) fell with every hit, halved where half the requests hit. As Triton counts
    a response-cache hit: success and queue, and cache_hit (its lookup time), no compute count; the
    request that looked the cache up and computed counts in cache_miss too."""
    from genserve.kserve import grpc_service_pb2 as kpb
    from genserve.kserve import grpc_service_pb2_grpc as kpb_grpc

    def stats() -> kpb.InferStatistics:
        with grpc.insecure_channel(cached_server.target) as channel:
            kstub = kpb_grpc.GRPCInferenceServiceStub(channel)
            request = kpb.ModelStatisticsRequest(name="tiny-gen")
            return kstub.ModelStatistics(request, timeout=10).model_stats[0].inference_stats

    expected = {"success": 2, "queue": 2, "cache_hit": 1, "cache_miss": 1}
    expected |= {"compute_input": 1, "compute_infer": 1, "compute_output": 1}
    before = stats()
    computed = stub.Sample(pb.SampleRequest(model="tiny-gen", seeds=[31, 32]))
    cached = stub.Sample(pb.SampleRequest(model="tiny-gen", seeds=[31, 32]))
    assert [g.from_cache for g in computed.images] == [False, False]
    assert [g.from_cache for g in cached.images] == [True, True]
    after = stats()
    assert {p: getattr(after, p).count - getattr(before, p).count for p in expected} == expected
    assert after.compute_input.count == after.compute_infer.count == after.compute_output.count


def test_model_config_declares_the_response_cache_of_the_models_sample_serves_from_the_cache(
    cached_server: ServerProcess, tiny_server: ServerProcess
) -> None:
    """ModelStatistics reports cache_hit / cache_miss for Sample's image cache, but ModelConfig never
    declared Triton's response_cache: perf_analyzer (which reads config["response_cache"]["enable"])
    then warns 'Response Cache is disabled for model [tiny-gen] but cache hit/miss latency is
    non-zero' and leaves the cache out of its latency breakdown. Declared where the cache is on and
    the model's Sample goes through it; a kind Sample does not serve, and a server without the
    cache, declare none."""
    from google.protobuf.json_format import MessageToDict

    from genserve.kserve import grpc_service_pb2 as kpb
    from genserve.kserve import grpc_service_pb2_grpc as kpb_grpc

    def declared(server: ServerProcess, name: str) -> bool:
        with grpc.insecure_channel(server.target) as channel:
            kstub = kpb_grpc.GRPCInferenceServiceStub(channel)
            config = kstub.ModelConfig(kpb.ModelConfigRequest(name=name), timeout=10).config
        as_json = MessageToDict(config, preserving_proto_field_name=True)  # as perf_analyzer reads it
        return bool(as_json.get("response_cache", {}).get("enable", False))

    assert declared(cached_server, "tiny-gen") and declared(cached_server, "tiny-cond")
    assert not declared(cached_server, "tiny-sr")  # SuperResolve: no image cache
    assert not declared(tiny_server, "tiny-gen")  # image_cache_bytes 0: off


def test_the_rpcs_docs_kserve_counts_as_cache_hits_are_the_ones_served_from_the_cache(
    stub: pb_grpc.GenerationServiceStub, cached_server: ServerProcess
) -> None:
    """docs/kserve.md said a request of genserve.v1 `Sample` and `SampleStream` served from the image
    cache counts as a cache hit; SampleStream never goes through the cache (docs/server.md), so an
    operator reading cache_hit 0 under a stream load was told the wrong story."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "kserve.md").read_text()
    said = re.search(r"With the image cache on \((.*?)\)", doc, re.S)
    assert said is not None
    hits0, misses0 = lookups(cached_server, "tiny-gen")
    for _ in range(2):
        request = pb.SampleStreamRequest(sample=pb.SampleRequest(model="tiny-gen", count=2, base_seed=41))
        assert sum(len(chunk.images) for chunk in stub.SampleStream(request, timeout=30)) == 2
    assert lookups(cached_server, "tiny-gen") == (hits0, misses0)  # never looked up
    assert "`SampleStream`" not in said.group(1) and "`Sample`" in said.group(1), said.group(1)


def test_other_formats_labels_and_truncation_are_other_images(
    stub: pb_grpc.GenerationServiceStub, cached_server: ServerProcess
) -> None:
    def sample(**kwargs: object) -> pb.SampleResponse:
        return stub.Sample(pb.SampleRequest(seeds=[21], **kwargs))  # type: ignore[arg-type]

    raw = tpb.OutputOptions(format=RAW)
    assert not sample(model="tiny-gen", output=raw).images[0].from_cache
    assert sample(model="tiny-gen", output=raw).images[0].from_cache
    assert not sample(model="tiny-gen", output=tpb.OutputOptions(format=JPEG)).images[0].from_cache
    assert not sample(model="tiny-gen", output=raw, truncation_psi=0.5).images[0].from_cache
    assert not sample(model="tiny-cond", labels=[1], output=raw).images[0].from_cache
    two = sample(model="tiny-cond", labels=[2], output=raw).images[0]
    assert not two.from_cache and two.label == 2
    assert sample(model="tiny-cond", labels=[1], output=raw).images[0].from_cache


def test_explicit_latents_are_never_served_from_the_cache(
    stub: pb_grpc.GenerationServiceStub,
) -> None:
    z = np.zeros((1, 16), "<f4")
    latents = tpb.Tensor(shape=z.shape, dtype=tpb.DTYPE_FLOAT32, data=z.tobytes())
    for _ in range(2):
        response = stub.Sample(pb.SampleRequest(model="tiny-gen", latents=latents))
        assert not response.images[0].from_cache and list(response.provenance.executed_batch_sizes) == [1]


def test_image_cache_bytes_is_validated_and_off_by_default(tmp_path: Path) -> None:
    path = tmp_path / "server.json"
    path.write_text(json.dumps({"image_cache_bytes": -1}))
    with pytest.raises(ConfigError, match="image_cache_bytes must be >= 0, got -1"):
        load_server_config(path)
    assert load_server_config(None).image_cache_bytes == 0
    path.write_text(json.dumps({"image_cache_bytes": 1 << 26}))
    assert load_server_config(path).image_cache_bytes == 1 << 26


BUNDLED_MODELS = Path(__file__).resolve().parents[2] / "models"


@pytest.mark.skipif(
    not (BUNDLED_MODELS / "dcgan-digits").is_dir(), reason="models/ not written yet (export/ trains it)"
)
def test_the_documented_count_of_digits_a_64_mib_cache_holds_is_what_it_holds(tmp_path: Path) -> None:
    """docs/server.md sizes image_cache_bytes by what 64 MiB holds of the bundled 28x28 digits (PNG,
    default options, with their latents), counted as the cache counts its entries
    (genserve_image_cache_bytes): the number an operator sizes the cache by must be what it holds."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "server.md").read_text()
    found = re.search(r"64 MiB holds ~(\d+)k 28×28 PNG digits", text)
    assert found is not None, "docs/server.md no longer says what 64 MiB of image cache holds"
    documented = int(found.group(1)) * 1000
    root = tmp_path / "models"
    shutil.copytree(BUNDLED_MODELS / "dcgan-digits", root / "dcgan-digits")
    config = {"image_cache_bytes": 64 << 20, "warmup": False, "execution_providers": ["CPUExecutionProvider"]}
    n = 256
    with running_server(root, tmp_path / "work", config=config) as server:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            stub.Sample(pb.SampleRequest(model="dcgan-digits", seeds=list(range(n))), timeout=60)
        per_entry = server.metric("genserve_image_cache_bytes") / n
    holds = (64 << 20) / per_entry
    assert abs(holds - documented) / holds < 0.1, (
        f"64 MiB holds ~{holds / 1000:.0f}k digits ({per_entry:.0f} bytes an entry); "
        f"the docs say ~{documented // 1000}k"
    )
