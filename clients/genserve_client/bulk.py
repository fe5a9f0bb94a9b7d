"""Crash-safe, resumable bulk generation over SampleStream.

On-disk protocol (what makes SIGKILL at any instant safe):
  1. each image goes to `images/.tmp-<name>`, is fsynced, then renamed to `images/<name>`;
  2. after a chunk's files are renamed (and the directory fsynced) its manifest lines are appended
     to `manifest.jsonl` in one write, flushed and fsynced, under one lock (one manifest for all
     streams);
so a manifest line always names a complete file. `job.json` (parameters, pinned version and the
model file's sha256) is written before the first chunk's files, once the server has sent that
chunk: a job the server rejects leaves no job.json behind. On start the job takes an exclusive lock
(`job.lock`, flock) for its whole life, drops a torn last manifest line, deletes its own temp files
(images/.tmp-*, .tmp-job.json, .tmp-manifest.jsonl) and its own image files the manifest does not
name (killed between 1 and 2), and streams only the
missing index ranges, cut into streams of at most `stream_images` images (by default 1,024, or the
server's max_stream_images where smaller, also when a restarted server lowers it mid-job) that
`concurrency` workers open one after another. Each stream is one RPC, which the channel's
round_robin policy sends to the next READY replica (channel.py): a job spreads over every replica, a
stream whose replica went away is reopened where it stopped on another one, and a replica that comes
back gets the next streams (so does one added behind a DNS name: streams open on channels at most a
minute old, channelpool.py). Since image i is a pure function of (model file, base_seed + i,
labels[i % len]), a resumed job writes the same bytes a clean run would have.

A job never deletes or overwrites a file it did not write: a new job refuses a folder that is not
empty and holds no job.json (its own leftovers, such as an empty images/ of a job the server
rejected, excepted), and recovery only touches names of the job's own pattern in images/.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import hashlib
import json
import logging
import os
import random
import re
import socket
import stat
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, TextIO, TypeVar

import grpc

from genserve.v1 import genserve_pb2
from genserve_client.channelpool import DEFAULT_PERIOD_S, FreshChannels
from genserve_client.classes import class_refusal
from genserve_client.client import GenserveClient, SampleStream
from genserve_client.convert import FILE_SUFFIX, image_format
from genserve_client.errors import GenserveClientError, closed_client_error
from genserve_client.pngmeta import png_text, with_png_text
from genserve_client.progress import ProgressBar
from genserve_client.requests import StreamOptions
from genserve_client.results import SampleResult
from genserve_client.retry import is_permanent
from genserve_contract.kinds import SAMPLE_KINDS
from genserve_contract.staging import create_beside

JOB_FILE = "job.json"
MANIFEST_FILE = "manifest.jsonl"
IMAGES_DIR = "images"
LOCK_FILE = "job.lock"
TMP_PREFIX = ".tmp-"
IO_THREADS = 8
FORMAT_VERSION = 2
# Images per stream: a stream is reopened (on the next replica) at least this often. Reopening
# costs one RPC start; 1024 images of even the smallest model take seconds. A server whose
# max_stream_images (ModelInfo) is smaller gets streams of that many.
DEFAULT_STREAM_IMAGES = 1024
# How long a job keeps retrying transient errors (a server restart, a GPU pod start) without any
# progress before it stops; each stream counts from its own last chunk or the job's, the later: a
# stream refused while the job's other streams progress (more workers than the server's
# max_concurrent_sample_streams) waits for a slot instead of stopping the job.
DEFAULT_RETRY_WINDOW_S = 300.0
# A stream has no deadline (a job may run for hours), so one whose server stopped sending while the
# connection stays alive (a hung handler) would hold its job forever: a stream that sends nothing for
# the idle bound, max(IDLE_FLOOR_S, IDLE_FACTOR x the slowest chunk seen so far in the job), is
# cancelled and resumed as a broken one (--retry-window).
IDLE_FLOOR_S = 120.0
IDLE_FACTOR = 5.0

logger = logging.getLogger(__name__)
BACKOFF_INITIAL_S = 0.5
BACKOFF_MAX_S = 15.0
# What a job's requests can carry (genserve.proto): image i uses seed base_seed + i and seeds are in
# [0, 2^63) (int64); labels are int32 class indices; SampleRequest.count and chunk_size are uint32.
# A value outside these would fail building a stream's request, so a job refuses it before it starts.
SEED_LIMIT = 2**63
LABEL_LIMIT = 2**31
UINT32_LIMIT = 2**32


def _changed(used: Mapping[str, str], expected: Mapping[str, str]) -> str:
    """The models whose digest differs between the two (or that only one names), sorted, comma-separated."""
    return ", ".join(sorted(m for m in used.keys() | expected.keys() if used.get(m) != expected.get(m)))


def _named(digests: Mapping[str, str]) -> str:
    """{model: digest} as a refusal names it: 'mapping=D, decoder=E' (sorted by model)."""
    return ", ".join(f"{model}={digest}" for model, digest in sorted(digests.items()))


class BulkError(Exception):
    """A job that cannot start or go on (changed parameters, a corrupt manifest)."""


class BulkBusy(BulkError):
    """Another process holds the job folder's lock."""


class BulkRetryExhausted(BulkError):
    """Transient errors lasted longer than the retry window; the job is resumable as it is."""


class VersionNotServed(BulkError):
    """The server does not have the version of a model a job names (GetModel NOT_FOUND naming it).
    `served`: the versions it has, as GetModel for all of them lists them ("1 (READY), 2 (LOADING)")."""

    def __init__(self, model: str, version: str, served: str) -> None:
        super().__init__(f"model {model!r} has no version {version!r} on the server (served: {served})")
        self.model, self.version, self.served = model, version, served


class BulkIncomplete(BulkError):
    """The job ended with images missing: a stream's worker stopped on an unexpected error (a bug),
    or a stream ended without its images. What is on disk is consistent; the job is resumable."""


@dataclass(frozen=True, slots=True)
class ServedModel:
    """A model version as the server serves it, and the most images one stream of it may send
    (ModelInfo.max_stream_images; 0: the server does not say). `weights_sha256`: its external data
    files' digest (ModelVersionInfo.weights_sha256), "" where it has none or the server does not say.
    `card_sha256`: the digest of the card.json it loaded (ModelVersionInfo.card_sha256), "" where the
    server does not say.
    `class_names`: that version's classes (ModelInfo.class_names), which the job's labels must be
    among; None where the resolver does not say (nothing is checked)."""

    version: str
    sha256: str
    max_stream_images: int = 0
    weights_sha256: str = ""
    class_names: tuple[str, ...] | None = None
    card_sha256: str = ""


@dataclass(frozen=True, slots=True)
class BulkParams:
    """Everything that decides the job's output. A resume must repeat these exactly, except `n`,
    which may grow (the job is extended)."""

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
        if self.n >= UINT32_LIMIT:
            raise ValueError(f"a bulk job holds fewer than 2^32 images (a uint32 count), got n={self.n}")
        if not 0 <= self.base_seed <= SEED_LIMIT - self.n:
            raise ValueError(
                f"a bulk job's seeds base_seed .. base_seed + n - 1 must be in [0, 2^63): base_seed must be "
                f"in [0, {SEED_LIMIT - self.n}] for n={self.n}, got {self.base_seed}"
            )
        bad = [label for label in self.labels if not 0 <= label < LABEL_LIMIT]
        if bad:
            raise ValueError(f"a bulk job's labels are class indices in [0, 2^31), got {bad[0]}")

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["labels"] = list(self.labels)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> BulkParams:
        return cls(
            model=d["model"],
            n=d["n"],
            base_seed=d.get("base_seed", 0),
            labels=tuple(d.get("labels", ())),
            format=d.get("format", "png"),
            psi=d.get("psi"),
            version=d.get("version", ""),
        )


def read_job(out_dir: Path) -> dict[str, Any] | None:
    """The job.json of `out_dir`, or None when there is none."""
    path = out_dir / JOB_FILE
    try:
        job: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BulkError(f"{path}: not a bulk job file ({exc})") from None
    if not isinstance(job, dict) or not isinstance(job.get("params"), dict):
        raise BulkError(f"{path}: not a bulk job file (no params)")
    return job


def file_above(path: Path) -> Path | None:
    """The file (anything but a folder) that `path`, a path not there, lies under: no folder can be
    made there (mkdir's, and a read's, bare "Not a directory"); None where it lies under folders."""
    for parent in path.parents:
        if parent.exists():
            return None if parent.is_dir() else parent
    return None


