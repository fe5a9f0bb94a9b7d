"""Helpers shared by the ecosystem tests: a small Dockerfile reader, repository paths, venv tools."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
K8S_DIR = ROOT / "deploy" / "k8s"
SCHEMA_DIR = Path(__file__).resolve().parent / "schemas"
# Folders the tests keep between runs (git-ignored `.cache/`): tool venvs, downloaded binaries.
CACHE_DIR = ROOT / ".cache" / "ecosystem"
# Copies of the packages for a non-editable install: no build leftovers of the working tree.
COPY_IGNORE = shutil.ignore_patterns("build", "*.egg-info", "__pycache__", "*.pyc")


@dataclass
class Instruction:
    keyword: str  # upper case: FROM, COPY, RUN, ...
    flags: dict[str, str]  # --from=build -> {"from": "build"}
    args: list[str]  # JSON (exec) form as given; shell form split like a shell would
    exec_form: bool
    line: int


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction | None:
        found = self.all(keyword)
        return found[-1] if found else None


_FLAG = re.compile(r"^--([a-z-]+)(?:=(.*))?$")


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """Join backslash continuations and drop comments (Dockerfile rules, default escape `\\`)."""
    out: list[tuple[int, str]] = []
    buffer: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and buffer):
            continue  # comment lines (also inside a continued instruction) and blank continuation lines
        if not stripped:
            continue
        if not buffer:
            start = number
        if stripped.endswith("\\"):
            buffer.append(stripped[:-1])
            continue
        buffer.append(stripped)
        out.append((start, " ".join(buffer)))
        buffer = []
    if buffer:
        out.append((start, " ".join(buffer)))
    return out


def _split_instruction(number: int, line: str) -> Instruction:
    keyword, _, rest = line.partition(" ")
    keyword = keyword.upper()
    rest = rest.strip()
    flags: dict[str, str] = {}
    # Flags come first: COPY --from=x --chown=u:g src dst; HEALTHCHECK --interval=5s CMD ...
    while rest.startswith("--"):
        token, _, remainder = rest.partition(" ")
        match = _FLAG.match(token)
        if match is None:
            break
        flags[match.group(1)] = match.group(2) or ""
        rest = remainder.strip()
    prefix: list[str] = []
    if keyword == "HEALTHCHECK" and rest.upper().startswith("CMD "):
        prefix, rest = ["CMD"], rest[4:].strip()  # HEALTHCHECK [flags] CMD <exec or shell form>
    if rest.startswith("["):
        try:
            parsed = json.loads(rest)
        except json.JSONDecodeError:
            parsed = None
        if isinstance(parsed, list) and all(isinstance(p, str) for p in parsed):
            return Instruction(keyword, flags, prefix + parsed, True, number)
    return Instruction(
        keyword, flags, prefix + (shlex.split(rest, posix=True) if rest else []), False, number
    )


def parse_dockerfile(path: Path) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages, in order; ARG-substituted FROM lines."""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for number, line in _logical_lines(path.read_text()):
        instruction = _split_instruction(number, line)
        if instruction.keyword == "ARG" and not stages:
            name, _, default = instruction.args[0].partition("=")
            global_args[name] = default
            continue
        if instruction.keyword == "FROM":
            base = instruction.args[0]
            for name, value in global_args.items():
                base = base.replace(f"${{{name}}}", value).replace(f"${name}", value)
            alias = (
                instruction.args[2]
                if len(instruction.args) >= 3 and instruction.args[1].upper() == "AS"
                else None
            )
            stages.append(Stage(base=base, name=alias))
            continue
        if not stages:
            raise ValueError(f"{path}:{number}: {instruction.keyword} before the first FROM")
        stages[-1].instructions.append(instruction)
    return global_args, stages


def run(
    cmd: list[str], *, timeout_s: float, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a command, capture text output, and fail with its output when it exits non-zero."""
    proc = subprocess.run(
        cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout_s, check=False
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"{shlex.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n"
            f"--- stderr\n{proc.stderr[-4000:]}"
        )
    return proc


def venv_python(venv: Path) -> Path:
    return venv / ("Scripts" if sys.platform == "win32" else "bin") / "python"
