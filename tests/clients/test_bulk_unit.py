"""Bulk job: manifest recovery, range sharding, parameter pinning, and runs against the fake server."""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import socket
import threading
import time
import tracemalloc
from collections.abc import Iterable, Iterator
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest
from client_fakes import FAKE_SHA256, FakeServer, FakeService, cli_main, fake_pixels, run_cli
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

import genserve_client.bulk as bulk_module
import genserve_client.channel as channel_module
from genserve.v1 import genserve_pb2, genserve_pb2_grpc
from genserve_client import GenserveClient, GenserveClientError, RetryPolicy
from genserve_client.bulk import (
    BulkError,
    BulkJob,
    BulkParams,
    missing_ranges,
    plan_streams,
    read_manifest,
    served_model,
)
from genserve_client.channelpool import FreshChannels
from genserve_client.cli import card

FAST_RETRY = RetryPolicy(max_attempts=6, initial_backoff_s=0.001, max_backoff_s=0.01)


def entry(index: int, data: bytes = b"x") -> dict[str, object]:
    return {"file": f"images/{index:06d}.png", "index": index, "sha256": hashlib.sha256(data).hexdigest()}


def write_lines(path: Path, entries: list[dict[str, object]], tail: bytes = b"") -> None:
    path.write_bytes(b"".join(json.dumps(e).encode() + b"\n" for e in entries) + tail)


def test_torn_last_line_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "manifest.jsonl"
    write_lines(path, [entry(0), entry(1)], tail=b'{"file": "images/000002.p')
    entries, intact = read_manifest(path)
    assert [e["index"] for e in entries] == [0, 1]
    assert intact == path.read_bytes().rfind(b"\n") + 1


def test_corrupt_complete_line_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "manifest.jsonl"
    path.write_bytes(json.dumps(entry(0)).encode() + b"\nnot json\n" + json.dumps(entry(2)).encode() + b"\n")
    with pytest.raises(BulkError, match=":2: corrupt"):
        read_manifest(path)


def test_recover_truncates_torn_tail_and_removes_orphans(tmp_path: Path) -> None:
    job = BulkJob(GenserveClient("127.0.0.1:1"), BulkParams("m", n=10), tmp_path)
    images = tmp_path / "images"
    images.mkdir()
    for i in (0, 1, 2, 3):  # 3 is an orphan: its manifest line was torn
        (images / f"{i:06d}.png").write_bytes(b"x")
    (images / ".tmp-000004.png").write_bytes(b"half")
    write_lines(tmp_path / "manifest.jsonl", [entry(0), entry(1), entry(2)], tail=b'{"index": 3, "fi')
    done = job.recover()
    assert sorted(done) == [0, 1, 2]
    assert sorted(p.name for p in images.iterdir()) == ["000000.png", "000001.png", "000002.png"]
    assert (tmp_path / "manifest.jsonl").read_bytes().endswith(b"\n")
    # A listed file that vanished is forgotten (and so regenerated), the manifest rewritten without it.
    (images / "000001.png").unlink()
    assert sorted(job.recover()) == [0, 2]
    assert [e["index"] for e in read_manifest(tmp_path / "manifest.jsonl")[0]] == [0, 2]


def test_a_manifest_line_one_past_the_jobs_last_index_is_refused_naming_the_line(tmp_path: Path) -> None:
    # A job of n=3 has indices 0, 1 and 2: index 2 (its last) is the job's, index 3 another job's
    # (a manifest from a larger job copied over it), refused naming its line, not a traceback.
    job = BulkJob(GenserveClient("127.0.0.1:1"), BulkParams("m", n=3), tmp_path)
    (tmp_path / "images").mkdir()
    for i in (0, 2):
        (tmp_path / "images" / f"{i:06d}.png").write_bytes(b"x")
    write_lines(tmp_path / "manifest.jsonl", [entry(0), entry(2)])
    assert sorted(job.recover()) == [0, 2]
    write_lines(tmp_path / "manifest.jsonl", [entry(0), entry(2), entry(3)])
    with pytest.raises(BulkError, match=r"manifest.jsonl:3: index 3 is outside the job's range \[0, 3\)"):
        job.recover()


