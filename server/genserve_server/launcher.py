"""Start a server as a subprocess and wait until it serves: the other side of `--ready-file`.

`genserve-server serve --ready-file PATH` (and bench's naive server) write {"port", "metrics_port",
"health_port", "pid"} once they listen (main.write_ready_file, atomically). The tests and the benchmark start
servers on OS-chosen ports this way; this module is the one place that launches, waits and stops.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Self


class ServerStartError(RuntimeError):
    """The server exited, or did not write its ready file in time; the message ends with its log."""

    def __init__(self, reason: str, log: str) -> None:
        self.reason = reason
        self.log = log
        super().__init__(f"{reason}:\n{log}")


@dataclass(frozen=True, slots=True)
class ServerSubprocess:
    """A started server: its process, the ports from its ready file, and its combined output."""

    proc: subprocess.Popen[bytes]
    port: int
    metrics_port: int  # 0: the server serves no /metrics
    pid: int  # the serving process (the ready file's; a wrapper's child may differ from proc.pid)
    log_path: Path
    health_port: int = 0  # 0: no --health-port

    @classmethod
    def start(
        cls,
        command: Sequence[str],
        workdir: Path,
        *,
        timeout_s: float = 60.0,
        poll_s: float = 0.05,
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
    ) -> Self:
        """Run `command --ready-file workdir/ready.json`, output to workdir/server.log, and wait for the
        ready file. Fails fast (ServerStartError) when the process exits first or `timeout_s` passes."""
        workdir.mkdir(parents=True, exist_ok=True)
        ready = workdir / "ready.json"
        ready.unlink(missing_ok=True)
        log_path = workdir / "server.log"
        with log_path.open("wb") as log:  # the child keeps its own descriptor
            proc = subprocess.Popen(
                [*command, "--ready-file", str(ready)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            )
        deadline = time.monotonic() + timeout_s
        try:
            while not ready.exists():
                if proc.poll() is not None:
                    raise ServerStartError(
                        f"server exited unexpectedly ({proc.returncode})", log_path.read_text()
                    )
                if time.monotonic() > deadline:
                    raise ServerStartError(f"server not ready within {timeout_s} s", log_path.read_text())
                time.sleep(poll_s)
            info = json.loads(ready.read_text())
        except BaseException:  # not ready in time, Ctrl-C, a bad ready file: no server left running
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
            raise
        return cls(
            proc,
            int(info["port"]),
            int(info.get("metrics_port") or 0),
            int(info.get("pid") or proc.pid),
            log_path,
            int(info.get("health_port") or 0),
        )

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout_s: float = 15.0) -> int:
        """SIGTERM (a graceful drain), then SIGKILL after `timeout_s`; the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return int(self.proc.returncode)


def genserve_command(models: Path, *extra: str) -> list[str]:
    """`genserve-server serve` on 127.0.0.1 with OS-chosen gRPC and metrics ports, from this
    interpreter (so it runs the same environment as its caller)."""
    return [
        sys.executable,
        "-m",
        "genserve_server",
        "serve",
        "--models",
        str(models),
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--metrics-port",
        "0",
        *extra,
    ]