def load_params(out_dir: Path) -> tuple[BulkParams, Shard | None]:
    """The parameters and shard of the job in `out_dir` (for `bulk --resume DIR`)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise BulkError(
            f"{out_dir} is a file, not a bulk job's folder: "
            "resume the folder the job was started in (its --out)"
        )
    if not out_dir.exists() and (above := file_above(out_dir)) is not None:
        raise BulkError(f"{out_dir} lies under {above}, a file, not a folder: no bulk job is there")
    job = read_job(out_dir)
    if job is None:
        raise BulkError(f"{out_dir} holds no bulk job (no {JOB_FILE}); start one with --model, --n and --out")
    return job_settings(out_dir / JOB_FILE, job)


def job_settings(path: Path, job: dict[str, Any]) -> tuple[BulkParams, Shard | None]:
    """The parameters and shard of job.json `path` (read as `job`), its other fields checked: a
    BulkError naming the file when one is missing or of the wrong kind (a hand-edited file)."""
    try:
        shard = Shard(*job["shard"]) if job.get("shard") else None
        params = BulkParams.from_json(job["params"])
    except (KeyError, TypeError, ValueError) as exc:
        raise BulkError(f"{path}: unreadable params ({exc!r})") from None
    if not isinstance(job.get("pinned_version"), str):
        raise BulkError(f"{path}: field 'pinned_version' must be a string, got {job.get('pinned_version')!r}")
    width = job.get("name_width", 1)
    if not isinstance(width, int) or isinstance(width, bool) or width < 1:
        raise BulkError(f"{path}: field 'name_width' must be a positive integer, got {width!r}")
    return params, shard


SHARD_ENV = "JOB_COMPLETION_INDEX"  # set by a Kubernetes Indexed Job in each pod


@dataclass(frozen=True, slots=True)
class Shard:
    """Shard `index` of `count`: a contiguous range of the job's indices (so of its seeds), run
    as its own job in its own folder, resumable on its own."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise ValueError(f"--shard: I must be in [0, N), got {self.index}/{self.count}")

    def range(self, n: int) -> tuple[int, int]:
        """[lo, hi) of a job of n images; the shards' ranges tile [0, n) in order."""
        return self.index * n // self.count, (self.index + 1) * n // self.count

    def folder(self, out_dir: Path) -> Path:
        return out_dir / f"shard-{self.index:05d}-of-{self.count:05d}"

    @classmethod
    def parse(cls, text: str, env: Mapping[str, str] | None = None) -> Shard:
        """`I/N`, or `N` with I from $JOB_COMPLETION_INDEX (a Kubernetes Indexed Job)."""
        index_text, _, count_text = text.rpartition("/")
        if not index_text:
            index_text = (os.environ if env is None else env).get(SHARD_ENV, "")
            if not index_text:
                raise ValueError(f"--shard {text}: give I/N, or N with I in ${SHARD_ENV}")
        try:
            return cls(int(index_text), int(count_text))
        except ValueError as exc:
            if "--shard" in str(exc):
                raise
            raise ValueError(f"--shard: expected I/N or N (integers), got {text!r}") from None


def foreign_entries(out_dir: Path) -> list[str]:
    """What a folder without job.json holds that no bulk job of ours would have left there.

    A job writes job.json before its first image, so without job.json its only possible leftovers
    are an empty images/, an empty manifest, the lock file and job.json's temp file.
    """
    if not out_dir.exists():
        return []
    if not out_dir.is_dir():
        return [out_dir.name]
    foreign = []
    for path in sorted(out_dir.iterdir()):
        name = path.name
        if name == IMAGES_DIR and path.is_dir() and not path.is_symlink():
            foreign += [
                f"{IMAGES_DIR}/{p.name}" + ("/" if p.is_dir() else "") for p in sorted(path.iterdir())
            ]
        elif name == MANIFEST_FILE and path.is_file() and path.stat().st_size == 0:
            continue
        elif name in (LOCK_FILE, TMP_PREFIX + JOB_FILE) and path.is_file():
            continue
        else:
            foreign.append(name + ("/" if path.is_dir() else ""))
    return foreign


def describe_shard(shard: Shard | None) -> str:
    return f"shard {shard.index}/{shard.count}" if shard else "a whole job (no --shard)"


def describe_entries(entries: Sequence[str], shown: int = 5) -> str:
    more = f" and {len(entries) - shown} more" if len(entries) > shown else ""
    return ", ".join(entries[:shown]) + more


# Where Windows' lock of job.lock lies: one byte past anything the file holds, so that the holder's
# line at its start stays readable by a second run (a locked range cannot be read on Windows).
WINDOWS_LOCK_OFFSET = 1 << 20


def lock_exclusively(fd: int) -> None:
    """Lock `fd`'s file for this open file; BlockingIOError where another run holds it. flock on
    Unix; msvcrt.locking on Windows, which has no fcntl (released, too, when the file is closed)."""
    if sys.platform == "win32":
        import msvcrt

        os.lseek(fd, WINDOWS_LOCK_OFFSET, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EDEADLOCK):
                raise BlockingIOError(exc.errno, exc.strerror) from exc
            raise
        finally:
            os.lseek(fd, 0, os.SEEK_SET)
    else:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


class JobLock:
    """An exclusive lock (flock; msvcrt.locking on Windows) on `job.lock` in the job folder, held
    for the job's life. The file names the holder (pid, host, start time) so a second run can say
    who it is; the OS releases the lock when the holder dies, whatever the file says."""

    def __init__(self, out_dir: Path) -> None:
        self.path = out_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        # Never through a link (a copied or shared job folder): its target would be truncated and
        # overwritten with the holder's line. Windows has no O_NOFOLLOW.
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError as exc:
            if exc.errno == errno.ELOOP or self.path.is_symlink():
                raise BulkError(
                    f"{self.path} is a symbolic link, not a job's lock file: remove it and run again"
                ) from None
            raise
        try:
            lock_exclusively(fd)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace")
            os.close(fd)
            raise BulkBusy(
                f"{self.path.parent} is in use by another bulk run ({describe_holder(holder)}); "
                "wait for it to end or stop it, then run again"
            ) from None
        except OSError:
            os.close(fd)
            raise
        started = datetime.now(UTC).isoformat(timespec="seconds")
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": started}
        try:
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)  # no os.pwrite on Windows
            os.write(fd, json.dumps(info).encode() + b"\n")
        except OSError as exc:  # a full disk: say where, as every other write of the job does
            os.close(fd)
            name_file(exc, self.path)
            raise
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None


def describe_holder(text: str) -> str:
    try:
        info = json.loads(text)
        return f"pid {info['pid']} on host {info['host']}, started {info['started']}"
    except (json.JSONDecodeError, KeyError, TypeError):
        return "holder not yet recorded"


def name_file(exc: OSError, path: Path) -> None:
    """Make `exc` name `path` when it names no file: the OS's write, flush and fsync errors (a full
    disk's ENOSPC, EIO, EDQUOT) name none, and "No space left on device" alone does not say where."""
    if exc.filename is None and exc.errno is not None:
        exc.filename = str(path)


def fsync_dir(path: Path) -> None:
    if sys.platform == "win32":  # no directory opens with os.open there; NTFS journals a rename
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        name_file(exc, path)
        raise
    finally:
        os.close(fd)


def write_file_durably(path: Path, data: bytes | Iterable[bytes]) -> None:
    """temp name + fsync + rename: `path` either does not exist (or is left as it was) or holds all
    of `data` (bytes, or its pieces in order). An error names the file (the temp name) it was
    writing, which is removed (a full disk's partial file would hold on to the space to free)."""
    tmp = path.with_name(TMP_PREFIX + path.name)
    try:
        # The temp name is the job's own: whatever holds it (a symlink, which recovery leaves) is
        # removed, never written through, and the file is created anew.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        with open(tmp, "xb") as f:
            f.writelines([data] if isinstance(data, bytes) else data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        name_file(exc, tmp)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    os.replace(tmp, path)


def write_file_whole(path: Path, data: bytes | Iterable[bytes]) -> None:
    """`path` holds all of `data` (bytes, or its pieces in order), or is left as it was: written
    under a temp name beside it, renamed into place, the temp file removed on an error (a full
    disk), which names `path`. For the CLI's outputs (a picture, a merged manifest), which need no
    fsync: a later tool must never take a partial file for a whole one, and "No space left on
    device" alone does not say where.

    A symlink is written through (the file it points to is replaced, the link kept); a file replaced
    keeps its permissions; a path that is no regular file (a FIFO, /dev/stdout, a terminal) is
    written into as it is: no file renamed over it could take its place."""
    try:
        existing: os.stat_result | None = os.stat(path)
    except OSError:
        existing = None
    if existing is not None and not stat.S_ISREG(existing.st_mode) and not stat.S_ISDIR(existing.st_mode):
        try:
            with open(path, "wb") as f:
                f.writelines([data] if isinstance(data, bytes) else data)
        except OSError as exc:
            name_file(exc, path)
            raise
        return
    target = Path(os.path.realpath(path)) if path.is_symlink() else path
    tmp: Path | None = None
    try:
        try:
            replaced = existing is not None and stat.S_ISREG(existing.st_mode)
            mode = stat.S_IMODE(existing.st_mode) if existing is not None and replaced else 0o666
            handle, tmp = _new_file_beside(target, mode)
            with handle as f:
                f.writelines([data] if isinstance(data, bytes) else data)
            if replaced:  # exactly its permissions (the umask may have narrowed them)
                os.chmod(tmp, mode)  # no os.fchmod on Windows before 3.13
            os.replace(tmp, target)
        except BaseException:
            if tmp is not None:
                tmp.unlink(missing_ok=True)
            raise
    except OSError as exc:
        if exc.filename in (None, str(tmp)) and exc.errno is not None:
            # A new error: setting filename2 to None would print "-> None" after the name.
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise


def _new_file_beside(target: Path, mode: int) -> tuple[BinaryIO, Path]:
    """A file created beside `target` under a temp name of its own (`.NAME.PID.RANDOM.tmp`,
    genserve_contract.staging), opened to write: created exclusively, with `mode` (less the umask)
    from the start. An error names no file (write_file_whole names `target`)."""
    try:
        fd, tmp = create_beside(target, mode)
    except FileExistsError:
        raise OSError(errno.EEXIST, "no free temp name beside it") from None
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror) from exc
    return os.fdopen(fd, "wb"), tmp