def test_recovery_keeps_a_listed_file_of_another_name_and_removes_its_indexs_unlisted_one(
    tmp_path: Path,
) -> None:
    job = BulkJob(GenserveClient("127.0.0.1:1"), BulkParams("m", n=10), tmp_path)
    images = tmp_path / "images"
    images.mkdir()
    for name in ("000000.png", "7.png", "000007.png", "0000003.png"):
        (images / name).write_bytes(b"x")
    write_lines(tmp_path / "manifest.jsonl", [entry(0), {**entry(7), "file": "images/7.png"}])
    assert sorted(job.recover()) == [0, 7]
    # 0000003.png, 7 digits, is no name of a job of 6-digit names: a user's, left alone.
    assert sorted(p.name for p in images.iterdir()) == ["000000.png", "0000003.png", "7.png"]


def test_recovery_leaves_a_users_all_digit_file_that_is_no_name_of_the_job(tmp_path: Path) -> None:
    # A job of 10 images names them 000000.png .. 000009.png (6 digits): a user's 7.png,
    # 20240101.png or 000010.png beside them is no image of the job's, and recovery deleted it.
    job = BulkJob(GenserveClient("127.0.0.1:1"), BulkParams("m", n=10), tmp_path)
    images = tmp_path / "images"
    images.mkdir()
    users = ["7.png", "20240101.png", "000010.png", "123456789.png", ".tmp-7.png", ".tmp-000010.png"]
    for name in ["000000.png", "000003.png", ".tmp-000004.png", *users]:
        (images / name).write_bytes(b"x")
    write_lines(tmp_path / "manifest.jsonl", [entry(0)])
    assert sorted(job.recover()) == [0]
    assert sorted(p.name for p in images.iterdir()) == sorted(["000000.png", *users])


def test_a_recovery_killed_while_it_rewrites_the_manifest_leaves_the_manifest_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The manifest without a lost image's line is written a line at a time under a temp name and
    # renamed over it: a kill in the middle leaves the old one, which the next resume reads.
    job = BulkJob(GenserveClient("127.0.0.1:1"), BulkParams("m", n=10), tmp_path)
    (tmp_path / "images").mkdir()
    for i in range(4):
        (tmp_path / "images" / f"{i:06d}.png").write_bytes(b"x")
    write_lines(tmp_path / "manifest.jsonl", [entry(i) for i in range(4)])
    before = (tmp_path / "manifest.jsonl").read_bytes()
    (tmp_path / "images" / "000001.png").unlink()
    real = bulk_module.write_file_durably

    def killed_after_a_line(path: Path, data: bytes | Iterable[bytes]) -> None:
        def pieces() -> Iterator[bytes]:
            for k, piece in enumerate([data] if isinstance(data, bytes) else data):
                if k == 1:
                    raise KeyboardInterrupt
                yield piece

        real(path, pieces())

    monkeypatch.setattr(bulk_module, "write_file_durably", killed_after_a_line)
    with pytest.raises(KeyboardInterrupt):
        job.recover()
    assert (tmp_path / "manifest.jsonl").read_bytes() == before
    monkeypatch.undo()
    assert sorted(job.recover()) == [0, 2, 3]
    assert [e["index"] for e in read_manifest(tmp_path / "manifest.jsonl")[0]] == [0, 2, 3]


