"""The image cache across model versions on a real server: a style generator's images (keyed by its
mapping's loaded version too), and the entries of a version that unloads (released with it)."""

from __future__ import annotations

import signal
from pathlib import Path

import grpc
import pytest
from server_support import (
    TINY_LATENT,
    generator_graph,
    running_server,
    wait_until,
    write_model,
    write_tiny_generator,
)
from style_models import STYLE_LATENT, W_DIM, mapping_graph, write_style_models

from genserve.v1 import genserve_pb2 as pb
from genserve.v1 import genserve_pb2_grpc as pb_grpc
from genserve.v1 import types_pb2 as tpb
from genserve_server.codecs import ImageFormat

CACHE = {"image_cache_bytes": 1 << 20, "drain_grace_s": 0.5}
RAW = tpb.OutputOptions(format=ImageFormat.RAW_UINT8, return_latents=True)


def ready(stub: pb_grpc.GenerationServiceStub, name: str, version: str) -> bool:
    try:
        info = stub.GetModel(pb.GetModelRequest(name=name), timeout=10)
    except grpc.RpcError:
        return False
    return any(v.version == version and v.state == pb.MODEL_STATE_READY for v in info.versions)


def test_a_style_generators_sample_is_cached_under_its_mapping_version(tmp_path: Path) -> None:
    """docs/server.md: a Sample for seeds already served gets the stored bytes; only explicit latents,
    Interpolate, Decode and SampleStream are not cached. A style generator's images also depend on
    its mapping: a new mapping version computes them again."""
    root = tmp_path / "models"
    names = write_style_models(root)
    gen, mapping = names["generator"], names["mapping"]
    with running_server(root, tmp_path / "work", config=CACHE) as server:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            first = stub.Sample(pb.SampleRequest(model=gen, seeds=[3, 4], output=RAW), timeout=30)
            again = stub.Sample(pb.SampleRequest(model=gen, seeds=[4, 5], output=RAW), timeout=30)
            assert [g.from_cache for g in first.images] == [False, False]
            assert [g.from_cache for g in again.images] == [True, False]
            assert again.images[0].image == first.images[1].image
            assert again.images[0].latent == first.images[1].latent
            assert list(again.provenance.executed_batch_sizes) == [1]
            assert server.metric("genserve_image_cache_lookups_total", model=gen, result="hit") == 1
            truncated = stub.Sample(
                pb.SampleRequest(model=gen, seeds=[4], truncation_psi=0.5, output=RAW), timeout=30
            )
            assert not truncated.images[0].from_cache
            # A new mapping version: the same seeds are other images, computed again.
            write_model(
                root,
                mapping,
                "style_mapping",
                mapping_graph(seed=7),
                {"latent_dim": STYLE_LATENT, "w_dim": W_DIM, "output_range": None},
                config={"batching": {"max_batch_size": 16, "max_queue_size": 256}},
                version="2",
            )
            server.proc.send_signal(signal.SIGHUP)
            wait_until(lambda: ready(stub, mapping, "2"), 60, "mapping version 2")
            remapped = stub.Sample(pb.SampleRequest(model=gen, seeds=[4], output=RAW), timeout=30)
            assert [u.version for u in remapped.provenance.used_models] == ["2"]
            assert not remapped.images[0].from_cache
            assert remapped.images[0].image != first.images[1].image


def test_the_images_of_an_unloaded_version_leave_the_cache(tmp_path: Path) -> None:
    """No request can reach an unloaded version's entries again: they are released with it, and
    genserve_image_cache_bytes (what the cache holds now) drops."""
    root = tmp_path / "models"
    write_tiny_generator(root, "gen")
    write_tiny_generator(root, "other")
    with running_server(root, tmp_path / "work", config=CACHE) as server:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            stub.Sample(pb.SampleRequest(model="gen", seeds=list(range(8)), output=RAW), timeout=30)
            stub.Sample(pb.SampleRequest(model="other", seeds=[1], output=RAW), timeout=30)
            held = server.metric("genserve_image_cache_bytes")
            assert held > 0
            # Version 2 replaces version 1, which drains and unloads.
            card = {"latent_dim": TINY_LATENT, "channels": 1, "image_size": [8, 8]}
            write_model(
                root, "gen", "generator", generator_graph(TINY_LATENT, 1, 8, 8, seed=5), card, version="2"
            )
            server.proc.send_signal(signal.SIGHUP)

            def unloaded() -> bool:
                text = server.metrics_text()
                return 'genserve_model_ready{model="gen",version="1"}' not in text

            wait_until(lambda: ready(stub, "gen", "2"), 60, "gen version 2")
            wait_until(unloaded, 60, "version 1 to unload")
            # Only "other"'s one image is left.
            one_image = held / 9
            assert server.metric("genserve_image_cache_bytes") == pytest.approx(one_image)
            again = stub.Sample(pb.SampleRequest(model="gen", seeds=[0], output=RAW), timeout=30)
            assert not again.images[0].from_cache