def read_manifest(path: Path) -> tuple[list[dict[str, Any]], int]:
    """Entries of a manifest and the byte length of its intact part.

    Everything after the last newline is a torn append (the process died inside the write) and is
    ignored; a complete line that is not a JSON object means real corruption and raises.
    """
    if not path.exists():
        return [], 0
    data = path.read_bytes()
    intact = data.rfind(b"\n") + 1
    entries = [
        manifest_entry(path, lineno, line) for lineno, line in enumerate(data[:intact].splitlines(), 1)
    ]
    return entries, intact


def manifest_entry(path: Path, lineno: int, line: bytes) -> dict[str, Any]:
    """Line `lineno` of manifest `path` as an entry; BulkError naming both when it is none."""
    try:
        entry = json.loads(line)
    except json.JSONDecodeError as exc:
        raise BulkError(f"{path}:{lineno}: corrupt manifest line ({exc.msg})") from None
    except UnicodeDecodeError as exc:  # a damaged byte: json.loads decodes the line before parsing it
        raise BulkError(
            f"{path}:{lineno}: corrupt manifest line (not UTF-8: {exc.reason} at byte {exc.start})"
        ) from None
    if not isinstance(entry, dict) or not isinstance(entry.get("index"), int):
        raise BulkError(f"{path}:{lineno}: manifest line without an integer index")
    if not isinstance(entry.get("file"), str):
        raise BulkError(f"{path}:{lineno}: manifest line without a file name")
    folder, _, name = entry["file"].partition("/")
    if folder != IMAGES_DIR or name in ("", ".", "..") or any(c in name for c in "/\\\0"):
        # Joined to the job folder as it is read: `..` or an absolute path (a manifest from someone
        # else, a copied folder) would have resume and verify read and hash files outside the job.
        raise BulkError(
            f"{path}:{lineno}: field 'file' must name a file in {IMAGES_DIR}/ (as the job writes "
            f"{IMAGES_DIR}/NAME), got {entry['file']!r}"
        )
    return entry


