"""Check that a bulk job's output is exactly the job: one folder, or the shard folders of a job run
with `--shard I/N` (e.g. by a Kubernetes Indexed Job), found under one or several roots (shards
written to several volumes or copied from several machines), and optionally merge their manifests.

Exactly means: every shard 0..N-1 present once and of the same job (parameters, pinned version,
model sha256, and the sha256 of the models its images also went through where job.json records
them), the manifests together name each index in [0, n) once and only once, each with the job's
seed (base_seed + index), label and model version, every named file exists (and, with `hashes`, has
the sha256 its manifest line records).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from genserve_client.bulk import (
    JOB_FILE,
    MANIFEST_FILE,
    BulkError,
    Shard,
    read_job,
    read_manifest,
    write_file_whole,
)

MAX_LISTED = 10  # problems of one kind listed before "and N more"


@dataclass
class VerifyReport:
    """What verify_job found; `ok` when the folders hold exactly the job."""

    roots: list[Path]
    n: int = 0
    folders: list[Path] = field(default_factory=list)
    images: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _listed(kind: str, items: Sequence[object]) -> str:
    shown = ", ".join(map(str, items[:MAX_LISTED]))
    more = f" and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
    return f"{kind} ({len(items)}): {shown}{more}"


def job_folders(root: Path) -> list[Path]:
    """`root` itself when it is a job, else its shard-* sub-folders that hold a job."""
    if (root / JOB_FILE).exists():
        return [root]
    return sorted(p for p in root.glob("shard-*-of-*") if (p / JOB_FILE).exists())


def _identity(job: dict[str, Any]) -> dict[str, Any]:
    return {k: job.get(k) for k in ("params", "pinned_version", "model_sha256")}


def _check_shards(report: VerifyReport, shards: dict[Path, Shard | None]) -> None:
    """All folders one whole job, or shards 0..N-1 of one N, each once."""
    counts = {s.count if s else None for s in shards.values()}
    if len(counts) > 1:
        report.problems.append(f"the folders mix shard counts: {sorted(map(str, counts))}")
        return
    count = counts.pop()
    if count is None:
        if len(shards) > 1:
            report.problems.append(_listed("folders holding the whole job, more than one", list(shards)))
        return
    where: dict[int, list[Path]] = {}
    for folder, shard in shards.items():
        if shard is not None:
            where.setdefault(shard.index, []).append(folder)
    missing = [i for i in range(count) if i not in where]
    if missing:
        report.problems.append(_listed(f"shards missing of {count}", missing))
    twice = [f"{i} ({', '.join(map(str, where[i]))})" for i in sorted(where) if len(where[i]) > 1]
    if twice:
        report.problems.append(_listed("shards found in more than one folder", twice))


@dataclass
class _Entries:
    """The manifests' entries, merged, and what is wrong with them."""

    merged: list[dict[str, Any]] = field(default_factory=list)
    seen: set[int] = field(default_factory=set)
    intact: set[int] = field(default_factory=set)  # listed, and the file there (and its sha256 with hashes)
    duplicates: list[int] = field(default_factory=list)
    outside: list[int] = field(default_factory=list)
    absent: list[str] = field(default_factory=list)
    damaged: list[str] = field(default_factory=list)
    foreign: list[int] = field(default_factory=list)  # another seed, label or version than the job's
    corrupt: list[str] = field(default_factory=list)  # manifests that cannot be read, and why

    def add(self, base: Path, folder: Path, lo: int, hi: int, job: dict[str, Any], *, hashes: bool) -> None:
        try:
            entries, _ = read_manifest(folder / MANIFEST_FILE)
        except BulkError as exc:  # damage verify is there to find: a problem it lists, not a usage error
            self.corrupt.append(str(exc))
            return
        unnamed = [i for i, e in enumerate(entries, 1) if not isinstance(e.get("file"), str)]
        if unnamed:
            self.corrupt.append(f"{folder / MANIFEST_FILE}:{unnamed[0]}: manifest line without a file name")
            return
        prefix = folder.relative_to(base)
        params = job["params"]
        base_seed, labels = int(params.get("base_seed", 0)), list(params.get("labels") or [])
        version = job.get("pinned_version")
        for entry in entries:
            index = entry["index"]
            label = labels[index % len(labels)] if labels else entry.get("label")
            if (
                entry.get("seed") != base_seed + index
                or entry.get("label") != label
                or entry.get("version") not in (None, "", version)
            ):
                self.foreign.append(index)
            if not lo <= index < hi:
                self.outside.append(index)
            if index in self.seen:
                self.duplicates.append(index)
                continue
            self.seen.add(index)
            path = folder / entry["file"]
            if not path.is_file():
                self.absent.append(str(path))
            elif hashes and hashlib.sha256(path.read_bytes()).hexdigest() != entry.get("sha256"):
                self.damaged.append(str(path))
            else:
                self.intact.add(index)
            self.merged.append({**entry, "file": str(prefix / entry["file"])})


