"""Start genserve or the naive server as a subprocess, drive it with the client's load generator.

Both servers are started the same way (127.0.0.1, an OS-chosen port, a ready file with
{"port", "metrics_port", "pid"}) and driven by the same command, `genserve-client bench --json`,
one concurrency level per invocation so that the server's CPU time (utime + stime of all its
threads, from /proc/<pid>/stat) can be read around each level.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from bench.common import REPO_ROOT
from genserve_server.admission import HEALTH_CHECK
from genserve_server.launcher import ServerStartError, ServerSubprocess, genserve_command

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
VENV_BIN = Path(sys.executable).parent


class BenchError(RuntimeError):
    """A server did not start, or the load generator failed."""


def _tool(name: str) -> str:
    local = VENV_BIN / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise BenchError(f"{name} not found (run `make setup-dev` first)")
    return found


def _client_command() -> list[str]:
    """genserve-client: the installed script, else this interpreter on the package (a machine where
    the sources are only on PYTHONPATH, such as the lent GPU machine)."""
    try:
        return [_tool("genserve-client")]
    except BenchError:
        return [sys.executable, "-m", "genserve_client"]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of every thread of `pid` so far."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        stat = f.read()
    fields = stat[stat.rindex(")") + 2 :].split()
    # Fields after the command: state is fields[0], so utime (14th overall) is fields[11].
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


@dataclass
class ServerProcess:
    """A running server subprocess: `with ServerProcess.genserve(models) as s: s.port`.

    Started, awaited and stopped by genserve_server.launcher, as the tests start theirs."""

    name: str
    command: list[str]
    startup_timeout_s: float = 180.0
    running: ServerSubprocess | None = None
    port: int = 0
    pid: int = 0
    metrics_port: int = 0  # 0: the server has no /metrics (the naive one)
    env: dict[str, str] | None = None  # e.g. PYTHONPATH for another source tree (bench.ab)
    workdir: Path | None = None  # its ready file and server.log, removed once it stopped

    @classmethod
    def genserve(cls, models: Path, extra: Sequence[str] = ()) -> ServerProcess:
        return cls("genserve", genserve_command(models, *extra))

    @classmethod
    def naive(cls, models: Path, extra: Sequence[str] = ()) -> ServerProcess:
        command = [sys.executable, "-m", "bench.naive_server", "--models", str(models), *extra]
        return cls("naive", command)

    @classmethod
    def naive_sync(cls, models: Path, extra: Sequence[str] = ()) -> ServerProcess:
        command = [sys.executable, "-m", "bench.naive_server", "--sync", "--models", str(models), *extra]
        return cls("naive-sync", command)

    def __enter__(self) -> ServerProcess:
        self.workdir = workdir = Path(tempfile.mkdtemp(prefix=f"bench-{self.name}-"))
        try:
            run = ServerSubprocess.start(
                self.command,
                workdir,
                timeout_s=self.startup_timeout_s,
                poll_s=0.1,
                cwd=REPO_ROOT,
                env=self.env,
            )
        except ServerStartError as exc:
            shutil.rmtree(workdir, ignore_errors=True)
            raise BenchError(f"{self.name} {exc.reason}: {exc.log[-2000:]}") from None
        self.running, self.port, self.pid, self.metrics_port = run, run.port, run.pid, run.metrics_port
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log_tail(self, chars: int = 2000) -> str:
        return "" if self.running is None else self.running.log()[-chars:]

    def stop(self) -> None:
        if self.running is not None:
            self.running.stop()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def check_alive(self) -> None:
        if self.running is None or not self.running.alive():
            raise BenchError(f"{self.name} server died: {self.log_tail()}")


def client_bench(
    target: str,
    model: str,
    concurrency: int,
    duration_s: float,
    fmt: str,
    *,
    labels: Sequence[int] = (),
    method: str = "Sample",
    image_size: tuple[int, int] | None = None,
    warmup_s: float = 0.0,
    timeout_s: float = 120.0,
) -> dict[str, Any]:
    """One closed-loop level through the client's load generator; returns its JSON result object.

    Sample goes through `genserve-client bench --json`; SuperResolve and Translate through
    bench.image_load, the same LoadGenerator with an image payload (the CLI drives Sample only).
    """
    common = [
        "--model",
        model,
        "--concurrency",
        str(concurrency),
        "--duration",
        f"{duration_s:g}",
        "--warmup",
        f"{warmup_s:g}",
        "--format",
        fmt,
        "--json",
    ]
    if method == "Sample":
        command = [*_client_command(), "--target", target, "bench", *common]
        if labels:
            command += ["--labels", ",".join(str(label) for label in labels)]
    else:
        size = image_size or (64, 64)
        command = [
            sys.executable,
            "-m",
            "bench.image_load",
            "--target",
            target,
            "--method",
            method,
            "--image-size",
            f"{size[0]}x{size[1]}",
            *common,
        ]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=timeout_s + duration_s, check=False, cwd=REPO_ROOT
    )
    if done.returncode != 0:
        raise BenchError(f"load failed ({done.returncode}): {' '.join(command)}\n{done.stderr[-2000:]}")
    parsed = json.loads(done.stdout)
    results = parsed if isinstance(parsed, list) else [parsed]
    result: dict[str, Any] = results[0]
    return result


def check_no_failures(result: dict[str, Any], what: str) -> None:
    """Raise BenchError when any call of a client level failed.

    A failed call is in no latency (a deadline drops the slowest from the p99, a fast refusal
    flatters nothing but is no image) and its CPU would be spread over it as if served: the level is
    no measurement of this server, and its figures must not reach a ratio."""
    failed = {code: n for code, n in (result.get("errors") or {}).items() if n}
    if failed:
        raise BenchError(
            f"{what}: {sum(failed.values())} of {result.get('requests')} requests failed "
            f"({', '.join(f'{code} x{n}' for code, n in sorted(failed.items()))})"
        )


def measured_level(
    server: ServerProcess,
    model: str,
    concurrency: int,
    duration_s: float,
    fmt: str,
    **kwargs: Any,
) -> dict[str, Any]:
    """A client level plus the server's CPU seconds per request during it.

    `warmup_s` (unmeasured) runs as a client of its own before the CPU clock is read: the client
    reports no count of a warm-up's requests, so the server's CPU for them would be divided over the
    level's requests (bench.ab's 0.3 s before 2-s levels: +15 % CPU per request)."""
    server.check_alive()
    warmup_s = float(kwargs.pop("warmup_s", 0.0))
    if warmup_s > 0:
        client_bench(server.target, model, concurrency, warmup_s, fmt, **kwargs)
    cpu_before = cpu_seconds(server.pid)
    children_before = _children_cpu_s()
    result = client_bench(server.target, model, concurrency, duration_s, fmt, **kwargs)
    cpu_used = cpu_seconds(server.pid) - cpu_before
    client_cpu = _children_cpu_s() - children_before
    check_no_failures(result, f"{server.name} {model} c={concurrency}")
    requests = result.get("requests") or result.get("ok") or result.get("images")
    if not requests:
        requests = result["images_per_s"] * float(result.get("duration_s", duration_s))
    result = dict(result)
    result["server_cpu_s"] = round(cpu_used, 3)
    # The client's start-up is in the window too; the server is idle then (a few ms of CPU).
    result["server_cpu_ms_per_request"] = 1e3 * cpu_used / max(1.0, float(requests))
    # Over the level's measured window: the client's start-up (0.5-1 s, the server idle) is in the
    # wall around it, and diluted a 1-s level's utilisation by a third or more.
    window_s = float(result.get("duration_s") or duration_s)
    result["server_cpu_utilisation"] = cpu_used / window_s if window_s > 0 else 0.0
    # The load generator shares the cores: its CPU per request (start-up included) bounds what any
    # server can reach here.
    result["client_cpu_ms_per_request"] = 1e3 * client_cpu / max(1.0, float(requests))
    return result


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def rpc_floor_ms(server: ServerProcess, duration_s: float = 1.5) -> float:
    """p50 ms of a trivial RPC (grpc.health Check, answered without any model work), one call at a
    time through the client's own load generator, the one every level of the bench is measured
    with: the transport's floor on this server, which a tiny model's c=1 p50 is judged against
    (issue 20: c=1 p50 <= floor + 0.5 ms). The same client on both sides of that difference: a
    blocking grpcio client's floor read 0.04-0.1 ms under the asyncio load generator's, which put
    the two clients' difference into genserve's figure (bench/profile.md, fifteenth round)."""
    return asyncio.run(_floor_ms(server.target, duration_s))


async def _floor_ms(target: str, duration_s: float) -> float:
    from grpc_health.v1 import health_pb2

    from genserve_client.bench import LoadGenerator
    from genserve_client.channel import ChannelConfig

    request = health_pb2.HealthCheckRequest(service="").SerializeToString()
    gen = LoadGenerator(ChannelConfig(target=target), lambda: request, method=HEALTH_CHECK)
    try:
        await gen.closed_loop(1, 0.3)  # connection and first-call costs out of the figure
        result = await gen.closed_loop(1, duration_s)
    finally:
        await gen.close()
    if result.p50_ms is None:
        raise BenchError(f"no health Check answered on {target}: {result.errors}")
    # A failed Check is in no latency: the p50 of the rest is no floor (as for a level).
    check_no_failures(result.to_json(), f"health Check floor on {target}")
    return float(result.p50_ms)
