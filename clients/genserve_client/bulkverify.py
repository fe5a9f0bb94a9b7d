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
import heapq
import json
import os
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from genserve_client.bulk import (
    JOB_FILE,
    MANIFEST_FILE,
    BulkError,
    Shard,
    _named,
    iter_manifest,
    job_settings,
    read_job,
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


def _listed(kind: str, items: Sequence[object], count: int | None = None) -> str:
    """`kind (count): ` the first MAX_LISTED items `and N more`; count: of items, or more of them."""
    count = len(items) if count is None else count
    shown = ", ".join(map(str, items[:MAX_LISTED]))
    more = f" and {count - MAX_LISTED} more" if count > MAX_LISTED else ""
    return f"{kind} ({count}): {shown}{more}"


def job_folders(root: Path) -> list[Path]:
    """`root` itself when it is a job, else its shard-* sub-folders that hold a job."""
    if (root / JOB_FILE).exists():
        return [root]
    return sorted(p for p in root.glob("shard-*-of-*") if (p / JOB_FILE).exists())


def _identity(job: dict[str, Any]) -> dict[str, Any]:
    return {k: job.get(k) for k in ("params", "pinned_version", "model_sha256")}


def _check_weights(report: VerifyReport, jobs: dict[Path, dict[str, Any]]) -> None:
    """One digest of the model's external data files (job.json weights_sha256), and one of the used
    models' (used_weights_sha256: a mapping's), in every folder that recorded one: a model with
    external data retrained under the same graph keeps its model_sha256. The same for the card.json
    digests (card_sha256, used_card_sha256): a card edited beside the same graph (w_avg,
    output_range) changes the images. Absent or empty: not recorded (a job.json from before it, an
    older server) or no external data."""
    for key in ("weights_sha256", "used_weights_sha256", "card_sha256", "used_card_sha256"):
        weights = [(f, job[key]) for f, job in jobs.items() if job.get(key)]
        for folder, digest in weights[1:]:
            if digest != weights[0][1]:
                report.problems.append(
                    f"{folder} belongs to another job than {weights[0][0]} "
                    f"({key}: {_shown(weights[0][1])} vs {_shown(digest)})"
                )


def _shown(value: Any) -> str:
    """A job.json value in a problem line: {model: digest} as bulk's refusals name it ('mapping=D'),
    anything else as its repr."""
    if isinstance(value, dict):
        return _named(value) or "none"
    return repr(value)


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


class _Found:
    """How many items of one kind of problem there are, and the MAX_LISTED that verify lists: the
    first found, or with `smallest` the smallest (as in a sorted list), memory bounded however many."""

    def __init__(self, *, smallest: bool = False) -> None:
        self.count = 0
        self.smallest = smallest
        self._items: list[Any] = []  # with smallest: a heap of the negated items

    def add(self, item: Any) -> None:
        self.count += 1
        if not self.smallest:
            if len(self._items) < MAX_LISTED:
                self._items.append(item)
        elif len(self._items) < MAX_LISTED:
            heapq.heappush(self._items, -item)
        elif item < -self._items[0]:
            heapq.heapreplace(self._items, -item)

    def listed(self, kind: str) -> str | None:
        """The report's line, None when there is none."""
        if not self.count:
            return None
        items = sorted(-i for i in self._items) if self.smallest else self._items
        return _listed(kind, items, self.count)


_UNSEEN, _SEEN, _INTACT = 0, 1, 2  # _Entries.state of an index in [0, n)


class MergedManifest:
    """The merged manifest of the folders: the first line naming each index in [0, n), in index
    order, its file relative to the roots' common parent. It holds where each line is (a few bytes
    an image) and reads the lines again as it is iterated; it is the whole job when the report is ok."""

    def __init__(self, n: int) -> None:
        self.manifests: list[tuple[Path, Path]] = []  # (a folder's manifest, the folder's prefix)
        self.where = array("i", [-1]) * n  # the manifest of each index (a position in manifests)
        self.offsets = array("q", [0]) * n  # the byte offset of its line there

    def __iter__(self) -> Iterator[dict[str, Any]]:
        current, f = -1, None
        try:
            for index, k in enumerate(self.where):
                if k < 0:
                    continue
                path, prefix = self.manifests[k]
                if k != current or f is None:  # a shard's indices are contiguous: one file at a time
                    if f is not None:
                        f.close()
                    f, current = open(path, "rb"), k
                f.seek(self.offsets[index])
                entry = json.loads(f.readline())
                yield {**entry, "file": str(prefix / entry["file"])}
        finally:
            if f is not None:
                f.close()


class _Entries:
    """The manifests' entries, merged, and what is wrong with them: read a line at a time, with a few
    bytes kept per index of the job (a job may hold millions of images), never the entries."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.merged = MergedManifest(n)
        self.state = bytearray(n)  # _UNSEEN, _SEEN, or _INTACT: the file there (and its sha256 with hashes)
        self.seen_outside: set[int] = set()  # indices listed outside [0, n): few, unless all is wrong
        self.duplicates = _Found(smallest=True)
        self.outside = _Found(smallest=True)
        self.absent = _Found()
        self.damaged = _Found()
        self.links = _Found()
        self.unreadable = _Found()  # files that cannot be read, and why
        self.foreign = _Found(smallest=True)  # another seed, label or version than the job's
        self.corrupt = _Found()  # manifests that cannot be read, and why

    def add(self, base: Path, folder: Path, lo: int, hi: int, job: dict[str, Any], *, hashes: bool) -> None:
        manifest = folder / MANIFEST_FILE
        try:  # a manifest that cannot be read counts for none of its lines: read it through first
            for _ in iter_manifest(manifest):
                pass
        except BulkError as exc:  # damage verify is there to find: a problem it lists, not a usage error
            self.corrupt.add(str(exc))
            return
        except OSError as exc:  # no read permission, a failing disk: listed too, the other folders checked
            self.corrupt.add(str(exc))
            return
        self.merged.manifests.append((manifest, folder.relative_to(base)))
        number = len(self.merged.manifests) - 1
        params = job["params"]
        base_seed, labels = int(params.get("base_seed", 0)), list(params.get("labels") or [])
        version = job.get("pinned_version")
        try:
            for offset, entry in iter_manifest(manifest):
                index = entry["index"]
                label = labels[index % len(labels)] if labels else entry.get("label")
                if (
                    entry.get("seed") != base_seed + index
                    or entry.get("label") != label
                    or entry.get("version") not in (None, "", version)
                ):
                    self.foreign.add(index)
                if not lo <= index < hi:
                    self.outside.add(index)
                inside = 0 <= index < self.n
                if (self.state[index] != _UNSEEN) if inside else (index in self.seen_outside):
                    self.duplicates.add(index)
                    continue
                seen = self._check_file(folder / entry["file"], entry, hashes=hashes)
                if inside:
                    self.state[index] = seen
                    self.merged.where[index], self.merged.offsets[index] = number, offset
                else:
                    self.seen_outside.add(index)
        except (BulkError, OSError) as exc:  # changed since it was read through (a job still writing it)
            self.corrupt.add(str(exc))

    def _check_file(self, path: Path, entry: dict[str, Any], *, hashes: bool) -> int:
        """_INTACT, or _SEEN with what is wrong with the file listed."""
        try:
            if path.is_symlink():  # the job writes none: never followed (a copied folder's)
                self.links.add(str(path))
            elif not path.is_file():
                self.absent.add(str(path))
            elif hashes and hashlib.sha256(path.read_bytes()).hexdigest() != entry.get("sha256"):
                self.damaged.add(str(path))
            else:
                return _INTACT
        except OSError as exc:  # no read permission, a failing disk: this file, not the manifest
            self.unreadable.add(str(exc))
        return _SEEN


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
            # Its fields as bulk --resume checks them: an n below 1 or from 2^32 is no job's size.
            shards[folder] = job_settings(folder / JOB_FILE, job)[1]
        except BulkError as exc:
            unreadable.append(str(exc))
            continue
        except OSError as exc:  # no read permission, a failing disk, a folder at its name
            unreadable.append(str(exc))
            continue
        except (KeyError, TypeError, ValueError) as exc:
            unreadable.append(f"{folder / JOB_FILE}: unreadable ({exc!r})")
            continue
        jobs[folder] = job
    return jobs, shards, unreadable


def verify_job(roots: Path | Sequence[Path], *, hashes: bool = False) -> tuple[VerifyReport, MergedManifest]:
    """Check the job in `roots` (each a job folder or a folder of shard folders; together, the
    whole job). Returns the report and the merged manifest (MergedManifest), its files relative to
    the roots' common parent (the root itself when there is one)."""
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
    # Paths as given, links not resolved: a shard folder linked in from another volume (`ln -s`) lies
    # under its DIR only through the link, and the merged manifest names it that way.
    base = Path(os.path.commonpath([r.absolute() for r in given]))
    jobs, shards, unreadable = _read_jobs(folders)
    if unreadable:
        report.problems.append(_listed("job files that cannot be read", unreadable))
    if not jobs:
        return report, MergedManifest(0)
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
                f"(used_models: {_shown(recorded[0][1])} vs {_shown(used)})"
            )
    _check_weights(report, jobs)
    _check_shards(report, shards)
    found = _Entries(report.n)
    for folder, shard in shards.items():
        lo, hi = shard.range(report.n) if shard else (0, report.n)
        found.add(base, folder.absolute(), lo, hi, jobs[folder], hashes=hashes)
    missing = _Found()
    for index in (i for i, state in enumerate(found.state) if state == _UNSEEN):
        missing.add(index)
    for kind, items in (
        ("indices missing", missing),
        ("indices listed twice", found.duplicates),
        ("indices outside their shard's range", found.outside),
        ("indices whose seed, label or version is not the job's", found.foreign),
        ("files missing", found.absent),
        ("files whose sha256 differs from the manifest", found.damaged),
        ("files that are symbolic links, which the job never writes", found.links),
        ("files that cannot be read", found.unreadable),
        ("manifests that cannot be read", found.corrupt),
    ):
        line = items.listed(kind)
        if line:
            report.problems.append(line)
    # The images the folders hold: a line whose file is missing (or damaged) is no image.
    report.images = found.state.count(_INTACT)
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


def write_merged_manifest(path: Path, entries: Iterable[dict[str, Any]]) -> None:
    """Write the entries a line each, as they come (a MergedManifest reads them as it goes)."""
    write_file_whole(path, (json.dumps(e, sort_keys=True).encode() + b"\n" for e in entries))
