"""Bulk jobs never lose a user's files, never mix two runs or two models, resume from the manifest
alone and ride out outages for a configurable window (all against the in-process fake server)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from client_fakes import FAKE_SHA256, FakeServer, FakeService, cli_main, fake_pixels
from PIL import Image

from genserve.v1 import genserve_pb2, genserve_pb2_grpc, types_pb2
from genserve_client import GenserveClient, RetryPolicy
from genserve_client import bulk as bulk_module
from genserve_client.bulk import (
    BulkError,
    BulkIncomplete,
    BulkJob,
    BulkParams,
    JobLock,
    Manifest,
    ServedModel,
    Shard,
    read_manifest,
)

FAST_RETRY = RetryPolicy(max_attempts=3, initial_backoff_s=0.001, max_backoff_s=0.01)
OTHER_SHA256 = hashlib.sha256(b"another model").hexdigest()


def run_job(target: str, out: Path, params: BulkParams, **kwargs: Any) -> None:
    with GenserveClient(target, retry=FAST_RETRY) as client:
        BulkJob(client, params, out, **kwargs).run()


def indices(out: Path) -> list[int]:
    return sorted(e["index"] for e in read_manifest(out / "manifest.jsonl")[0])


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def finished_job(
    capsys: pytest.CaptureFixture[str], fake_server: FakeServer, out: Path, n: int
) -> tuple[str, str]:
    """A job of `n` fake-gen images run to its end into `out` by the CLI; the `--target` arguments of
    the fake server, for the test's later commands."""
    t = ("--target", fake_server.target)
    code, _, err = cli_main(capsys, *t, "bulk", "--model", "fake-gen", "--n", str(n), "--out", str(out))
    assert code == 0, err
    return t


def refuse_every_stream(fake_server: FakeServer) -> None:
    """From now on the fake server cuts every SampleStream before its first chunk (UNAVAILABLE, as a
    server shutting down), until serve_streams_again."""
    fake_server.service.fail["SampleStream"] = [grpc.StatusCode.UNAVAILABLE] * 10_000


def serve_streams_again(fake_server: FakeServer) -> None:
    fake_server.service.fail["SampleStream"].clear()


def describe_models(
    service: FakeService, monkeypatch: pytest.MonkeyPatch, edit: Callable[[genserve_pb2.ModelInfo], None]
) -> None:
    """From now on the fake describes each model by its own answer as `edit` changes it (in place):
    GetModel and ListModels answer so, and its calls serve the versions so listed (a reload, another
    version, state or limit). A later call replaces the edit, it does not add to it."""
    fakes_own = type(service)._info

    def edited(name: str) -> genserve_pb2.ModelInfo:
        answer = fakes_own(service, name)
        edit(answer)
        return answer

    monkeypatch.setattr(service, "_info", edited)


def add_version_2(answer: genserve_pb2.ModelInfo) -> None:
    """A version 2 beside the fake's version 1, described as it is. (The fake answers a GetModel
    naming a version with that version alone, or NOT_FOUND.)"""
    v2 = answer.versions.add()
    v2.CopyFrom(answer.versions[0])
    v2.version = "2"


def run_the_resume_hint(capsys: pytest.CaptureFixture[str], hint: str, out: Path, n: int) -> None:
    """The printed `genserve-client ...` command, run as is, finishes the job: `n` images in `out`."""
    code, _, err = cli_main(capsys, *shlex.split(hint)[1:])
    assert code == 0, err
    assert indices(out) == list(range(n))


# --- 1. a folder that is not one of the job's own ----------------------------------------------


