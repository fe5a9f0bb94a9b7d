"""`genserve-client verify DIR...`: the union of shard folders spread over several roots (volumes,
machines) is exactly the job: every shard once, every index and seed once, one model."""

from __future__ import annotations

import errno
import hashlib
import itertools
import json
import shutil
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from client_fakes import FakeServer, cli_main, run_cli

from genserve_client.bulk import read_manifest

JOB = ("bulk", "--model", "fake-cond", "--labels", "1,2,3", "--seed", "40", "--n", "11", "--chunk-size", "2")


def shard_folder(root: Path, index: int) -> Path:
    return root / f"shard-{index:05d}-of-00003"


@pytest.fixture
def spread(fake_server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[Path, Path]:
    """Shard 0 of 3 written on volume a/, shards 1 and 2 on volume b/ (as pods with their own volumes)."""
    a, b = tmp_path / "a" / "job", tmp_path / "b" / "job"
    for out, shard in ((a, "0/3"), (b, "1/3"), (b, "2/3")):
        code, _, err = cli_main(
            capsys, "--target", fake_server.target, *JOB, "--out", str(out), "--shard", shard
        )
        assert code == 0, err
    return a, b


def test_the_union_of_several_folders_is_the_job(
    spread: tuple[Path, Path], fake_server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = spread
    code, _, err = cli_main(capsys, "verify", str(a))
    assert code == 1 and "shards missing of 3 (2): 1, 2" in err and "indices missing (8)" in err
    merged = tmp_path / "merged.jsonl"
    # Whole roots, single shard folders, and a folder named twice all count once.
    for dirs in ((a, b), (a, shard_folder(b, 1), shard_folder(b, 2)), (a, b, b)):
        code, out, err = cli_main(
            capsys, "verify", *map(str, dirs), "--hashes", "--manifest-out", str(merged)
        )
        assert code == 0, err
        assert "complete, 11 images in 3 folder(s)" in out
    # The merged manifest names every image once, relative to the folders' common parent.
    entries = [json.loads(line) for line in merged.read_text().splitlines()]
    assert [e["index"] for e in entries] == list(range(11))
    assert [e["seed"] for e in entries] == [40 + i for i in range(11)]
    assert entries[0]["file"] == "a/job/shard-00000-of-00003/images/000000.png"
    for entry in entries:
        assert (tmp_path / entry["file"]).is_file()
    # The same job in one folder has the same entries, file for file.
    whole = tmp_path / "whole"
    assert cli_main(capsys, "--target", fake_server.target, *JOB, "--out", str(whole))[0] == 0
    reference = sorted(read_manifest(whole / "manifest.jsonl")[0], key=lambda e: e["index"])
    assert [{**e, "file": e["file"].split("/", 3)[-1]} for e in entries] == reference


def test_a_shard_in_two_folders_is_a_duplicate(
    spread: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = spread
    copy = tmp_path / "c" / "job"
    shutil.copytree(shard_folder(b, 1), shard_folder(copy, 1))  # a shard run twice, on two volumes
    code, _, err = cli_main(capsys, "verify", str(a), str(b), str(copy))
    assert code == 1
    assert "shards found in more than one folder (1): 1 (" in err
    assert "indices listed twice (4): 3, 4, 5, 6" in err
    assert "NOT the complete job" in err


def test_a_shard_of_another_job_or_model_is_refused(
    spread: tuple[Path, Path], fake_server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = spread
    # Shard 2 of the same job but other seeds (a mistyped --seed in one pod).
    other = tmp_path / "other"
    job = [*JOB]
    job[job.index("--seed") + 1] = "41"
    code, _, err = cli_main(
        capsys, "--target", fake_server.target, *job, "--out", str(other), "--shard", "2/3"
    )
    assert code == 0, err
    code, _, err = cli_main(capsys, "verify", str(a), str(shard_folder(b, 1)), str(other))
    assert code == 1 and "belongs to another job" in err and "base_seed: 40 vs 41" in err
    # Shard 2 with the job's parameters but from a replaced model file.
    job_file = shard_folder(b, 2) / "job.json"
    job_json = json.loads(job_file.read_text())
    job_file.write_text(json.dumps({**job_json, "model_sha256": "0" * 64}))
    code, _, err = cli_main(capsys, "verify", str(a), str(b))
    assert code == 1 and f"model_sha256: '{job_json['model_sha256']}' vs '{'0' * 64}'" in err
    job_file.write_text(json.dumps(job_json))
    # A manifest line whose seed is not base_seed + index (an image of another seed).
    manifest = shard_folder(b, 1) / "manifest.jsonl"
    lines = manifest.read_text().splitlines()
    entry = json.loads(lines[0])
    lines[0] = json.dumps({**entry, "seed": entry["seed"] + 100})
    manifest.write_text("\n".join(lines) + "\n")
    code, _, err = cli_main(capsys, "verify", str(a), str(b))
    assert code == 1 and f"indices whose seed, label or version is not the job's (1): {entry['index']}" in err


def test_shards_whose_images_went_through_another_mapping_are_another_job(
    fake_server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A style generator's images also depend on its mapping (job.json used_models): a shard that
    started after the mapping was replaced (same generator file) holds images of another model, as a
    resume would refuse (test_bulk_safety); verify must not call the folders together the job."""
    t = ("--target", fake_server.target)
    root = tmp_path / "job"
    try:
        for shard, mapping in (("0/3", "1"), ("1/3", "1"), ("2/3", "2")):
            sha = hashlib.sha256(f"mapping {mapping}".encode()).hexdigest()
            fake_server.service.used_models = [("fake-mapping", mapping, sha)]
            code, _, err = cli_main(capsys, *t, *JOB, "--out", str(root), "--shard", shard)
            assert code == 0, err
    finally:
        fake_server.service.used_models = []
    code, _, err = cli_main(capsys, "verify", str(root))
    assert code == 1, err
    assert "belongs to another job" in err and "used_models" in err
    # A job.json written before used_models was recorded (null: not known) differs from no shard.
    for index in range(3):
        job_file = shard_folder(root, index) / "job.json"
        job_file.write_text(json.dumps({**json.loads(job_file.read_text()), "used_models": None}))
    code, _, err = cli_main(capsys, "verify", str(root))
    assert code == 0, err


def test_shards_served_weights_retrained_under_the_same_graph_are_another_job(
    fake_server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A model whose weights lie in model.onnx.data keeps its graph, and model_sha256, when retrained:
    a shard that started after the retrained weights were served holds images of another model (job.json
    weights_sha256, as a resume refuses); verify must not call the folders together the job. A shard
    that recorded none (a server older than the field, a job.json from before it) differs from no shard."""
    t = ("--target", fake_server.target)
    root = tmp_path / "job"
    try:
        for shard, weights in (("0/3", "1"), ("1/3", "1"), ("2/3", "2")):
            fake_server.service.weights_sha256 = hashlib.sha256(f"weights {weights}".encode()).hexdigest()
            code, _, err = cli_main(capsys, *t, *JOB, "--out", str(root), "--shard", shard)
            assert code == 0, err
    finally:
        fake_server.service.weights_sha256 = ""
    code, _, err = cli_main(capsys, "verify", str(root))
    assert code == 1, err
    assert "belongs to another job" in err and "weights_sha256" in err, err
    job_file = shard_folder(root, 2) / "job.json"
    job = json.loads(job_file.read_text())
    del job["weights_sha256"]
    job_file.write_text(json.dumps(job))
    code, _, err = cli_main(capsys, "verify", str(root))
    assert code == 0, err


def test_shards_whose_mapping_was_retrained_under_the_same_graph_are_another_job(
    fake_server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A mapping whose weights lie in model.onnx.data keeps its graph, and its sha256 in used_models,
    when retrained: a shard started after the retrained mapping was served holds images of another
    model (job.json used_weights_sha256, as its resume refuses); verify must not call the folders
    together the job. A shard that recorded none (a job.json from before it) differs from no shard."""
    t = ("--target", fake_server.target)
    root = tmp_path / "job"
    try:
        fake_server.service.used_models = [("fake-mapping", "1", hashlib.sha256(b"graph").hexdigest())]
        for shard, weights in (("0/3", "1"), ("1/3", "1"), ("2/3", "2")):
            digest = hashlib.sha256(f"weights {weights}".encode()).hexdigest()
            fake_server.service.used_weights_sha256 = {"fake-mapping": digest}
            code, _, err = cli_main(capsys, *t, *JOB, "--out", str(root), "--shard", shard)
            assert code == 0, err
    finally:
        fake_server.service.used_models = []
        fake_server.service.used_weights_sha256 = {}
    code, _, err = cli_main(capsys, "verify", str(root))
    assert code == 1, err
    assert "belongs to another job" in err and "used_weights_sha256" in err, err
    job_file = shard_folder(root, 2) / "job.json"
    job = json.loads(job_file.read_text())
    del job["used_weights_sha256"]
    job_file.write_text(json.dumps(job))
    code, _, err = cli_main(capsys, "verify", str(root))
    assert code == 0, err


def test_shards_served_another_card_are_another_job(
    fake_server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A card.json edited beside the same graph and weights (w_avg, output_range) changes the images,
    the model's or its mapping's: a shard started after the edited card was served holds images of
    another model (job.json card_sha256, used_card_sha256, as its resume refuses); verify must not call
    the folders together the job. A shard that recorded none (a job.json from before it) differs from
    no shard."""
    t = ("--target", fake_server.target)
    service = fake_server.service
    service.used_models = [("fake-mapping", "1", hashlib.sha256(b"graph").hexdigest())]
    try:
        for key in ("card_sha256", "used_card_sha256"):
            root = tmp_path / key
            for shard, card in (("0/3", "1"), ("1/3", "1"), ("2/3", "2")):
                digest = hashlib.sha256(f"card {card}".encode()).hexdigest()
                if key == "card_sha256":
                    service.card_sha256 = digest
                else:
                    service.used_card_sha256 = {"fake-mapping": digest}
                code, _, err = cli_main(capsys, *t, *JOB, "--out", str(root), "--shard", shard)
                assert code == 0, err
            service.card_sha256, service.used_card_sha256 = "", {}
            code, _, err = cli_main(capsys, "verify", str(root))
            assert code == 1, err
            assert "belongs to another job" in err and f"({key}: " in err, err
            job_file = shard_folder(root, 2) / "job.json"
            job = json.loads(job_file.read_text())
            del job[key]
            job_file.write_text(json.dumps(job))
            code, _, err = cli_main(capsys, "verify", str(root))
            assert code == 0, err
    finally:
        service.used_models = []
        service.card_sha256, service.used_card_sha256 = "", {}


def test_shards_of_servers_older_and_newer_than_used_models_are_one_job(
    fake_server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A server older than Provenance.used_models reports none (empty: not reported): shards run
    on old and upgraded replicas during a rolling upgrade are one job, the mapping unchanged."""
    t = ("--target", fake_server.target)
    root = tmp_path / "job"
    sha = hashlib.sha256(b"mapping 1").hexdigest()
    try:
        for shard, used in (("0/3", []), ("1/3", [("fake-mapping", "1", sha)]), ("2/3", [])):
            fake_server.service.used_models = used
            code, _, err = cli_main(capsys, *t, *JOB, "--out", str(root), "--shard", shard)
            assert code == 0, err
    finally:
        fake_server.service.used_models = []
    code, _, err = cli_main(capsys, "verify", str(root))
    assert code == 0, err


def test_verify_names_a_folder_without_a_job(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    code, _, err = cli_main(capsys, "verify", str(tmp_path / "empty"))
    assert code == 2 and "holds no bulk job" in err and "Traceback" not in err


def test_verify_of_a_dir_that_is_no_job_exits_2_saying_what_it_is(tmp_path: Path) -> None:
    # A DIR that is no job folder is a bad argument (exit 2, docs/client.md), not an incomplete job
    # (exit 1): the message says what the path is, so that a mistyped one reads as such.
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    cases = (
        ("empty", "holds no bulk job (job.json) and no shard-*-of-* folder with one"),
        ("typo", "does not exist"),
        ("file", "is not a folder"),
    )
    for name, says in cases:
        proc = run_cli("verify", str(tmp_path / name))
        assert proc.returncode == 2, proc.stderr
        assert f"genserve-client: {tmp_path / name} {says}" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr


def test_a_damaged_manifest_is_a_problem_verify_lists_not_a_usage_error_or_a_traceback(
    spread: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    # verify is there to find damage: a manifest line that is not JSON, or one without a file name,
    # is what it reports (exit 1, naming the manifest and the line, and still checking the other
    # folders), not exit 2 as if its arguments were bad, nor a KeyError traceback.
    a, b = spread
    manifest = shard_folder(b, 1) / "manifest.jsonl"
    lines = manifest.read_text().splitlines()
    manifest.write_text("\n".join([lines[0], "{not json", *lines[2:]]) + "\n")
    code, _, err = cli_main(capsys, "verify", str(a), str(b))
    assert code == 1, err
    assert f"{manifest}:2: corrupt manifest line" in err and "NOT the complete job" in err
    entry = json.loads(lines[0])
    del entry["file"]
    manifest.write_text("\n".join([json.dumps(entry), *lines[1:]]) + "\n")
    code, _, err = cli_main(capsys, "verify", str(a), str(b))
    assert code == 1 and "Traceback" not in err, err
    assert f"{manifest}:1: manifest line without a file name" in err


def test_a_manifest_line_naming_a_file_outside_its_images_folder_is_a_problem_verify_lists(
    spread: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A manifest line's "file" was joined to the folder unchecked: a copied folder whose manifest
    # names `..` or an absolute path had verify --hashes read and hash files outside the job (a whole
    # file in memory), and call the job complete where the sha256 matched.
    a, b = spread
    victim = tmp_path / "notes.png"
    victim.write_bytes(b"the user's notes")
    manifest = shard_folder(b, 1) / "manifest.jsonl"
    lines = manifest.read_text().splitlines()
    for file in ("../../../notes.png", str(victim)):
        entry = json.loads(lines[0])
        entry.update(file=file, sha256=hashlib.sha256(victim.read_bytes()).hexdigest())
        manifest.write_text("\n".join([json.dumps(entry), *lines[1:]]) + "\n")
        code, _, err = cli_main(capsys, "verify", str(a), str(b), "--hashes")
        assert code == 1 and "Traceback" not in err, err
        assert f"{manifest}:1: field 'file' must name a file in images/" in err and repr(file) in err, err
        assert "NOT the complete job" in err


def test_a_damaged_job_file_of_one_shard_is_listed_with_the_other_shards_problems(
    spread: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    # A damaged job.json is damage verify is there to find, like a damaged manifest: it stopped at
    # the first one (exit 2, as for a bad argument) and listed nothing of the other shards.
    a, b = spread
    job_file = shard_folder(b, 1) / "job.json"
    job_file.write_text('{"params": {"n": 11')  # torn
    lost = next(iter(sorted((shard_folder(b, 2) / "images").iterdir())))
    lost.unlink()
    code, _, err = cli_main(capsys, "verify", str(a), str(b))
    assert code == 1, err
    assert f"job files that cannot be read (1): {job_file}: not a bulk job file" in err, err
    assert f"files missing (1): {lost}" in err, err
    assert "NOT the complete job" in err and "Traceback" not in err


def test_verify_help_lists_no_connection_flags(capsys: pytest.CaptureFixture[str]) -> None:
    # verify reads folders only: its --help listed --target, --token, --tls... which it never uses.
    code, out, _ = cli_main(capsys, "verify", "--help")
    assert code == 0 and "--hashes" in out
    for flag in ("--target", "--token", "--tls", "--timeout"):
        assert flag not in out, out


def test_an_incomplete_jobs_image_count_leaves_out_files_missing_or_damaged(
    spread: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    # 'NOT the complete job (11 of 11 images)' for a job with a file deleted and another damaged
    # counted manifest lines, not images: the count is of images there (and intact, with --hashes).
    a, b = spread
    images = shard_folder(b, 1) / "images"
    victims = sorted(images.iterdir())
    victims[0].unlink()
    victims[1].write_bytes(victims[1].read_bytes() + b"x")
    code, _, err = cli_main(capsys, "verify", str(a), str(b))
    assert code == 1 and "files missing (1)" in err and "NOT the complete job (10 of 11 images)" in err, err
    code, _, err = cli_main(capsys, "verify", str(a), str(b), "--hashes")
    assert code == 1 and "sha256 differs" in err and "NOT the complete job (9 of 11 images)" in err, err


def test_an_image_that_is_a_link_is_a_problem_verify_lists_naming_it(
    spread: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The job never writes a link at images/NNNNNN.png; a copied folder may hold one (to a huge or
    # private file): verify followed it, counted it as the image and, with --hashes, read the file it
    # points to whole and hashed it (the job complete where the sha256 matched).
    a, b = spread
    image = sorted((shard_folder(b, 1) / "images").iterdir())[0]
    private = tmp_path / "private.png"
    private.write_bytes(image.read_bytes())  # the same bytes: its sha256 matches the manifest's
    image.unlink()
    image.symlink_to(private)
    for hashes in ((), ("--hashes",)):
        code, _, err = cli_main(capsys, "verify", str(a), str(b), *hashes)
        assert code == 1 and "Traceback" not in err, err
        assert "symbolic link" in err and str(image) in err, err
        assert "NOT the complete job (10 of 11 images)" in err, err


def synthetic_job(out: Path, n: int, *, images: bool = True, seed: int = 40) -> None:
    """A whole job folder of n manifest lines (empty image files, or none), as bulk writes it."""
    (out / "images").mkdir(parents=True)
    empty = hashlib.sha256(b"").hexdigest()
    with open(out / "manifest.jsonl", "w") as manifest:
        for i in range(n):
            name = f"images/{i:06d}.png"
            if images:
                (out / name).touch()
            entry = {"file": name, "index": i, "seed": seed + i, "label": 1, "model": "fake", "sha256": empty}
            manifest.write(json.dumps({**entry, "version": "1"}, sort_keys=True) + "\n")
    job = {"params": {"model": "fake", "n": n, "base_seed": 40, "labels": [1]}, "pinned_version": "1"}
    (out / "job.json").write_text(json.dumps({**job, "model_sha256": "0" * 64, "shard": None}))


def test_verify_holds_a_few_bytes_per_image_not_the_manifest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # verify read each manifest whole and kept every line as a dict (and the merged manifest as one
    # more dict per image, and every problem found): about 1.4 KB per image, so the verify of a job
    # of a million images took gigabytes. Its memory may grow by a few bytes per image (which indices
    # are there), not by the manifest; what it says and writes is unchanged.
    runs = itertools.count()

    def peak_bytes(n: int, **job: Any) -> tuple[int, str, str]:
        run = next(runs)
        out = tmp_path / f"job-{n}-{len(job)}-{run}"
        synthetic_job(out, n, **job)
        merged = tmp_path / f"merged-{n}-{run}.jsonl"
        tracemalloc.start()
        try:
            tracemalloc.reset_peak()
            code, stdout, stderr = cli_main(capsys, "verify", str(out), "--manifest-out", str(merged))
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        if not job:
            assert code == 0 and f"complete, {n} images in 1 folder(s)" in stdout, stderr
            lines = merged.read_text().splitlines()
            assert [json.loads(line)["index"] for line in lines] == list(range(n))
            assert lines == (out / "manifest.jsonl").read_text().splitlines()
        return peak, stdout, stderr

    # A job whose every image is missing and of another seed lists 10 of each, and counts them all
    # (and this first run imports what verify imports, which the runs compared must not count).
    _, _, err = peak_bytes(20, images=False, seed=0)
    assert "files missing (20): " in err and "and 10 more" in err
    foreign = "indices whose seed, label or version is not the job's (20): 0, 1, 2, 3, 4, 5, 6, 7, 8, 9"
    assert f"{foreign} and 10 more" in err
    assert "NOT the complete job (0 of 20 images)" in err
    small, large = 1000, 5000
    for job in ({}, {"images": False, "seed": 0}):
        # tracemalloc counts every thread's allocations: a thread an earlier test left ending (a
        # channel's, a server log reader's) can add to one run's peak, never take from it, so the
        # lesser growth of two side-by-side measurements is verify's own.
        grown = min(peak_bytes(large, **job)[0] - peak_bytes(small, **job)[0] for _ in range(2))
        assert grown < 100 * (large - small), f"{job}: {grown / (large - small):.0f} bytes per image"


def test_verify_names_the_used_models_digests_of_another_job_readably(
    spread: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """A shard whose images went through another mapping (used_models) or another mapping's weights
    (used_weights_sha256) is named with both values as 'model=digest', as bulk's own refusal names
    them, not as Python dicts ({'fake-mapping': '...'})."""
    a, b = spread
    for index, (root, digest) in enumerate(((a, "a" * 64), (b, "b" * 64), (b, "b" * 64))):
        job_file = shard_folder(root, index) / "job.json"
        job = json.loads(job_file.read_text())
        job.update(used_models={"fake-mapping": digest}, used_weights_sha256={"fake-mapping": digest})
        job_file.write_text(json.dumps(job))
    code, _, err = cli_main(capsys, "verify", str(a), str(b))
    assert code == 1, err
    for key in ("used_models", "used_weights_sha256"):
        assert f"({key}: fake-mapping={'a' * 64} vs fake-mapping={'b' * 64})" in err, err
    assert "{" not in err and "'" not in err, err


def test_a_manifest_line_that_is_not_utf8_is_named_by_verify_and_resume(
    spread: tuple[Path, Path], fake_server: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    # A byte of a manifest line damaged into one that is no UTF-8 (a bad sector, a bit flipped on a
    # copy) escaped as a bare UnicodeDecodeError: verify exited 2, as for a bad argument, saying
    # "'utf-8' codec can't decode byte 0xff in position 30" without naming the manifest, its line or
    # the other folders' problems; a resume said the same.
    a, b = spread
    manifest = shard_folder(b, 1) / "manifest.jsonl"
    lines = manifest.read_bytes().splitlines(keepends=True)
    lines[1] = lines[1].replace(b'"index"', b'"ind\xffex"')
    manifest.write_bytes(b"".join(lines))
    lost = sorted((shard_folder(b, 2) / "images").iterdir())[0]
    lost.unlink()
    code, _, err = cli_main(capsys, "verify", str(a), str(b))
    assert code == 1 and "Traceback" not in err, err
    assert f"manifests that cannot be read (1): {manifest}:2: corrupt manifest line (not UTF-8" in err, err
    assert f"files missing (1): {lost}" in err and "NOT the complete job" in err, err
    code, _, err = cli_main(
        capsys, "--target", fake_server.target, "bulk", "--resume", str(shard_folder(b, 1))
    )
    assert code == 2 and f"{manifest}:2: corrupt manifest line (not UTF-8" in err, err
    assert manifest.read_bytes() == b"".join(lines)


def test_a_shard_folder_linked_in_from_another_volume_is_checked_through_its_link(
    spread: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Shards gathered into one folder with `ln -s /mnt/b/job/shard-... /data/job/`: verify resolved
    # each shard folder and took it relative to the DIR's own real path, so a link to a folder
    # outside it ended verify with pathlib's "'/.../shard-00001-of-00003' is not in the subpath of
    # '/.../job' OR one path is relative and the other is absolute" (exit 2), nothing checked.
    a, b = spread
    for index in (1, 2):
        shard_folder(b, index).rename(shard_folder(a, index).with_name(f"elsewhere-{index}"))
    gathered = tmp_path / "gathered"
    gathered.mkdir()
    shard_folder(a, 0).rename(shard_folder(gathered, 0))
    for index in (1, 2):
        shard_folder(gathered, index).symlink_to(shard_folder(a, index).with_name(f"elsewhere-{index}"))
    merged = tmp_path / "merged.jsonl"
    code, out, err = cli_main(capsys, "verify", str(gathered), "--hashes", "--manifest-out", str(merged))
    assert code == 0, err
    assert "complete, 11 images in 3 folder(s)" in out
    # Files relative to the DIR, as docs/client.md says, through the link.
    entries = [json.loads(line) for line in merged.read_text().splitlines()]
    assert [e["index"] for e in entries] == list(range(11))
    assert entries[4]["file"] == "shard-00001-of-00003/images/000004.png"
    assert all((gathered / e["file"]).is_file() for e in entries)
    # Damage behind a link is named.
    (shard_folder(gathered, 2) / "images" / "000008.png").unlink()
    code, _, err = cli_main(capsys, "verify", str(gathered))
    assert code == 1 and "files missing (1): " in err and "000008.png" in err, err


def test_a_job_file_whose_size_no_job_has_is_listed_naming_it(
    spread: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    # verify took job.json's n as it found it: a hand-edited n below 1 ended verify with "negative
    # count" (exit 2, naming neither the file nor the field), and one from 2^32 (no job holds that
    # many) had it allocate bytes per index for it. Both are a job file that cannot be read, as bulk
    # --resume refuses it, listed with the other folders' problems.
    a, b = spread
    job_file = shard_folder(a, 0) / "job.json"  # the first folder's: the job's size is taken from it
    job = json.loads(job_file.read_text())
    for n, says in (
        (-5, "needs n >= 1 images, got -5"),
        (2**40, f"fewer than 2^32 images (a uint32 count), got n={2**40}"),
    ):
        job_file.write_text(json.dumps({**job, "params": {**job["params"], "n": n}}))
        code, _, err = cli_main(capsys, "verify", str(a), str(b))
        assert code == 1 and "Traceback" not in err, err
        assert f"job files that cannot be read (1): {job_file}: unreadable params" in err and says in err, err
        assert "shards missing of 3 (1): 0" in err and "NOT the complete job" in err, err


def test_a_manifest_or_job_file_that_cannot_be_read_is_listed_with_the_other_folders_problems(
    spread: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    # A file verify could not open (no read permission, an I/O error of a failing disk; here a folder
    # at its name, as these tests run as any user) ended verify at its first one with that error alone:
    # the other folders' problems unlisted, as docs/client.md says verify lists them all.
    a, b = spread
    manifest = shard_folder(b, 1) / "manifest.jsonl"
    manifest.unlink()
    manifest.mkdir()
    job_file = shard_folder(b, 2) / "job.json"
    job_file.unlink()
    job_file.mkdir()
    lost = sorted((shard_folder(a, 0) / "images").iterdir())[0]
    lost.unlink()
    code, _, err = cli_main(capsys, "verify", str(a), str(b), "--hashes")
    assert code == 1 and "Traceback" not in err, err
    assert f"manifests that cannot be read (1): [Errno 21] Is a directory: '{manifest}'" in err, err
    assert f"job files that cannot be read (1): [Errno 21] Is a directory: '{job_file}'" in err, err
    assert f"files missing (1): {lost}" in err and "NOT the complete job" in err, err


def test_an_image_that_cannot_be_read_is_named_and_the_rest_still_checked(
    spread: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # An image verify --hashes could not read (a failing disk's EIO, no read permission) ended verify
    # with that error alone, the rest of the job unchecked.
    a, b = spread
    bad = sorted((shard_folder(b, 1) / "images").iterdir())[1]
    lost = sorted((shard_folder(b, 2) / "images").iterdir())[0]
    lost.unlink()
    read_bytes = Path.read_bytes

    def failing_disk(self: Path) -> bytes:
        if self == bad:
            raise OSError(errno.EIO, "Input/output error", str(self))
        return read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", failing_disk)
    code, _, err = cli_main(capsys, "verify", str(a), str(b), "--hashes")
    assert code == 1 and "Traceback" not in err, err
    assert f"files that cannot be read (1): [Errno 5] Input/output error: '{bad}'" in err, err
    assert f"files missing (1): {lost}" in err and "manifests that cannot be read" not in err, err
    assert "NOT the complete job (9 of 11 images)" in err, err
