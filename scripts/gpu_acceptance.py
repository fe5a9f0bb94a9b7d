"""GPU acceptance checks of issue 21, one per defect, with their figures in one JSON file.

    python scripts/gpu_acceptance.py --out OUT/gpu_acceptance.json [--dry] [--rehearse-on-cpu]

Run by scripts/gpu_acceptance.sh on a lent GPU machine (see ../shared/GPU.md). Without a GPU
(`--dry`, or no session really runs on CUDA) every GPU check is recorded as skipped;
`--rehearse-on-cpu` runs the checks that do not need CUDA graphs on the CPU provider instead, to try
the script's own code before the one device call. Every check writes its figures as soon as it
ends, so a run cut short still leaves the finished ones. Exit status: 1 when a check failed, 3 when
(without --dry or --rehearse-on-cpu) no session ran on CUDA, so that nothing was checked on a GPU,
else 0.

Needs the repository's sources on the path (api, server, clients, export, tests/server, tests/perf)
and onnx (the tiny test graphs).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / p) for p in ("api", "server", "clients", "export", "tests/server", "tests/perf")]

from genserve_server import ort_session  # noqa: E402
from genserve_server.config import LATENT_KINDS, ServerConfig  # noqa: E402
from genserve_server.loader import warmup_inputs  # noqa: E402
from genserve_server.metrics import Metrics  # noqa: E402
from genserve_server.ort_session import (  # noqa: E402
    CPU,
    CUDA,
    TENSORRT,
    ProfileShapes,
    RuntimeConfig,
    create_session,
    max_abs_diff,
)
from genserve_server.repository import ModelState, Repository  # noqa: E402
from genserve_server.runner import Runner  # noqa: E402
from genserve_server.session_runner import SessionRunner, check_fp16_parity  # noqa: E402

ort.set_default_logger_severity(3)
# Same device, same session options: a replayed graph computes what a plain run does (cuDNN may
# pick another algorithm for a padded batch size, hence not 0).
GRAPH_ATOL = 1e-4
# GPU vs CPU in fp32 with TF32 off: summation order and cuDNN's algorithms differ, not the math
# (TF32 would give ~1e-2 on the deeper bundled models).
CUDA_VS_CPU_ATOL = 5e-3
GRAPH_SIZES = (1, 8, 64)
Array = np.ndarray


class Report:
    def __init__(self, path: Path, device: str) -> None:
        self.path = path
        self.data: dict[str, Any] = {"device": device, "checks": {}, "started": time.strftime("%FT%TZ")}
        self.failed = False

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=2, default=str) + "\n")

    def check(self, name: str, fn: Callable[[], dict[str, Any]], *, runs: bool, why_not: str = "") -> None:
        started = time.perf_counter()
        if not runs:
            entry: dict[str, Any] = {"status": "skipped", "reason": why_not}
        else:
            try:
                figures = fn()
                entry = {"status": "pass" if figures.pop("ok") else "fail", **figures}
            except Exception as exc:  # a check that crashes fails; the others still run
                entry = {"status": "error", "error": f"{type(exc).__name__}: {exc}"[:2000]}
                entry["traceback"] = traceback.format_exc()[-3000:]
        entry["seconds"] = round(time.perf_counter() - started, 3)
        self.failed |= entry["status"] in ("fail", "error")
        self.data["checks"][name] = entry
        sys.stdout.write(f"{name}: {entry['status']} ({entry['seconds']} s)\n")
        sys.stdout.flush()
        self.write()


def cuda_really_used(model: Path) -> bool:
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            session = ort.InferenceSession(str(model), providers=[CUDA, CPU], enable_fallback=0)
    except Exception:
        return False
    return bool(session.get_providers()[0] == CUDA)


def gpu_name() -> str:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
        return out.stdout.strip() or out.stderr.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unknown ({exc})"


def z(n: int, dim: int = 16, seed: int = 0) -> dict[str, Array]:
    return {"z": np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)}


def random_like(feeds: Mapping[str, Array], seed: int, classes: int = 10) -> dict[str, Array]:
    """Random inputs with the shapes and dtypes of `feeds` (warm-up inputs are zeros)."""
    rng = np.random.default_rng(seed)
    out: dict[str, Array] = {}
    for name, value in feeds.items():
        if value.dtype == np.int64:
            out[name] = rng.integers(0, classes, value.shape).astype(np.int64)
        elif name == "image":
            out[name] = rng.uniform(0, 1, value.shape).astype(np.float32)
        else:
            out[name] = rng.standard_normal(value.shape).astype(np.float32)
    return out


class Checks:
    def __init__(self, work: Path, provider: str) -> None:
        from perf_support import write_tiny_version

        self.work = work
        self.provider = provider  # CUDA on the device; CPU in a rehearsal
        self.tiny = write_tiny_version(work / "tiny" / "1") / "model.onnx"

    def large_generator(self) -> Path:
        """A 256x256 generator with random weights (~10^8 multiply-adds an image), written once: the
        default repository has no generator this large."""
        from server_support import write_large_generator

        model = self.work / "large" / "large-gen"
        if not (model / "1" / "model.onnx").is_file():
            write_large_generator(model.parent, model.name)
        return model

    def providers(self) -> list[str]:
        return [self.provider, CPU] if self.provider != CPU else [CPU]

    def session_runner(
        self, path: Path, config: RuntimeConfig, providers: list[str] | None = None
    ) -> SessionRunner:
        info = create_session(path, providers or self.providers(), config, cores=2)
        return SessionRunner(info, config)

    # ------------------------------------------------------------------ defect 1

    def fallback_keeps_options(self) -> dict[str, Any]:
        config = replace(RuntimeConfig(), cuda_graph=True, io_binding=True)
        profile = ProfileShapes({"z": [1, 16]}, {"z": [8, 16]}, {"z": [64, 16]})
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            info = create_session(self.tiny, [TENSORRT, CUDA, CPU], config, cores=2, profile=profile)
        cuda = info.provider_options.get(CUDA, {})
        return {
            "ok": info.provider == CUDA
            and cuda.get("enable_cuda_graph") == "1"
            and cuda.get("use_tf32") == "0"
            and "Falling back" not in printed.getvalue(),
            "providers": info.providers,
            "effective_cuda_options": cuda,
            "fallbacks": info.fallbacks,
            "tensorrt": ort_session.tensorrt_loadable() or "loadable",
            "describe": info.describe(),
        }

    # ------------------------------------------------------------------ defects 2 and 3

    def graph_replay_equals_plain(self) -> dict[str, Any]:
        digits = ROOT / "models" / "dcgan-digits" / "1"
        figures: dict[str, Any] = {"ok": True}
        for label, path, dim in (
            ("tiny", self.tiny, 16),
            ("dcgan-digits", digits / "model.onnx", _latent_dim(digits)),
        ):
            graph_config = replace(RuntimeConfig(), cuda_graph=True, cuda_graph_batch_sizes=GRAPH_SIZES)
            graph = self.session_runner(path, graph_config)
            plain = self.session_runner(path, replace(RuntimeConfig(), io_binding=True))
            graph.capture_all(z(1, dim))
            diffs = {}
            for batch in (1, 5, 8, 64, 70):
                feeds = z(batch, dim, seed=batch)
                diffs[batch] = max_abs_diff(plain.run(feeds), graph.run(feeds))
            worst = max(diffs.values())
            figures[label] = {
                "mode": graph.mode,
                "max_abs_diff_by_batch": diffs,
                "captured_shapes": [list(s[0]) for s in graph.captured_shapes],
            }
            figures["ok"] &= graph.mode == "cuda_graph" and worst <= GRAPH_ATOL
            graph.close()
        return figures

    def replay_really_happens(self) -> dict[str, Any]:
        config = replace(RuntimeConfig(), cuda_graph=True, cuda_graph_batch_sizes=GRAPH_SIZES)
        graph = self.session_runner(self.tiny, config)
        plain = self.session_runner(self.tiny, replace(RuntimeConfig(), io_binding=True))
        graph.capture_all(z(1))
        captured = len(graph.captured_shapes)
        # Fresh inputs on every call: a replay that ignored the updated input buffers would repeat
        # the first output.
        worst = 0.0
        for seed in range(20):
            feeds = z(8, seed=100 + seed)
            worst = max(worst, max_abs_diff(plain.run(feeds), graph.run(feeds)))

        def per_call_us(runner: SessionRunner, calls: int = 300) -> float:
            feeds = z(8, seed=7)
            runner.run(feeds)
            started = time.perf_counter()
            for _ in range(calls):
                runner.run(feeds)
            return (time.perf_counter() - started) / calls * 1e6

        graph_us, plain_us = per_call_us(graph), per_call_us(plain)
        after = len(graph.captured_shapes)
        graph.close()
        return {
            "ok": captured == len(GRAPH_SIZES) and after == captured and worst <= GRAPH_ATOL,
            "graphs_captured_at_load": captured,
            "graphs_after_serving": after,
            "max_abs_diff_fresh_inputs": worst,
            "graph_call_us_b8": round(graph_us, 1),
            "io_binding_call_us_b8": round(plain_us, 1),
            "graph_over_io_binding": round(graph_us / plain_us, 3),
        }

    def multi_instance_capture(self) -> dict[str, Any]:
        config = replace(RuntimeConfig(), cuda_graph=True, cuda_graph_batch_sizes=GRAPH_SIZES)
        runner = Runner(
            self.tiny,
            label="multi",
            providers=self.providers(),
            instances=2,
            intra_op_threads=1,
            runtime=config,
        )
        reference = self.session_runner(self.tiny, replace(RuntimeConfig(), io_binding=True))
        try:
            runner.warm(z(8))
            sealed = [r.sealed for r in runner.session_runners]
            shapes = [len(r.captured_shapes) for r in runner.session_runners]

            async def many() -> list[tuple[dict[str, Array], Mapping[str, Array]]]:
                inputs = [z(1 + i % 9, seed=i) for i in range(48)]
                outs = await asyncio.gather(*(runner.run("k", feeds) for feeds in inputs))
                return list(zip(inputs, outs, strict=True))

            worst = 0.0
            for feeds, out in asyncio.run(many()):
                worst = max(worst, max_abs_diff(reference.run(feeds), [out["image"]]))
            return {
                "ok": runner.mode == "cuda_graph"
                and all(sealed)
                and shapes == [3, 3]
                and worst <= GRAPH_ATOL,
                "mode": runner.mode,
                "instances_sealed": sealed,
                "graphs_per_instance": shapes,
                "max_abs_diff_concurrent": worst,
            }
        finally:
            runner.close()

    def shape_change_same_batch(self) -> dict[str, Any]:
        from server_support import image_to_image_graph

        path = self.work / "fully-conv.onnx"
        onnx.save(image_to_image_graph(4), str(path))
        config = replace(RuntimeConfig(), cuda_graph=True, cuda_graph_batch_sizes=(8,))
        plain = self.session_runner(path, replace(RuntimeConfig(), io_binding=True))
        rng = np.random.default_rng(0)

        def image(h: int) -> dict[str, Array]:
            return {"image": rng.uniform(0, 1, (8, 3, h, h)).astype(np.float32)}

        figures: dict[str, Any] = {}
        # Unsealed: each shape gets its own graph (never-reused id); sealed: a new shape runs plain.
        lazy = self.session_runner(path, config)
        lazy_diffs = [max_abs_diff(plain.run(f), lazy.run(f)) for f in (image(16), image(32), image(16))]
        figures["lazy"] = {"max_abs_diff": lazy_diffs, "graphs": len(lazy.captured_shapes)}
        sealed = self.session_runner(path, config)
        sealed.capture_all(image(16))
        sealed_diffs = [max_abs_diff(plain.run(f), sealed.run(f)) for f in (image(16), image(32), image(16))]
        figures["sealed"] = {"max_abs_diff": sealed_diffs, "graphs": len(sealed.captured_shapes)}
        lazy.close()
        sealed.close()
        figures["ok"] = (
            max(lazy_diffs + sealed_diffs) <= GRAPH_ATOL
            and figures["lazy"]["graphs"] == 2
            and figures["sealed"]["graphs"] == 1
        )
        return figures

    # ------------------------------------------------------------------ memory, repository

    def oom_split_and_retry(self) -> dict[str, Any]:
        """A batch that does not fit under gpu_mem_limit fails, is retried in halves, and every row
        comes back; the model stays READY (out of memory is not a sticky error)."""
        source = self.large_generator()
        tries: list[dict[str, Any]] = []
        limit_mib = 256
        # On the CPU provider the cap does nothing: one try shows the code path.
        for _ in range(6 if self.provider == CUDA else 1):
            result = self._oom_try(source, limit_mib)
            tries.append(result)
            if result["split"] and result["rows_back"] == 64:
                break
            limit_mib = limit_mib * 2 if result["rows_back"] == 0 else limit_mib // 2
            if limit_mib < 16:
                break
        last = tries[-1]
        return {
            "ok": last["split"] and last["rows_back"] == 64 and last["state"] == "READY",
            "tries": tries,
        }

    def _oom_try(self, source: Path, limit_mib: int) -> dict[str, Any]:
        root = self.work / f"oom-{limit_mib}"
        shutil.copytree(source, root / source.name, dirs_exist_ok=True)
        config_path = root / source.name / "config.json"
        cfg = json.loads(config_path.read_text())
        cfg["execution_providers"] = self.providers()
        cfg["instances"] = 1
        cfg["batching"] = {"max_batch_size": 64, "max_queue_delay_ms": 1.0}
        cfg["runtime"] = {"gpu_mem_limit_bytes": limit_mib << 20, "arena_extend_strategy": "kSameAsRequested"}
        config_path.write_text(json.dumps(cfg))
        records: list[str] = []
        handler = _ListHandler(records)
        logging.getLogger("genserve_server").addHandler(handler)

        async def body() -> dict[str, Any]:
            repo = Repository(root, ServerConfig(warmup=False), Metrics(enabled=False))
            repo.on_fatal = records.append
            repo.scan()
            await repo.load_all()
            mv = repo.get(source.name).versions["1"]
            out: dict[str, Any] = {"limit_mib": limit_mib, "provider": mv.provider, "split": False}
            try:
                if mv.batcher is None:
                    return out | {"rows_back": 0, "state": mv.state.name, "reason": mv.reason[:300]}
                assert mv.card is not None and mv.card.latent_dim is not None
                try:
                    result = await mv.batcher.submit(("z",), z(64, mv.card.latent_dim), 64)
                    out["rows_back"] = int(result.outputs["image"].shape[0])
                    out["executed_batch_sizes"] = result.executed_batch_sizes
                except Exception as exc:
                    out["rows_back"] = 0
                    out["error"] = str(exc)[:300]
                out["split"] = any("in halves" in r for r in records)
                out["state"] = mv.state.name
                return out
            finally:
                await repo.close(1)

        try:
            return asyncio.run(body())
        finally:
            logging.getLogger("genserve_server").removeHandler(handler)

    def bundled_models(self) -> dict[str, Any]:
        """Every bundled model through the Repository on the provider (and generators again with
        CUDA graphs and two instances), outputs against the CPU provider's; and no batch cap where
        the config leaves it to efficient_batch_tolerance "auto" (it caps CPU sessions only)."""
        on_device = self._repository_outputs("device", self.providers(), {})
        on_cpu = self._repository_outputs("cpu", [CPU], {})
        graphs = self._repository_outputs("graphs", self.providers(), {"cuda_graph": True}, latent_only=True)
        models: dict[str, Any] = {}
        ok = True
        for name, got in on_device.items():
            entry = {k: v for k, v in got.items() if k != "outputs"}
            ref = on_cpu.get(name, {}).get("outputs")
            if got.get("outputs") is not None and ref is not None:
                entry["max_abs_diff_vs_cpu"] = max_abs_diff(ref, got["outputs"])
                tolerance = 5e-2 if got.get("precision") == "fp16" else CUDA_VS_CPU_ATOL
                entry["within_tolerance"] = entry["max_abs_diff_vs_cpu"] <= tolerance
            else:
                entry["within_tolerance"] = False
            graph = graphs.get(name)
            if graph is not None:
                entry["cuda_graph_runtime"] = graph.get("runtime")
                if graph.get("outputs") is not None and got.get("outputs") is not None:
                    entry["cuda_graph_max_abs_diff"] = max_abs_diff(got["outputs"], graph["outputs"])
                    entry["within_tolerance"] &= entry["cuda_graph_max_abs_diff"] <= GRAPH_ATOL
                else:
                    entry["within_tolerance"] = False
            # "auto" caps compute-bound CPU sessions only (a CPU rehearsal caps srgan-photos-x4 at 1).
            entry["uncapped_where_auto"] = (
                self.provider == CPU
                or not got.get("auto")
                or got.get("batch_max_rows") == got.get("max_batch_size")
            )
            ok &= (
                entry["state"] == "READY"
                and entry["provider"] == self.provider
                and entry["within_tolerance"]
                and entry["uncapped_where_auto"]
            )
            models[name] = entry
        return {"ok": ok and bool(models), "models": models}

    def _repository_outputs(
        self, label: str, providers: list[str], runtime: Mapping[str, Any], latent_only: bool = False
    ) -> dict[str, dict[str, Any]]:
        root = self.work / f"models-{label}"
        shutil.copytree(ROOT / "models", root, dirs_exist_ok=True)
        for config_path in root.glob("*/config.json"):
            cfg = json.loads(config_path.read_text())
            if latent_only and cfg["kind"] not in LATENT_KINDS:
                shutil.rmtree(config_path.parent)
                continue
            cfg["execution_providers"] = providers
            cfg["runtime"] = {**cfg.get("runtime", {}), **runtime}
            config_path.write_text(json.dumps(cfg))

        async def body() -> dict[str, dict[str, Any]]:
            repo = Repository(root, ServerConfig(), Metrics(enabled=False))
            repo.scan()
            await repo.load_all()
            out: dict[str, dict[str, Any]] = {}
            try:
                for model in repo:
                    for mv in model.versions.values():
                        entry: dict[str, Any] = {
                            "state": mv.state.name,
                            "reason": mv.reason[:300],
                            "provider": mv.provider,
                            "precision": mv.precision,
                            "runtime": mv.runtime,
                            "load_s": round(mv.load_s, 3),
                            "auto": mv.config.batching.efficient_batch_tolerance == "auto",
                            "max_batch_size": mv.config.batching.max_batch_size,
                            "batch_max_rows": mv.batcher.max_batch_size if mv.batcher is not None else None,
                        }
                        if mv.state == ModelState.READY and mv.runner is not None and mv.card is not None:
                            feeds = random_like(
                                warmup_inputs(mv.card, 4), seed=1, classes=len(mv.card.class_names) or 1
                            )
                            result = mv.runner.run_sync(feeds)
                            entry["outputs"] = [result[o] for o in mv.runner.outputs]
                        out[model.name] = entry
            finally:
                await repo.close(1)
            return out

        return asyncio.run(body())

    # ------------------------------------------------------------------ precision

    def fp16_parity_on_device(self) -> dict[str, Any]:
        models: dict[str, Any] = {}
        ok = True
        for version in sorted((ROOT / "models").glob("*/1")):
            if not (version / "model.fp16.onnx").is_file():
                continue
            from genserve_server.config import load_card

            card = load_card(version / "card.json")
            feeds = random_like(warmup_inputs(card, 8), seed=3, classes=len(card.class_names) or 1)
            fp32 = self.session_runner(version / "model.onnx", RuntimeConfig())
            fp16 = self.session_runner(version / "model.fp16.onnx", RuntimeConfig())
            atol = float((json.loads(card.raw_json).get("parity") or {}).get("fp16_atol") or 1e-2)
            within, diff = check_fp16_parity(fp32, fp16, feeds, atol)
            models[version.parent.name] = {"max_abs_diff": diff, "atol": atol, "within": within}
            ok &= fp16.info.provider == self.provider
        return {"ok": ok and bool(models), "models": models}

    def tf32_off_by_default(self) -> dict[str, Any]:
        version = self.large_generator() / "1"
        feeds = z(8, _latent_dim(version), seed=5)
        off = self.session_runner(version / "model.onnx", RuntimeConfig())
        on = self.session_runner(version / "model.onnx", replace(RuntimeConfig(), use_tf32=True))
        cpu = self.session_runner(version / "model.onnx", RuntimeConfig(), [CPU])
        ref = cpu.run(feeds)
        off_out, on_out = off.run(feeds), on.run(feeds)
        off_vs_cpu = max_abs_diff(ref, off_out)
        effective = [r.info.provider_options.get(CUDA, {}).get("use_tf32") for r in (off, on)]
        return {
            "ok": off_vs_cpu <= CUDA_VS_CPU_ATOL and effective == ["0", "1"],
            "tf32_off_vs_cpu": off_vs_cpu,
            "tf32_on_vs_cpu": max_abs_diff(ref, on_out),
            "tf32_on_vs_off": max_abs_diff(off_out, on_out),
            "effective_use_tf32": effective,
        }


def _latent_dim(version: Path) -> int:
    return int(json.loads((version / "card.json").read_text())["latent_dim"])


class _ListHandler(logging.Handler):
    def __init__(self, records: list[str]) -> None:
        super().__init__(logging.WARNING)
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record.getMessage())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="the JSON file to write")
    parser.add_argument("--dry", action="store_true", help="skip every GPU check (CPU hosts)")
    parser.add_argument(
        "--rehearse-on-cpu", action="store_true", help="run the checks that can on the CPU provider"
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="gpu-acceptance-") as tmp:
        work = Path(tmp)
        checks = Checks(work, CUDA)
        on_gpu = not args.dry and cuda_really_used(checks.tiny)
        device = gpu_name() if on_gpu else "none (dry run)" if args.dry else "no usable GPU"
        report = Report(args.out, device)
        report.data["environment"] = {
            "onnxruntime": ort.__version__,
            "onnxruntime_path": str(Path(ort.__file__).parent),
            "available_providers": ort.get_available_providers(),
            "preload_dlls": ort_session.preload_cuda_libraries(),
            "cuda_session": on_gpu,
            "python": sys.version.split()[0],
        }
        report.write()
        why = "no GPU: dry run" if args.dry else "no session runs on CUDAExecutionProvider here"
        rehearse = args.rehearse_on_cpu and not on_gpu
        if rehearse:
            checks = Checks(work / "rehearsal", CPU)
            report.data["rehearsal_on_cpu"] = True
        gpu_only = [
            ("fallback_keeps_options", checks.fallback_keeps_options),
            ("graph_replay_equals_plain", checks.graph_replay_equals_plain),
            ("replay_really_happens", checks.replay_really_happens),
            ("multi_instance_capture", checks.multi_instance_capture),
            ("shape_change_same_batch", checks.shape_change_same_batch),
        ]
        any_provider = [
            ("oom_split_and_retry", checks.oom_split_and_retry),
            ("bundled_models_through_repository", checks.bundled_models),
            ("fp16_parity_on_device", checks.fp16_parity_on_device),
            ("tf32_off_by_default", checks.tf32_off_by_default),
        ]
        for name, fn in gpu_only:
            report.check(name, fn, runs=on_gpu, why_not=why)
        for name, fn in any_provider:
            report.check(name, fn, runs=on_gpu or rehearse, why_not=why)
        report.data["sticky_cuda_error"] = {
            "status": "not exercised on the device",
            "reason": "no safe way to poison a CUDA context on purpose; the classification and the "
            "NOT_SERVING + restart path run on CPU (tests/perf/test_gpu_path.py)",
        }
        report.data["finished"] = time.strftime("%FT%TZ")
        report.write()
    if report.failed and not rehearse:
        return 1
    return 3 if not (args.dry or on_gpu or rehearse) else 0


if __name__ == "__main__":
    sys.exit(main())