def test_a_new_job_refuses_a_folder_with_files_it_did_not_write(
    fake_server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "job"
    (out / "images" / "trip").mkdir(parents=True)
    (out / "images" / "my_holiday_photo.png").write_bytes(b"not generated")
    (out / "images" / "trip" / "day1.png").write_bytes(b"mine too")
    (out / "README.txt").write_text("my notes")
    before = snapshot(out)
    t = ("--target", fake_server.target)
    code, _, err = cli_main(capsys, *t, "bulk", "--model", "fake-gen", "--n", "6", "--out", str(out))
    assert code == 2, err
    assert str(out) in err and "images/my_holiday_photo.png" in err and "README.txt" in err
    assert "Traceback" not in err
    assert snapshot(out) == before  # nothing deleted, nothing added (not even a lock file)
    assert sorted(p.name for p in out.iterdir()) == ["README.txt", "images"]
    assert fake_server.service.calls["SampleStream"] == 0
    code, _, err = cli_main(
        capsys, *t, "bulk", "--model", "fake-gen", "--n", "6", "--out", str(out / "README.txt")
    )
    assert code == 2 and "is a file, not a folder" in err
    assert (out / "README.txt").read_text() == "my notes"
    # An empty folder, and the leftovers of a job the server rejected, are fine.
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = cli_main(capsys, *t, "bulk", "--model", "fake-gen", "--n", "3", "--out", str(empty))
    assert code == 0, err
    assert indices(empty) == [0, 1, 2]


def test_a_job_folder_that_is_a_file_or_lies_under_one_is_refused_naming_the_flag_not_errno(
    fake_server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`bulk --resume OUT/job.json` (the job's file given for its folder) failed exit 1 with a bare
    '[Errno 20] Not a directory: OUT/job.json/job.json', and a new job's `--out` under a file failed
    exit 1 with '[Errno 20]' and the hint to run the same command again, which fails the same way.
    Both are bad arguments (exit 2), named as `--out FILE` is, with nothing written."""
    out = tmp_path / "job"
    t = finished_job(capsys, fake_server, out, 3)
    job_file = out / "job.json"
    before = snapshot(out)
    for args, said in (
        (("--resume", str(job_file)), f"{job_file} is a file, not a bulk job's folder"),
        (("--resume", str(job_file / "sub")), f"{job_file / 'sub'} lies under {job_file}, a file"),
        (
            ("--model", "fake-gen", "--n", "3", "--out", str(job_file / "sub")),
            f"--out {job_file / 'sub'} lies under {job_file}, a file",
        ),
    ):
        code, _, err = cli_main(capsys, *t, "bulk", *args)
        assert code == 2, err
        assert said in err and "Errno" not in err and "run the same command" not in err, err
    assert snapshot(out) == before


def test_recovery_leaves_foreign_files_and_sub_folders_in_images_alone(
    fake_server: FakeServer, tmp_path: Path
) -> None:
    run_job(fake_server.target, tmp_path, BulkParams("fake-gen", n=4))
    images = tmp_path / "images"
    (images / "keep").mkdir()
    (images / "keep" / "x.png").write_bytes(b"x")
    (images / "notes.txt").write_text("mine")
    (images / ".tmp-000001.png").write_bytes(b"torn")  # the job's own temp file: removed
    run_job(fake_server.target, tmp_path, BulkParams("fake-gen", n=9))  # grows the job
    assert indices(tmp_path) == list(range(9))
    assert (images / "notes.txt").read_text() == "mine" and (images / "keep" / "x.png").read_bytes() == b"x"
    assert not (images / ".tmp-000001.png").exists()


def test_a_library_job_of_a_model_kind_bulk_cannot_serve_is_refused_before_its_folder_is_made(
    fake_server: FakeServer, tmp_path: Path
) -> None:
    # Bulk streams SampleStream, which only the kinds that answer Sample serve: BulkJob.run made the
    # folder and its job.lock before its GetModel lookup, and the server refused the streams after.
    out = tmp_path / "job"
    with GenserveClient(fake_server.target, retry=FAST_RETRY) as client:
        with pytest.raises(BulkError) as refused:
            BulkJob(client, BulkParams("fake-i2i", n=3), out).run()
    message = str(refused.value)
    assert "'fake-i2i' is a image_to_image" in message and "SampleStream" in message, message
    assert "generator, conditional_generator" in message, message
    assert not out.exists()
    assert fake_server.service.calls["SampleStream"] == 0


def test_a_refused_model_kind_is_named_by_the_argument_its_caller_gave(
    fake_server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A library caller gave BulkParams(model=...), and has no --model flag to correct; the CLI's user
    # gave --model.
    with GenserveClient(fake_server.target, retry=FAST_RETRY) as client:
        with pytest.raises(BulkError) as refused:
            BulkJob(client, BulkParams("fake-i2i", n=3), tmp_path / "lib").run()
    assert "model='fake-i2i' is a image_to_image" in str(refused.value), refused.value
    assert "--model" not in str(refused.value), refused.value
    out = tmp_path / "cli"
    args = ("--target", fake_server.target, "bulk", "--model", "fake-i2i", "--n", "3", "--out", str(out))
    code, _, err = cli_main(capsys, *args)
    assert code == 2 and "--model 'fake-i2i' is a image_to_image" in err, err
    assert not out.exists() and fake_server.service.calls["SampleStream"] == 0


def test_a_job_of_a_label_the_model_lacks_is_refused_before_its_folder_is_made_as_sample_refuses_it(
    fake_server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # `bulk --labels 11` on a 10-class model made the job's folder and reached the server, which
    # refused its stream (exit 2) after an empty progress line; `sample --labels 11` refuses it
    # before any call. Both refuse it with one message, the library's job too.
    t = ("--target", fake_server.target)
    out = tmp_path / "cli"
    code, _, err = cli_main(
        capsys, *t, "bulk", "--model", "fake-cond", "--labels", "3,11", "--n", "4", "--out", str(out)
    )
    assert code == 2, err
    assert "bulk: --labels: fake-cond has no class 11: its classes are [0, 10) (0, 1, 2" in err, err
    assert "Traceback" not in err and "resumable" not in err, err
    code, _, sample_err = cli_main(
        capsys, *t, "sample", "--model", "fake-cond", "--labels", "3,11", "--out", "x"
    )
    assert code == 2 and sample_err.replace("sample:", "bulk:") == err, (sample_err, err)
    lib = tmp_path / "lib"
    with GenserveClient(fake_server.target, retry=FAST_RETRY) as client:
        with pytest.raises(BulkError) as refused:
            BulkJob(client, BulkParams("fake-cond", n=4, labels=(3, 11)), lib).run()
    assert "bulk: labels: fake-cond has no class 11: its classes are [0, 10)" in str(refused.value)
    assert not out.exists() and not lib.exists()
    assert fake_server.service.calls["SampleStream"] == 0 and fake_server.service.calls["Sample"] == 0


def test_a_job_with_labels_for_a_model_without_classes_is_refused_before_its_folder_is_made(
    fake_server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # `bulk --model <an unconditional generator> --labels 3` made the job's folder and sent the
    # labels, which the server refuses on every stream ('only conditional models take labels');
    # sample sent them too. Both refuse them before any call, as a class name there is refused.
    t = ("--target", fake_server.target)
    out = tmp_path / "cli"
    code, _, err = cli_main(
        capsys, *t, "bulk", "--model", "fake-gen", "--labels", "3", "--n", "4", "--out", str(out)
    )
    assert code == 2, err
    assert "bulk: --labels: fake-gen is a generator without classes: it takes no labels" in err, err
    code, _, err = cli_main(capsys, *t, "sample", "--model", "fake-gen", "--labels", "3", "--out", str(out))
    assert code == 2 and "sample: --labels: fake-gen is a generator without classes" in err, err
    with GenserveClient(fake_server.target, retry=FAST_RETRY) as client:
        with pytest.raises(BulkError, match="bulk: labels: fake-gen is a generator without classes"):
            BulkJob(client, BulkParams("fake-gen", n=4, labels=(3,)), out).run()
    assert not out.exists()
    assert fake_server.service.calls["SampleStream"] == 0 and fake_server.service.calls["Sample"] == 0


def test_a_library_jobs_refusals_name_the_arguments_its_caller_gave_and_the_clis_its_flags(
    fake_server: FakeServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A library caller gave BulkJob(out_dir=..., stream_images=...) and BulkParams(n=...), and has no
    # --out, --n or --stream-images flag to correct.
    (tmp_path / "a-file").write_text("mine")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    out = tmp_path / "job"
    run_job(fake_server.target, out, BulkParams("fake-gen", n=4))
    sharded = tmp_path / "sharded"
    run_job(fake_server.target, sharded, BulkParams("fake-gen", n=4), shard=Shard(0, 2))
    refused: list[tuple[Path, BulkParams, dict[str, Any], str]] = [
        (
            tmp_path / "a-file",
            BulkParams("fake-gen", n=3),
            {},
            f"out_dir={str(tmp_path / 'a-file')!r} is a file",
        ),
        (foreign, BulkParams("fake-gen", n=3), {}, "use a new or empty out_dir"),
        (out, BulkParams("fake-gen", n=4, base_seed=9), {}, "use a new out_dir"),
        (out, BulkParams("fake-gen", n=2), {}, "is a job of 4 images: n can only grow it, got n=2"),
        (
            sharded,
            BulkParams("fake-gen", n=6),
            {"shard": Shard(0, 2)},
            "cannot grow (its seed ranges would move), got n=6",
        ),
        (tmp_path / "new", BulkParams("fake-gen", n=3), {"stream_images": 4}, "stream_images=4 is more than"),
    ]

    def limited(answer: genserve_pb2.ModelInfo) -> None:
        answer.max_stream_images = 2

    describe_models(fake_server.service, monkeypatch, limited)
    for folder, params, kwargs, expected in refused:
        with pytest.raises(BulkError) as error:
            run_job(fake_server.target, folder, params, **kwargs)
        message = str(error.value)
        assert expected in message and "--" not in message, message
    # The CLI's user gave the flags.
    t = ("--target", fake_server.target, "bulk")
    code, _, err = cli_main(capsys, *t, "--model", "fake-gen", "--n", "3", "--out", str(tmp_path / "a-file"))
    assert code == 2 and f"--out {tmp_path / 'a-file'} is a file" in err, err
    code, _, err = cli_main(capsys, *t, "--model", "fake-gen", "--n", "3", "--out", str(foreign))
    assert code == 2 and "use a new or empty --out" in err, err
    code, _, err = cli_main(capsys, *t, "--resume", str(out), "--n", "2")
    assert code == 2 and "is a job of 4 images: --n can only grow it, got 2" in err, err
    code, _, err = cli_main(capsys, *t, "--resume", str(sharded), "--n", "6")
    assert code == 2 and "cannot grow (its seed ranges would move), got --n 6" in err, err
    new = ("--model", "fake-gen", "--n", "3", "--out", str(tmp_path / "new"), "--stream-images", "4")
    code, _, err = cli_main(capsys, *t, *new)
    assert code == 2 and "--stream-images 4 is more than" in err, err


@pytest.mark.parametrize("cli", [False, True])
def test_a_jobs_settings_and_mixed_model_refusals_name_the_argument_or_the_flag_its_caller_gave(
    fake_server: FakeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cli: bool
) -> None:
    # A library caller (cli=False) gave stream_images=, chunk_size= and out_dir=, and has no
    # --stream-images, --chunk-size or --out to correct; the CLI (cli=True) gave those flags.
    out_named = "--out" if cli else "out_dir"
    service = fake_server.service
    with GenserveClient(fake_server.target, retry=FAST_RETRY) as client:
        params = BulkParams("fake-gen", n=2)
        with pytest.raises(ValueError) as bad:
            BulkJob(client, params, tmp_path / "new", stream_images=0, cli=cli)
        assert str(bad.value).startswith("--stream-images must be" if cli else "stream_images must be")
        with pytest.raises(ValueError) as bad:
            BulkJob(client, params, tmp_path / "new", chunk_size=-1, cli=cli)
        assert str(bad.value).startswith("--chunk-size must be" if cli else "chunk_size must be")

        # Images of another version than GetModel lists (another replica's).
        out = tmp_path / "version"
        BulkJob(client, params, out, cli=cli).run()
        provenance = service._provenance

        def of_version_2(model: str, version: str) -> types_pb2.Provenance:
            answer = provenance(model, version)
            answer.version = "2"
            return answer

        monkeypatch.setattr(service, "_provenance", of_version_2)
        with pytest.raises(BulkError) as refused:
            BulkJob(client, BulkParams("fake-gen", n=4), out, cli=cli).run()
        assert str(refused.value).endswith(
            f"version 2: resuming would mix two models in one job; use a new {out_named}"
        )
        monkeypatch.setattr(service, "_provenance", provenance)
        w1, w2 = hashlib.sha256(b"w1").hexdigest(), hashlib.sha256(b"w2").hexdigest()
        # (the fake server's setting, as the job starts, then as it resumes)
        changes: list[tuple[str, object, object]] = [
            ("model_sha256", FAKE_SHA256, OTHER_SHA256),
            ("weights_sha256", w1, w2),
            ("used_models", [("map", "1", FAKE_SHA256)], [("map", "1", OTHER_SHA256)]),
            ("used_weights_sha256", {"map": w1}, {"map": w2}),
            ("card_sha256", w1, w2),
            ("used_card_sha256", {"map": w1}, {"map": w2}),
        ]
        for setting, before, after in changes:
            out = tmp_path / setting
            setattr(service, setting, before)
            used = setting in ("used_weights_sha256", "used_card_sha256")
            if used:
                service.used_models = [("map", "1", FAKE_SHA256)]
            BulkJob(client, params, out, cli=cli).run()
            setattr(service, setting, after)
            with pytest.raises(BulkError) as refused:
                BulkJob(client, BulkParams("fake-gen", n=4), out, cli=cli).run()
            assert str(refused.value).endswith(f"use a new {out_named}"), (setting, str(refused.value))
            setattr(service, setting, before)
            if used:
                service.used_models = []
        # The pinned version, or the whole model, no longer served: a stream answered NOT_FOUND, and
        # GetModel (READY version 1 as the job resumed) then lists version 2 alone, or NOT_FOUND.
        out = tmp_path / "gone"
        BulkJob(client, params, out, cli=cli).run()
        enter = service._enter
        for gone, said in (("version", "no longer serves that version"), ("model", "no longer serves model")):
            looked_up = service.calls["GetModel"] + 1

            def after_the_resumes_lookup(
                method: str, context: grpc.ServicerContext, gone: str = gone, looked_up: int = looked_up
            ) -> None:
                enter(method, context)
                if gone == "model" and method == "GetModel" and service.calls["GetModel"] > looked_up:
                    context.abort(grpc.StatusCode.NOT_FOUND, "model 'fake-gen' is not served")

            def versions(answer: genserve_pb2.ModelInfo, looked_up: int = looked_up) -> None:
                if service.calls["GetModel"] > looked_up:
                    answer.versions[0].version = "2"

            monkeypatch.setattr(service, "_enter", after_the_resumes_lookup)
            describe_models(service, monkeypatch, versions)
            service.fail["SampleStream"].append(grpc.StatusCode.NOT_FOUND)
            with pytest.raises(BulkError) as refused:
                BulkJob(client, BulkParams("fake-gen", n=4), out, cli=cli).run()
            assert said in str(refused.value), str(refused.value)
            assert str(refused.value).endswith(f"use a new {out_named}"), str(refused.value)


def test_a_library_job_of_a_version_not_served_or_not_ready_is_refused_before_its_folder_is_made(
    fake_server: FakeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # BulkJob.run made the folder and its job.lock, then found the version missing (the CLI checks
    # --version before any file): the job folder of a job that can never run was left behind.
    out = tmp_path / "job"
    with GenserveClient(fake_server.target, retry=FAST_RETRY) as client:
        with pytest.raises(BulkError) as refused:
            BulkJob(client, BulkParams("fake-gen", n=3, version="7"), out).run()
        assert str(refused.value) == "model 'fake-gen' has no version '7' on the server (served: 1 (READY))"
        assert not out.exists()

        def failed(answer: genserve_pb2.ModelInfo) -> None:
            answer.versions[0].state = genserve_pb2.MODEL_STATE_UNAVAILABLE

        describe_models(fake_server.service, monkeypatch, failed)
        for version in ("1", ""):
            with pytest.raises(BulkError) as refused:
                BulkJob(client, BulkParams("fake-gen", n=3, version=version), out).run()
            assert str(refused.value) == "model 'fake-gen' version 1 is not READY (served: 1 (UNAVAILABLE))"
            assert not out.exists()
    assert fake_server.service.calls["SampleStream"] == 0


def test_a_library_job_of_a_named_version_is_checked_against_that_versions_kind(
    fake_server: FakeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # BulkJob.run looked the model up with a GetModel naming no version: a job of version 1 was
    # judged by the kind of version 2, the one served by default (as the CLI's --version was).
    kinds = {"1": "generator", "2": "image_to_image"}

    def two_versions(answer: genserve_pb2.ModelInfo) -> None:
        add_version_2(answer)
        answer.kind = kinds.get(fake_server.service.model_versions[-1] or "2", "")

    describe_models(fake_server.service, monkeypatch, two_versions)
    out = tmp_path / "generator"
    run_job(fake_server.target, out, BulkParams("fake-gen", n=3, version="1"))
    assert json.loads((out / "job.json").read_text())["pinned_version"] == "1"
    assert indices(out) == [0, 1, 2]
    assert fake_server.service.model_versions == ["1"]
    # Version 1 of a kind whose streams the server refuses is refused before its folder is made.
    kinds.update({"1": "image_to_image", "2": "generator"})
    out = tmp_path / "i2i"
    with pytest.raises(BulkError) as refused:
        run_job(fake_server.target, out, BulkParams("fake-gen", n=3, version="1"))
    assert "model='fake-gen' is a image_to_image" in str(refused.value), str(refused.value)
    assert not out.exists()
    # A version the server does not have (NOT_FOUND, as the server answers a GetModel naming it) is
    # named with the versions it serves.
    out = tmp_path / "seven"
    with pytest.raises(BulkError) as refused:
        run_job(fake_server.target, out, BulkParams("fake-gen", n=3, version="7"))
    served = "(served: 1 (READY), 2 (READY))"
    assert str(refused.value) == f"model 'fake-gen' has no version '7' on the server {served}"
    assert not out.exists()
    assert fake_server.service.calls["SampleStream"] == 1


def test_a_cli_job_pins_the_version_whose_labels_it_resolved_from_one_lookup(
    fake_server: FakeServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The CLI resolved the labels from its own GetModel answer and BulkJob.run pinned the version from
    # a second one: a model reloaded between the two (here a version 2, an unconditional generator)
    # gave a job the labels of version 1 pinned to version 2.

    def reloaded_after_the_first_lookup(answer: genserve_pb2.ModelInfo) -> None:
        if fake_server.service.calls["GetModel"] > 1:
            answer.kind, answer.versions[0].version = "generator", "2"
            del answer.class_names[:]

    describe_models(fake_server.service, monkeypatch, reloaded_after_the_first_lookup)
    out = tmp_path / "job"
    args = ("--target", fake_server.target, "bulk", "--model", "fake-cond", "--n", "4", "--out", str(out))
    code, _, err = cli_main(capsys, *args)
    assert code == 0, err
    job = json.loads((out / "job.json").read_text())
    assert job["pinned_version"] == "1", job
    assert job["params"]["labels"] == list(range(10)), job
    assert fake_server.service.calls["GetModel"] == 1
    assert indices(out) == [0, 1, 2, 3]


def test_a_cli_job_waiting_for_a_loading_version_takes_its_labels_from_the_answer_it_pins(
    fake_server: FakeServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The first answer: version 1 (ten classes) DRAINING describes the model, version 2 (two
    # classes) LOADING is what a job pins. The job waited for version 2 by asking again, pinning
    # version 2 from that answer with the labels resolved from the first: version 1's ten classes.
    fake_server.service.version = "2"

    def reloading(answer: genserve_pb2.ModelInfo) -> None:
        v2 = answer.versions[0]
        if fake_server.service.calls["GetModel"] == 1:
            v2.state = genserve_pb2.MODEL_STATE_LOADING
            v1 = genserve_pb2.ModelVersionInfo(version="1", state=genserve_pb2.MODEL_STATE_DRAINING)
            answer.versions.insert(0, v1)
        else:
            del answer.class_names[:]
            answer.class_names.extend(["cat", "dog"])

    describe_models(fake_server.service, monkeypatch, reloading)
    out = tmp_path / "job"
    args = ("--target", fake_server.target, "bulk", "--model", "fake-cond", "--n", "4", "--out", str(out))
    code, _, err = cli_main(capsys, *args)
    assert code == 0, err
    job = json.loads((out / "job.json").read_text())
    assert (job["pinned_version"], job["params"]["labels"]) == ("2", [0, 1]), job
    assert indices(out) == [0, 1, 2, 3]
    # A library caller's answer pinning a LOADING version is refused, not traded for another answer.
    loading = genserve_pb2.ModelVersionInfo(version="2", state=genserve_pb2.MODEL_STATE_LOADING)
    given = genserve_pb2.ModelInfo(name="fake-cond", kind="conditional_generator", versions=[loading])
    asked = fake_server.service.calls["GetModel"]
    with GenserveClient(fake_server.target, retry=FAST_RETRY) as client:
        with pytest.raises(BulkError) as refused:
            BulkJob(client, BulkParams("fake-cond", n=3, labels=(0, 1)), tmp_path / "lib").run(info=given)
    assert "model 'fake-cond' version 2 is LOADING in the GetModel answer given" in str(refused.value)
    assert fake_server.service.calls["GetModel"] == asked and not (tmp_path / "lib").exists()


def test_a_cli_job_of_a_named_version_resolves_its_labels_from_that_versions_class_names(
    fake_server: FakeServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Version 1 has the fake's ten classes, version 2 (what a request naming no version gets) two
    # others: --version 1's labels are version 1's, as a GetModel naming it describes it.
    v2_classes = ["cat", "dog"]

    def two_versions(answer: genserve_pb2.ModelInfo) -> None:
        add_version_2(answer)
        if fake_server.service.model_versions[-1] != "1":
            del answer.class_names[:]
            answer.class_names.extend(v2_classes)

    describe_models(fake_server.service, monkeypatch, two_versions)
    t = ("--target", fake_server.target, "bulk", "--model", "fake-cond", "--n", "4", "--version", "1")
    out = tmp_path / "all"
    code, _, err = cli_main(capsys, *t, "--labels", "all", "--out", str(out))
    assert code == 0, err
    job = json.loads((out / "job.json").read_text())
    assert (job["pinned_version"], job["params"]["labels"]) == ("1", list(range(10))), job
    # A class name version 1 has (and version 2 has not) is taken; one only version 2 has is not.
    out = tmp_path / "named"
    code, _, err = cli_main(capsys, *t, "--labels", "7", "--out", str(out))
    assert code == 0, err
    assert json.loads((out / "job.json").read_text())["params"]["labels"] == [7]
    code, _, err = cli_main(capsys, *t, "--labels", "dog", "--out", str(tmp_path / "dog"))
    assert code == 2 and "dog" in err, err
    assert not (tmp_path / "dog").exists()
    # A version the server does not have (NOT_FOUND, as the server answers a GetModel naming it) is
    # still named with the versions it serves.
    code, _, err = cli_main(capsys, *t[:-1], "3", "--out", str(tmp_path / "three"))
    served = "(served: 1 (READY), 2 (READY))"
    assert code == 2 and f"--version '3': model 'fake-cond' has no such version {served}" in err, err
    assert not (tmp_path / "three").exists()
    # Version 1 loaded between a GetModel naming it (NOT_FOUND) and the one listing the versions: the
    # listing describes version 2 (its class names), so the job's labels are of version 1's answer,
    # asked again, not of the listing (the CLI took the listing's two labels for version 1).
    for cli in (True, False):
        fake_server.service.fail["GetModel"].append(
            (grpc.StatusCode.NOT_FOUND, "model fake-cond has no version '1'; versions: 2")
        )
        out = tmp_path / f"loaded-between-{cli}"
        if cli:
            code, _, err = cli_main(capsys, *t, "--labels", "all", "--out", str(out))
            assert code == 0, err
        else:
            with GenserveClient(fake_server.target, retry=FAST_RETRY) as client:
                answer = bulk_module.model_answer(client, "fake-cond", "1")
            assert list(answer.class_names) == [str(i) for i in range(10)], answer
            params = BulkParams("fake-cond", n=4, version="1", labels=tuple(range(10)))
            with GenserveClient(fake_server.target, retry=FAST_RETRY) as client:
                BulkJob(client, params, out).run(info=answer)
        job = json.loads((out / "job.json").read_text())
        assert (job["pinned_version"], job["params"]["labels"]) == ("1", list(range(10))), job
    assert fake_server.service.model_versions[-3:] == ["1", "", "1"]
    # A model the server does not serve, with a version named or not, is refused naming --model.
    for version in (("--version", "1"), ()):
        nothing = ("--target", fake_server.target, "bulk", "--model", "nope", "--n", "4", *version)
        code, _, err = cli_main(capsys, *nothing, "--out", str(tmp_path / "nope"))
        assert code == 2 and "bulk: --model 'nope': model 'nope' not found; models: " in err, err
        assert not (tmp_path / "nope").exists()


def two_versions_with_stream_limits(
    service: FakeService, monkeypatch: pytest.MonkeyPatch, limits: dict[str, int]
) -> None:
    """The fake serves versions 1 and 2 (2 by default), each with its max_stream_images in `limits`:
    a GetModel naming a version describes that one, one naming none version 2."""

    def two_versions(answer: genserve_pb2.ModelInfo) -> None:
        add_version_2(answer)
        answer.max_stream_images = limits[service.model_versions[-1] or "2"]

    describe_models(service, monkeypatch, two_versions)


def stream_sizes(service: FakeService, since: int = 0) -> list[tuple[str, int]]:
    """(version, images) of each SampleStream call from the `since`-th on."""
    return [(version, count - start) for version, start, count in service.stream_requests[since:]]


def test_a_resumed_job_fits_its_streams_to_the_max_stream_images_of_its_pinned_version(
    fake_server: FakeServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A resume asked GetModel for no version: a job pinned to version 1 (streams of at most 2 images)
    # took the max_stream_images of version 2, the one served by default, and opened streams of 4
    # (the server would refuse each INVALID_ARGUMENT).
    service = fake_server.service
    two_versions_with_stream_limits(service, monkeypatch, {"1": 2, "2": 1000})
    out = tmp_path / "job"
    run_job(fake_server.target, out, BulkParams("fake-gen", n=4, version="1"))
    assert stream_sizes(service) == [("1", 2), ("1", 2)]
    run_job(fake_server.target, out, BulkParams("fake-gen", n=8, version="1"))
    assert stream_sizes(service, 2) == [("1", 2), ("1", 2)]
    asked = len(service.stream_requests)
    code, _, err = cli_main(capsys, "--target", fake_server.target, "bulk", "--resume", str(out), "--n", "12")
    assert code == 0, err
    assert stream_sizes(service, asked) == [("1", 2), ("1", 2)]
    assert indices(out) == list(range(12))
    assert "" not in service.model_versions, service.model_versions


def test_a_job_refits_its_streams_to_the_max_stream_images_of_its_pinned_version_when_one_is_refused(
    fake_server: FakeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A stream refused INVALID_ARGUMENT: the worker asked GetModel for no version whether the limit
    # had come down (a restarted server), and read version 2's: version 1's, lowered from 4 to 2, was
    # not seen, and the job stopped on the refusal instead of refitting its streams.
    service = fake_server.service
    limits = {"1": 4, "2": 1000}
    two_versions_with_stream_limits(service, monkeypatch, limits)
    enter = service._enter

    def restarted_with_a_lower_limit(method: str, context: grpc.ServicerContext) -> None:
        if method == "SampleStream" and not service.calls["SampleStream"]:
            limits["1"] = 2
            service.fail["SampleStream"].append(grpc.StatusCode.INVALID_ARGUMENT)
        enter(method, context)

    monkeypatch.setattr(service, "_enter", restarted_with_a_lower_limit)
    out = tmp_path / "job"
    run_job(fake_server.target, out, BulkParams("fake-gen", n=8, version="1"))
    assert indices(out) == list(range(8))
    assert stream_sizes(service) == [("1", 2)] * 4
    assert "" not in service.model_versions, service.model_versions


# --- 2. one run per folder -----------------------------------------------------------------------


def test_a_second_run_on_the_same_folder_exits_at_once_naming_the_holder(
    fake_server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tmp_path.mkdir(exist_ok=True)
    job = ("--target", fake_server.target, "bulk", "--model", "fake-gen", "--n", "5", "--out", str(tmp_path))
    holder = JobLock(tmp_path)
    holder.acquire()  # another open file description: conflicts like another process would
    try:
        code, _, err = cli_main(capsys, *job)
        assert code == 3, err
        assert f"pid {os.getpid()} on host {socket.gethostname()}, started 20" in err
        assert str(tmp_path) in err
        assert fake_server.service.calls["SampleStream"] == 0
        with pytest.raises(bulk_module.BulkBusy):
            run_job(fake_server.target, tmp_path, BulkParams("fake-gen", n=5))
    finally:
        holder.release()
    code, _, err = cli_main(capsys, *job)
    assert code == 0, err  # released: the next run goes ahead


def test_client_md_quotes_the_message_a_second_run_on_a_folder_prints(
    fake_server: FakeServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """docs/client.md quoted `job/ is in use by another bulk run (...)`: the CLI names the folder
    as given to --out, with no slash added, and tells what to do next."""
    monkeypatch.chdir(tmp_path)
    Path("job").mkdir()
    holder = JobLock(Path("job"))
    holder.acquire()
    try:
        code, _, err = cli_main(capsys, "--target", fake_server.target, "bulk", "--model", "fake-gen",
                                "--n", "5", "--out", "job")  # fmt: skip
    finally:
        holder.release()
    assert code == 3, err
    docs = " ".join((Path(__file__).resolve().parents[2] / "docs" / "client.md").read_text().split())
    quoted = re.search(r"`(genserve-client: job[^`]* is in use by another bulk run[^`]*)`", docs)
    assert quoted is not None, "docs/client.md quotes no message of a second run"
    holder_text = re.compile(r"\(pid [^)]*\)")
    assert holder_text.sub("(HOLDER)", err.strip()) == holder_text.sub("(HOLDER)", quoted.group(1))


def test_a_run_started_beside_a_running_job_exits_3_even_while_that_job_writes_its_first_files(
    fake_server: FakeServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Two runs started at once on one folder: the first holds the lock and, between the second's
    # look for job.json and its listing of the folder, writes job.json and its first image.
    done, out = tmp_path / "done", tmp_path / "job"
    run_job(fake_server.target, done, BulkParams("fake-gen", n=5))
    out.mkdir()
    first = JobLock(out)
    first.acquire()
    real = bulk_module.foreign_entries

    def first_run_writes_meanwhile(folder: Path) -> list[str]:
        if not (out / "job.json").exists():
            (out / "images").mkdir(exist_ok=True)
            for name in ("job.json", "manifest.jsonl", "images/000000.png"):
                (out / name).write_bytes((done / name).read_bytes())
        return real(folder)

    monkeypatch.setattr(bulk_module, "foreign_entries", first_run_writes_meanwhile)
    try:
        job = ("--target", fake_server.target, "bulk", "--model", "fake-gen", "--n", "5", "--out", str(out))
        code, _, err = cli_main(capsys, *job)
        assert code == 3, err  # in use, not "a folder holding foreign files" (exit 2)
        assert "in use by another bulk run" in err and f"pid {os.getpid()}" in err
        assert fake_server.service.calls["SampleStream"] == 1  # the first job's own, none more
    finally:
        first.release()


def test_the_lock_is_held_while_the_job_runs(fake_server: FakeServer, tmp_path: Path) -> None:
    seen: list[str] = []

    def resolve(model: str, version: str) -> ServedModel:
        # Called inside run(), under the job's lock.
        try:
            JobLock(tmp_path).acquire()
        except bulk_module.BulkBusy as exc:
            seen.append(str(exc))
        return ServedModel("1", FAKE_SHA256)

    with GenserveClient(fake_server.target, retry=FAST_RETRY) as client:
        BulkJob(client, BulkParams("fake-gen", n=3), tmp_path).run(resolve)
    assert len(seen) == 1 and f"pid {os.getpid()}" in seen[0]


# --- 3. one model per job ------------------------------------------------------------------------


def test_resume_refuses_a_replaced_model_naming_both(
    fake_server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    t = finished_job(capsys, fake_server, tmp_path, 4)
    job = json.loads((tmp_path / "job.json").read_text())
    assert (job["params"]["model"], job["pinned_version"], job["model_sha256"]) == (
        "fake-gen",
        "1",
        FAKE_SHA256,
    )
    manifest = (tmp_path / "manifest.jsonl").read_bytes()
    fake_server.service.model_sha256 = OTHER_SHA256  # replaced in place, same version
    code, _, err = cli_main(capsys, *t, "bulk", "--resume", str(tmp_path), "--n", "8")
    assert code == 2, err
    assert FAKE_SHA256 in err and OTHER_SHA256 in err and "mix two models" in err
    fake_server.service.model_sha256 = FAKE_SHA256
    fake_server.service.version = "2"  # the old version is gone
    code, _, err = cli_main(capsys, *t, "bulk", "--resume", str(tmp_path), "--n", "8")
    assert code == 2, err
    assert "no version '1'" in err and "served: 2 (READY)" in err
    assert (tmp_path / "manifest.jsonl").read_bytes() == manifest
    assert fake_server.service.calls["SampleStream"] == 1


def test_a_resume_refuses_labels_the_served_model_no_longer_has_before_any_stream(
    fake_server: FakeServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A reload that leaves the job's version and model file but names fewer classes (its card's
    # class_names cut to 5): the resume's streams carried the job's labels 0..9 to a server that
    # refuses labels 5..9, once the run had begun. Refused before any stream, naming the job, the
    # label and the classes now served (exit 2, no resume hint), the job left as it was.
    import client_fakes

    t = ("--target", fake_server.target)
    code, _, err = cli_main(
        capsys, *t, "bulk", "--model", "fake-cond", "--labels", "all", "--n", "4", "--out", str(tmp_path)
    )
    assert code == 0, err
    # job.lock names each run (its pid and start time): the job's files are what must stay.
    before = {name: data for name, data in snapshot(tmp_path).items() if name != "job.lock"}
    monkeypatch.setattr(client_fakes, "FAKE_CLASSES", ["a", "b", "c", "d", "e"])
    code, _, err = cli_main(capsys, *t, "bulk", "--resume", str(tmp_path), "--n", "12")
    assert code == 2, err
    assert f"{tmp_path} is a job of 'fake-cond' version 1 with labels 0, 1, 2, ..., 9" in err, err
    assert "fake-cond has no class 5: its classes are [0, 5) (a, b, c, d, e)" in err, err
    assert "Traceback" not in err and "resumable" not in err, err
    assert fake_server.service.calls["SampleStream"] == 1  # the first run's
    assert {name: data for name, data in snapshot(tmp_path).items() if name != "job.lock"} == before
    with GenserveClient(fake_server.target, retry=FAST_RETRY) as client:
        with pytest.raises(BulkError, match=r"has no class 5: its classes are \[0, 5\)"):
            BulkJob(client, BulkParams("fake-cond", n=12, labels=tuple(range(10))), tmp_path).run()
    assert fake_server.service.calls["SampleStream"] == 1


def test_every_chunk_must_come_from_the_jobs_model_file(fake_server: FakeServer, tmp_path: Path) -> None:
    # GetModel still reports the old file, the stream already sends the new one's images.
    fake_server.service.model_sha256 = OTHER_SHA256
    with GenserveClient(fake_server.target, retry=FAST_RETRY) as client:
        job = BulkJob(client, BulkParams("fake-gen", n=5), tmp_path)
        with pytest.raises(BulkError, match=f"{FAKE_SHA256}.*{OTHER_SHA256}"):
            job.run(lambda model, version: ServedModel("1", FAKE_SHA256))
    assert not (tmp_path / "job.json").exists() and indices(tmp_path) == []


def test_a_resume_refuses_images_through_a_reloaded_mapping(
    fake_server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A style generator's images also depend on its mapping: a resume after the mapping was
    replaced (same generator file) would mix two sets of images in one job."""
    t = ("--target", fake_server.target)
    fake_server.service.used_models = [("fake-mapping", "1", FAKE_SHA256)]
    try:
        code, _, err = cli_main(capsys, *t, "bulk", "--model", "fake-gen", "--n", "4", "--out", str(tmp_path))
        assert code == 0, err
        job = json.loads((tmp_path / "job.json").read_text())
        assert job["used_models"] == {"fake-mapping": FAKE_SHA256}
        manifest = (tmp_path / "manifest.jsonl").read_bytes()
        fake_server.service.used_models = [("fake-mapping", "2", OTHER_SHA256)]
        code, _, err = cli_main(capsys, *t, "bulk", "--resume", str(tmp_path), "--n", "8")
        assert code == 2, err
        assert "fake-mapping changed" in err and "mix two models" in err
        assert (tmp_path / "manifest.jsonl").read_bytes() == manifest
        fake_server.service.used_models = [("fake-mapping", "1", FAKE_SHA256)]
        code, _, err = cli_main(capsys, *t, "bulk", "--resume", str(tmp_path), "--n", "8")
        assert code == 0, err
    finally:
        fake_server.service.used_models = []


def test_a_resume_refused_for_a_changed_mapping_names_its_digests_readably(
    fake_server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The refusal names the job's and the server's used models as name=digest, as the other
    refusals name their values, not as Python dicts."""
    t = ("--target", fake_server.target)
    service = fake_server.service
    weights, retrained = hashlib.sha256(b"weights").hexdigest(), hashlib.sha256(b"retrained").hexdigest()
    try:
        service.used_models = [("fake-mapping", "1", FAKE_SHA256)]
        service.used_weights_sha256 = {"fake-mapping": weights}
        code, _, err = cli_main(capsys, *t, "bulk", "--model", "fake-gen", "--n", "4", "--out", str(tmp_path))
        assert code == 0, err
        service.used_weights_sha256 = {"fake-mapping": retrained}
        code, _, err = cli_main(capsys, *t, "bulk", "--resume", str(tmp_path), "--n", "8")
        assert code == 2, err
        assert f"fake-mapping={weights}" in err and f"fake-mapping={retrained}" in err, err
        assert "{" not in err and "'" not in err, err
        service.used_models = [("fake-mapping", "2", OTHER_SHA256)]
        code, _, err = cli_main(capsys, *t, "bulk", "--resume", str(tmp_path), "--n", "8")
        assert code == 2, err
        assert f"fake-mapping={FAKE_SHA256}" in err and f"fake-mapping={OTHER_SHA256}" in err, err
        assert "{" not in err and "'" not in err, err
    finally:
        service.used_models = []
        service.used_weights_sha256 = {}


def test_a_bulk_job_pins_the_card_its_images_were_made_with(
    fake_server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A style generator's card.json (w_avg, output_range) shapes its images under the same graph
    and weights; the server reports its sha256 (Provenance/ModelVersionInfo card_sha256, and
    UsedModel's for a mapping). job.json pins them, and a resume whose server loaded another card
    stops naming both digests, nothing written; a job.json from before the field resumes (absent:
    not pinned) and records them from the first chunk that names them."""
    t = ("--target", fake_server.target)
    service = fake_server.service
    card, edited = hashlib.sha256(b"card").hexdigest(), hashlib.sha256(b"edited card").hexdigest()
    out = tmp_path / "job"
    job_file, manifest_file = out / "job.json", out / "manifest.jsonl"

    def resume(n: int) -> tuple[int, str]:
        code, _, err = cli_main(capsys, *t, "bulk", "--resume", str(out), "--n", str(n))
        return code, err

    try:
        service.card_sha256 = card
        service.used_models = [("fake-mapping", "1", FAKE_SHA256)]
        service.used_card_sha256 = {"fake-mapping": card}
        code, _, err = cli_main(capsys, *t, "bulk", "--model", "fake-gen", "--n", "4", "--out", str(out))
        assert code == 0, err
        job = json.loads(job_file.read_text())
        assert job["card_sha256"] == card and job["used_card_sha256"] == {"fake-mapping": card}, job
        manifest = manifest_file.read_bytes()
        # The model's card edited beside the same graph.
        service.card_sha256 = edited
        code, err = resume(8)
        assert code == 2, err
        assert f"card sha256 {card}" in err and f"card sha256 {edited}" in err, err
        assert "mix two models" in err and "resumable" not in err, err
        assert manifest_file.read_bytes() == manifest
        # The mapping's card edited.
        service.card_sha256 = card
        service.used_card_sha256 = {"fake-mapping": edited}
        code, err = resume(8)
        assert code == 2, err
        assert f"fake-mapping={card}" in err and f"fake-mapping={edited}" in err and "card" in err, err
        assert manifest_file.read_bytes() == manifest
        # A job.json written before card_sha256: not pinned, recorded from the first chunk.
        service.used_card_sha256 = {"fake-mapping": card}
        old = {k: v for k, v in job.items() if k not in ("card_sha256", "used_card_sha256")}
        job_file.write_text(json.dumps(old))
        code, err = resume(8)
        assert code == 0, err
        job = json.loads(job_file.read_text())
        assert job["card_sha256"] == card and job["used_card_sha256"] == {"fake-mapping": card}, job
        service.card_sha256 = edited
        code, err = resume(12)
        assert code == 2 and f"card sha256 {edited}" in err, err
    finally:
        service.card_sha256 = ""
        service.used_models = []
        service.used_card_sha256 = {}


# --- 4. --resume DIR -----------------------------------------------------------------------------


def test_a_job_resumes_across_a_server_upgrade_that_starts_reporting_the_mapping(
    fake_server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A server older than Provenance.used_models sends none (empty: not reported, as an empty
    sha256 is): a job it started resumes on the upgraded server, which names the mapping, and one
    the new server started resumes on an old replica; the models did not change."""
    t = ("--target", fake_server.target)
    upgraded, rolled_back = tmp_path / "upgraded", tmp_path / "rolled-back"
    try:
        for out, first, then in (
            (upgraded, [], [("fake-mapping", "1", FAKE_SHA256)]),
            (rolled_back, [("fake-mapping", "1", FAKE_SHA256)], []),
        ):
            fake_server.service.used_models = first
            code, _, err = cli_main(capsys, *t, "bulk", "--model", "fake-gen", "--n", "4", "--out", str(out))
            assert code == 0, err
            fake_server.service.used_models = then
            code, _, err = cli_main(capsys, *t, "bulk", "--resume", str(out), "--n", "8")
            assert code == 0, err
            assert indices(out) == list(range(8))
            assert json.loads((out / "job.json").read_text())["used_models"] == {"fake-mapping": FAKE_SHA256}
        # Once known, a mapping that does change is still refused.
        fake_server.service.used_models = [("fake-mapping", "2", OTHER_SHA256)]
        code, _, err = cli_main(capsys, *t, "bulk", "--resume", str(upgraded), "--n", "12")
        assert code == 2 and "fake-mapping changed" in err, err
    finally:
        fake_server.service.used_models = []


def test_resume_takes_every_setting_from_the_manifest_and_a_larger_n_grows_the_job(
    fake_server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    t = ("--target", fake_server.target)
    grown, clean = tmp_path / "grown", tmp_path / "clean"
    settings = ("--model", "fake-cond", "--labels", "3,7", "--seed", "100", "--chunk-size", "2")
    assert cli_main(capsys, *t, "bulk", *settings, "--n", "5", "--out", str(grown))[0] == 0
    code, _, err = cli_main(capsys, *t, "bulk", "--resume", str(grown), "--n", "11", "--concurrency", "2")
    assert code == 0, err
    assert cli_main(capsys, *t, "bulk", *settings, "--n", "11", "--out", str(clean))[0] == 0
    assert indices(grown) == list(range(11))
    assert snapshot(grown / "images") == snapshot(clean / "images")  # as if it had been one job
    entries = {e["index"]: e for e in read_manifest(grown / "manifest.jsonl")[0]}
    assert [(entries[i]["seed"], entries[i]["label"]) for i in (0, 1, 10)] == [(100, 3), (101, 7), (110, 3)]
    assert json.loads((grown / "job.json").read_text())["params"]["n"] == 11
    with Image.open(grown / entries[10]["file"]) as picture:  # each PNG says what it is
        assert picture.text == {  # type: ignore[attr-defined]
            "Software": "genserve-client",
            "index": "10",
            "seed": "110",
            "label": "3",
            "model": "fake-cond",
            "version": "1",
            "model_sha256": FAKE_SHA256,
        }
        np.testing.assert_array_equal(np.asarray(picture)[:, :, None], fake_pixels(110, 3))
    # A finished job resumes to nothing; settings that decide the output are refused, as is shrinking.
    assert cli_main(capsys, *t, "bulk", "--resume", str(grown))[0] == 0
    code, _, err = cli_main(capsys, *t, "bulk", "--resume", str(grown), "--seed", "5", "--format", "webp")
    assert code == 2 and "drop --seed, --format" in err
    code, _, err = cli_main(capsys, *t, "bulk", "--resume", str(grown), "--n", "4")
    assert code == 2 and "can only grow it" in err
    # Repeating the command resumes while its --n is the job's size (docs/client.md); the original
    # command of a job since grown is refused: resumed to 5 images it would leave the job unfinished.
    code, _, err = cli_main(capsys, *t, "bulk", *settings, "--n", "5", "--out", str(grown))
    assert code == 2 and "is a job of 11 images: --n can only grow it, got 5" in err, err
    code, _, err = cli_main(capsys, *t, "bulk", *settings, "--n", "11", "--out", str(grown))
    assert code == 0, err
    code, _, err = cli_main(capsys, *t, "bulk", "--resume", str(tmp_path / "nothing"))
    assert code == 2 and "holds no bulk job" in err
    code, _, err = cli_main(capsys, *t, "bulk", "--model", "fake-gen", "--out", str(tmp_path / "x"))
    assert code == 2 and "bulk needs --n" in err


# A bulk run that SIGKILLs itself once the temp file of its next durable write (job.json, the
# manifest) is written and fsynced, just before renaming it into place: what kill -9 leaves there.
KILLED_BEFORE_RENAME = """
import os, signal, sys
from genserve_client import bulk
from genserve_client.__main__ import main

victim = sys.argv.pop(1)
real_replace = os.replace
def replace(src, dst, *args, **kwargs):
    if os.path.basename(dst) == victim:
        os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst, *args, **kwargs)

bulk.os.replace = replace
sys.exit(main())
"""


def test_a_run_killed_while_renaming_job_json_leaves_no_temp_file_once_resumed(
    fake_server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A grown job killed between job.json's temp file and its rename left OUT/.tmp-job.json; the
    # resume that finished the job at its recorded size kept it there for good, beside a finished job.
    t = ("--target", fake_server.target)
    out = tmp_path / "job"
    settings = ("--model", "fake-cond", "--labels", "3,7", "--seed", "100", "--chunk-size", "2")
    assert cli_main(capsys, *t, "bulk", *settings, "--n", "5", "--out", str(out))[0] == 0
    grow = ("bulk", "--resume", str(out), "--n", "9")
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_BEFORE_RENAME, "job.json", *t, *grow],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert killed.returncode == -9, killed.stderr
    assert (out / ".tmp-job.json").is_file()  # what the kill left
    code, _, err = cli_main(capsys, *t, "bulk", "--resume", str(out))
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["images", "job.json", "job.lock", "manifest.jsonl"]
    assert indices(out) == list(range(5)) and len(list((out / "images").iterdir())) == 5


# --- 5. outages: a retry window, then the command that resumes ----------------------------------


@pytest.fixture
def quick_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bulk_module, "BACKOFF_INITIAL_S", 0.01)
    monkeypatch.setattr(bulk_module, "BACKOFF_MAX_S", 0.05)


@pytest.mark.usefixtures("quick_backoff")
def test_the_job_outlasts_the_clients_own_retries(fake_server: FakeServer, tmp_path: Path) -> None:
    # 20 failures in a row: the client gives up every 3 attempts, the job reopens the stream.
    fake_server.service.fail["SampleStream"] = [grpc.StatusCode.UNAVAILABLE] * 20
    run_job(fake_server.target, tmp_path, BulkParams("fake-gen", n=6), retry_window_s=30.0)
    assert indices(tmp_path) == list(range(6))
    assert fake_server.service.calls["SampleStream"] == 21


@pytest.mark.usefixtures("quick_backoff")
def test_after_the_window_the_job_stops_and_prints_the_command_that_resumes(
    fake_server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    t = finished_job(capsys, fake_server, tmp_path, 3)
    refuse_every_stream(fake_server)
    code, _, err = cli_main(
        capsys,
        "bulk",
        "--resume",
        str(tmp_path),
        "--n",
        "7",
        "--retry-window",
        "0.3",
        "--concurrency",
        "2",
        *t,
    )
    assert code == 1, err
    assert "gave up after retrying for 0.3 s" in err and "UNAVAILABLE" in err
    hint = err.split("the job is resumable: ")[1].strip()
    assert hint == shlex.join(
        ["genserve-client", "--target", fake_server.target, "bulk", "--resume", str(tmp_path), "--n", "7"]
        + ["--concurrency", "2", "--retry-window", "0.3"]
    )
    # job.json still holds the finished job of 3 until the server accepts a chunk of the new range.
    assert json.loads((tmp_path / "job.json").read_text())["params"]["n"] == 3
    # The printed command, run as is, finishes the job.
    serve_streams_again(fake_server)
    run_the_resume_hint(capsys, hint, tmp_path, 7)


@pytest.mark.usefixtures("quick_backoff")
def test_the_resume_hint_of_a_job_in_a_non_ascii_folder_names_it_under_a_c_locale(
    fake_server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Under a locale that is not UTF-8 (LANG=C, Python's UTF-8 mode and locale coercion off) Python
    holds a non-ASCII path's bytes as lone surrogates, and stderr wrote them as \\udcc3: the hint
    said `--resume 'r\\udcc3\\udca9sultats'`, a folder that does not exist. Its bytes are written
    as they came, so the hint, pasted as is, resumes the job."""
    out = tmp_path / "résultats ö"
    t = finished_job(capsys, fake_server, out, 2)
    refuse_every_stream(fake_server)
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONCOERCECLOCALE": "0", "PYTHONUTF8": "0"}
    env.pop("PYTHONIOENCODING", None)
    resume = ("bulk", "--resume", str(out), "--n", "4", "--retry-window", "0.3")
    done = subprocess.run(
        [sys.executable, "-m", "genserve_client", *t, *resume], capture_output=True, env=env, timeout=120
    )
    err = done.stderr.decode("utf-8", "backslashreplace")
    assert done.returncode == 1, err
    hint = err.split("the job is resumable: ")[1].strip()
    assert hint == shlex.join(["genserve-client", *t, *resume]), err
    serve_streams_again(fake_server)
    run_the_resume_hint(capsys, hint, out, 4)


@pytest.mark.usefixtures("quick_backoff")
def test_the_resume_hint_of_a_job_given_a_literal_token_says_to_set_the_variable_it_names(
    fake_server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The hint printed --token "$GENSERVE_TOKEN" (never the token), but the CLI reads no such
    variable and nothing told the user to set it: pasted as is, it sent an empty token. A line after
    it says to set GENSERVE_TOKEN to the token given with --token, still without the token; a
    --token-file is repeated as given, with no such line."""
    secret = "s3cret-T_1"
    t = finished_job(capsys, fake_server, tmp_path, 2)
    refuse_every_stream(fake_server)
    resume = ("bulk", "--resume", str(tmp_path), "--n", "4", "--retry-window", "0.3")
    code, _, err = cli_main(capsys, *t, "--token", secret, *resume)
    assert code == 1, err
    assert secret not in err, err
    hint_line, *rest = err.split("the job is resumable: ")[1].splitlines()
    assert '--token "$GENSERVE_TOKEN"' in hint_line, err
    assert any("GENSERVE_TOKEN" in line and "--token" in line and "set" in line for line in rest), err
    token_file = tmp_path.parent / "token"
    token_file.write_text(secret + "\n")
    code, _, err = cli_main(capsys, *t, "--token-file", str(token_file), *resume)
    assert code == 1, err
    assert secret not in err and "GENSERVE_TOKEN" not in err, err
    assert shlex.join(["--token-file", str(token_file)]) in err, err


@pytest.mark.usefixtures("quick_backoff")
def test_a_new_job_cut_before_its_first_chunk_says_to_repeat_the_command_and_the_same_command_starts_it(
    fake_server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Every stream cut before its first chunk (a server shutting down): the job leaves an empty
    # manifest and job.lock but no job.json (written at the first chunk), so no --resume hint can be
    # given; it gave up saying nothing of what to do.
    out = tmp_path / "job"
    refuse_every_stream(fake_server)
    command = ("--target", fake_server.target, "bulk", "--model", "fake-gen", "--n", "3", "--out", str(out))
    code, _, err = cli_main(capsys, *command, "--retry-window", "0.3")
    assert code == 1, err
    assert "gave up after retrying for 0.3 s" in err
    assert not (out / "job.json").exists()
    assert "no image of the job was written: run the same command again to start it" in err, err
    # The same command starts it: its leftovers (the lock, an empty manifest) do not block it.
    serve_streams_again(fake_server)
    code, _, err = cli_main(capsys, *command)
    assert code == 0, err
    assert indices(out) == list(range(3))


def _without_root_privileges() -> list[str]:
    """A command prefix under which file permissions bind (root writes into a read-only folder);
    [] when not root. Root without its capabilities (setpriv), still the owner of pytest's tmp_path."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv to run the CLI without root's capabilities")
    return ["setpriv", "--bounding-set=-all", "--inh-caps=-all"]


def test_a_job_in_a_folder_it_cannot_write_says_so_and_not_to_run_the_same_resume(
    fake_server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A finished job's folder made read-only (archived, a read-only mount): resuming it failed on
    # job.lock with "Permission denied", then printed "the job is resumable: <the same command>",
    # which fails the same way: a loop for the user.
    out = tmp_path / "job"
    t = finished_job(capsys, fake_server, out, 3)
    (out / "job.lock").unlink()  # as a copy or an archive of the folder holds none
    for path in (out / "images", out):
        path.chmod(0o555)
    try:
        proc = subprocess.run(
            [*_without_root_privileges(), sys.executable, "-m", "genserve_client", *t, "bulk",
             "--resume", str(out)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    finally:
        for path in (out, out / "images"):
            path.chmod(0o755)
    assert proc.returncode == 1, proc.stderr
    assert f"{out} is not writable" in proc.stderr and "Permission denied" in proc.stderr, proc.stderr
    assert "the job is resumable" not in proc.stderr, proc.stderr
    assert f"genserve-client verify {out}" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert indices(out) == list(range(3))


def test_the_window_never_retries_a_rejected_request(fake_server: FakeServer, tmp_path: Path) -> None:
    fake_server.service.fail["SampleStream"] = [grpc.StatusCode.INVALID_ARGUMENT]
    with pytest.raises(Exception, match="INVALID_ARGUMENT"):
        run_job(fake_server.target, tmp_path, BulkParams("fake-gen", n=3), retry_window_s=60.0)
    assert fake_server.service.calls["SampleStream"] == 1


# --- shards: one job split by seed range, each resumable on its own, verified as a whole --------


def test_shard_parsing() -> None:
    assert Shard.parse("1/4", {}) == Shard(1, 4)
    assert Shard.parse("4", {"JOB_COMPLETION_INDEX": "3"}) == Shard(3, 4)
    for bad in ("4", "4/4", "-1/2", "a/b", "1/0"):
        with pytest.raises(ValueError, match="--shard"):
            Shard.parse(bad, {})
    ranges = [Shard(i, 3).range(10) for i in range(3)]
    assert ranges == [(0, 3), (3, 6), (6, 10)]


def test_shards_tile_the_job_and_verify_checks_the_union(
    fake_server: FakeServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    t = ("--target", fake_server.target)
    sharded, whole = tmp_path / "sharded", tmp_path / "whole"
    job = (
        "bulk",
        "--model",
        "fake-cond",
        "--labels",
        "1,2,3",
        "--seed",
        "40",
        "--n",
        "11",
        "--chunk-size",
        "2",
    )
    assert cli_main(capsys, *t, *job, "--out", str(whole))[0] == 0
    assert cli_main(capsys, *t, *job, "--out", str(sharded), "--shard", "0/3")[0] == 0
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "1")  # as in a pod of an Indexed Job
    code, out, err = cli_main(capsys, *t, *job, "--out", str(sharded), "--shard", "3")
    assert code == 0, err
    assert "shard 1/3, images [3, 7) of 11" in out
    code, _, err = cli_main(capsys, "verify", str(sharded))
    assert code == 1
    assert "shards missing of 3 (1): 2" in err and "indices missing (4): 7, 8, 9, 10" in err
    # A shard's folder is a job of its own: it resumes (here: finishes) by itself.
    fake_server.service.stream_breaks_after_chunks = [0] * 3  # a flaky start changes nothing
    assert cli_main(capsys, *t, *job, "--out", str(sharded), "--shard", "2/3")[0] == 0
    last = sharded / "shard-00002-of-00003"
    (last / "images" / "000009.png").unlink()
    assert cli_main(capsys, "verify", str(sharded))[0] == 1  # a file gone
    code, _, err = cli_main(capsys, *t, "bulk", "--resume", str(last))
    assert code == 0, err
    merged = tmp_path / "merged.jsonl"
    code, out, err = cli_main(capsys, "verify", str(sharded), "--hashes", "--manifest-out", str(merged))
    assert code == 0, err
    assert "complete, 11 images in 3 folder(s)" in out
    # The union is the one-folder job: same entries, same bytes.
    reference = {e["index"]: e for e in read_manifest(whole / "manifest.jsonl")[0]}
    for entry in (json.loads(line) for line in merged.read_text().splitlines()):
        shard_folder, _, file = entry["file"].partition("/")
        assert {**entry, "file": file} == reference[entry["index"]]
        assert (sharded / entry["file"]).read_bytes() == (whole / file).read_bytes()
    assert cli_main(capsys, "verify", str(whole))[0] == 0
    # A sharded job cannot grow, and --resume takes the shard from the manifest.
    code, _, err = cli_main(capsys, *t, "bulk", "--resume", str(last), "--n", "20")
    assert code == 2 and "cannot grow" in err
    code, _, err = cli_main(capsys, *t, "bulk", "--resume", str(last), "--shard", "1/3")
    assert code == 2 and "drop --shard" in err
    # A damaged file is found with --hashes.
    (last / "images" / "000010.png").write_bytes(b"damaged")
    code, _, err = cli_main(capsys, "verify", str(sharded), "--hashes")
    assert code == 1 and "sha256 differs" in err and "000010.png" in err


def test_a_shard_without_images_is_a_finished_shard(
    fake_server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    t = ("--target", fake_server.target)
    for i in range(3):
        code, _, err = cli_main(
            capsys, *t, "bulk", "--model", "fake-gen", "--n", "2", "--out", str(tmp_path), "--shard", f"{i}/3"
        )
        assert code == 0, err
    code, out, err = cli_main(capsys, "verify", str(tmp_path))
    assert code == 0, err
    assert "complete, 2 images in 3 folder(s)" in out


@pytest.mark.usefixtures("quick_backoff")
def test_a_job_waits_for_a_server_that_is_not_up_yet(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], server_port: int
) -> None:
    # Connection refused (UNAVAILABLE) at the start, as during a server restart; the server comes
    # up on the same port 1.5 s later and the job finishes. The port is held (server_port) till
    # then: no one else's server answers there meanwhile, nor takes it from this one.
    port = server_port
    service = FakeService()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    genserve_pb2_grpc.add_GenerationServiceServicer_to_server(service, server)
    starter = threading.Timer(1.5, lambda: (server.add_insecure_port(f"127.0.0.1:{port}"), server.start()))
    starter.start()
    try:
        code, _, err = cli_main(
            capsys,
            "bulk",
            "--target",
            f"127.0.0.1:{port}",
            "--model",
            "fake-cond",
            "--n",
            "4",
            "--out",
            str(tmp_path),
        )
        assert code == 0, err
    finally:
        starter.cancel()
        server.stop(grace=None)
    assert indices(tmp_path) == [0, 1, 2, 3]
    assert service.calls["GetModel"] >= 1


# --- 6. a worker that stops on an unexpected error ----------------------------------------------


def test_an_unexpected_error_in_a_worker_fails_the_job_and_it_resumes(
    fake_server: FakeServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Not a failed call, a BulkError or an OSError: a bug inside the worker thread at image 6.
    real = bulk_module.with_png_text

    def broken(data: bytes, text: dict[str, str]) -> bytes:
        if text.get("index") == "6":
            raise RuntimeError("injected bug")
        return real(data, text)

    monkeypatch.setattr(bulk_module, "with_png_text", broken)
    t = ("--target", fake_server.target)
    job = ("bulk", "--model", "fake-gen", "--n", "10", "--chunk-size", "2", "--concurrency", "2")
    code, out, err = cli_main(capsys, *t, *job, "--out", str(tmp_path))
    assert code == 1, (out, err)
    assert "10 images" not in out  # no success line
    assert "unexpected error" in err and "RuntimeError: injected bug" in err and "Traceback" not in err
    assert 6 not in indices(tmp_path)
    hint = err.split("the job is resumable: ")[1].strip()
    monkeypatch.setattr(bulk_module, "with_png_text", real)
    code, out, err = cli_main(capsys, *shlex.split(hint)[1:])
    assert code == 0, err
    assert indices(tmp_path) == list(range(10))


@pytest.mark.parametrize("victim", ["images/.tmp-000006.png", "manifest.jsonl"])
def test_a_full_disk_stops_the_job_naming_the_file_it_was_writing_and_it_resumes(
    fake_server: FakeServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    victim: str,
) -> None:
    # ENOSPC where a full disk raises it (an image's temp file, the manifest's append): the OS's
    # write and fsync errors name no file.
    real_fsync = os.fsync

    def disk_full(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}") == str(tmp_path / victim):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", disk_full)
    t = ("--target", fake_server.target)
    job = ("bulk", "--model", "fake-gen", "--n", "10", "--chunk-size", "2", "--concurrency", "2")
    code, out, err = cli_main(capsys, *t, *job, "--out", str(tmp_path))
    assert code == 1, (out, err)
    assert "10 images" not in out  # no success line
    assert f"No space left on device: '{tmp_path / victim}'" in err, err
    assert "Traceback" not in err
    assert len(indices(tmp_path)) < 10 and (tmp_path / "job.json").is_file()
    hint = err.split("the job is resumable: ")[1].strip()
    monkeypatch.setattr(os, "fsync", real_fsync)
    code, out, err = cli_main(capsys, *shlex.split(hint)[1:])
    assert code == 0, err
    assert indices(tmp_path) == list(range(10))  # each image once
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == [f"{i:06d}.png" for i in range(10)]


def test_an_image_write_that_fails_on_a_full_disk_leaves_no_temp_file_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk failing an image's write left its partial .tmp- file there (taking the space
    the user must free) until the next run's recovery; the error still names it."""
    real_fsync = os.fsync

    def disk_full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match=re.escape(str(tmp_path / ".tmp-000006.png"))):
        bulk_module.write_file_durably(tmp_path / "000006.png", b"x" * 4096)
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert list(tmp_path.iterdir()) == []


def test_a_link_at_an_images_temp_name_is_not_written_through_on_resume(
    fake_server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Recovery leaves a symlink at a `.tmp-` name (it removes only files), and the image's write
    opened that name with a plain "wb": the image went into the file the link points to, outside
    the job's folder, and the link was renamed into images/ as the image."""
    out = tmp_path / "job"
    t = finished_job(capsys, fake_server, out, 4)
    victim = tmp_path / "notes.txt"
    victim.write_bytes(b"the user's notes")
    (out / "images" / "000003.png").unlink()  # lost behind the job's back: redone on resume
    (out / "images" / ".tmp-000003.png").symlink_to(victim)
    code, _, err = cli_main(capsys, *t, "bulk", "--resume", str(out))
    assert code == 0, err
    assert victim.read_bytes() == b"the user's notes", "the image was written through the link"
    image = out / "images" / "000003.png"
    assert not image.is_symlink() and image.read_bytes().startswith(b"\x89PNG")


def test_a_link_at_job_lock_is_refused_and_its_target_left_as_it_was(
    fake_server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """job.lock was opened with a plain create-if-missing open: a symlink at OUT/job.lock (a copied
    or shared job folder) had the file it points to truncated and overwritten with the holder's line."""
    out = tmp_path / "job"
    t = finished_job(capsys, fake_server, out, 4)
    victim = tmp_path / "notes.txt"
    victim.write_bytes(b"the user's notes")
    (out / "job.lock").unlink()
    (out / "job.lock").symlink_to(victim)
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "job.lock").symlink_to(victim)
    for args in (("--resume", str(out)), ("--model", "fake-gen", "--n", "4", "--out", str(fresh))):
        code, _, err = cli_main(capsys, *t, "bulk", *args)
        assert code == 2, err
        lock = Path(args[1] if args[0] == "--resume" else args[-1]) / "job.lock"
        assert f"{lock} is a symbolic link" in err, err
        assert "Traceback" not in err
        assert victim.read_bytes() == b"the user's notes", "the lock's line was written through the link"
        assert lock.is_symlink()
    assert not (fresh / "images").exists() and sorted(p.name for p in fresh.iterdir()) == ["job.lock"]


def test_a_job_whose_manifest_is_removed_while_it_runs_stops_instead_of_reporting_success(
    fake_server: FakeServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # An `rm -rf job/` (or a clean-up of the manifest) racing the job: the job went on appending to
    # the deleted file and ended with exit 0 and "job/: 10 images, manifest job/manifest.jsonl",
    # a manifest that no longer existed.
    out = tmp_path / "job"
    real_append = Manifest.append

    def append_then_removed(self: Manifest, entries: Any) -> None:
        real_append(self, entries)
        (out / "manifest.jsonl").unlink(missing_ok=True)

    monkeypatch.setattr(Manifest, "append", append_then_removed)
    t = ("--target", fake_server.target)
    job = ("bulk", "--model", "fake-gen", "--n", "10", "--chunk-size", "2")
    code, stdout, err = cli_main(capsys, *t, *job, "--out", str(out))
    assert code == 1, (stdout, err)
    assert "10 images" not in stdout  # no success line
    assert str(out / "manifest.jsonl") in err and "removed" in err, err
    assert "Traceback" not in err
    # The job stopped at the append that found it gone, and it resumes from what is on disk.
    monkeypatch.setattr(Manifest, "append", real_append)
    hint = err.split("the job is resumable: ")[1].strip()
    code, _, err = cli_main(capsys, *shlex.split(hint)[1:])
    assert code == 0, err
    assert indices(out) == list(range(10))


def test_a_job_whose_folder_is_moved_away_while_it_runs_does_not_say_no_image_was_written(
    fake_server: FakeServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The folder moved (or removed) under a running job: its next write failed (ENOENT), and with no
    # job.json left at --out the job said "no image of the job was written: run the same command
    # again to start it", though it had written images (now in the moved folder).
    out, moved = tmp_path / "job", tmp_path / "moved"
    real_append = Manifest.append

    def append_then_moved(self: Manifest, entries: Any) -> None:
        real_append(self, entries)
        if out.exists():
            out.rename(moved)

    monkeypatch.setattr(Manifest, "append", append_then_moved)
    t = ("--target", fake_server.target)
    job = ("bulk", "--model", "fake-gen", "--n", "10", "--chunk-size", "2")
    code, stdout, err = cli_main(capsys, *t, *job, "--out", str(out))
    assert code == 1, (stdout, err)
    assert "10 images" not in stdout
    assert "no image of the job was written" not in err, err
    assert f"{out / 'job.json'} is gone" in err, err
    assert "Traceback" not in err
    assert len(indices(moved)) >= 2
    # What it wrote resumes where the folder is now.
    monkeypatch.setattr(Manifest, "append", real_append)
    code, _, err = cli_main(capsys, *t, "bulk", "--resume", str(moved))
    assert code == 0, err
    assert indices(moved) == list(range(10))


def test_a_full_disk_when_the_job_takes_its_lock_names_the_lock_file(
    fake_server: FakeServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A run on a full disk fails first writing its holder into job.lock: the error was a bare
    # "[Errno 28] No space left on device", naming no file, where a full disk names what it wrote.
    out = tmp_path / "job"
    t = ("--target", fake_server.target)
    job = ("bulk", "--model", "fake-gen", "--n", "4", "--out", str(out))
    assert cli_main(capsys, *t, *job)[0] == 0

    write = os.write

    def disk_full(fd: int, data: bytes) -> int:
        if data.startswith(b'{"pid"'):  # the holder's line
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write(fd, data)

    monkeypatch.setattr(os, "write", disk_full)
    for args in (job, ("bulk", "--resume", str(out))):
        code, _, err = cli_main(capsys, *t, *args)
        assert code == 1, err
        assert f"No space left on device: '{out / 'job.lock'}'" in err, err
        assert "Traceback" not in err
    monkeypatch.undo()
    code, _, err = cli_main(capsys, *t, "bulk", "--resume", str(out))  # the lock was released
    assert code == 0, err
    assert indices(out) == list(range(4))


def test_a_job_is_finished_only_when_every_image_is_listed(
    fake_server: FakeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A worker that returns without its range and without an error (a bug) must not pass for done.
    real = BulkJob._run_range

    def loses_a_stream(self: BulkJob, start: int, stop: int, sink: Any) -> None:
        if start != 5:
            real(self, start, stop, sink)

    monkeypatch.setattr(BulkJob, "_run_range", loses_a_stream)
    with pytest.raises(BulkIncomplete, match=r"5 images missing, index ranges \[5, 10\)"):
        run_job(fake_server.target, tmp_path, BulkParams("fake-gen", n=10), stream_images=5)
    assert indices(tmp_path) == list(range(5))
    monkeypatch.setattr(BulkJob, "_run_range", real)
    run_job(fake_server.target, tmp_path, BulkParams("fake-gen", n=10))
    assert indices(tmp_path) == list(range(10))


def test_an_images_path_that_is_a_file_is_named_and_no_resume_hint_is_printed(
    fake_server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """OUT/images replaced by a regular file failed the run with a bare '[Errno 17] File exists',
    naming nothing, then printed a 'resumable' hint that failed the same way."""
    t = finished_job(capsys, fake_server, tmp_path, 4)
    shutil.rmtree(tmp_path / "images")
    (tmp_path / "images").write_text("not a folder")
    code, _, err = cli_main(capsys, *t, "bulk", "--resume", str(tmp_path))
    assert code == 2 and "Traceback" not in err, err
    assert f"{tmp_path / 'images'} is a file, not a folder" in err, err
    assert "resumable" not in err and "File exists" not in err
    assert (tmp_path / "images").read_text() == "not a folder"  # left alone


def test_a_manifest_whose_lines_were_pasted_twice_resumes_and_a_conflicting_duplicate_names_its_lines(
    fake_server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A manifest holding its own lines twice (pasted, concatenated) was refused with 'index N is out of
    range or listed twice', no line and no way on: identical lines list the same image, so the resume
    keeps one of each; a line listing an index again differently names both lines and what to do."""
    t = finished_job(capsys, fake_server, tmp_path, 6)
    manifest = tmp_path / "manifest.jsonl"
    lines = manifest.read_text().splitlines(keepends=True)
    manifest.write_text("".join(lines + lines))
    code, _, err = cli_main(capsys, *t, "bulk", "--resume", str(tmp_path), "--verify")
    assert code == 0, err
    assert manifest.read_text() == "".join(lines)
    entry = json.loads(lines[2])
    entry["sha256"] = OTHER_SHA256
    manifest.write_text("".join([*lines, json.dumps(entry) + "\n"]))
    code, _, err = cli_main(capsys, *t, "bulk", "--resume", str(tmp_path))
    assert code == 2 and "Traceback" not in err, err
    assert f"{manifest}:7: index {entry['index']} is listed again, differently from line 3" in err, err
    assert "verify" in err
    assert manifest.read_text() == "".join([*lines, json.dumps(entry) + "\n"])  # left as it was


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (a device that is always full)")
def test_a_manifest_whose_append_failed_on_a_full_disk_closes_without_raising_again() -> None:
    """The entries a failed append left in the manifest's buffer failed again in close(), in the job's
    cleanup: that error (again ENOSPC) replaced the job's own and skipped closing the channels."""
    manifest = Manifest(Path("/dev/full"))
    with pytest.raises(OSError) as excinfo:
        manifest.append([{"index": 0, "file": "000000.png"}])
    assert excinfo.value.errno == errno.ENOSPC and "/dev/full" in str(excinfo.value)
    manifest.close()  # the job's error is the append's; nothing raised here


# A stand-in for Windows' msvcrt.locking (per-process: enough for two JobLocks in one process).
_WINDOWS_WITHOUT_FCNTL = """
import errno, os, sys, types
from pathlib import Path
sys.modules["fcntl"] = None  # Windows has no fcntl
del os.pwrite  # nor os.pwrite
import genserve_client.cli  # the CLI imports bulk
# After the imports: the standard library's own take a msvcrt module or win32 for Windows.
sys.platform = "win32"
held = set()
def locking(fd, mode, nbytes):
    key = (os.fstat(fd).st_ino, os.lseek(fd, 0, os.SEEK_CUR), nbytes)
    if mode == msvcrt.LK_UNLCK:
        held.discard(key)
    elif key in held:
        raise OSError(errno.EACCES, "Permission denied")
    else:
        held.add(key)
msvcrt = types.ModuleType("msvcrt")
msvcrt.LK_NBLCK, msvcrt.LK_UNLCK, msvcrt.locking = 2, 0, locking
sys.modules["msvcrt"] = msvcrt
real_open = os.open
def windows_open(path, flags, *args, **kwargs):
    if os.path.isdir(path):  # Windows opens no directory with os.open
        raise PermissionError(errno.EACCES, "Permission denied", str(path))
    return real_open(path, flags, *args, **kwargs)
os.open = windows_open
"""
_TAKE_THE_LOCK_TWICE = """
from genserve_client.bulk import BulkBusy, JobLock
out = Path(sys.argv[1])
JobLock(out).acquire()
try:
    JobLock(out).acquire()
except BulkBusy as exc:
    print(exc)
"""


def test_the_cli_imports_and_a_bulk_job_takes_its_lock_where_there_is_no_fcntl(tmp_path: Path) -> None:
    """On Windows (no fcntl, no os.pwrite) `import genserve_client.cli` failed with
    ModuleNotFoundError: every genserve-client command did, as bulk.py imported fcntl at its top.
    The CLI imports there, and a bulk job's lock is taken with msvcrt.locking: a second run on the
    folder is refused naming the holder, as under flock."""
    proc = subprocess.run(
        [sys.executable, "-c", _WINDOWS_WITHOUT_FCNTL + _TAKE_THE_LOCK_TWICE, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "is in use by another bulk run" in proc.stdout, proc.stdout
    assert f"on host {socket.gethostname()}" in proc.stdout, proc.stdout


def test_a_bulk_job_runs_and_resumes_where_directories_cannot_be_opened(
    fake_server: FakeServer, tmp_path: Path
) -> None:
    """A job fsyncs images/ after its renames and the job folder after job.json, opening the folder
    with os.open, which Windows refuses for a directory (PermissionError): every bulk job there
    stopped at its first chunk. Where directories cannot be opened (Windows, whose NTFS journals a
    rename itself), there is no folder fsync; the job runs, and a rerun finds it complete."""
    out = tmp_path / "job"
    job = f"""
from genserve_client.cli import main
sys.exit(main(["--target", {fake_server.target!r}, "bulk", "--model", "fake-gen", "--n", "5",
               "--out", {str(out)!r}]))
"""
    for _ in range(2):
        proc = subprocess.run(
            [sys.executable, "-c", _WINDOWS_WITHOUT_FCNTL + job], capture_output=True, text=True, timeout=60
        )
        assert proc.returncode == 0, proc.stderr
        assert indices(out) == list(range(5))