def iter_manifest(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """The entries of a manifest as read_manifest takes them, each with its line's byte offset, read
    a line at a time (a job's manifest may name millions of images). A torn last line is ignored; a
    line that is no entry raises BulkError when it is reached."""
    if not path.exists():
        return
    with open(path, "rb") as f:
        offset = 0
        for lineno, line in enumerate(f, 1):
            if not line.endswith(b"\n"):
                return  # a torn append
            yield offset, manifest_entry(path, lineno, line)
            offset += len(line)


def missing_ranges(done: Iterable[int], n: int, start: int = 0) -> list[tuple[int, int]]:
    """Half-open index ranges of [start, n) not in `done` (which holds no index below start)."""
    ranges: list[tuple[int, int]] = []
    for index in sorted(done):
        if index > start:
            ranges.append((start, index))
        start = index + 1
    if start < n:
        ranges.append((start, n))
    return ranges


class DoneIndices:
    """Which indices of [lo, hi) a job has (listed in its manifest): one byte each, as a job may
    hold millions of images."""

    def __init__(self, lo: int, hi: int) -> None:
        self.lo = lo
        self._done = bytearray(max(0, hi - lo))

    def __contains__(self, index: int) -> bool:
        return 0 <= index - self.lo < len(self._done) and self._done[index - self.lo] != 0

    def __len__(self) -> int:
        return self._done.count(1)

    def __iter__(self) -> Iterator[int]:
        pos = self._done.find(1)
        while pos != -1:
            yield self.lo + pos
            pos = self._done.find(1, pos + 1)

    def add(self, index: int) -> None:
        self._done[index - self.lo] = 1

    def discard(self, index: int) -> None:
        self._done[index - self.lo] = 0

    def add_range(self, start: int, stop: int) -> None:
        a, b = max(0, start - self.lo), min(len(self._done), stop - self.lo)
        if a < b:
            self._done[a:b] = bytes([1]) * (b - a)

    def missing_ranges(self) -> list[tuple[int, int]]:
        """Half-open ranges of the indices not done, in order (as missing_ranges)."""
        ranges: list[tuple[int, int]] = []
        start = self._done.find(0)
        while start != -1:
            stop = self._done.find(1, start)
            if stop == -1:
                stop = len(self._done)
            ranges.append((self.lo + start, self.lo + stop))
            start = self._done.find(0, stop)
        return ranges


def plan_streams(ranges: Sequence[tuple[int, int]], parts: int, max_images: int = 0) -> list[tuple[int, int]]:
    """Cut ranges, in order, into the streams of a run: near-equal pieces, at least `parts` of them
    (so that `parts` workers are busy) and of at most `max_images` images each (0: no bound)."""
    total = sum(b - a for a, b in ranges)
    if total == 0:
        return []
    pieces = max(1, parts, -(-total // max_images) if max_images > 0 else 0)
    pieces = min(pieces, total)
    cuts = [k * total // pieces for k in range(1, pieces)]  # offsets into the missing images
    streams: list[tuple[int, int]] = []
    offset = 0
    for lo, hi in ranges:
        start = lo
        for cut in cuts[bisect.bisect_right(cuts, offset) : bisect.bisect_left(cuts, offset + hi - lo)]:
            streams.append((start, lo + cut - offset))
            start = lo + cut - offset
        streams.append((start, hi))
        offset += hi - lo
    return streams


class StreamQueue:
    """The streams still to open, taken in index order by whichever worker is free: a replica that
    answers faster takes more of them, and each new stream goes to the next replica."""

    def __init__(self, streams: Sequence[tuple[int, int]]) -> None:
        self._streams = list(reversed(streams))
        self._lock = threading.Lock()

    def take(self) -> tuple[int, int] | None:
        with self._lock:
            return self._streams.pop() if self._streams else None


def name_width(n: int) -> int:
    """Digits of image file names: at least 6, enough for index n - 1."""
    return max(6, len(str(max(0, n - 1))))


class Manifest:
    """Append-only manifest shared by all streams; one lock orders the appends."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._file = open(path, "ab")  # closed by close()
        self._failed = False
        st = os.fstat(self._file.fileno())
        self._identity = (st.st_dev, st.st_ino)

    def append(self, entries: Sequence[dict[str, Any]]) -> None:
        data = b"".join(json.dumps(e, sort_keys=True).encode() + b"\n" for e in entries)
        with self._lock:
            try:
                self._file.write(data)
                self._file.flush()
                os.fsync(self._file.fileno())
                self._check_in_place()
            except OSError as exc:
                self._failed = True
                name_file(exc, self.path)
                raise

    def _check_in_place(self) -> None:
        """The lines just appended went to the file at `path`: one removed or replaced under the job
        (an `rm -rf` of its folder racing it) would take every later line with it, and the job would
        report a manifest that is not there."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            st = None
        if st is None or (st.st_dev, st.st_ino) != self._identity:
            raise OSError(
                errno.ENOENT,
                "the manifest was removed or replaced while the job ran (the lines since went with it)",
                str(self.path),
            )

    def close(self) -> None:
        try:
            self._file.close()
        except OSError:
            # The entries a failed append left in the buffer fail again here (a full disk): that
            # error is already the job's, and these entries were never durable (their images are
            # found again by the next run's recovery). Raised here, it would replace the job's own
            # error and skip closing the channels.
            if not self._failed:
                raise


def version_order(v: genserve_pb2.ModelVersionInfo) -> tuple[int, str]:
    """Sort key of versions by number (their names are numeric: longer is larger)."""
    return len(v.version), v.version


def kind_refusal(model: str, kind: str, *, cli: bool = False) -> str | None:
    """Why a bulk job of `model`, a model of `kind`, can never run (its streams would be refused for
    the kind); None where it can, or where the server does not say its kind (an older server). The
    model is named as its caller gave it: --model on the command line (`cli`), else BulkParams' model=."""
    if not kind or kind in SAMPLE_KINDS:
        return None
    given = f"--model {model!r}" if cli else f"model={model!r}"
    return (
        f"bulk: {given} is a {kind}; bulk streams images from seeds "
        f"(SampleStream), which only {', '.join(SAMPLE_KINDS)} models serve"
    )


def served_versions(info: genserve_pb2.ModelInfo) -> str:
    """The versions a GetModel answer lists, as refusals name them: "1 (READY), 2 (LOADING)"."""
    return ", ".join(f"{v.version} ({state_label(v.state)})" for v in info.versions) or "none"


def version_answer(client: GenserveClient, model: str, version: str = "") -> genserve_pb2.ModelInfo:
    """GetModel's answer for `model`'s `version`: that version's kind, class names and
    max_stream_images, not those of the version served by default ("" asks for that one). A version
    the server does not have (NOT_FOUND) is a VersionNotServed naming the versions it serves (from a
    GetModel of all of them, whose NOT_FOUND, the model's own, is raised as it is). The one place
    that tells the two NOT_FOUNDs apart, for the CLI and the library's jobs alike."""
    try:
        info = client.get_model(model, version)
    except GenserveClientError as exc:
        if exc.code != grpc.StatusCode.NOT_FOUND or not version:
            raise
        info = client.get_model(model)  # the model's versions, without it
        if any(v.version == version for v in info.versions):
            # Loaded in between: that version's own answer (this one describes the default version).
            info = client.get_model(model, version)
    if version and all(v.version != version for v in info.versions):
        raise VersionNotServed(model, version, served_versions(info))
    return info


def served_model(
    client: GenserveClient, model: str, version: str, info: genserve_pb2.ModelInfo | None = None
) -> ServedModel:
    """The version the server serves for `version` ("" = the highest READY one) and its sha256,
    from `info` where given (a GetModel answer just received), else from GetModel for that version
    (version_answer: its max_stream_images, not the default version's).

    A version still LOADING (a server that is starting) is a transient UNAVAILABLE, so the job's
    retry window waits for it; a version the server does not have is final.
    """
    if info is None:
        info = version_answer(client, model, version)
    served = served_versions(info)
    if version:
        candidates = [v for v in info.versions if v.version == version]
        if not candidates:
            raise VersionNotServed(model, version, served)
    else:
        ready = [v for v in info.versions if v.state == genserve_pb2.MODEL_STATE_READY]
        candidates = ready or list(info.versions)
    if not candidates:
        raise BulkError(f"model {model!r} has no version on the server (served: {served})")
    v = max(candidates, key=version_order)
    if v.state == genserve_pb2.MODEL_STATE_LOADING:
        raise GenserveClientError(
            grpc.StatusCode.UNAVAILABLE, f"model {model!r} version {v.version} is LOADING"
        )
    if v.state != genserve_pb2.MODEL_STATE_READY:
        raise BulkError(f"model {model!r} version {v.version} is not READY (served: {served})")
    return ServedModel(
        v.version,
        v.model_sha256,
        info.max_stream_images,
        v.weights_sha256,
        tuple(info.class_names),
        v.card_sha256,
    )


def model_answer(client: GenserveClient, model: str, version: str = "") -> genserve_pb2.ModelInfo:
    """GetModel's answer for `model` (`version`'s where one is named) to resolve a job's labels
    from and pin its version from (BulkJob.run(info=...)): a version it would pin still LOADING is
    a transient UNAVAILABLE, for a RetryWindow to ask again, so the labels are never of an answer
    other than the one the version is pinned from."""
    info = version_answer(client, model, version)
    try:
        served_model(client, model, version, info)
    except BulkError:
        pass  # refused where the answer is used, as a usage error where it is one
    return info


def state_label(state: genserve_pb2.ModelState.ValueType) -> str:
    name: str = genserve_pb2.ModelState.Name(state)
    return name.removeprefix("MODEL_STATE_")


T = TypeVar("T")


class RetryWindow:
    """Keeps retrying transient errors (UNAVAILABLE, RESOURCE_EXHAUSTED) with capped exponential
    backoff and jitter until `window_s` have passed without progress; then raises
    BulkRetryExhausted. The client's own per-call retries run inside each attempt."""

    def __init__(
        self,
        window_s: float,
        retryable: frozenset[grpc.StatusCode],
        stop: threading.Event,
        rng: random.Random | None = None,
    ) -> None:
        self.window_s = window_s
        self.retryable = retryable
        self.stop = stop
        self._rng = rng or random.Random()

    def pause(self, exc: GenserveClientError, since: float, failures: int) -> None:
        """After failure number `failures` since the last progress at `since` (monotonic): wait
        before the next try (returns early when the job is stopped), or raise when final."""
        if exc.code not in self.retryable or is_permanent(exc.code, exc.details):
            raise exc
        left = self.window_s - (time.monotonic() - since)
        if left <= 0:
            raise BulkRetryExhausted(
                f"gave up after retrying for {self.window_s:g} s without progress (--retry-window); "
                f"last error: {exc}"
            ) from exc
        cap = min(BACKOFF_MAX_S, BACKOFF_INITIAL_S * 2 ** min(failures - 1, 30))
        self.stop.wait(min(left, self._rng.uniform(cap / 2, cap)))

    def call(self, fn: Callable[[], T]) -> T:
        since, failures = time.monotonic(), 0
        while True:
            try:
                return fn()
            except GenserveClientError as exc:
                failures += 1
                self.pause(exc, since, failures)
                if self.stop.is_set():
                    raise


@dataclass(frozen=True, slots=True)
class _Sink:
    """Where the streams put what they receive (shared by all of them)."""

    manifest: Manifest
    progress: ProgressBar
    io_pool: ThreadPoolExecutor


class BulkJob:
    """One bulk job in `out_dir`; `run()` generates every missing image or raises."""

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
        retry_window_s: float = DEFAULT_RETRY_WINDOW_S,
        shard: Shard | None = None,
        stream_images: int | None = None,
        channel_period_s: float = DEFAULT_PERIOD_S,
        idle_limit_s: float | None = None,
        cli: bool = False,
    ) -> None:
        # Whether refusals name the settings by the CLI's flags (--out, --n, --stream-images), else by
        # the arguments a library caller gave (out_dir=, BulkParams' n=, stream_images=).
        self.cli = cli
        if stream_images is not None and stream_images < 1:
            raise ValueError(
                f"{self._given('stream-images', 'stream_images')} must be >= 1, got {stream_images}"
            )
        if not 0 <= chunk_size < UINT32_LIMIT:
            raise ValueError(
                f"{self._given('chunk-size', 'chunk_size')} must be 0 (the server's default) or "
                f"1..{UINT32_LIMIT - 1} images, got {chunk_size}"
            )
        self.client = client
        # None: DEFAULT_STREAM_IMAGES, or the server's max_stream_images where smaller (fit_streams).
        self.stream_images_given = stream_images
        self.stream_images = stream_images or DEFAULT_STREAM_IMAGES
        self.params = params
        self.shard = shard
        self.lo, self.hi = shard.range(params.n) if shard else (0, params.n)
        self.out_dir = out_dir
        self.images_dir = out_dir / IMAGES_DIR
        self.concurrency = max(1, concurrency)
        self.chunk_size = chunk_size
        self.verify = verify
        self.progress_stream = progress_stream
        self.pinned_version = params.version
        self.model_sha256 = ""
        # The digest of the external data files the model loads its weights from (a graph retrained
        # keeps its bytes, and its sha256, where its weights are in model.onnx.data): "" where it
        # has none, or not learned yet (a job.json from before the field).
        self.weights_sha256 = ""
        # {model: sha256} of the models the images also went through (a style generator's mapping),
        # learned from the first chunk; None: not learned yet (a new job, or a job.json from before).
        self.used_models: dict[str, str] | None = None
        # {model: weights_sha256} of those of them that keep their weights in external data files
        # (UsedModel.weights_sha256: a mapping retrained under the same graph keeps its sha256), as
        # used_models: None not learned yet, empty not reported (an older server, no external data).
        self.used_weights_sha256: dict[str, str] | None = None
        # The digest of the card.json the model loaded (its w_avg, output_range or tile defaults
        # shape the images under the same graph and weights), and {model: card_sha256} of the used
        # models' (UsedModel.card_sha256), as weights_sha256 and used_weights_sha256: "" or None not
        # learned yet (a job.json from before the field), empty not reported (an older server).
        self.card_sha256 = ""
        self.used_card_sha256: dict[str, str] | None = None
        suffix = FILE_SUFFIX.get(image_format(params.format))
        if suffix is None:
            raise BulkError(
                f"bulk writes image files: --format must be png, jpeg or webp, got {params.format!r}"
            )
        self.suffix = suffix
        # Names shaped as the job's own (see recover, which touches only file_name(i) of its indices
        # and their temp names): images/NNNNNN.png.
        self._own_name = re.compile(rf"({re.escape(TMP_PREFIX)})?\d+{re.escape(suffix)}")
        self.name_width = name_width(params.n)
        # The first final error of any worker (run() raises it); an unexpected one is wrapped in
        # BulkIncomplete, so a worker never dies silently.
        self.failure: Exception | None = None
        # The indices the manifest lists: recovered (recover, in _run_locked), then every chunk
        # whose manifest lines this run appended.
        self._done = DoneIndices(self.lo, self.lo)
        self._stop = threading.Event()
        self.window = RetryWindow(retry_window_s, client.retry.retryable_codes, self._stop)
        # Open streams and the client each was opened on (see channelpool.py).
        self._streams: dict[SampleStream, GenserveClient] = {}
        self._channels = FreshChannels(client, channel_period_s)
        # The clients of the workers' GetModel lookups under way: _stop_all closes them (see _model_info).
        self._lookups: set[GenserveClient] = set()
        self._lock = threading.Lock()  # guards _streams, failure, _pending_job and the progress bar
        # When any stream of this run last wrote a chunk (monotonic; a float, assigned atomically).
        self._job_progress_at = time.monotonic()
        # The idle bound of a stream (see IDLE_FLOOR_S): given, or derived from the slowest chunk.
        self.idle_limit_given = idle_limit_s
        self._slowest_chunk_s = 0.0
        # When each open stream last received a chunk (or opened); the streams cancelled as stalled,
        # with the bound they exceeded; how many stalled in this run.
        self._chunk_at: dict[SampleStream, float] = {}
        self._stalled: dict[SampleStream, float] = {}
        self.stalls = 0
        self._pending_job: dict[str, Any] | None = None  # job.json still to write (see _commit_job)
        # Whether out_dir held this job's job.json at some point of the run (found there, or written
        # at the first chunk): a job.json gone after that means the folder went away, not that no
        # image was written.
        self.job_file_written = False

    # --- start / resume ------------------------------------------------------------------------

    def _given(self, flag: str, arg: str, value: object = None) -> str:
        """A setting named as its caller gave it: `--flag value` from the CLI, else `arg=value`
        (the flag or argument alone without a value)."""
        if value is None:
            return f"--{flag}" if self.cli else arg
        return f"--{flag} {value}" if self.cli else f"{arg}={value!r}"

    def file_name(self, index: int) -> str:
        return f"{index:0{self.name_width}d}{self.suffix}"

    def check_folder(self) -> None:
        """Refuse a folder that holds files this job did not write (it would delete them)."""
        if (self.out_dir / JOB_FILE).exists():
            return
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise BulkError(f"{self._given('out', 'out_dir', str(self.out_dir))} is a file, not a folder")
        if not self.out_dir.exists() and (above := file_above(self.out_dir)) is not None:
            # Refused as a file at out_dir is, not a bare "Not a directory" from mkdir, which the same
            # command would meet again.
            raise BulkError(
                f"{self._given('out', 'out_dir', str(self.out_dir))} lies under {above}, a file, not a folder"
            )
        foreign = foreign_entries(self.out_dir)
        if foreign:
            raise BulkError(
                f"{self.out_dir} is not empty and holds no bulk job ({JOB_FILE}): it contains "
                f"{describe_entries(foreign)}; a bulk job never deletes or overwrites files it did "
                f"not write: use a new or empty {self._given('out', 'out_dir')}"
            )

    def _job_json(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "params": self.params.to_json(),
            "pinned_version": self.pinned_version,
            "model_sha256": self.model_sha256,
            "weights_sha256": self.weights_sha256,
            "used_models": self.used_models,
            "used_weights_sha256": self.used_weights_sha256,
            "card_sha256": self.card_sha256,
            "used_card_sha256": self.used_card_sha256,
            "name_width": self.name_width,
            "shard": [self.shard.index, self.shard.count] if self.shard else None,
        }

    def _load_or_create_job(self, resolve: Callable[[str, str], ServedModel]) -> None:
        job_path = self.out_dir / JOB_FILE
        job = read_job(self.out_dir)
        if job is None:
            # Pin the served version and its file's sha256, so a resume after a model update or
            # a model replaced in place does not mix two models in one job.
            served = self.window.call(lambda: resolve(self.params.model, self.params.version))
            self._fit_streams(served.max_stream_images)
            self.pinned_version, self.model_sha256 = served.version, served.sha256
            self.weights_sha256 = served.weights_sha256
            self.card_sha256 = served.card_sha256
            # job.json is written once the server has accepted the job (its first chunk), so a job
            # it rejects leaves nothing that would refuse the corrected command.
            self._pending_job = self._job_json()
            return
        self.job_file_written = True
        theirs, their_shard = job_settings(job_path, job)
        if replace(theirs, n=self.params.n) != self.params:
            old, ours = theirs.to_json(), self.params.to_json()
            diff = ", ".join(
                f"{k}: {old[k]!r} -> {ours[k]!r}" for k in ours if k != "n" and old[k] != ours[k]
            )
            out = self._given("out", "out_dir")
            raise BulkError(f"{job_path} was started with other parameters ({diff}); use a new {out}")
        if their_shard != self.shard:
            raise BulkError(f"{job_path} is {describe_shard(their_shard)}, not {describe_shard(self.shard)}")
        if self.shard and self.params.n != theirs.n:
            raise BulkError(
                f"{job_path} is {describe_shard(self.shard)} of a job of {theirs.n} images: a sharded job "
                f"cannot grow (its seed ranges would move), got {self._given('n', 'n', self.params.n)}"
            )
        if self.params.n < theirs.n:
            raise BulkError(
                f"{job_path} is a job of {theirs.n} images: {self._given('n', 'n')} can only grow it, got "
                f"{self.params.n if self.cli else self._given('n', 'n', self.params.n)}"
            )
        self.pinned_version = job["pinned_version"]
        self.model_sha256 = job.get("model_sha256", "")
        self.weights_sha256 = job.get("weights_sha256", "")
        self.used_models = job.get("used_models")
        self.used_weights_sha256 = job.get("used_weights_sha256")
        self.card_sha256 = job.get("card_sha256", "")
        self.used_card_sha256 = job.get("used_card_sha256")
        self.name_width = job.get("name_width", name_width(theirs.n))
        try:
            served = self.window.call(lambda: resolve(self.params.model, self.pinned_version))
        except GenserveClientError as exc:
            if exc.code != grpc.StatusCode.NOT_FOUND:
                raise
            raise self._model_gone(exc) from exc
        self._fit_streams(served.max_stream_images)
        self._check_model(
            served.version, served.sha256, served.weights_sha256, served.card_sha256, "the server now serves"
        )
        self._check_classes(served)
        if (
            self.params.n != theirs.n
            or job.get("format_version") != FORMAT_VERSION
            or not self.model_sha256
            or (served.weights_sha256 and not self.weights_sha256)
            or (served.card_sha256 and not self.card_sha256)
        ):
            # A grown job (or an older job.json) is rewritten before any image of the new range, once
            # the server has accepted a chunk (or at once when no image is missing): a resume it
            # refuses leaves the job as it was, and the old command still resumes it.
            self.model_sha256 = self.model_sha256 or served.sha256
            self.weights_sha256 = self.weights_sha256 or served.weights_sha256
            self.card_sha256 = self.card_sha256 or served.card_sha256
            self._pending_job = self._job_json()

    def _check_classes(self, served: ServedModel) -> None:
        """A resumed job's labels must still be classes of the version it pins: a reload that keeps
        its version and model file may name fewer classes (its card's class_names), and every stream
        carrying a label past them would be refused, once the run had begun. Refused before any
        stream, as a replaced model is (exit 2, no resume hint)."""
        if served.class_names is None:
            return
        refusal = class_refusal(self.params.model, "", served.class_names, self.params.labels)
        if refusal:
            labels = self.params.labels
            shown = (
                ", ".join(map(str, labels))
                if len(labels) <= 4
                else f"{labels[0]}, {labels[1]}, {labels[2]}, ..., {labels[-1]}"
            )
            raise BulkError(
                f"{self.out_dir} is a job of {self.params.model!r} version {self.pinned_version} with labels "
                f"{shown}, but the server now serves it with other classes: {refusal}; serve it with "
                f"the job's classes again and resume, or use a new {self._given('out', 'out_dir')}"
            )

    def _fit_streams(self, server_limit: int) -> None:
        """Streams of at most the server's max_stream_images (0: it does not say): the default
        size shrinks to it; a size the caller gave above it is refused before any stream (each
        stream would be refused INVALID_ARGUMENT)."""
        if not server_limit or self.stream_images <= server_limit:
            return
        if self.stream_images_given is not None:
            given = self._given("stream-images", "stream_images", self.stream_images_given)
            raise BulkError(
                f"{given} is more than the server's "
                f"max_stream_images {server_limit} (the most images one stream may send): give at "
                f"most {server_limit}, or leave it out to use {min(DEFAULT_STREAM_IMAGES, server_limit)}"
            )
        self.stream_images = server_limit

    def _check_model(
        self, version: str, sha256: str, weights_sha256: str, card_sha256: str, source: str
    ) -> None:
        """Refuse images of another version, model file, weights or card than the job's (empty = not
        reported; a graph with external data has the same ones whatever its weights, and any graph
        whatever its card.json)."""
        model, out = self.params.model, self._given("out", "out_dir")
        if version and version != self.pinned_version:
            raise BulkError(
                f"{self.out_dir} is a job of {model!r} version {self.pinned_version}, but {source} "
                f"version {version}: resuming would mix two models in one job; use a new {out}"
            )
        if sha256 and self.model_sha256 and sha256 != self.model_sha256:
            raise BulkError(
                f"{self.out_dir} is a job of {model!r} version {self.pinned_version} with model sha256 "
                f"{self.model_sha256}, but {source} sha256 {sha256} for it (the model was replaced): "
                f"resuming would mix two models in one job; serve the original model again or use a new {out}"
            )
        if weights_sha256 and self.weights_sha256 and weights_sha256 != self.weights_sha256:
            raise BulkError(
                f"{self.out_dir} is a job of {model!r} version {self.pinned_version} with weights sha256 "
                f"{self.weights_sha256}, but {source} weights sha256 {weights_sha256} for it (its external "
                "data files were replaced, the same graph retrained): resuming would mix two models in one "
                f"job; serve the original model again or use a new {out}"
            )
        if card_sha256 and self.card_sha256 and card_sha256 != self.card_sha256:
            raise BulkError(
                f"{self.out_dir} is a job of {model!r} version {self.pinned_version} with card sha256 "
                f"{self.card_sha256}, but {source} card sha256 {card_sha256} for it (its card.json was "
                "replaced beside the same graph: w_avg, output_range): resuming would mix two models in one "
                f"job; serve the original model again or use a new {out}"
            )

    def _commit_job(self) -> None:
        """Write a pending job.json (durably, before any manifest line can name an image)."""
        with self._lock:
            if self._pending_job is None:
                return
            self.out_dir.mkdir(parents=True, exist_ok=True)
            write_file_durably(self.out_dir / JOB_FILE, json.dumps(self._pending_job, indent=2).encode())
            fsync_dir(self.out_dir)
            self._pending_job = None
            self.job_file_written = True

    def recover(self) -> DoneIndices:
        """Bring the directory to a state where every manifest line names a complete file and every
        file of the job's own naming (file_name(i) of an index i of its range, or that name's temp
        name) is named by the manifest; return the indices it lists. Anything else in images/ (a
        user's file, all digits or not, a sub-folder) is left alone.

        The manifest is read a line at a time (a job may list millions of images): what is held is
        a byte per index, and the names of files listed under another name than their index's."""
        if self.images_dir.exists() and not self.images_dir.is_dir():
            # mkdir's bare "File exists", and a resume that fails the same way: say what is wrong.
            raise BulkError(
                f"{self.images_dir} is a file, not a folder: the job keeps its images there; move it "
                "away and resume (the images its manifest lists that are not there are made again)"
            )
        self.images_dir.mkdir(parents=True, exist_ok=True)
        for name in (JOB_FILE, MANIFEST_FILE):
            # A run killed between a durable write's temp file and its rename (write_file_durably) left
            # it: written only under the lock this run holds, so no other run's.
            tmp = self.out_dir / (TMP_PREFIX + name)
            if tmp.is_file() and not tmp.is_symlink():
                tmp.unlink()
        manifest_path = self.out_dir / MANIFEST_FILE
        done = self._listed(manifest_path)
        lost = 0
        other_names: set[str] = set()  # files listed that are not images/<their index's name>
        other_indices: set[int] = set()
        for _, entry in iter_manifest(manifest_path):
            index = entry["index"]
            if not self._entry_intact(entry):
                done.discard(index)
                lost += 1
            elif entry["file"] != f"{IMAGES_DIR}/{self.file_name(index)}":
                other_names.add(entry["file"])
                other_indices.add(index)
        if lost:  # files deleted or damaged behind the job's back: forget them and redo them
            kept = (
                json.dumps(e, sort_keys=True).encode() + b"\n"
                for _, e in iter_manifest(manifest_path)
                if e["index"] in done
            )
            write_file_durably(manifest_path, kept)
        with os.scandir(self.images_dir) as listing:  # a name at a time, not a list of them all
            for item in listing:
                name = item.name
                if not self._own_name.fullmatch(name) or f"{IMAGES_DIR}/{name}" in other_names:
                    continue
                index = int(name.removeprefix(TMP_PREFIX).removesuffix(self.suffix))
                if not self.lo <= index < self.hi or name.removeprefix(TMP_PREFIX) != self.file_name(index):
                    continue  # all digits, but no name of the job's (a user's 7.png, 20240101.png)
                if not name.startswith(TMP_PREFIX) and index in done and index not in other_indices:
                    continue
                if item.is_file(follow_symlinks=False):
                    os.unlink(item.path)  # temp files and files written after the last manifest append
        fsync_dir(self.images_dir)
        return done

    def _listed(self, manifest_path: Path) -> DoneIndices:
        """The indices the manifest lists, its torn tail dropped, and lines that repeat an earlier
        line exactly (the same image, pasted twice) dropped; BulkError naming the line for a corrupt
        line, an index out of the job's range or listed again differently (the manifest is then left
        as it is, torn tail excepted)."""
        done = DoneIndices(self.lo, self.hi)
        if not manifest_path.exists():
            return done
        intact, outside, again = 0, None, set()
        with open(manifest_path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                if not line.endswith(b"\n"):
                    break  # a torn append
                index = manifest_entry(manifest_path, lineno, line)["index"]
                intact += len(line)
                if not self.lo <= index < self.hi:
                    outside = (lineno, index) if outside is None else outside
                elif index in done:
                    again.add(index)
                else:
                    done.add(index)
        if intact != manifest_path.stat().st_size:
            os.truncate(manifest_path, intact)  # drop the torn tail before appending after it
        if outside is not None:
            raise BulkError(
                f"{manifest_path}:{outside[0]}: index {outside[1]} is outside the job's range "
                f"[{self.lo}, {self.hi}): a line of another job's manifest?"
            )
        if again:
            self._drop_repeated_lines(manifest_path, again)
        return done

    @staticmethod
    def _drop_repeated_lines(manifest_path: Path, again: set[int]) -> None:
        """Rewrite the manifest without the lines that repeat an earlier one exactly; BulkError naming
        both lines where an index is listed again differently (which of the two is right is for
        verify --hashes to tell)."""
        first: dict[int, tuple[int, bytes]] = {}
        with open(manifest_path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                index = json.loads(line)["index"]
                if index not in again:
                    continue
                seen = first.setdefault(index, (lineno, line))
                if seen[1] != line:
                    raise BulkError(
                        f"{manifest_path}:{lineno}: index {index} is listed again, differently from "
                        f"line {seen[0]}: keep the line whose sha256 is its file's (verify "
                        f"{manifest_path.parent} --hashes names the image that differs), remove the other "
                        "and resume"
                    )

        def kept() -> Iterator[bytes]:
            with open(manifest_path, "rb") as f:
                for lineno, line in enumerate(f, 1):
                    index = json.loads(line)["index"]
                    if index not in again or first[index][0] == lineno:
                        yield line

        write_file_durably(manifest_path, kept())

    def _entry_intact(self, entry: dict[str, Any]) -> bool:
        path = self.out_dir / entry["file"]
        # The job writes no links: one there (a copied job folder) is no image, never followed.
        if path.is_symlink() or not path.is_file():
            return False
        # A line without its sha256 (hand-edited) cannot vouch for its file: redone, as verify reports it.
        return not self.verify or hashlib.sha256(path.read_bytes()).hexdigest() == entry.get("sha256")

    # --- run ---------------------------------------------------------------------------------

    def run(
        self,
        resolve: Callable[[str, str], ServedModel] | None = None,
        *,
        info: genserve_pb2.ModelInfo | None = None,
    ) -> None:
        """Generate every missing image; raises the first final error of any stream (after stopping
        the others), so what is on disk stays consistent and a rerun resumes. Returns only when
        every image of the job (or shard) is in the manifest, else raises BulkIncomplete.

        `resolve(model, version)` says what the server serves (default: served_model via GetModel).
        `info`: a GetModel answer for the job's model the caller just received (the CLI's, which its
        labels were resolved from; model_answer gives one): a new job pins its version from it, not
        from another GetModel that a model reloaded in between would answer differently. A version
        it pins still LOADING is refused, as it cannot be waited for without another answer.
        """
        try:
            self.check_folder()  # before creating anything in a folder that is not ours
        except BulkError:
            if not (self.out_dir / LOCK_FILE).is_file():
                raise
            # A job's lock file: a run holding it may have written its job.json and first images
            # between the look for job.json and the listing (two runs started at once). Decide
            # under the lock: in use (BulkBusy), else the folder is checked again below.
        looked_up: list[ServedModel] = []
        if resolve is None and not (self.out_dir / JOB_FILE).exists():
            # A new job: look the model up before making its folder, so that a model of a kind whose
            # streams the server refuses, a label it lacks, or a version it does not serve READY,
            # leaves no job folder behind (a version still LOADING is waited for). The answer pins
            # the version.
            def look_up(answer: genserve_pb2.ModelInfo) -> ServedModel:
                refusal = kind_refusal(self.params.model, answer.kind)
                if refusal:
                    raise BulkError(refusal)
                # Labels the model lacks, as `sample` refuses them: its streams would be refused.
                refusal = class_refusal(
                    self.params.model, answer.kind, answer.class_names, self.params.labels
                )
                if refusal:
                    raise BulkError(f"bulk: {self._given('labels', 'labels')}: {refusal}")
                return served_model(self.client, self.params.model, self.params.version, answer)

            def ask() -> ServedModel:
                # The version named (its kind, not that of the version served by default); a version
                # the server does not have (NOT_FOUND) is named with those it serves.
                return look_up(version_answer(self.client, self.params.model, self.params.version))

            if info is None:
                looked_up.append(self.window.call(ask))
            else:
                # The caller's answer alone: asking again while its version is LOADING would pin a
                # version from another answer than the one its labels came from.
                try:
                    looked_up.append(look_up(info))
                except GenserveClientError as exc:
                    raise BulkError(
                        f"{exc.details} in the GetModel answer given (model_answer waits for it to load)"
                    ) from None

        def served(model: str, version: str) -> ServedModel:
            # The lookup's answer, once, where it is for the version asked (another run may have
            # written job.json before the lock, pinning another): else the server is asked.
            if looked_up and version == self.params.version:
                return looked_up.pop()
            looked_up.clear()
            return served_model(self.client, model, version)

        resolver = resolve or served
        self.out_dir.mkdir(parents=True, exist_ok=True)
        lock = JobLock(self.out_dir)
        lock.acquire()
        try:
            self.check_folder()  # again under the lock: another run may have changed the folder
            self._load_or_create_job(resolver)
            self._run_locked()
        finally:
            lock.release()

    def _run_locked(self) -> None:
        self._done = done = self.recover()
        streams = plan_streams(done.missing_ranges(), self.concurrency, self.stream_images)
        if not streams:
            self._commit_job()  # a shard with no image (n < N) is still a finished shard
        progress = ProgressBar(self.hi - self.lo, initial=len(done), stream=self.progress_stream)
        # fsync costs ~3-5 ms on a VM disk when issued one by one, ~0.3 ms each when issued from
        # several threads at once (the filesystem commits them together): a chunk's files are
        # written and fsynced in parallel.
        sink = _Sink(
            Manifest(self.out_dir / MANIFEST_FILE),
            progress,
            ThreadPoolExecutor(max_workers=IO_THREADS, thread_name_prefix="bulk-io"),
        )
        queue = StreamQueue(streams)
        workers = min(self.concurrency, len(streams))
        threads = [
            threading.Thread(target=self._run_worker, args=(queue, sink), daemon=True) for _ in range(workers)
        ]
        workers_done = threading.Event()
        watchdog = threading.Thread(target=self._watch_stalls, args=(workers_done,), daemon=True)
        watchdog.start()
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
            workers_done.set()
            sink.io_pool.shutdown()
            sink.manifest.close()
            self._channels.close()
            progress.close()
        if self.failure is not None:
            raise self.failure
        # Success only when every image of [lo, hi) is listed: a worker that ended without its
        # range (and without an error) must not make an incomplete job look finished.
        left = done.missing_ranges()
        if left:
            missing = sum(b - a for a, b in left)
            ranges = describe_entries([f"[{a}, {b})" for a, b in left])
            raise BulkIncomplete(f"the job ended with {missing} images missing, index ranges {ranges}")

    def idle_limit_s(self) -> float:
        """How long a stream may send nothing before it is cancelled and resumed."""
        if self.idle_limit_given is not None:
            return self.idle_limit_given
        return max(IDLE_FLOOR_S, IDLE_FACTOR * self._slowest_chunk_s)

    def _watch_stalls(self, workers_done: threading.Event) -> None:
        """Cancel each stream that sent nothing for the idle bound; its worker resumes it."""
        while not workers_done.wait(min(1.0, self.idle_limit_s() / 4)):
            limit = self.idle_limit_s()
            now = time.monotonic()
            with self._lock:
                idle = [s for s, at in self._chunk_at.items() if now - at > limit]
                for stream in idle:
                    del self._chunk_at[stream]  # watched no more: its worker resumes it
                    self._stalled[stream] = limit
                    self.stalls += 1
            for stream in idle:
                logger.warning(
                    "bulk: a stream of model %r (request id %s) sent nothing for %g s (the idle bound): "
                    "cancelled, it resumes where it stopped",
                    self.params.model,
                    stream.request_id,
                    limit,
                )
                stream.cancel()

    def _stop_all(self) -> None:
        self._stop.set()
        with self._lock:
            for stream in self._streams:
                stream.cancel()
            for lookup in self._lookups:
                lookup.close()  # its call raises CANCELLED now, not at its deadline

    def _model_info(self, version: str = "") -> genserve_pb2.ModelInfo:
        """GetModel for a worker (of `version`; "": of all the model's versions), on a channel of its
        own that _stop_all closes: a job stopped (Ctrl-C) while a lookup waits for a server that does
        not answer stops at once, not at --timeout."""
        own = self.client
        with self._lock:
            if self._stop.is_set():
                raise closed_client_error(None)
            try:
                lookup = GenserveClient(own.config, timeout_s=own.timeout_s, retry=own.retry, rng=own._rng)
            except ValueError:  # an address list's name that does not resolve now: the job's client
                lookup = own
            else:
                self._lookups.add(lookup)
        try:
            return lookup.get_model(self.params.model, version)
        finally:
            if lookup is not own:
                with self._lock:
                    self._lookups.discard(lookup)
                lookup.close()

    def _run_worker(self, queue: StreamQueue, sink: _Sink) -> None:
        stream: tuple[int, int] | None = None
        try:
            while not self._stop.is_set() and (stream := queue.take()) is not None:
                self._run_range(*stream, sink)
        except (GenserveClientError, BulkError, OSError) as exc:
            # Transient RPC errors were retried (inside the stream, then for the retry window);
            # this one is final. Keep the first and stop the other workers; run() re-raises it.
            self._fail(exc)
        except Exception as exc:
            # Anything else is a bug (or a value a request cannot carry): it must stop the job like
            # a final error, not kill this thread with a traceback while the job reports success.
            where = f"the stream of images [{stream[0]}, {stream[1]})" if stream else "a worker"
            frames = traceback.extract_tb(exc.__traceback__)
            at = f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
            crash = BulkIncomplete(f"{where} stopped on an unexpected error{at}: {type(exc).__name__}: {exc}")
            crash.__cause__ = exc
            self._fail(crash)

    def _fail(self, exc: Exception) -> None:
        """Keep the first final error and stop the other workers; run() raises it."""
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
            client = self._channels.acquire()
            try:
                stream = client.sample_stream(p.model, stop, **opts)
            except BaseException:
                self._channels.release(client)
                raise
            self._streams[stream] = client
            self._chunk_at[stream] = time.monotonic()
        return stream

    def _close_stream(self, stream: SampleStream) -> None:
        with self._lock:
            self._chunk_at.pop(stream, None)
            client = self._streams.pop(stream, None)
        if client is not None:
            self._channels.release(client)

    def _run_range(self, start: int, stop: int, sink: _Sink) -> None:
        """Stream [start, stop); after a transient failure the client's retries did not cure,
        reopen it where it stopped until the retry window passes without progress. Each stream
        sends at most `stream_images` images: a server restarted with a smaller max_stream_images
        refits them (_refit_streams), and the rest of the range goes in streams of its size."""
        expected = start
        since, failures = time.monotonic(), 0
        while expected < stop:
            end = min(stop, expected + self.stream_images)
            stream = self._open_stream(expected, end)
            if stream is None:
                return
            try:
                for chunk in stream:
                    if self._stop.is_set():
                        return
                    if chunk.indices != list(range(expected, expected + len(chunk.items))):
                        raise BulkError(
                            f"the stream sent indices {chunk.indices[:3]}..., expected {expected}"
                        )
                    self._accept_provenance(chunk)
                    self._commit_job()
                    self._write_chunk(chunk, sink)
                    expected += len(chunk.items)
                    since, failures = time.monotonic(), 0
                    self._job_progress_at = since
                    with self._lock:
                        sink.progress.update(len(chunk.items))
                        # From after the last chunk was written: the server's time, not the disk's.
                        now = time.monotonic()
                        if (last := self._chunk_at.get(stream)) is not None:
                            self._slowest_chunk_s = max(self._slowest_chunk_s, now - last)
                            self._chunk_at[stream] = now
                with self._lock:
                    limit = self._stalled.pop(stream, None)
                if limit is not None and not self._stop.is_set():
                    failures += 1
                    stall = GenserveClientError(
                        grpc.StatusCode.UNAVAILABLE,
                        f"a stream of model {self.params.model!r} sent nothing for {limit:g} s (the idle "
                        f"bound), stalled at index {expected}",
                        stream.request_id,
                    )
                    self.window.pause(stall, max(since, self._job_progress_at), failures)
                    continue
            except GenserveClientError as exc:
                if self._stop.is_set():
                    return
                if exc.code == grpc.StatusCode.NOT_FOUND:
                    self._check_pinned_served(exc)
                if exc.code == grpc.StatusCode.INVALID_ARGUMENT and self._refit_streams(end - expected):
                    continue
                failures += 1
                # The window runs while the *job* makes no progress: the other streams may hold
                # every slot the server has for bulk streams, and this one gets one when they end.
                self.window.pause(exc, max(since, self._job_progress_at), failures)
                continue
            finally:
                self._close_stream(stream)
            if self._stop.is_set():
                return
            if expected != end:
                raise BulkError(f"the stream for [{start}, {stop}) ended early, at index {expected}")

    def _refit_streams(self, sent: int) -> bool:
        """A stream that was to send `sent` images was refused INVALID_ARGUMENT. When GetModel's
        max_stream_images for the pinned version is now below that (the job met a server restarted
        with a smaller limit), fit the job's streams to it as a resume would (_fit_streams: a
        --stream-images given above it stops the job, exit 2) and return True: the caller reopens the
        stream, smaller. Otherwise (another refusal) return False: the refusal is final."""
        try:
            # The pinned version's limit, not the one of the version served by default.
            limit = self._model_info(self.pinned_version).max_stream_images
        except GenserveClientError:
            return False
        if not limit or sent <= limit:
            return False
        with self._lock:  # another worker may refit at the same time
            self._fit_streams(limit)
        return True

    def _check_pinned_served(self, exc: GenserveClientError) -> None:
        """A stream was answered NOT_FOUND. When the server no longer has the job's pinned version (a
        reload or a restart replaced it mid-job, or took the whole model out of service), the job
        stops as a resume would refuse it: a BulkError naming the pinned version (exit 2), not a
        "resumable" error whose resume fails the same way. Otherwise (GetModel fails another way, or
        still lists the version: another replica's answer) `exc` is raised as it is."""
        try:
            info = self._model_info()
        except GenserveClientError as lookup:
            if lookup.code == grpc.StatusCode.NOT_FOUND:
                raise self._model_gone(lookup) from exc
            raise exc from None
        if any(v.version == self.pinned_version for v in info.versions):
            raise exc
        served = served_versions(info)
        out = self._given("out", "out_dir")
        raise BulkError(
            f"{self.out_dir} is a job of {self.params.model!r} version {self.pinned_version}, but the server "
            f"no longer serves that version (served: {served}): going on would mix two models in one job; "
            f"serve version {self.pinned_version} again and resume, or use a new {out}"
        ) from exc

    def _model_gone(self, exc: GenserveClientError) -> BulkError:
        """The server answered GetModel NOT_FOUND for a job's model (its directory removed, or a
        server with another repository): as for a version it no longer serves, the job cannot go on
        until the pinned version is served again."""
        return BulkError(
            f"{self.out_dir} is a job of {self.params.model!r} version {self.pinned_version}, but the server "
            f"no longer serves model {self.params.model!r} ({exc.details}): serve version "
            f"{self.pinned_version} of it again and resume, or use a new {self._given('out', 'out_dir')}"
        )

    def _accept_provenance(self, chunk: SampleResult) -> None:
        """Every chunk must come from the job's model file; a new job learns the sha256 from its
        first chunk when GetModel did not report one."""
        prov = chunk.provenance
        used = {model: sha256 for model, _, sha256 in prov.used_models}
        used_weights = dict(prov.used_weights_sha256)
        used_cards = dict(prov.used_card_sha256)
        with self._lock:
            if prov.model_sha256 and not self.model_sha256:
                self.model_sha256 = prov.model_sha256
                self._pending_job = self._job_json()
            if prov.weights_sha256 and not self.weights_sha256:
                self.weights_sha256 = prov.weights_sha256
                self._pending_job = self._job_json()
            if prov.card_sha256 and not self.card_sha256:
                self.card_sha256 = prov.card_sha256
                self._pending_job = self._job_json()
            # Empty is not reported, as an empty sha256 is: a server older than
            # Provenance.used_models sends none (a model version that goes through another always
            # does on a server that reports them), so a job it started learns them after an upgrade
            # and one resumed on an older replica is checked on its version and sha256 alone.
            if self.used_models is None or (used and not self.used_models):
                self.used_models = used
                self._pending_job = self._job_json()
            if self.used_weights_sha256 is None or (used_weights and not self.used_weights_sha256):
                self.used_weights_sha256 = used_weights
                self._pending_job = self._job_json()
            if self.used_card_sha256 is None or (used_cards and not self.used_card_sha256):
                self.used_card_sha256 = used_cards
                self._pending_job = self._job_json()
            expected = self.used_models
            expected_weights = self.used_weights_sha256
            expected_cards = self.used_card_sha256
        self._check_model(
            prov.version,
            prov.model_sha256,
            prov.weights_sha256,
            prov.card_sha256,
            "the server sent images of",
        )
        if used and used != expected:
            changed = _changed(used, expected)
            raise BulkError(
                f"{self.out_dir} is a job whose images also went through "
                f"{_named(expected) or 'no other model'}, but the server sent images through "
                f"{_named(used) or 'no other model'} ({changed} "
                "changed: a model reloaded under the job): resuming would mix two models in one job; "
                f"serve the original models again or use a new {self._given('out', 'out_dir')}"
            )
        if used_weights and used_weights != expected_weights:
            changed = _changed(used_weights, expected_weights)
            raise BulkError(
                f"{self.out_dir} is a job whose images also went through models with weights sha256 "
                f"{_named(expected_weights) or 'none'}, but the server sent images through weights sha256 "
                f"{_named(used_weights)} ({changed} changed: external data files replaced, the "
                "same graph retrained): resuming would mix two models in one job; serve the original models "
                f"again or use a new {self._given('out', 'out_dir')}"
            )
        if used_cards and used_cards != expected_cards:
            changed = _changed(used_cards, expected_cards)
            raise BulkError(
                f"{self.out_dir} is a job whose images also went through models with card sha256 "
                f"{_named(expected_cards) or 'none'}, but the server sent images through card sha256 "
                f"{_named(used_cards)} ({changed} changed: a card.json replaced beside the same "
                "graph): resuming would mix two models in one job; serve the original models again or use a "
                f"new {self._given('out', 'out_dir')}"
            )

    def _write_chunk(self, chunk: SampleResult, sink: _Sink) -> None:
        names = [self.file_name(item.index) for item in chunk.items]
        # A PNG carries its own provenance (seed, label, psi, model, version, sha256) in text
        # chunks, spliced in without re-encoding, so a file copied out of the job still says what it is.
        psi = self.params.psi
        data = [
            with_png_text(
                item.raw,
                png_text(chunk.provenance, index=item.index, seed=item.seed, label=item.label, psi=psi),
            )
            for item in chunk.items
        ]
        # list() re-raises the first write error here, before any manifest line is written.
        list(sink.io_pool.map(write_file_durably, [self.images_dir / n for n in names], data))
        entries = []
        for item, name, written in zip(chunk.items, names, data, strict=True):
            entries.append(
                {
                    "file": f"{IMAGES_DIR}/{name}",
                    "index": item.index,
                    "seed": item.seed,
                    "label": item.label,
                    "model": chunk.provenance.model or self.params.model,
                    "version": chunk.provenance.version or self.pinned_version,
                    "sha256": hashlib.sha256(written).hexdigest(),
                }
            )
        fsync_dir(self.images_dir)  # the renames are durable before the manifest names them
        sink.manifest.append(entries)
        if chunk.items:  # contiguous indices (checked in _run_range)
            with self._lock:
                self._done.add_range(chunk.items[0].index, chunk.items[-1].index + 1)
