"""Hot reload of the model repository: new versions in, old versions drained out, no request lost.

Triggers (docs/operations.md, "Hot reload"): SIGHUP (main.py), and optionally a poll of the
repository's directory listing every `watch_interval_s` (stdlib has no inotify; a listing of a few
directories every few seconds costs nothing). There is no admin RPC: that would need a proto change
and a way to authorize it, while SIGHUP already has the OS's.

One rescan, serialised by a lock (a trigger during a rescan queues exactly one more):

1. Models whose directory is gone leave the registry at once (new requests get NOT_FOUND, health
   NOT_SERVING), then their versions drain in the background.
2. New models, and new versions picked by the model's version policy, are loaded and warmed on a
   worker thread while the old versions keep serving. Versions that failed to load before are
   retried (a fixed file plus SIGHUP brings them back).
3. Traffic switches atomically: `Model.resolve("")` picks the highest READY version, and a version
   becomes READY in one assignment on the event loop once its batcher runs.
4. Versions the policy no longer picks drain, but only once the model has a READY version among the
   picked ones, so a new version that fails to load leaves the old one serving. Draining: state
   DRAINING (no new request resolves to it), wait until no RPC holds it (`Batcher.wait_released`:
   RPCs and SampleStreams hold a version from resolve to their end; bounded by `drain_grace_s`),
   finish the accepted batches (`Batcher.close`), close the runner, remove it.

Write a new version aside and rename it into place (`.tmp-3` -> `3`): names that are not version
numbers are ignored, so a half-copied directory is never loaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from genserve_server.repository import VERSION_PATTERN, Model, ModelState, ModelVersion, Repository

logger = logging.getLogger(__name__)

HealthSetter = Callable[[str, bool], None]


@dataclass
class RescanReport:
    """What one rescan changed (logged, and returned for tests)."""

    loaded: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    retired: list[str] = field(default_factory=list)
    removed_models: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # old versions kept because the new one failed

    def changed(self) -> bool:
        return bool(self.loaded or self.failed or self.retired or self.removed_models)


def repository_fingerprint(root: Path) -> tuple[tuple[str, int, int], ...]:
    """Names, sizes and mtimes of everything two levels under the repository root (the watch)."""
    entries: list[tuple[str, int, int]] = []
    with contextlib.suppress(OSError):
        for model_dir in root.iterdir():
            if model_dir.name.startswith("."):
                continue
            for path in (model_dir, *_children(model_dir)):
                with contextlib.suppress(OSError):
                    st = path.stat()
                    entries.append((str(path.relative_to(root)), st.st_size, st.st_mtime_ns))
    return tuple(sorted(entries))


def _children(model_dir: Path) -> list[Path]:
    if not model_dir.is_dir():
        return []
    paths: list[Path] = []
    with contextlib.suppress(OSError):
        for child in model_dir.iterdir():
            paths.append(child)
            if child.is_dir() and VERSION_PATTERN.match(child.name):
                paths.extend(child.iterdir())
    return paths


class Reloader:
    """Rescans `repository` on request; owns the background drains of retired versions."""

    def __init__(
        self,
        repository: Repository,
        *,
        drain_grace_s: float,
        watch_interval_s: float | None = None,
        on_removed: HealthSetter | None = None,
    ) -> None:
        self.repo = repository
        self.drain_grace_s = drain_grace_s
        self.watch_interval_s = watch_interval_s
        self._on_removed = on_removed
        self._lock = asyncio.Lock()
        self._requested = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self.rescans = 0  # completed rescans (for tests and logs)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._loop_task = loop.create_task(self._serve_requests(), name="reload")
        if self.watch_interval_s is not None:
            self._watch_task = loop.create_task(self._watch(self.watch_interval_s), name="reload-watch")

    def request(self) -> None:
        """Ask for a rescan (SIGHUP handler, watch); requests during a rescan coalesce into one more."""
        logger.info("repository rescan requested")
        self._requested.set()

    async def close(self, timeout_s: float) -> None:
        """Stop watching and rescanning; let running drains finish (up to timeout_s)."""
        for task in (self._watch_task, self._loop_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout_s)

    async def _serve_requests(self) -> None:
        while True:
            await self._requested.wait()
            self._requested.clear()
            try:
                await self.rescan()
            except Exception:  # a failed rescan must not end reloading; the models keep serving
                logger.exception("repository rescan failed; models keep serving as before")

    async def _watch(self, interval_s: float) -> None:
        last = await asyncio.to_thread(repository_fingerprint, self.repo.root)
        while True:
            await asyncio.sleep(interval_s)
            now = await asyncio.to_thread(repository_fingerprint, self.repo.root)
            if now != last:
                last = now
                self.request()

    # ------------------------------------------------------------------ rescan

    async def rescan(self) -> RescanReport:
        async with self._lock:
            report = RescanReport()
            started = time.monotonic()
            if not self.repo.root.is_dir():
                logger.error("%s: model repository directory not found; nothing changed", self.repo.root)
                return report
            on_disk = {d.name: d for d in self.repo.model_dirs()}
            for name in [n for n in self.repo.models if n not in on_disk]:
                self._remove_model(name, report)
            for model_dir in on_disk.values():
                await self._rescan_model(model_dir, report)
            self.rescans += 1
            if report.changed():
                logger.info(
                    "rescan in %.2f s: loaded %s, failed %s, retiring %s, removed models %s",
                    time.monotonic() - started,
                    report.loaded or "none",
                    report.failed or "none",
                    report.retired or "none",
                    report.removed_models or "none",
                )
            return report

    def _remove_model(self, name: str, report: RescanReport) -> None:
        model = self.repo.models.pop(name)
        report.removed_models.append(name)
        logger.info("model %s left the repository: draining its versions", name)
        if self._on_removed is not None:
            self._on_removed(name, False)
        for mv in list(model.versions.values()):
            self._retire(model, mv, report)

    async def _rescan_model(self, model_dir: Path, report: RescanReport) -> None:
        fresh = self.repo.read_model(model_dir)
        current = self.repo.models.get(fresh.name)
        if current is None or (current.config is None and not current.versions):
            self.repo.models[fresh.name] = current = fresh  # new model, or a broken config fixed/changed
        elif fresh.config is None:
            # A broken config.json edit never takes down a serving model.
            logger.error(
                "%s: config.json is invalid, keeping the loaded versions: %s", fresh.name, fresh.reason
            )
            return
        config = fresh.config
        if config is None:
            self.repo.notify(current)  # health: this name NOT_SERVING, and "" re-evaluated
            return  # a new model whose config.json is broken: UNAVAILABLE with the reason
        current.config = config
        selected = config.version_policy.select(self.repo.available_versions(current))
        for version in selected:
            known = current.versions.get(version)
            if known is not None and known.state != ModelState.UNAVAILABLE:
                continue  # loaded, loading or draining: leave it
            mv = self.repo.add_version(current, version, config)
            await self.repo.load_version(mv)
            (report.loaded if mv.state == ModelState.READY else report.failed).append(mv.label)
        stale = [mv for v, mv in current.versions.items() if v not in selected]
        picked_ready = any(
            current.versions[v].state == ModelState.READY for v in selected if v in current.versions
        )
        if stale and (picked_ready or not selected):
            for mv in stale:
                self._retire(current, mv, report)
        elif stale:
            report.kept.extend(mv.label for mv in stale)
            logger.warning(
                "%s: no newly picked version is ready; still serving %s",
                current.name,
                ", ".join(mv.label for mv in stale),
            )
        self.repo.notify(current)

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
        task = asyncio.get_running_loop().create_task(self._drain(model, mv), name=f"drain {mv.label}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _drain(self, model: Model, mv: ModelVersion) -> None:
        deadline = time.monotonic() + self.drain_grace_s
        batcher = mv.batcher
        try:
            # RPCs that resolved this version may not have queued yet (an image still decoding),
            # and a SampleStream queues its chunks one after another: wait for both, up to the grace.
            if batcher is not None:
                if not await batcher.wait_released(deadline - time.monotonic()):
                    logger.warning(
                        "%s: %d RPCs and %d SampleStreams still running after the drain grace (%.0f s); "
                        "they fail with UNAVAILABLE",
                        mv.label,
                        batcher.callers,
                        batcher.streams,
                        self.drain_grace_s,
                    )
                await batcher.close(max(0.1, deadline - time.monotonic()))
            if mv.runner is not None:
                await asyncio.to_thread(mv.runner.close)
        finally:
            self._forget(model, mv)
            logger.info("%s unloaded", mv.label)

    def _forget(self, model: Model, mv: ModelVersion) -> None:
        if model.versions.get(mv.version) is mv:
            del model.versions[mv.version]
        mv.metrics.ready.set(0)
        mv.metrics.clear_runtime()
        metrics = self.repo.metrics
        if metrics.enabled:
            for family in (metrics.model_ready, metrics.queue_depth, metrics.model_load_duration):
                with contextlib.suppress(KeyError):
                    family.remove(mv.name, mv.version)
        if self.repo.models.get(model.name) is model:
            self.repo.notify(model)
