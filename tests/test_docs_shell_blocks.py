"""The shell blocks of README.md and docs/*.md, as a reader pastes them (and README's Python
quick start, run against a real server).

Every `genserve-server` and `genserve-client` command in a ```bash block (and in an unlabelled
block of shell lines) must parse with the real command-line parser, after joining its `\\`
continuations: a flag that does not exist, or was renamed, fails here. And a block must not have
a line that starts with a flag without the line before it continuing the command: pasted into a
shell, that line is a command of its own (`--tls-client-ca: command not found`) and the command
above it runs without the flag.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from server_support import ServerProcess, running_server, wait_until

from genserve_client.cli import build_parser as client_parser
from genserve_server.main import build_parser as server_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
COMMANDS = {"genserve-client": client_parser, "genserve-server": server_parser}


def _shell_blocks() -> list[tuple[str, int, list[str]]]:
    """(file, first line, lines) of each ```bash block and each unlabelled block of commands."""
    blocks = []
    for doc in DOCS:
        lines = doc.read_text(encoding="utf-8").splitlines()
        i = 0
        while i < len(lines):
            fence = lines[i].strip()
            if fence.startswith("```"):
                lang = fence[3:].strip()
                j = i + 1
                while j < len(lines) and not lines[j].strip().startswith("```"):
                    j += 1
                body = lines[i + 1 : j]
                shell = lang in ("bash", "sh", "shell") or (
                    lang == "" and any(re.match(r"\s*(\S*/)?genserve-(client|server) ", b) for b in body)
                )
                if shell:
                    blocks.append((doc.relative_to(ROOT).as_posix(), i + 2, body))
                i = j + 1
            else:
                i += 1
    return blocks


BLOCKS = _shell_blocks()


def _commands(body: list[str]) -> list[str]:
    """The block's commands: comments dropped, `\\` continuations joined."""
    out: list[str] = []
    pending = ""
    for raw in body:
        line = re.sub(r"(^|\s)#.*$", "", raw).rstrip()
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        out.append((pending + line).strip())
        pending = ""
    return [c for c in out if c]


def _argv(command: str) -> tuple[str, list[str]] | None:
    """The genserve program and its arguments, or None for another command or a sketch (`...`)."""
    if "..." in command:
        return None
    words = shlex.split(command.replace("[", "").replace("]", ""))
    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # VAR=value prefixes
        words = words[1:]
    if not words:
        return None
    program = Path(words[0]).name
    if program not in COMMANDS:
        return None
    return program, words[1:]


def test_the_docs_have_shell_blocks_with_genserve_commands() -> None:
    found = [c for _, _, body in BLOCKS for c in _commands(body) if _argv(c)]
    assert len(found) >= 20, found


@pytest.mark.parametrize(("doc", "line", "body"), BLOCKS, ids=[f"{d}:{n}" for d, n, _ in BLOCKS])
def test_no_line_of_a_shell_block_is_a_flag_cut_off_its_command(doc: str, line: int, body: list[str]) -> None:
    previous = ""
    for k, raw in enumerate(body):
        stripped = raw.strip()
        assert not (stripped.startswith("-") and not previous.endswith("\\")), (
            f"{doc}:{line + k}: {stripped!r} starts with a flag but the line before does not end with"
            " a backslash: pasted into a shell it runs as a command of its own"
        )
        previous = re.sub(r"(^|\s)#.*$", "", raw).rstrip()


@pytest.mark.parametrize(("doc", "line", "body"), BLOCKS, ids=[f"{d}:{n}" for d, n, _ in BLOCKS])
def test_every_genserve_command_of_a_shell_block_parses(doc: str, line: int, body: list[str]) -> None:
    for command in _commands(body):
        parsed = _argv(command)
        if parsed is None:
            continue
        program, argv = parsed
        try:
            COMMANDS[program]().parse_args(argv)
        except SystemExit as exc:
            pytest.fail(f"{doc} (block at line {line}): {command!r} does not parse (exit {exc.code})")


def _python_blocks(doc: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", doc.read_text(encoding="utf-8"), flags=re.S | re.M)


def test_the_readme_python_quick_start_runs_and_prints_what_it_made(tmp_path: Path) -> None:
    """README.md's "From Python" block, pasted into a file with only the address changed, against
    a server of the bundled cgan-digits: it writes three.png (a 28x28 digit) and prints the four
    seeds from base_seed 42 and the sha256 of the model file that made them."""
    [block] = [b for b in _python_blocks(ROOT / "README.md") if "GenserveClient" in b]
    assert '"127.0.0.1:50051"' in block, block
    models = tmp_path / "models"
    shutil.copytree(ROOT / "models" / "cgan-digits", models / "cgan-digits")
    card = json.loads((models / "cgan-digits" / "1" / "card.json").read_text())
    with running_server(models, tmp_path / "server", config={"warmup": False}) as server:
        (tmp_path / "quick_start.py").write_text(block.replace("127.0.0.1:50051", server.target))
        proc = subprocess.run(
            [sys.executable, "quick_start.py"], cwd=tmp_path, capture_output=True, text=True, timeout=120
        )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["[42,", "43,", "44,", "45]", card["sha256"]["model.onnx"]], proc.stdout
    with Image.open(tmp_path / "three.png") as image:
        assert image.size == (28, 28)


def test_the_hot_reload_block_adds_the_version_when_a_script_runs_it(tmp_path: Path) -> None:
    """docs/operations.md's "add version 2 of a model" block, run as written by `bash -c` (a script,
    `ssh host '...'`, a cron job) in a folder holding `models/` and `staging/`, against a
    `genserve-server serve --models models --ready-file ready.json` started there: the rename puts
    version 2 in place and the signal reaches the server, whose rescan loads it. (It said
    `kill -HUP "$(pgrep -f 'genserve-server serve')"`: pgrep also found the `bash -c` whose command
    line holds that pattern, and kill refused the two ids: no rescan.)"""
    [block] = [b for doc, _, b in BLOCKS if doc == "docs/operations.md" and any("kill -HUP" in x for x in b)]
    assert any("models/dcgan/2" in line for line in block), block
    shutil.copytree(ROOT / "models" / "dcgan-digits", tmp_path / "models" / "dcgan")
    shutil.copytree(ROOT / "models" / "dcgan-digits" / "1", tmp_path / "staging" / "dcgan" / "2")
    entry = Path(sys.executable).with_name("genserve-server")  # the command the docs name
    command = [str(entry), "serve", "--models", "models", "--port", "0", "--metrics-port", "0"]
    server = ServerProcess.start(command, tmp_path, cwd=tmp_path)  # --ready-file tmp_path/ready.json
    try:
        proc = subprocess.run(
            ["bash", "-c", "\n".join(block)], cwd=tmp_path, capture_output=True, text=True, timeout=60
        )
        assert proc.returncode == 0, proc.stderr
        wait_until(lambda: "model dcgan version 2 ready" in server.log(), 30, "version 2 loaded")
    finally:
        server.stop()
