"""Crash-safe, resumable bulk generation over SampleStream.

On-disk protocol (what makes SIGKILL at any instant safe):
  1. each image goes to `images/.tmp-<name>`, is fsynced, then renamed to `images/<name>`;
  2. after a chunk's files are renamed (and the directory fsynced) its manifest lines are appended
     to `manifest.jsonl` in one write, flushed and fsynced, under one lock (one manifest for all
     shards);
so a manifest line always names a complete file. `job.json` (parameters, pinned version) is
written before the first chunk's files, once the server has sent that chunk: a job the server
rejects leaves no job.json behind. On start the job drops a torn last manifest line, deletes temp
files and files the manifest does not name (killed between 1 and 2), and streams only the
missing index ranges, split over `concurrency` streams. Since image i is a pure
function of (model version, base_seed + i, labels[i % len]), a resumed job writes the same bytes
a clean run would have.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

from genserve_client.client import GenserveClient, SampleStream
from genserve_client.convert import FILE_SUFFIX, image_format
from genserve_client.errors import GenserveClientError
from genserve_client.progress import ProgressBar
from genserve_client.requests import StreamOptions
from genserve_client.results import SampleResult

JOB_FILE = "job.json"
MANIFEST_FILE = "manifest.jsonl"
IMAGES_DIR = "images"
TMP_PREFIX = ".tmp-"
IO_THREADS = 8


class BulkError(Exception):
    """A job that cannot start or go on (changed parameters, a corrupt manifest)."""


@dataclass(frozen=True, slots=True)
class BulkParams:
    """Everything that decides the job's output. A resume must repeat these exactly."""

    model: str
    n: int
    base_seed: int = 0
    labels: tuple[int, ...] = ()
    format: str = "png"
    psi: float | None = None
    version: str = ""  # as asked; the served version is pinned in job.json at the first start

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"a bulk job needs n >= 1 images, got {self.n}")

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["labels"] = list(self.labels)
        return d


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_durably(path: Path, data: bytes) -> None:
    """temp name + fsync + rename: `path` either does not exist or holds all of `data`."""
    tmp = path.with_name(TMP_PREFIX + path.name)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_manifest(path: Path) -> tuple[list[dict[str, Any]], int]:
    """Entries of a manifest and the byte length of its intact part.

    Everything after the last newline is a torn append (the process died inside the write) and is
    ignored; a complete line that is not a JSON object means real corruption and raises.
    """
    if not path.exists():
        return [], 0
    data = path.read_bytes()
    intact = data.rfind(b"\n") + 1
    entries = []
    for lineno, line in enumerate(data[:intact].splitlines(), 1):
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BulkError(f"{path}:{lineno}: corrupt manifest line ({exc.msg})") from None
        if not isinstance(entry, dict) or not isinstance(entry.get("index"), int):
            raise BulkError(f"{path}:{lineno}: manifest line without an integer index")
        entries.append(entry)
    return entries, intact


def missing_ranges(done: Iterable[int], n: int) -> list[tuple[int, int]]:
    """Half-open index ranges of [0, n) not in `done`."""
    ranges: list[tuple[int, int]] = []
    start = 0
    for index in sorted(done):
        if index > start:
            ranges.append((start, index))
        start = index + 1
    if start < n:
        ranges.append((start, n))
    return ranges