def _read_jobs(
    folders: list[Path],
) -> tuple[dict[Path, dict[str, Any]], dict[Path, Shard | None], list[str]]:
    """The folders' job.json files and shards, and those that cannot be read. A damaged job.json is
    damage verify is there to find (as a damaged manifest): listed, its folder left out (its shard
    then missing), the other folders still checked."""
    jobs: dict[Path, dict[str, Any]] = {}
    shards: dict[Path, Shard | None] = {}
    unreadable: list[str] = []
    for folder in folders:
        try:
            job = read_job(folder) or {}
            int(job["params"]["n"])
            shards[folder] = Shard(*job["shard"]) if job.get("shard") else None
        except BulkError as exc:
            unreadable.append(str(exc))
            continue
        except (KeyError, TypeError, ValueError) as exc:
            unreadable.append(f"{folder / JOB_FILE}: unreadable ({exc!r})")
            continue
        jobs[folder] = job
    return jobs, shards, unreadable


def verify_job(
    roots: Path | Sequence[Path], *, hashes: bool = False
) -> tuple[VerifyReport, list[dict[str, Any]]]:
    """Check the job in `roots` (each a job folder or a folder of shard folders; together, the
    whole job). Returns the report and the merged manifest entries, their files relative to the
    roots' common parent (the root itself when there is one)."""
    given = [roots] if isinstance(roots, Path) else list(roots)
    if not given:
        raise BulkError("verify needs at least one folder")
    report = VerifyReport(given)
    folders: list[Path] = []
    for root in given:
        found_here = job_folders(root)
        if not found_here:  # a bad argument (a mistyped path, most often): say what the path is
            if not root.is_dir():
                raise BulkError(f"{root} {'is not a folder' if root.exists() else 'does not exist'}")
            raise BulkError(f"{root} holds no bulk job ({JOB_FILE}) and no shard-*-of-* folder with one")
        # The same folder named twice (or through a link) is one folder, not two copies of a shard.
        known = {f.resolve() for f in folders}
        folders += [f for f in found_here if f.resolve() not in known]
    report.folders = folders
    base = Path(os.path.commonpath([r.resolve() for r in given]))
    jobs, shards, unreadable = _read_jobs(folders)
    if unreadable:
        report.problems.append(_listed("job files that cannot be read", unreadable))
    if not jobs:
        return report, []
    first_folder, first = next(iter(jobs.items()))
    report.n = int(first["params"]["n"])
    for folder, job in jobs.items():
        if _identity(job) != _identity(first):
            report.problems.append(
                f"{folder} belongs to another job than {first_folder} ({_difference(first, job)})"
            )
    # The other models the images went through (a style generator's mapping): a shard started after
    # one was replaced holds images of another model. Null: a job.json from before they were recorded;
    # empty: not reported (a server older than Provenance.used_models), as bulk.py reads it.
    recorded = [(f, job["used_models"]) for f, job in jobs.items() if job.get("used_models")]
    for folder, used in recorded[1:]:
        if used != recorded[0][1]:
            report.problems.append(
                f"{folder} belongs to another job than {recorded[0][0]} "
                f"(used_models: {recorded[0][1]!r} vs {used!r})"
            )
    _check_shards(report, shards)
    found = _Entries()
    for folder, shard in shards.items():
        lo, hi = shard.range(report.n) if shard else (0, report.n)
        found.add(base, folder.resolve(), lo, hi, jobs[folder], hashes=hashes)
    for kind, items in (
        ("indices missing", [i for i in range(report.n) if i not in found.seen]),
        ("indices listed twice", sorted(found.duplicates)),
        ("indices outside their shard's range", sorted(found.outside)),
        ("indices whose seed, label or version is not the job's", sorted(found.foreign)),
        ("files missing", found.absent),
        ("files whose sha256 differs from the manifest", found.damaged),
        ("manifests that cannot be read", found.corrupt),
    ):
        if items:
            report.problems.append(_listed(kind, items))
    # The images the folders hold: a line whose file is missing (or damaged) is no image.
    report.images = sum(1 for i in found.intact if 0 <= i < report.n)
    found.merged.sort(key=lambda e: int(e["index"]))
    return report, found.merged


def _difference(first: dict[str, Any], other: dict[str, Any]) -> str:
    """What makes `other` another job: the fields that differ, with both values."""
    a, b = _identity(first), _identity(other)
    diffs = []
    for key in a:
        if key == "params" and isinstance(a[key], dict) and isinstance(b[key], dict):
            diffs += [
                f"{k}: {a[key].get(k)!r} vs {b[key].get(k)!r}"
                for k in sorted(set(a[key]) | set(b[key]))
                if a[key].get(k) != b[key].get(k)
            ]
        elif a[key] != b[key]:
            diffs.append(f"{key}: {a[key]!r} vs {b[key]!r}")
    return ", ".join(diffs)


def write_merged_manifest(path: Path, entries: list[dict[str, Any]]) -> None:
    write_file_whole(path, b"".join(json.dumps(e, sort_keys=True).encode() + b"\n" for e in entries))