def resumable_job(out: Path, n: int) -> list[bytes]:
    """A job folder of n images whose manifest lists all but the last 2 and whose image n // 2 was
    deleted behind its back (as a real job writes them: empty files); the manifest's lines a resume
    keeps."""
    params = BulkParams("fake-gen", n=n)
    job = BulkJob(GenserveClient("127.0.0.1:1"), params, out)
    job.pinned_version, job.model_sha256 = "1", FAKE_SHA256
    out.mkdir()
    (out / "job.json").write_text(json.dumps(job._job_json()))
    (out / "images").mkdir()
    empty = hashlib.sha256(b"").hexdigest()
    lines = []
    for i in range(n - 2):
        (out / "images" / f"{i:06d}.png").touch()
        e = {"file": f"images/{i:06d}.png", "index": i, "seed": i, "label": 0, "model": "fake-gen"}
        lines.append(json.dumps({**e, "version": "1", "sha256": empty}, sort_keys=True).encode() + b"\n")
    (out / "manifest.jsonl").write_bytes(b"".join(lines))
    (out / "images" / f"{n // 2:06d}.png").unlink()
    return lines[: n // 2] + lines[n // 2 + 1 :]


def test_a_resumed_job_holds_a_few_bytes_per_image_not_its_manifest(
    fake_server: FakeServer, tmp_path: Path
) -> None:
    # A resume read the whole manifest and kept every line as a dict for the whole run (and a set of
    # every file name, the rewritten manifest as one bytes, every index sorted again at the end):
    # about 1 KB per image, so resuming a job of a million images took a gigabyte. Its memory may
    # grow by a few bytes per image (which indices are done), not by the manifest; what it writes
    # is unchanged.
    def peak_bytes(n: int) -> int:
        out = tmp_path / f"job-{n}"
        kept = resumable_job(out, n)
        with GenserveClient(fake_server.target, retry=FAST_RETRY) as client:
            job = BulkJob(client, BulkParams("fake-gen", n=n), out)
            tracemalloc.start()
            try:
                tracemalloc.reset_peak()
                job.run()
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
        manifest = (out / "manifest.jsonl").read_bytes().splitlines(keepends=True)
        assert manifest[: n - 3] == kept  # the lost image's line dropped, the others byte for byte
        assert sorted(json.loads(line)["index"] for line in manifest[n - 3 :]) == [n // 2, n - 2, n - 1]
        assert sorted(p.name for p in (out / "images").iterdir()) == [f"{i:06d}.png" for i in range(n)]
        return peak

    peak_bytes(20)  # imports what a run imports, which the runs compared must not count
    small, large = 1000, 5000
    grown = peak_bytes(large) - peak_bytes(small)
    assert grown < 100 * (large - small), f"{grown / (large - small):.0f} bytes per image"


@given(
    done=st.sets(st.integers(0, 199), max_size=150),
    n=st.integers(1, 200),
    parts=st.integers(1, 9),
    max_images=st.integers(0, 40),
)
def test_missing_ranges_cut_into_bounded_streams_that_keep_every_worker_busy(
    done: set[int], n: int, parts: int, max_images: int
) -> None:
    done = {i for i in done if i < n}
    missing = missing_ranges(done, n)
    streams = plan_streams(missing, parts, max_images)
    covered = [i for a, b in streams for i in range(a, b)]
    assert covered == sorted(set(range(n)) - done)  # no gap, no duplicate, in order
    assert all(b - a <= max_images for a, b in streams) or not max_images
    # Enough streams for every worker whenever there are enough images, never needlessly small.
    assert len(streams) >= min(parts, len(covered))
    if len(missing) == 1 and not max_images:
        assert len(streams) <= parts


def test_the_highest_version_is_the_highest_number_not_the_last_in_text_order() -> None:
    # Version names are numbers: "10" is above "9", though "9" sorts after "10" as text. A job of the
    # highest READY version, and the card a call without --version uses, are version 10's.
    info = genserve_pb2.ModelInfo(name="m")
    for version in ("9", "10", "2"):
        info.versions.add(
            version=version,
            state=genserve_pb2.MODEL_STATE_READY,
            model_sha256=f"sha-{version}",
            card_json=json.dumps({"version": version}),
        )
    served = served_model(GenserveClient("127.0.0.1:1"), "m", "", info)
    assert (served.version, served.sha256) == ("10", "sha-10")
    assert card(info) == {"version": "10"}


def bulk(target: str, out: Path, params: BulkParams, **kwargs: int) -> None:
    with GenserveClient(target, retry=FAST_RETRY) as client:
        BulkJob(client, params, out, **kwargs).run()


def manifest_by_index(out: Path) -> dict[int, dict[str, object]]:
    entries, _ = read_manifest(out / "manifest.jsonl")
    by_index = {e["index"]: e for e in entries}
    assert len(by_index) == len(entries), "an index is listed twice"
    return by_index


def test_bulk_survives_stream_breaks_and_matches_the_seeds(fake_server: FakeServer, tmp_path: Path) -> None:
    fake_server.service.stream_breaks_after_chunks = [1, 0, 2, 1]
    params = BulkParams("fake-cond", n=90, base_seed=1000, labels=(3, 7))
    bulk(fake_server.target, tmp_path, params, concurrency=3, chunk_size=4)
    by_index = manifest_by_index(tmp_path)
    assert sorted(by_index) == list(range(90))
    for i, e in by_index.items():
        data = (tmp_path / str(e["file"])).read_bytes()
        assert e["sha256"] == hashlib.sha256(data).hexdigest()
        assert (e["seed"], e["label"], e["version"]) == (1000 + i, (3, 7)[i % 2], "1")
        with Image.open(tmp_path / str(e["file"])) as picture:
            np.testing.assert_array_equal(
                np.asarray(picture)[:, :, None], fake_pixels(1000 + i, (3, 7)[i % 2])
            )
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == sorted(
        Path(str(e["file"])).name for e in by_index.values()
    )
    # Running again finds nothing to do and changes nothing.
    before = (tmp_path / "manifest.jsonl").read_bytes()
    bulk(fake_server.target, tmp_path, params, concurrency=2)
    assert (tmp_path / "manifest.jsonl").read_bytes() == before


def test_bulk_refuses_to_resume_with_other_parameters(fake_server: FakeServer, tmp_path: Path) -> None:
    bulk(fake_server.target, tmp_path, BulkParams("fake-gen", n=5, base_seed=1))
    with pytest.raises(BulkError, match="base_seed: 1 -> 2"):
        bulk(fake_server.target, tmp_path, BulkParams("fake-gen", n=5, base_seed=2))
    assert json.loads((tmp_path / "job.json").read_text())["pinned_version"] == "1"


def test_bulk_stops_on_invalid_argument(fake_server: FakeServer, tmp_path: Path) -> None:
    with pytest.raises(GenserveClientError) as info:
        bulk(fake_server.target, tmp_path, BulkParams("bad", n=50, version="1"), concurrency=2)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    # The CLI reports the server's message and exits 2.
    proc = run_cli(
        "--target", fake_server.target, "bulk", "--model", "bad", "--n", "5", "--out", str(tmp_path / "b")
    )
    assert proc.returncode == 2, proc.stderr
    assert "INVALID_ARGUMENT: model: 'bad' is rejected by the fake" in proc.stderr


def test_a_job_the_server_rejects_leaves_no_job_file(fake_server: FakeServer, tmp_path: Path) -> None:
    with pytest.raises(GenserveClientError):
        bulk(fake_server.target, tmp_path, BulkParams("bad", n=5, version="1"))
    assert not (tmp_path / "job.json").exists()
    # The corrected command then runs in the same directory (it was refused as "other parameters").
    bulk(fake_server.target, tmp_path, BulkParams("fake-gen", n=5))
    assert sorted(manifest_by_index(tmp_path)) == list(range(5))
    assert json.loads((tmp_path / "job.json").read_text())["params"]["model"] == "fake-gen"


def test_a_grown_resume_the_server_rejects_leaves_the_job_as_it_was(
    fake_server: FakeServer, tmp_path: Path
) -> None:
    """Growing --n rewrites job.json only once the server accepts the new range's first chunk: a
    refused resume leaves the finished job of 4 images, which then resumes as finished."""
    bulk(fake_server.target, tmp_path, BulkParams("fake-gen", n=4))
    job_before = (tmp_path / "job.json").read_bytes()
    fake_server.service.fail["SampleStream"] = [(grpc.StatusCode.INVALID_ARGUMENT, "n: refused by the fake")]
    with pytest.raises(GenserveClientError, match="refused by the fake"):
        bulk(fake_server.target, tmp_path, BulkParams("fake-gen", n=8))
    assert (tmp_path / "job.json").read_bytes() == job_before
    bulk(fake_server.target, tmp_path, BulkParams("fake-gen", n=4))  # the old command still resumes
    assert sorted(manifest_by_index(tmp_path)) == list(range(4))


def test_bulk_needs_at_least_one_image(fake_server: FakeServer, tmp_path: Path) -> None:
    for n in (0, -3):
        with pytest.raises(ValueError, match="n >= 1"):
            BulkParams("fake-gen", n=n)
        proc = run_cli(
            "--target",
            fake_server.target,
            "bulk",
            "--model",
            "fake-gen",
            "--n",
            str(n),
            "--out",
            str(tmp_path),
        )
        assert proc.returncode == 2, proc.stderr
        assert "--n must be >= 1" in proc.stderr
    assert not (tmp_path / "job.json").exists()
    assert fake_server.service.calls["SampleStream"] == 0


def test_bulk_refuses_values_its_requests_cannot_carry(
    fake_server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Each of these used to fail building a stream's request inside a worker thread, after the job
    # had started (and, on a resume, rewritten job.json): the job must refuse them up front.
    for kwargs, match in (
        ({"n": 2**32}, r"fewer than 2\^32 images"),
        ({"n": 10, "base_seed": 2**63}, r"base_seed must be in \[0, 9223372036854775798\] for n=10"),
        ({"n": 10, "base_seed": 2**63 - 9}, r"base_seed must be in \[0, 9223372036854775798\]"),
        ({"n": 10, "base_seed": -1}, "base_seed must be in"),
        ({"n": 10, "labels": (3, 2**31)}, r"class indices in \[0, 2\^31\), got 2147483648"),
    ):
        with pytest.raises(ValueError, match=match):
            BulkParams("fake-gen", **kwargs)  # type: ignore[arg-type]
    assert BulkParams("fake-gen", n=10, base_seed=2**63 - 10).base_seed == 2**63 - 10  # last seed 2^63 - 1
    with GenserveClient(fake_server.target, retry=FAST_RETRY) as client:
        for size in (-1, 2**32):
            with pytest.raises(ValueError, match="^chunk_size must be 0"):
                BulkJob(client, BulkParams("fake-gen", n=4), tmp_path, chunk_size=size)
    # The CLI says which flag.
    code, _, err = cli_main(
        capsys,
        "--target",
        fake_server.target,
        "bulk",
        "--model",
        "fake-gen",
        "--n",
        str(2**32),
        "--out",
        str(tmp_path),
    )
    assert code == 2 and "--n must be below 2^32" in err, err
    assert not list(tmp_path.iterdir())
    assert fake_server.service.calls["SampleStream"] == 0


def test_streams_open_on_channels_no_older_than_the_period(fake_server: FakeServer) -> None:
    """A long job resolves its target again every period (replicas added meanwhile get streams); a
    replaced channel closes once its last stream ended; the caller's own client is never closed."""
    now = [0.0]
    with GenserveClient(fake_server.target, retry=FAST_RETRY) as own:
        channels = FreshChannels(own, period_s=60.0, clock=lambda: now[0])
        first = channels.acquire()
        assert first is own and channels.acquire() is own
        now[0] = 61.0
        second = channels.acquire()
        assert second is not own and channels.opened == 1
        now[0] = 122.0
        third = channels.acquire()
        assert third is not second
        assert second.list_models()  # still in use by its stream: open
        channels.release(second)
        with pytest.raises(ValueError, match="closed channel"):
            second.list_models()
        channels.release(third)
        assert third.list_models()  # the current channel stays open for the next stream
        channels.close()
        with pytest.raises(ValueError, match="closed channel"):
            third.list_models()
        channels.release(own)
        channels.release(own)
        assert own.list_models()  # never closed here


def test_a_channel_handed_out_while_its_replacement_did_not_resolve_stays_open_for_that_stream(
    fake_server: FakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stream given the current channel because a fresh one's host name did not resolve at that
    moment counts as one of its users: when a later fresh channel replaces it, it stays open until
    that stream is released too, not only the streams that acquired it before."""
    port = fake_server.target.rpartition(":")[2]
    real_getaddrinfo = channel_module.socket.getaddrinfo
    failing = [False]

    def flaky_getaddrinfo(host: str, *args: object, **kwargs: object) -> object:
        if host == "localhost" and failing[0]:
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return real_getaddrinfo(host, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(channel_module.socket, "getaddrinfo", flaky_getaddrinfo)
    now = [0.0]
    with GenserveClient(f"localhost:{port},localhost:{port}", retry=FAST_RETRY) as own:
        channels = FreshChannels(own, period_s=60.0, clock=lambda: now[0])
        now[0] = 61.0
        second = channels.acquire()  # stream A
        assert second is not own
        now[0] = 122.0
        failing[0] = True
        assert channels.acquire() is second  # stream B: no fresh channel resolved, the current one
        failing[0] = False
        third = channels.acquire()  # stream C, on a fresh channel that replaces `second`
        assert third is not second and channels.opened == 2
        channels.release(second)  # stream A ends; stream B still runs on `second`
        assert second.list_models()
        channels.release(second)  # stream B ends: now it closes
        with pytest.raises(ValueError, match="closed channel"):
            second.list_models()
        channels.release(third)
        channels.close()


def test_a_job_on_an_address_list_whose_names_stop_resolving_keeps_its_channel(
    fake_server: FakeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An address list's host names are resolved when a channel opens, and a job opens a fresh
    channel every period: a name that failed to resolve at that moment (a DNS hiccup mid-job)
    raised ValueError out of the stream's opening, which stopped the whole job as 'stopped on an
    unexpected error (at channel.py:...): ValueError: --target: cannot resolve ...', exit 1."""
    port = fake_server.target.rpartition(":")[2]
    real_getaddrinfo = channel_module.socket.getaddrinfo
    resolved = [0]

    def flaky_getaddrinfo(host: str, *args: object, **kwargs: object) -> object:
        if host == "localhost":
            resolved[0] += 1
            if resolved[0] > 2:  # the job's own channel resolved; every later one fails
                raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return real_getaddrinfo(host, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(channel_module.socket, "getaddrinfo", flaky_getaddrinfo)
    params = BulkParams("fake-cond", n=20, base_seed=3, labels=(1, 2))
    with GenserveClient(f"localhost:{port},localhost:{port}", retry=FAST_RETRY) as client:
        job = BulkJob(client, params, tmp_path / "job", concurrency=2, stream_images=5, channel_period_s=1e-9)
        job.run()
    assert resolved[0] > 2, "no fresh channel was tried"
    assert sorted(manifest_by_index(tmp_path / "job")) == list(range(20))


def test_a_job_whose_every_stream_opens_a_new_channel_is_the_same_job(
    fake_server: FakeServer, tmp_path: Path
) -> None:
    params = BulkParams("fake-cond", n=40, base_seed=3, labels=(1, 2))
    with GenserveClient(fake_server.target, retry=FAST_RETRY) as client:
        job = BulkJob(
            client, params, tmp_path / "fresh", concurrency=2, stream_images=5, channel_period_s=1e-9
        )
        job.run()
        assert job._channels.opened >= 8  # one per stream at least
        assert client.list_models()  # the caller's client is still open
    bulk(fake_server.target, tmp_path / "one", params)
    for name in ("fresh", "one"):
        assert sorted(manifest_by_index(tmp_path / name)) == list(range(40))
    assert manifest_by_index(tmp_path / "fresh") == manifest_by_index(tmp_path / "one")


def test_a_resume_over_a_manifest_line_without_a_file_name_names_the_line(
    fake_server: FakeServer, tmp_path: Path
) -> None:
    """A hand-edited manifest line with an index but no file name crashed the resume with a KeyError
    traceback; it is corruption, named by file and line, as a line without an index is."""
    bulk(fake_server.target, tmp_path, BulkParams("fake-gen", n=3))
    manifest = tmp_path / "manifest.jsonl"
    lines = manifest.read_text().splitlines()
    lines[1] = json.dumps({"index": json.loads(lines[1])["index"]})
    manifest.write_text("\n".join(lines) + "\n")
    with pytest.raises(BulkError, match=r"manifest.jsonl:2: manifest line without a file name"):
        bulk(fake_server.target, tmp_path, BulkParams("fake-gen", n=3))


@pytest.mark.parametrize("outside", ["../notes.png", "images/../../notes.png", "ABSOLUTE"])
def test_a_resume_over_a_manifest_line_naming_a_file_outside_its_images_folder_is_refused_naming_the_line(
    fake_server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str], outside: str
) -> None:
    """A manifest line's "file" was joined to the job folder unchecked: a manifest from someone else
    (a copied job folder) naming `..` or an absolute path had `bulk --resume --verify` read and hash
    a file outside the job, and count it as the job's image when its sha256 matched."""
    out = tmp_path / "job"
    command = ("--target", fake_server.target, "bulk", "--model", "fake-gen", "--n", "3", "--out", str(out))
    assert cli_main(capsys, *command)[0] == 0
    victim = tmp_path / "notes.png"
    victim.write_bytes(b"the user's notes")
    file = str(victim) if outside == "ABSOLUTE" else outside
    manifest = out / "manifest.jsonl"
    lines = manifest.read_text().splitlines()
    entry = json.loads(lines[1])
    (out / entry["file"]).unlink()
    lines[1] = json.dumps({**entry, "file": file, "sha256": hashlib.sha256(victim.read_bytes()).hexdigest()})
    manifest.write_text("\n".join(lines) + "\n")
    before = manifest.read_bytes()
    code, _, err = cli_main(capsys, "--target", fake_server.target, "bulk", "--resume", str(out), "--verify")
    assert code == 2, err
    assert f"{manifest}:2: field 'file' must name a file in images/" in err and repr(file) in err, err
    assert "Traceback" not in err
    assert manifest.read_bytes() == before


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("pinned_version", None),
        ("params.n", "3"),
        ("params.labels", None),
        ("shard", [1]),
        ("name_width", "x"),
    ],
)
def test_a_job_file_with_a_field_missing_or_of_the_wrong_type_is_refused_naming_it_not_a_traceback(
    fake_server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str], field: str, value: object
) -> None:
    """A hand-edited job.json, valid JSON with a field missing or of the wrong kind: repeating the
    command that started the job crashed with a traceback (KeyError 'pinned_version', TypeError
    from BulkParams), or failed naming no file ("Invalid format specifier '0xd'"), where --resume
    checked the params and named the file."""
    out = tmp_path / "job"
    command = ("--target", fake_server.target, "bulk", "--model", "fake-gen", "--n", "3", "--out", str(out))
    assert cli_main(capsys, *command)[0] == 0
    job_file = out / "job.json"
    job = json.loads(job_file.read_text())
    *parents, key = field.split(".")
    holder = job["params"] if parents else job
    if value is None and key == "pinned_version":
        del holder[key]
    else:
        holder[key] = value
    job_file.write_text(json.dumps(job))
    before = job_file.read_bytes()
    for args in (command, ("--target", fake_server.target, "bulk", "--resume", str(out))):
        code, _, err = cli_main(capsys, *args)
        assert code == 2, err
        assert f"{job_file}:" in err and "Traceback" not in err, err
    assert job_file.read_bytes() == before


def test_a_verifying_resume_redoes_an_image_whose_manifest_line_has_no_sha256(
    fake_server: FakeServer, tmp_path: Path
) -> None:
    """A manifest line without its sha256 (hand-edited) crashed `bulk --resume --verify` with a
    KeyError traceback, where `verify --hashes` reports that image's sha256 as differing: the resume
    takes it as damaged and writes it again."""
    bulk(fake_server.target, tmp_path, BulkParams("fake-gen", n=3))
    manifest = tmp_path / "manifest.jsonl"
    lines = manifest.read_text().splitlines()
    entry = json.loads(lines[1])
    del entry["sha256"]
    lines[1] = json.dumps(entry)
    manifest.write_text("\n".join(lines) + "\n")
    with GenserveClient(fake_server.target, retry=FAST_RETRY) as client:
        BulkJob(client, BulkParams("fake-gen", n=3), tmp_path, verify=True).run()
    entries = manifest_by_index(tmp_path)
    assert sorted(entries) == [0, 1, 2]
    data = (tmp_path / str(entries[entry["index"]]["file"])).read_bytes()
    assert entries[entry["index"]]["sha256"] == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("verify", [False, True])
def test_a_resume_redoes_an_image_that_is_a_link_leaving_what_it_points_to_alone(
    fake_server: FakeServer, tmp_path: Path, verify: bool
) -> None:
    """The job never writes a link at images/NNNNNN.png, but a copied job folder may hold one (to a
    huge or private file): the resume followed it, took the file it points to as the image (with
    --verify read whole and hashed, kept where its sha256 matched). The link is no image: redone as
    a file of the job's own, the file it pointed to left as it was."""
    out = tmp_path / "job"
    bulk(fake_server.target, out, BulkParams("fake-gen", n=3))
    entry = manifest_by_index(out)[1]
    image = out / str(entry["file"])
    private = tmp_path / "private.png"
    private.write_bytes(image.read_bytes())  # the same bytes: its sha256 matches the manifest's
    private.chmod(0o600)
    image.unlink()
    image.symlink_to(private)
    with GenserveClient(fake_server.target, retry=FAST_RETRY) as client:
        BulkJob(client, BulkParams("fake-gen", n=3), out, verify=verify).run()
    entries = manifest_by_index(out)
    assert sorted(entries) == [0, 1, 2]
    assert not image.is_symlink() and image.is_file()
    assert entries[1]["sha256"] == hashlib.sha256(image.read_bytes()).hexdigest()
    assert private.read_bytes() == image.read_bytes() and private.stat().st_mode & 0o777 == 0o600


def test_a_fresh_channel_draws_its_retry_jitter_from_the_callers_rng(fake_server: FakeServer) -> None:
    """A job's fresh channels retry with the jitter of the caller's rng (a seeded one reproduces)."""
    now = [0.0]
    rng = random.Random(7)
    with GenserveClient(fake_server.target, retry=FAST_RETRY, rng=rng) as own:
        channels = FreshChannels(own, period_s=60.0, clock=lambda: now[0])
        now[0] = 61.0
        fresh = channels.acquire()
        assert fresh is not own
        assert fresh._rng is rng
        channels.release(fresh)
        channels.close()


class StallingService(FakeService):
    """The fake, but each of the next len(stalls) streams sends stalls.pop(0) chunks and then
    neither sends nor ends while its client keeps the connection (a hung handler)."""

    def __init__(self, stalls: list[int]) -> None:
        super().__init__()
        self.stalls = stalls

    def SampleStream(
        self, request: genserve_pb2.SampleStreamRequest, context: grpc.ServicerContext
    ) -> Iterator[genserve_pb2.SampleStreamChunk]:
        stall_after = self.stalls.pop(0) if self.stalls else None
        for n_chunk, chunk in enumerate(super().SampleStream(request, context)):
            if n_chunk == stall_after:
                while context.is_active():
                    time.sleep(0.01)
                return
            yield chunk


@contextlib.contextmanager
def stalling_server(stalls: list[int]) -> Iterator[str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    genserve_pb2_grpc.add_GenerationServiceServicer_to_server(StallingService(stalls), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(grace=None)


def test_a_bulk_stream_that_stalls_is_cancelled_and_resumed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A stream whose server stopped sending (its handler hung, the connection alive) held its
    job forever: a stream has no deadline and --timeout reached only GetModel. One that sends
    nothing for the job's idle bound is cancelled and resumed where it stopped, logged once."""
    params = BulkParams("fake-gen", n=12, base_seed=3)
    with stalling_server([1]) as target, GenserveClient(target, retry=FAST_RETRY) as client:
        job = BulkJob(client, params, tmp_path / "job", chunk_size=4, idle_limit_s=0.5)
        job.run()
    assert sorted(manifest_by_index(tmp_path / "job")) == list(range(12))
    assert job.stalls == 1
    stalled = [r.getMessage() for r in caplog.records if "sent nothing" in r.getMessage()]
    assert len(stalled) == 1 and "'fake-gen'" in stalled[0] and "0.5 s" in stalled[0], stalled


def test_a_bulk_job_whose_streams_keep_stalling_stops_when_its_retry_window_is_spent(
    tmp_path: Path,
) -> None:
    params = BulkParams("fake-gen", n=12, base_seed=3)
    with stalling_server([0] * 100) as target, GenserveClient(target, retry=FAST_RETRY) as client:
        job = BulkJob(client, params, tmp_path / "job", chunk_size=4, idle_limit_s=0.3, retry_window_s=1.0)
        with pytest.raises(bulk_module.BulkRetryExhausted) as info:
            job.run()
    message = str(info.value)
    assert "--retry-window" in message and "sent nothing for 0.3 s" in message and "'fake-gen'" in message, (
        message
    )


class HangingLookupService(FakeService):
    """Refuses every stream NOT_FOUND (the job's version gone?) and never answers the GetModel the
    job then asks (but the one at its start), while the connection stays alive."""

    def __init__(self) -> None:
        super().__init__()
        self.looking_up = threading.Event()

    def SampleStream(
        self, request: genserve_pb2.SampleStreamRequest, context: grpc.ServicerContext
    ) -> Iterator[genserve_pb2.SampleStreamChunk]:
        context.abort(grpc.StatusCode.NOT_FOUND, "version '1' of model 'fake-gen' is not served")
        yield genserve_pb2.SampleStreamChunk()

    def GetModel(
        self, request: genserve_pb2.GetModelRequest, context: grpc.ServicerContext
    ) -> genserve_pb2.ModelInfo:
        if not self.calls["GetModel"]:  # the job's start, which pins the version
            return super().GetModel(request, context)
        self.looking_up.set()
        while context.is_active():
            time.sleep(0.01)
        return genserve_pb2.ModelInfo()


def test_a_bulk_job_stopped_during_a_model_lookup_stops_without_waiting_for_it(tmp_path: Path) -> None:
    """After a refused stream a worker asks GetModel (is the job's version still served?) with the
    client's deadline; a job stopped then (Ctrl-C: _stop_all) waited for that call, up to --timeout
    (60 s by default), where every other path stops within about a second."""
    service = HangingLookupService()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    genserve_pb2_grpc.add_GenerationServiceServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with GenserveClient(f"127.0.0.1:{port}", timeout_s=600, retry=FAST_RETRY) as client:
            job = BulkJob(client, BulkParams("fake-gen", n=8), tmp_path / "job")

            def run() -> None:
                with contextlib.suppress(Exception):  # how it ends is not the point here
                    job.run()

            runner = threading.Thread(target=run, daemon=True)
            runner.start()
            assert service.looking_up.wait(30)
            job._stop_all()  # what Ctrl-C does before it joins the workers
            runner.join(20)
            assert not runner.is_alive(), "the job waited out its GetModel after it was stopped"
    finally:
        server.stop(grace=None)
