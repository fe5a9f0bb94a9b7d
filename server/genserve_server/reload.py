"""Hot reload of the model repository: new versions in, old versions drained out, no request lost.

Triggers (docs/operations.md, "Hot reload"): SIGHUP (main.py), and optionally a poll of the
repository's directory listing every `watch_interval_s` (stdlib has no inotify; a listing of a few
directories every few seconds costs nothing). The watch compares against a listing taken when the
Reloader is made, before start-up's scan: what changed while start-up loaded is rescanned at once.
There is no admin RPC: that would need a proto change and a way to authorize it, while SIGHUP
already has the OS's.

One rescan, serialised by a lock (a trigger during a rescan queues exactly one more):

1. Models whose directory is gone leave the registry at once (new requests get NOT_FOUND, health
   NOT_SERVING), then their versions drain in the background.
2. New models, and new versions picked by the model's version policy, are loaded and warmed on a
   worker thread while the old versions keep serving. Versions that failed to load before are
   retried (a fixed file plus SIGHUP brings them back). A draining version picked again (a
   rollback: the newest version's directory removed while the one before it drains) serves again
   at once while its drain still waits for its holders; once its drain has begun closing it, it
   loads again from disk like a new version.
3. Traffic switches atomically: `Model.resolve("")` picks the highest READY version, and a version
   becomes READY in one assignment on the event loop once its batcher runs.
4. Versions the policy no longer picks drain, but only once every picked version is READY: a new
   version that fails to load leaves every loaded version serving (under `latest: 2`, a broken
   version 3 keeps version 1 beside 2). A stale version that never loaded leaves at once.
   Draining: state DRAINING (no new request resolves to it), wait until no RPC holds it
   (`Batcher.wait_released`: RPCs and SampleStreams hold a version from resolve to their end;
   bounded by `drain_grace_s`), finish the accepted batches (`Batcher.close`), close the runner,
   remove it.

Write a new version aside and rename it into place (`.tmp-3` -> `3`): names that are not version
numbers are ignored, so a half-copied directory is never loaded.

What a rescan cannot apply never takes a serving model down: a config.json that is broken or
invalid, a version_policy that picks no version directory on disk (a typo in `specific`, or the only
version directory deleted mid-replace), or a newly picked version that fails to load. The loaded
versions keep serving as they are, and the model says why: `Model.reason` (GetModel/ListModels
`reason`), genserve_model_config_error{model} 1, an ERROR log line. Removing the model's directory
is how a model is taken out of service.

A loaded version's model file is checked too (`_check_files`, after every rescan, and every
`file_check_interval_s` when no watch is set): size, mtime, inode and ctime against the last check (a
file renamed over or rewritten with its size and mtime kept: `rsync -t`, `cp -p`, a Kubernetes `..data`
swap), the sha256 against the loaded one when they moved. A file changed or deleted under a READY
version is reported (the version's reason, genserve_model_file_changed 1, an ERROR log line) while
the version keeps serving the copy its sessions hold in memory; it is never reloaded in place (a
write in progress cannot be told from a finished one). A restart loads the file on disk, and
refuses it when it no longer matches card.json's sha256, which the reason says beforehand. Beside an
fp16 twin served, model.onnx is checked too: a restart checks it against card.json as the parity
check's reference.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from stat import S_ISDIR, S_ISREG

from genserve_contract.repository import open_regular, read_regular_text
from genserve_server import heap
from genserve_server.config import MAX_JSON_BYTES, ConfigError, ModelConfig, load_card, load_model_config
from genserve_server.loader import FileStat, file_stat, stat_or_none
from genserve_server.ort_session import choose_model_file
from genserve_server.repository import (
    VERSION_PATTERN,
    Model,
    ModelState,
    ModelVersion,
    Repository,
    policy_misses,
    policy_picks_none,
)

logger = logging.getLogger(__name__)

HealthSetter = Callable[[str, bool], None]

# Loaded model files are checked this often when no watch is set (a stat per version; a sha256 only
# when its size, mtime, inode or ctime moved). With a watch, every change in a version directory
# triggers a rescan, which checks them.
FILE_CHECK_INTERVAL_S = 60.0


@dataclass
class RescanReport:
    """What one rescan changed (logged, and returned for tests)."""

    loaded: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    retired: list[str] = field(default_factory=list)
    removed_models: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # old versions kept because the new one failed
    revived: list[str] = field(default_factory=list)  # draining versions picked again: serving again
    config_errors: list[str] = field(default_factory=list)  # models whose files on disk cannot apply
    # models whose `specific` policy lists versions not on disk: applied, the others it lists serve
    listed_missing: list[str] = field(default_factory=list)
    # models whose config.json edit applies only when their loaded versions load again (no change now)
    config_waiting: list[str] = field(default_factory=list)

    def changed(self) -> bool:
        return bool(
            self.loaded
            or self.failed
            or self.retired
            or self.removed_models
            or self.config_errors
            or self.listed_missing
            or self.revived
        )


@dataclass(eq=False)
class _Drain:
    """A version retired while READY, on its way out (`Reloader._drain`)."""

    model: Model
    task: asyncio.Task[None] | None = None
    # Past waiting for its holders: its batcher closes, so it can never serve again.
    closing: bool = False
    # Picked again before closing (a rollback): READY again, and its drain ends without unloading it.
    revived: bool = False


# The size of a version directory's entry in repository_fingerprint where it cannot be looked
# inside (its mtime is then the errno).
UNLISTABLE = -1

# What the watch looks at inside a version directory: the files a version is loaded from (loader.py,
# ort_session.py), nothing else it may hold. A version directory can be a link to a large directory
# (a checkpoint folder): listing and stat-ing its every entry cost ~0.6 s of CPU a poll at 50k entries.
VERSION_FILES = ("model.onnx", "model.fp16.onnx", "card.json")


# One entry of repository_fingerprint: (name, size, mtime_ns, mode, ctime_ns).
Listed = tuple[str, int, int, int, int]


def repository_fingerprint(root: Path) -> tuple[Listed, ...]:
    """Names, sizes, mtimes, modes (permissions: a chmod that makes a file readable again changes
    nothing else) and ctimes (`cp -p` onto a file writes it in place and sets its mtime back; nothing
    sets a ctime back) of each model directory, its entries and its version directories' VERSION_FILES
    and the external data files their card.json lists (the watch). A version directory that cannot
    be looked inside is one more entry, (its name, UNLISTABLE, errno, 0, 0), and hides none of the
    versions beside it."""
    entries: list[Listed] = []
    with contextlib.suppress(OSError):
        for model_dir in root.iterdir():
            if model_dir.name.startswith("."):
                continue
            # Each path stat-ed once, whether it is a directory read from that stat: with hundreds
            # of models, every stat of every poll counts.
            with contextlib.suppress(OSError):
                st = model_dir.stat()
                entries.append((model_dir.name, st.st_size, st.st_mtime_ns, st.st_mode, st.st_ctime_ns))
                if S_ISDIR(st.st_mode):
                    _children(model_dir, model_dir.name, entries)
    return tuple(sorted(entries))


def _children(model_dir: Path, name: str, entries: list[Listed]) -> None:
    """`model_dir`'s entries (under `name`, the model's), and its version directories' VERSION_FILES
    that are there, to `entries`, as a version directory that cannot be looked inside is, as
    UNLISTABLE (repository_fingerprint)."""
    with contextlib.suppress(OSError):
        for child in model_dir.iterdir():
            listed = f"{name}/{child.name}"
            try:
                st = child.stat()
            except OSError:
                continue
            entries.append((listed, st.st_size, st.st_mtime_ns, st.st_mode, st.st_ctime_ns))
            if S_ISDIR(st.st_mode) and VERSION_PATTERN.match(child.name):
                names = deque(VERSION_FILES)
                while names:
                    file = names.popleft()
                    path = child / file
                    try:
                        st = path.stat()
                    except (FileNotFoundError, NotADirectoryError):
                        continue
                    except OSError as exc:  # EACCES: no search permission on the directory
                        entries.append((listed, UNLISTABLE, exc.errno or 0, 0, 0))
                        break
                    # A location card.json lists ("./model.onnx.data") as the path names it.
                    shown = f"{listed}/{file}" if file in VERSION_FILES else str(Path(listed, file))
                    entries.append((shown, st.st_size, st.st_mtime_ns, st.st_mode, st.st_ctime_ns))
                    if file == "card.json":  # the external data files it lists (model.onnx.data)
                        names += _card_data_files(
                            str(path), st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns
                        )


@functools.lru_cache(maxsize=4096)
def _card_data_files(card: str, size: int, mtime_ns: int, ino: int, ctime_ns: int) -> tuple[str, ...]:
    """The files card.json's sha256 lists beside VERSION_FILES: a graph's external data files, which
    a version loads its weights from (loader._verified_sha256). Read once per (size, mtime, inode,
    ctime) of the card (`cp -p` onto it keeps the first three); a location outside the version
    directory is not looked at."""
    del size, mtime_ns, ino, ctime_ns  # the cache's key: a card changed is read again
    try:
        digests = json.loads(read_regular_text(Path(card), MAX_JSON_BYTES)).get("sha256")
    except (OSError, ValueError, RecursionError, AttributeError):
        return ()
    if not isinstance(digests, dict):
        return ()
    return tuple(
        sorted(
            name
            for name in digests
            if isinstance(name, str)
            and name not in VERSION_FILES
            and name
            and not os.path.isabs(name)
            and ".." not in Path(name).parts
        )
    )


# The coarsest mtime granularity the watch allows for: 2 s (FAT; 1 s on NFS over ext3, HFS+).
MTIME_TICK_NS = 2_000_000_000


def _recent_digests(root: Path, listing: tuple[Listed, ...], taken_ns: int) -> dict[str, str]:
    """The sha256 of each file of `listing` (taken at `taken_ns`) whose mtime is within MTIME_TICK_NS
    of its taking, up to MAX_JSON_BYTES (config.json, card.json): on a file system with coarse mtimes,
    one rewritten with the same size within that tick lists the same, so the watch compares its bytes
    (a file further ahead, a file server's clock ahead of ours, is not)."""
    digests: dict[str, str] = {}
    for name, size, mtime, mode, _ in listing:
        if 0 <= size <= MAX_JSON_BYTES and S_ISREG(mode) and abs(mtime - taken_ns) <= MTIME_TICK_NS:
            with contextlib.suppress(OSError):
                with open_regular(root / name) as handle:
                    digests[name] = hashlib.sha256(handle.read(MAX_JSON_BYTES + 1)).hexdigest()
    return digests


def _unlistable(listing: tuple[Listed, ...], known: set[str], root: Path) -> set[str]:
    """The version directories `listing` could not list; a warning names each not in `known`."""
    names = {name for name, size, *_ in listing if size == UNLISTABLE}
    for name, size, code, *_ in listing:
        if size == UNLISTABLE and name not in known:
            logger.warning(
                "%s: cannot look inside this version directory (%s); the watch sees no change inside it",
                root / name,
                os.strerror(code) if code else "error",
            )
    return names


class Reloader:
    """Rescans `repository` on request; owns the background drains of retired versions."""

    def __init__(
        self,
        repository: Repository,
        *,
        drain_grace_s: float,
        watch_interval_s: float | None = None,
        on_removed: HealthSetter | None = None,
        on_unloaded: Callable[[ModelVersion], None] | None = None,
        file_check_interval_s: float | None = FILE_CHECK_INTERVAL_S,
    ) -> None:
        self.repo = repository
        self.drain_grace_s = drain_grace_s
        self.watch_interval_s = watch_interval_s
        self.file_check_interval_s = file_check_interval_s
        self._on_removed = on_removed
        self._on_unloaded = on_unloaded  # a version left the registry for good (its cached images go)
        # load_id -> file name -> (FileStat of the file at the last check (None: it was gone),
        # config.json's precision then: a restart's file choice, which the reason names; the status
        # found then). The files: the one served, and model.onnx beside an fp16 twin served.
        self._file_stats: dict[str, dict[str, tuple[FileStat | None, str, str]]] = {}
        self._lock = asyncio.Lock()
        self._requested = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        # Versions retired while READY whose drain has not ended: a rollback may revive one, and a
        # copy of a (model, version) in the registry may share its metric series with one (`_forget`).
        self._draining: dict[ModelVersion, _Drain] = {}
        self._loop_task: asyncio.Task[None] | None = None
        self._watch_task: asyncio.Task[None] | None = None
        # The watch's first listing, taken here: App makes its Reloader before start-up's scan, so a
        # version published while start-up loads (seconds) differs from it and the first poll after
        # `start` rescans. A listing taken at `start` would already hold that version.
        taken_ns = time.time_ns()
        self._baseline = repository_fingerprint(repository.root) if watch_interval_s is not None else None
        self._baseline_digests = (
            _recent_digests(repository.root, self._baseline, taken_ns) if self._baseline is not None else {}
        )
        self.rescans = 0  # completed rescans (for tests and logs)
        self._stopping = False  # `begin_shutdown`: a rescan in progress applies nothing more

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._loop_task = loop.create_task(self._serve_requests(), name="reload")
        if self.watch_interval_s is not None:
            self._watch_task = loop.create_task(self._watch(self.watch_interval_s), name="reload-watch")
        elif self.file_check_interval_s is not None:
            self._watch_task = loop.create_task(
                self._watch_files(self.file_check_interval_s), name="reload-file-check"
            )

    @property
    def draining(self) -> int:
        """Versions retired and not yet unloaded (tests, diagnostics)."""
        return len(self._draining)

    def request(self) -> None:
        """Ask for a rescan (SIGHUP handler, watch); requests during a rescan coalesce into one more."""
        logger.info("repository rescan requested")
        self._requested.set()

    def begin_shutdown(self) -> None:
        """SIGTERM: a reload's load in progress ends at its next step (LoadCancelled), as start-up's
        loads do; the process would otherwise wait for its thread's warm-up before exiting. The
        rescan then stops where it is: the loaded versions serve as they are until the drain."""
        if not self._stopping:
            self._stopping = True
            self.repo.cancel_loading()

    async def close(self, timeout_s: float) -> None:
        """Stop watching and rescanning; let running drains finish (up to timeout_s)."""
        for task in (self._watch_task, self._loop_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._tasks:
            _, running = await asyncio.wait(set(self._tasks), timeout=timeout_s)
            if running:
                # Retired versions (a removed model's, a replaced one's) are outside Repository.models,
                # whose close aborts only the serving versions' calls: a drain closing its runner on a
                # worker thread held the process's exit (asyncio.run joins that thread) until its
                # model call ended. Their calls are aborted too, and the drains end here.
                logger.warning("retired versions still draining at the end of the drain grace: aborting them")
                for mv in list(self._draining):
                    if mv.runner is not None:
                        mv.runner.abort()
                for task in running:
                    task.cancel()
                await asyncio.wait(running)

    async def _serve_requests(self) -> None:
        while True:
            await self._requested.wait()
            self._requested.clear()
            try:
                await self.rescan()
            except Exception:  # a failed rescan must not end reloading; the models keep serving
                logger.exception("repository rescan failed; models keep serving as before")

    async def _watch(self, interval_s: float) -> None:
        last, seen = self._baseline, self._baseline_digests
        self._baseline = None
        if last is None:
            taken_ns = time.time_ns()
            last = await asyncio.to_thread(repository_fingerprint, self.repo.root)
            seen = await asyncio.to_thread(_recent_digests, self.repo.root, last, taken_ns)
        unlistable = _unlistable(last, set(), self.repo.root)
        while True:
            await asyncio.sleep(interval_s)
            taken_ns = time.time_ns()
            now = await asyncio.to_thread(repository_fingerprint, self.repo.root)
            digests = await asyncio.to_thread(_recent_digests, self.repo.root, now, taken_ns)
            unlistable = _unlistable(now, unlistable, self.repo.root)
            # A file rewritten with the same size within its mtime's tick lists the same: its bytes tell.
            rewritten = any(seen.get(name, digest) != digest for name, digest in digests.items())
            seen = digests
            if now != last or rewritten:
                last = now
                self.request()

    async def _watch_files(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                async with self._lock:
                    await self._check_files()
            except Exception:  # a failed check must not end checking; the models keep serving
                logger.exception("checking the loaded model files failed")

    # ------------------------------------------------------------------ rescan

    async def rescan(self) -> RescanReport:
        async with self._lock:
            report = RescanReport()
            started = time.monotonic()
            if not self.repo.root.is_dir():
                logger.error("%s: model repository directory not found; nothing changed", self.repo.root)
                return report
            if self._stopping:
                return report
            try:
                on_disk = {d.name: d for d in self.repo.model_dirs()}
            except ConfigError as exc:  # e.g. its permissions changed: the loaded models keep serving
                logger.error("%s; nothing changed", exc)
                return report
            for name in [n for n in self.repo.models if n not in on_disk]:
                self._remove_model(name, report)
            for model_dir in on_disk.values():
                await self._rescan_model(model_dir, report)
                if self._stopping:
                    break
            else:
                await self._check_files(skip_removed=True)
            self.rescans += 1
            if report.changed():
                # Only a model with loaded versions keeps them: a new one that cannot apply serves nothing.
                kept = [
                    n
                    for n in report.config_errors
                    if n in self.repo.models and self.repo.models[n].ready_versions()
                ]
                unserved = [n for n in report.config_errors if n not in kept]
                logger.info(
                    "rescan in %.2f s: loaded %s, serving again %s, failed %s, retiring %s, "
                    "removed models %s, not applied (old versions serve) %s, "
                    "not applied (nothing serves) %s, applied, listing versions not on disk %s",
                    time.monotonic() - started,
                    report.loaded or "none",
                    report.revived or "none",
                    report.failed or "none",
                    report.retired or "none",
                    report.removed_models or "none",
                    kept or "none",
                    unserved or "none",
                    report.listed_missing or "none",
                )
            elif self._stopping:  # a SIGHUP's only line was 'rescan requested': it ended
                pass
            elif report.config_waiting:  # each model's line said what waits for a load
                logger.info(
                    "rescan in %.2f s: no change to apply now (config.json edits of %s wait for a load)",
                    time.monotonic() - started,
                    report.config_waiting,
                )
            else:
                logger.info("rescan in %.2f s: no change to apply", time.monotonic() - started)
            return report

    def _remove_model(self, name: str, report: RescanReport) -> None:
        model = self.repo.models.pop(name)
        report.removed_models.append(name)
        logger.info("model %s left the repository: draining its versions", name)
        if self._on_removed is not None:
            self._on_removed(name, False)
        self.repo.metrics.forget_model(name)
        for mv in list(model.versions.values()):
            self._retire(model, mv, report)

    async def _rescan_model(self, model_dir: Path, report: RescanReport) -> None:
        fresh = self.repo.read_model(model_dir)
        current = self.repo.models.get(fresh.name)
        if current is None or (current.config is None and not current.versions):
            self.repo.models[fresh.name] = current = fresh  # new model, or a broken config fixed/changed
        elif fresh.config is None:
            # A broken config.json edit never takes down a serving model.
            self._keep_serving(current, fresh.reason, report)
            return
        config = fresh.config
        if config is None:
            logger.error("model %s unavailable: %s", current.name, current.reason)
            self._set_reason(current, current.reason)
            report.config_errors.append(current.name)  # named in the summary: nothing serves
            self.repo.notify(current)  # health: this name NOT_SERVING, and "" re-evaluated
            return  # a new model whose config.json is broken: UNAVAILABLE with the reason
        reported = current.reason  # available_versions clears it
        available = self.repo.available_versions(current)
        selected = config.version_policy.select(available)
        problem = ""
        if not selected:
            problem = current.reason or policy_picks_none(current.path, available)
            if current.ready_versions():
                # A typo in `specific`, or the only version directory deleted mid-replace: keep serving.
                self._keep_serving(current, problem, report, reported=reported)
                return
        current.config = config
        loads = len(report.loaded) + len(report.failed)
        await self._load_picked(current, selected, report)
        if self._stopping:
            return  # a load cancelled by the shutdown is no failure of the files: nothing more applies
        if len(report.loaded) + len(report.failed) > loads:
            selected = self._picked_after_loads(current, config, selected)
        kept = self._retire_stale(current, selected, report)
        failed = [
            current.versions[v]
            for v in selected
            if v in current.versions and current.versions[v].state == ModelState.UNAVAILABLE
        ]
        if failed and not problem:
            problem = "; ".join(f"version {mv.version} failed to load: {mv.reason}" for mv in failed)
            if kept:
                problem += f"; still serving {kept}"
        if not problem:
            problem = _kind_left_behind(current, config)
        _note_config_waiting(current, config, report)
        missing = policy_misses(current.path, config.version_policy, available) if selected else ""
        if missing and missing not in reported:  # once per change, not at every rescan
            logger.warning("model %s: %s", current.name, missing)
        if problem:
            report.config_errors.append(current.name)
        elif missing:  # applied: it serves the versions it lists that are on disk
            report.listed_missing.append(current.name)
        problem = "; ".join(p for p in (problem, missing) if p)
        if reported and not problem:  # its ERROR (or WARNING) line gets its end
            logger.info("model %s: its files on disk apply again (cleared: %s)", current.name, reported)
        self._set_reason(current, problem)
        self.repo.notify(current)

    async def _load_picked(self, model: Model, selected: list[str], report: RescanReport) -> None:
        """Load the picked versions that do not serve: new ones, ones that failed before, and ones
        picked again while they drain (a rollback: the newest version's directory removed). A
        draining version still waiting for its holders serves again as it is; one whose drain is
        already closing it loads again from disk, beside it."""
        assert model.config is not None
        for version in selected:
            known = model.versions.get(version)
            if known is not None and known.state in (ModelState.READY, ModelState.LOADING):
                continue
            if known is not None and known.state == ModelState.DRAINING:
                if self._revive(model, known, report):
                    continue
                logger.info("%s: picked again while its drain closes it: loading it again", known.label)
            mv = self.repo.add_version(model, version, model.config)
            await self.repo.load_version(mv)
            if self._stopping:
                return
            (report.loaded if mv.state == ModelState.READY else report.failed).append(mv.label)

    def _picked_after_loads(self, model: Model, config: ModelConfig, selected: list[str]) -> list[str]:
        """The versions to retire by once this rescan's loads have ended (minutes, with a TensorRT
        build): where the files on disk now pick versions that all serve (a rollback meanwhile: the
        new version's directory removed, or config.json's version_policy pointed back), those, so
        that a serving version is never replaced by the version rolled back (then unloaded and
        loaded again by the rescan the rollback queued); else `selected`."""
        try:
            policy = load_model_config(
                model.path / "config.json",
                default_max_queue_size=self.repo.server_config.limits.default_max_queue_size,
            ).version_policy
            on_disk = [p.name for p in model.path.iterdir() if p.is_dir() and VERSION_PATTERN.match(p.name)]
        except (ConfigError, OSError):
            return selected  # the queued rescan reports what it cannot apply
        now = policy.select(on_disk)
        serving = all(v in model.versions and model.versions[v].state == ModelState.READY for v in now)
        return now if now and serving and now != selected else selected

    def _revive(self, model: Model, mv: ModelVersion, report: RescanReport) -> bool:
        """A draining version picked again serves again, if its drain has not begun closing it."""
        drain = self._draining.get(mv)
        if drain is None or drain.closing or drain.model is not model or mv.batcher is None:
            return False
        drain.revived = True
        del self._draining[mv]
        if drain.task is not None:
            drain.task.cancel()  # it waits for the version's holders; it ends without unloading it
        mv.state = ModelState.READY
        mv.metrics.ready.set(1)
        report.revived.append(mv.label)
        logger.info("%s is picked again while draining: serving again", mv.label)
        return True

    def _retire_stale(self, model: Model, selected: list[str], report: RescanReport) -> str:
        """Retire the versions the policy no longer picks; returns the serving ones kept ("": none).

        A stale version that does not serve (UNAVAILABLE) goes at once. Serving ones drain only once
        every picked version is READY: what replaces them must serve first. A picked version that
        failed to load leaves every loaded version serving as loaded (under `latest: 2` with 1 and 2
        loaded, a broken 3 keeps 1 beside 2) until a rescan loads it."""
        stale = [mv for v, mv in model.versions.items() if v not in selected]
        serving = [mv for mv in stale if mv.state == ModelState.READY]
        replaced = all(v in model.versions and model.versions[v].state == ModelState.READY for v in selected)
        kept = ""
        if serving and not replaced:
            kept = ", ".join(mv.label for mv in serving)
            report.kept.extend(mv.label for mv in serving)
            logger.warning("%s: not every picked version is ready; still serving %s", model.name, kept)
            stale = [mv for mv in stale if mv.state != ModelState.READY]
        for mv in stale:
            self._retire(model, mv, report)
        return kept

    def _keep_serving(
        self, model: Model, problem: str, report: RescanReport, *, reported: str | None = None
    ) -> None:
        """The files on disk cannot be applied: the loaded versions keep serving, and the model says why.
        Unless its directory left after this rescan listed the repository, as the rescan read it: no
        file that cannot apply but the model taken out of service, which the next rescan applies (the
        watch's, or the one a SIGHUP sent after the removal queued); the model's reason stays as it was
        (`reported`: available_versions replaced it)."""
        if not model.path.is_dir():
            if reported is not None:
                model.reason = reported
            logger.info(
                "model %s: its directory left while this rescan read it: the next rescan removes it",
                model.name,
            )
            return
        # Only the READY versions serve: a version that failed to load (or is draining) is no promise.
        ready = sorted((mv.version for mv in model.ready_versions()), key=int)
        serving = ", ".join(f"version {v}" for v in ready) or "nothing"
        reason = f"{problem}; not applied: still serving {serving} as loaded"
        if reason != model.reason:
            logger.error("model %s: %s", model.name, reason)
        self._set_reason(model, reason)
        report.config_errors.append(model.name)
        report.kept.extend(mv.label for mv in model.ready_versions())

    def _set_reason(self, model: Model, reason: str) -> None:
        model.reason = reason
        self.repo.metrics.set_config_error(model.name, bool(reason))

    # ------------------------------------------------------------------ loaded files

    async def _check_files(self, *, skip_removed: bool = False) -> None:
        """Compare every READY version's model file on disk with the one it loaded (under the lock).
        `skip_removed` (after a rescan): a version whose directory left while the rescan ran (its
        model or the version removed) is no file changed in place: the next rescan applies it."""
        for model in list(self.repo.models.values()):
            for mv in list(model.versions.values()):
                if mv.state != ModelState.READY:
                    continue
                precision = (model.config or mv.config).precision  # config.json's now, as a restart reads
                status = await asyncio.to_thread(self._file_status, mv, precision, skip_removed)
                if status is not None and status != mv.file_changed:
                    cleared, mv.file_changed = mv.file_changed, status
                    mv.metrics.file_changed.set(1 if status else 0)
                    if status:
                        logger.error("%s: %s", mv.label, status)
                    else:  # what was restored: the model file, card.json, external data, a permission
                        logger.info(
                            "%s: its files on disk match the loaded ones again (cleared: %s)",
                            mv.label,
                            cleared,
                        )

    def _file_status(self, mv: ModelVersion, precision: str, skip_removed: bool = False) -> str | None:
        """None: unchanged since the last check, or (`skip_removed`) the version's directory is gone
        (`_check_files`); "": the files match the loaded sha256s; else what
        changed and what a restart would do under config.json's `precision` now. The files: the one
        served, and where it is the fp16 twin, model.onnx, the parity check's reference, which a
        restart checks against card.json too; beside each, the external data files it loaded its
        weights from (card.json's sha256 covers them too). On a worker thread; a file is hashed only
        when its size, mtime, inode, ctime or the precision moved (or at the first check of a version:
        it may have changed since it loaded)."""
        if skip_removed and not mv.path.is_dir():
            return None
        served = _served_file(mv)
        if served is None:
            return None
        graphs = [(served, mv.sha256)]
        if mv.precision == "fp16" and mv.reference_sha256:
            graphs.append((mv.path / "model.onnx", mv.reference_sha256))
        files = []  # (file, its card.json key, the graph it belongs to, its loaded sha256)
        for graph, loaded in graphs:
            files.append((graph, graph.name, graph, loaded))
            for location, sha in mv.external_sha256.get(graph.name, {}).items():
                files.append((graph.parent / location, location, graph, sha))
        checked = self._file_stats.setdefault(mv.load_id, {})
        card_stat = stat_or_none(mv.path / "card.json")
        last_card = checked.get(CARD_CHECK)
        moved = last_card is None or last_card[:2] != (card_stat, precision)
        checked[CARD_CHECK] = (card_stat, precision, "")
        statuses = []
        matching = []  # (card.json key, loaded sha256) of the files that still match
        for path, key, graph, loaded in files:
            try:
                st = path.stat()
                stat: FileStat | None = file_stat(st)
            except (FileNotFoundError, NotADirectoryError):
                stat = None
            except OSError as exc:  # EACCES: a directory on its path lost its permissions; not gone
                moved = True
                checked.pop(key, None)  # try again next time
                statuses.append(
                    f"{_role(path, key, graph, served)} cannot be read on disk ({exc.strerror or exc})"
                )
                continue
            last = checked.get(key)
            if last is not None and last[:2] == (stat, precision):
                statuses.append(last[2])
                if not last[2]:
                    matching.append((key, loaded))
                continue
            moved = True
            found = self._one_file_status(mv, path, loaded, stat, precision, served, key, graph)
            if found is None:  # SIGTERM: the process's exit would wait for this thread
                checked.pop(key, None)
                return None
            status, readable = found
            if readable:
                checked[key] = (stat, precision, status)
            else:
                checked.pop(key, None)  # try again next time
            statuses.append(status)
            if not status:
                matching.append((key, loaded))
        if not moved:
            return None
        statuses.append(_card_status(mv, matching))
        return " ".join(status for status in statuses if status)

    def _one_file_status(
        self,
        mv: ModelVersion,
        path: Path,
        loaded: str,
        stat: FileStat | None,
        precision: str,
        served: Path,
        key: str,
        graph: Path,
    ) -> tuple[str, bool] | None:
        """`_file_status` of one of its files ("" where it matches `loaded`), and whether it could be
        read; None: stopping. `key`: its card.json sha256 entry; `graph`: the graph it is or whose
        external data it is."""
        reference = graph != served  # model.onnx beside the fp16 twin served (or its external data)
        role = _role(path, key, graph, served)
        if stat is None:
            what, actual = f"{role} is gone from disk since this version loaded", ""
        else:
            try:
                hashed = _sha256_unless(path, lambda: self._stopping)
            except OSError as exc:
                return f"{role} cannot be read on disk ({exc.strerror or exc})", False
            if hashed is None:
                return None
            actual = hashed
            if actual == loaded:
                return "", True
            what = (
                f"{role} changed on disk since this version loaded (sha256 now {actual[:16]}..., "
                f"loaded {loaded[:16]}...)"
            )
        if reference:
            restart = _reference_restart(mv, actual, precision, key)
            return f"{what}; serving {served.name} as loaded in memory; {restart}", True
        other = _restart_file(mv, graph, precision)
        if other:
            restart = f"a restart would load {other}, not this file"
        elif not actual:
            restart = "a restart would find no file and this version would be UNAVAILABLE: restore it"
        elif actual == _card_sha256(mv, key):
            restart = "a restart loads the new file"
        else:
            restart = (
                "a restart would refuse it (card.json's sha256 differs) and this version would be "
                "UNAVAILABLE: restore the file, or publish the new one as a new version"
            )
        return f"{what}; serving the copy loaded in memory; {restart}", True

    # ------------------------------------------------------------------ drain

    def _retire(self, model: Model, mv: ModelVersion, report: RescanReport) -> None:
        if mv.state == ModelState.DRAINING:
            return  # already on its way out
        report.retired.append(mv.label)
        if mv.state != ModelState.READY:
            self._forget(model, mv)
            return
        mv.state = ModelState.DRAINING  # from here on no request resolves to it
        mv.metrics.ready.set(0)
        drain = self._draining[mv] = _Drain(model)
        task = asyncio.get_running_loop().create_task(self._drain(mv, drain), name=f"drain {mv.label}")
        drain.task = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _drain(self, mv: ModelVersion, drain: _Drain) -> None:
        deadline = time.monotonic() + self.drain_grace_s
        batcher = mv.batcher
        try:
            # RPCs that resolved this version may not have queued yet (an image still decoding),
            # and a SampleStream queues its chunks one after another: wait for both, up to the grace.
            if batcher is not None:
                try:
                    released = await batcher.wait_released(deadline - time.monotonic())
                except asyncio.CancelledError:
                    if drain.revived:
                        return
                    raise
                if drain.revived:  # revived as its holders left (the cancel came too late to land)
                    return
                drain.closing = True
                if not released:
                    logger.warning(
                        "%s: %d RPCs, %d SampleStreams and %d calls of other models using it (a decoder,"
                        " top prior or mapping) still running after the drain grace (%.0f s); they fail"
                        " with UNAVAILABLE",
                        mv.label,
                        batcher.callers,
                        batcher.streams,
                        batcher.dependents,
                        self.drain_grace_s,
                    )
                await batcher.close(max(0.1, deadline - time.monotonic()))
            drain.closing = True
            if mv.runner is not None:
                await asyncio.to_thread(mv.runner.close)
        finally:
            if not drain.revived:
                self._draining.pop(mv, None)
                self._forget(drain.model, mv)
                logger.info("%s unloaded", mv.label)

    def _forget(self, model: Model, mv: ModelVersion) -> None:
        if model.versions.get(mv.version) is mv:
            del model.versions[mv.version]
        # Soon, when the caller's frame no longer holds `mv`: a version loaded before the start-up
        # heap was frozen is a cycle the collector would otherwise never see.
        heap.refreeze_soon()
        self._file_stats.pop(mv.load_id, None)
        if self._on_unloaded is not None:
            self._on_unloaded(mv)
        # A copy of the same (model, version) loaded since (the model's directory moved away and
        # back, the version loaded again) binds the same series: they stay, as that copy sets them.
        others = self._copies(mv)
        if not others:
            mv.metrics.ready.set(0)
        self.repo.metrics.forget_version(mv.metrics, [o.metrics for o in others])
        for other in others:
            other.metrics.ready.set(1 if other.state == ModelState.READY else 0)
            other.metrics.file_changed.set(1 if other.file_changed else 0)
        current = self.repo.models.get(model.name)
        if current is not None and (current is model or others):
            # Also where `model` is an old object (its directory moved away and back): the gauges just
            # set are the current copy's, whose readiness also follows its mapping or decoder (App).
            self.repo.notify(current)

    def _copies(self, mv: ModelVersion) -> list[ModelVersion]:
        """Other objects of `mv`'s (model, version) not yet forgotten: the registry's, and draining ones."""
        copies = [d for d in self._draining if d is not mv and (d.name, d.version) == (mv.name, mv.version)]
        model = self.repo.models.get(mv.name)
        current = model.versions.get(mv.version) if model is not None else None
        if current is not None and current is not mv and current not in copies:
            copies.append(current)
        return copies


# `Reloader._file_stats`'s entry of a version's card.json (no file key: a key is a file's name).
CARD_CHECK = "/card.json"


def _card_status(mv: ModelVersion, matching: list[tuple[str, str]]) -> str:
    """What card.json on disk now means for a restart of `mv` ("" where it would load the files that
    still match: `matching`, (card key, loaded sha256)): a card that no longer loads, or whose sha256
    entry of such a file changed, makes a restart refuse the version (loader._checked_digest)."""
    refuse = "a restart would refuse this version and it would be UNAVAILABLE"
    try:
        card = load_card(mv.path / "card.json")
    except ConfigError as exc:
        return f"card.json no longer loads ({exc}); serving as loaded in memory; {refuse}: restore card.json"
    changed = [
        f"its sha256 of {key} is now {card.sha256[key][:16]}..."
        if card.sha256.get(key)
        else f"it has no sha256 of {key}"
        for key, loaded in matching
        if card.sha256.get(key) != loaded
    ]
    if not changed:
        return ""
    return (
        f"card.json changed on disk since this version loaded: {', '.join(changed)}, while the file "
        f"still matches the copy loaded; serving as loaded in memory; {refuse}: restore card.json's "
        "sha256, or publish the change as a new version"
    )


def _role(path: Path, key: str, graph: Path, served: Path) -> str:
    """How a report names one of a version's files (`Reloader._one_file_status`)."""
    role = (
        f"{graph.name} (the fp16 parity check's fp32 reference of {served.name})"
        if graph != served
        else graph.name
    )
    return role if path == graph else f"{key} (external data of {role})"


def _kind_left_behind(model: Model, config: ModelConfig) -> str:
    """An edited `kind` applies to versions loaded from then on: a loaded version of the old kind
    keeps serving as it was loaded, but a restart would refuse it (its card and graph are of the old
    kind), so the model says so ("" where every serving version is of config.json's kind)."""
    kind = config.kind.value
    behind = [mv for mv in model.ready_versions() if mv.config.kind.value != kind]
    if not behind:
        return ""
    served = ", ".join(f"version {mv.version} ({mv.config.kind.value})" for mv in behind)
    return (
        f"config.json's kind is {kind}, but {served} loaded as another kind and serves as it; a restart "
        f"would refuse it (its card and graph are not a {kind}'s): publish a version of kind {kind}, "
        "or set the kind back"
    )


# What a rescan applies to loaded versions (the versions it picks), or reports on its own (a kind
# edit: _kind_left_behind); every other key of config.json applies when a version loads.
_APPLIED_AT_RESCAN = frozenset({"version_policy", "kind"})


def _note_config_waiting(model: Model, config: ModelConfig, report: RescanReport) -> None:
    """A valid config.json edit applies to versions loaded from then on: where a serving version was
    loaded with another config (batching, sampling, runtime, ...), one line says what changed and
    when it applies (an operator who edited it and sent SIGHUP was told 'no change to apply')."""
    keys: list[str] = []
    behind = []
    for mv in model.ready_versions():
        changed = [
            f.name
            for f in fields(config)
            if f.name not in _APPLIED_AT_RESCAN and getattr(mv.config, f.name) != getattr(config, f.name)
        ]
        if changed:
            behind.append(f"version {mv.version}")
            keys += [k for k in changed if k not in keys]
    if behind:
        logger.warning(
            "model %s: config.json changed (%s): it applies at a version's next load (a restart, or a new "
            "version directory); %s keeps serving as loaded",
            model.name,
            ", ".join(keys),
            ", ".join(behind),
        )
        report.config_waiting.append(model.name)


def _served_file(mv: ModelVersion) -> Path | None:
    """The file the version's sessions loaded (choose_model_file's choice, as its precision says; not
    found by its sha256 in card.json: a twin byte-identical to model.onnx has model.onnx's)."""
    if mv.card is None or not mv.sha256:
        return None
    return mv.path / ("model.fp16.onnx" if mv.precision == "fp16" else "model.onnx")


def _sha256_unless(path: Path, stopping: Callable[[], bool]) -> str | None:
    """genserve_contract's sha256_file, None as soon as `stopping()` holds between two 1 MiB blocks:
    hashing a multi-GB file takes tens of seconds, and the process's exit joins the thread doing it
    (asyncio.run waits for its default executor) whether or not anyone still wants the result."""
    digest = hashlib.sha256()
    with open_regular(path) as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            if stopping():
                return None
            digest.update(block)
    return digest.hexdigest()


def _restart_file(mv: ModelVersion, served: Path, precision: str) -> str:
    """What a restart would load instead of `served`, an fp16 twin it would not open (config.json's
    precision no longer fp16, the card's parity no longer vouching for it), with why; "" where a
    restart opens `served` (model.onnx is the fp16 parity check's reference too) or the card cannot
    be read (a restart refuses the version: the caller says so)."""
    if served.name == "model.onnx":
        return ""
    try:
        card = json.loads(read_regular_text(mv.path / "card.json", MAX_JSON_BYTES))
    except (OSError, ValueError, RecursionError):
        return ""
    if not isinstance(card, dict):
        return ""
    choice = choose_model_file(mv.path, precision, card)
    if choice.path.name == served.name:
        return ""
    return f"{choice.path.name} ({choice.reason or f'config.json precision {precision}'})"


def _reference_restart(mv: ModelVersion, actual: str, precision: str, key: str = "model.onnx") -> str:
    """What a restart would do with model.onnx (or `key`, an external data file of it) on disk
    (sha256 `actual`, "" where gone) beside the fp16 twin this version serves, under config.json's
    `precision` now."""
    twin = _restart_file(mv, mv.path / "model.fp16.onnx", precision) == ""  # a restart picks it
    if not actual:
        if key != "model.onnx":  # model.onnx stays, and a restart checks its external data too
            return (
                f"a restart would refuse this version ({key} not found) and it would be UNAVAILABLE: "
                "restore it"
            )
        if twin:
            return (
                "a restart would serve model.fp16.onnx on the card's parity alone, unchecked on its "
                "provider: restore the file"
            )
        return "a restart would find no file and this version would be UNAVAILABLE: restore it"
    if actual != _card_sha256(mv, key):
        return (
            f"a restart would refuse this version ({key}'s sha256 differs from card.json's) and "
            "it would be UNAVAILABLE: restore the file, or publish the new one as a new version"
        )
    if twin:
        return (
            "a restart checks model.fp16.onnx against the new file and serves it within fp16_atol, "
            "else the new file"
        )
    return "a restart loads the new file"


def _card_sha256(mv: ModelVersion, filename: str) -> str:
    """card.json's sha256 of `filename` as on disk now ("" when unreadable)."""
    try:
        data = json.loads(read_regular_text(mv.path / "card.json", MAX_JSON_BYTES))
        return str(data["sha256"][filename])
    except (OSError, ValueError, KeyError, TypeError, RecursionError):  # RecursionError: nested too deep
        return ""