def split_ranges(ranges: Sequence[tuple[int, int]], parts: int) -> list[list[tuple[int, int]]]:
    """Cut ranges into at most `parts` shards of nearly equal image counts, keeping order."""
    total = sum(b - a for a, b in ranges)
    if total == 0:
        return []
    per_shard = -(-total // max(1, parts))
    shards: list[list[tuple[int, int]]] = [[]]
    room = per_shard
    for a, b in ranges:
        while a < b:
            if room == 0:
                shards.append([])
                room = per_shard
            take = min(room, b - a)
            shards[-1].append((a, a + take))
            a += take
            room -= take
    return shards


class Manifest:
    """Append-only manifest shared by all shards; one lock orders the appends."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._file = open(path, "ab")  # closed by close()

    def append(self, entries: Sequence[dict[str, Any]]) -> None:
        data = b"".join(json.dumps(e, sort_keys=True).encode() + b"\n" for e in entries)
        with self._lock:
            self._file.write(data)
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


@dataclass(frozen=True, slots=True)
class _Sink:
    """Where the shards put what they receive (shared by all of them)."""

    manifest: Manifest
    progress: ProgressBar
    io_pool: ThreadPoolExecutor


class BulkJob:
    """One bulk job in `out_dir`; `run()` returns the process exit code."""

    def __init__(
        self,
        client: GenserveClient,
        params: BulkParams,
        out_dir: Path,
        *,
        concurrency: int = 1,
        chunk_size: int = 0,
        verify: bool = False,
        progress_stream: TextIO | None = None,
    ) -> None:
        self.client = client
        self.params = params
        self.out_dir = out_dir
        self.images_dir = out_dir / IMAGES_DIR
        self.concurrency = max(1, concurrency)
        self.chunk_size = chunk_size
        self.verify = verify
        self.progress_stream = progress_stream
        self.pinned_version = params.version
        self.suffix = FILE_SUFFIX.get(image_format(params.format))
        if self.suffix is None:
            raise BulkError(
                f"bulk writes image files: --format must be png, jpeg or webp, got {params.format!r}"
            )
        self.name_width = max(6, len(str(max(0, params.n - 1))))
        self.failure: GenserveClientError | BulkError | OSError | None = None
        self._stop = threading.Event()
        self._streams: list[SampleStream] = []
        self._lock = threading.Lock()  # guards _streams, failure, _new_job and the progress bar
        self._new_job: dict[str, Any] | None = None  # job.json still to write (see _commit_job)

    # --- start / resume ------------------------------------------------------------------------

    def file_name(self, index: int) -> str:
        return f"{index:0{self.name_width}d}{self.suffix}"

    def _load_or_create_job(self, resolve_version: Callable[[str], str]) -> None:
        job_path = self.out_dir / JOB_FILE
        if job_path.exists():
            job = json.loads(job_path.read_text())
            if job.get("params") != self.params.to_json():
                theirs, ours = job.get("params", {}), self.params.to_json()
                diff = ", ".join(
                    f"{k}: {theirs.get(k)!r} -> {ours[k]!r}" for k in ours if theirs.get(k) != ours[k]
                )
                raise BulkError(f"{job_path} was started with other parameters ({diff}); use a new --out")
            self.pinned_version = job["pinned_version"]
            return
        # Pin the served version so a job resumed after a model update does not mix versions.
        self.pinned_version = self.params.version or resolve_version(self.params.model)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        # job.json is written once the server has accepted the job (its first chunk), so a job it
        # rejects leaves nothing that would refuse the corrected command.
        self._new_job = {
            "format_version": 1,
            "params": self.params.to_json(),
            "pinned_version": self.pinned_version,
        }

    def _commit_job(self) -> None:
        """Write a new job's job.json (durably, before any manifest line can name an image)."""
        with self._lock:
            if self._new_job is None:
                return
            write_file_durably(self.out_dir / JOB_FILE, json.dumps(self._new_job, indent=2).encode())
            fsync_dir(self.out_dir)
            self._new_job = None

    def recover(self) -> dict[int, dict[str, Any]]:
        """Bring the directory to a state where every manifest line names a complete file and every
        file is named by the manifest; return the entries by index."""
        self.images_dir.mkdir(parents=True, exist_ok=True)
        manifest_path = self.out_dir / MANIFEST_FILE
        entries, intact = read_manifest(manifest_path)
        if manifest_path.exists() and intact != manifest_path.stat().st_size:
            os.truncate(manifest_path, intact)  # drop the torn tail before appending after it
        done: dict[int, dict[str, Any]] = {}
        for entry in entries:
            index = entry["index"]
            if not 0 <= index < self.params.n or index in done:
                raise BulkError(f"{manifest_path}: index {index} is out of range or listed twice")
            done[index] = entry
        lost = [i for i, e in done.items() if not self._entry_intact(e)]
        if lost:  # files deleted or damaged behind the job's back: forget them and redo them
            for index in lost:
                del done[index]
            data = b"".join(json.dumps(e, sort_keys=True).encode() + b"\n" for e in done.values())
            write_file_durably(manifest_path, data)
        named = {e["file"] for e in done.values()}
        for path in self.images_dir.iterdir():
            if f"{IMAGES_DIR}/{path.name}" not in named:
                path.unlink()  # temp files and files written after the last manifest append
        fsync_dir(self.images_dir)
        return done

    def _entry_intact(self, entry: dict[str, Any]) -> bool:
        path = self.out_dir / entry["file"]
        if not path.is_file():
            return False
        return not self.verify or hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"]

    # --- run ---------------------------------------------------------------------------------

    def run(self, resolve_version: Callable[[str], str]) -> None:
        """Generate every missing image; raises the first final error of any shard (after stopping
        the others), so what is on disk stays consistent and a rerun resumes."""
        self._load_or_create_job(resolve_version)
        done = self.recover()
        shards = split_ranges(missing_ranges(done, self.params.n), self.concurrency)
        progress = ProgressBar(self.params.n, initial=len(done), stream=self.progress_stream)
        # fsync costs ~3-5 ms on a VM disk when issued one by one, ~0.3 ms each when issued from
        # several threads at once (the filesystem commits them together): a chunk's files are
        # written and fsynced in parallel.
        sink = _Sink(
            Manifest(self.out_dir / MANIFEST_FILE),
            progress,
            ThreadPoolExecutor(max_workers=IO_THREADS, thread_name_prefix="bulk-io"),
        )
        threads = [threading.Thread(target=self._run_shard, args=(s, sink), daemon=True) for s in shards]
        try:
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        except KeyboardInterrupt:
            self._stop_all()
            for t in threads:
                t.join()
            raise
        finally:
            sink.io_pool.shutdown()
            sink.manifest.close()
            progress.close()
        if self.failure is not None:
            raise self.failure

    def _stop_all(self) -> None:
        self._stop.set()
        with self._lock:
            for stream in self._streams:
                stream.cancel()

    def _run_shard(self, ranges: list[tuple[int, int]], sink: _Sink) -> None:
        try:
            for start, stop in ranges:
                self._run_range(start, stop, sink)
        except (GenserveClientError, BulkError, OSError) as exc:
            # Transient RPC errors were retried inside the stream; this one is final. Keep the
            # first and stop the other shards; run() re-raises it in the main thread.
            with self._lock:
                self.failure = self.failure or exc
            self._stop_all()

    def _open_stream(self, start: int, stop: int) -> SampleStream | None:
        p = self.params
        opts: StreamOptions = {
            "start_index": start,
            "chunk_size": self.chunk_size,
            "base_seed": p.base_seed,
            "labels": p.labels,
            "format": p.format,
            "version": self.pinned_version,
        }
        if p.psi is not None:
            opts["psi"] = p.psi
        with self._lock:  # registered before the stop check ends, so _stop_all() cannot miss it
            if self._stop.is_set():
                return None
            stream = self.client.sample_stream(p.model, stop, **opts)
            self._streams.append(stream)
        return stream

    def _run_range(self, start: int, stop: int, sink: _Sink) -> None:
        stream = self._open_stream(start, stop)
        if stream is None:
            return
        expected = start
        for chunk in stream:
            if self._stop.is_set():
                return
            if chunk.indices != list(range(expected, expected + len(chunk.items))):
                raise BulkError(f"the stream sent indices {chunk.indices[:3]}..., expected {expected}")
            self._commit_job()
            self._write_chunk(chunk, sink)
            expected += len(chunk.items)
            with self._lock:
                sink.progress.update(len(chunk.items))
        if expected != stop and not self._stop.is_set():
            raise BulkError(f"the stream for [{start}, {stop}) ended early, at index {expected}")

    def _write_chunk(self, chunk: SampleResult, sink: _Sink) -> None:
        names = [self.file_name(item.index) for item in chunk.items]
        # list() re-raises the first write error here, before any manifest line is written.
        list(sink.io_pool.map(write_file_durably, [self.images_dir / n for n in names], chunk.raw))
        entries = []
        for item, name in zip(chunk.items, names, strict=True):
            entries.append(
                {
                    "file": f"{IMAGES_DIR}/{name}",
                    "index": item.index,
                    "seed": item.seed,
                    "label": item.label,
                    "model": chunk.provenance.model or self.params.model,
                    "version": chunk.provenance.version or self.pinned_version,
                    "sha256": hashlib.sha256(item.raw).hexdigest(),
                }
            )
        fsync_dir(self.images_dir)  # the renames are durable before the manifest names them
        sink.manifest.append(entries)
