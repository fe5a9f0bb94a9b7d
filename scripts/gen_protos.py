"""Regenerate the Python stubs of every .proto under protos/ into api/ (or --out DIR).

One command: `python scripts/gen_protos.py`. tests/test_protos_fresh.py regenerates into a
temporary folder and fails when the committed stubs differ.

protoc runs from grpcio-tools PROTOC_TOOLS (its own venv under .cache/, made on first use), not
from the dev venv's newer grpcio-tools: the stubs check at import that the protobuf runtime is at
least the protoc that wrote them (and grpcio at least the grpc plugin), so an older protoc gives a
lower floor for the same code. With protoc 6.33 the stubs load on protobuf 6.33+ and 7.x alike, and
genserve-client installs beside tritonclient (which pins protobuf < 7). The mypy stubs come from the
dev venv's mypy-protobuf plugins, which protoc calls as programs.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
# `inference`: where the KServe stubs were generated before they moved under genserve/kserve/;
# removed so that a regeneration never leaves the old top-level package behind.
GENERATED_PACKAGES = ("genserve", "inference")
# protoc 6.33.5: the stubs need protobuf >= 6.33.5 and grpcio >= 1.81.1 (api/pyproject.toml).
PROTOC_TOOLS = "grpcio-tools==1.81.1"
TOOL_VENV = ROOT / ".cache" / f"protoc-{PROTOC_TOOLS.split('==')[1]}"


def protoc_python() -> Path:
    """The tool venv's python (grpcio-tools PROTOC_TOOLS), created once."""
    python = TOOL_VENV / "bin" / "python"
    stamp = TOOL_VENV / ".installed"
    if python.exists() and stamp.exists() and stamp.read_text() == PROTOC_TOOLS:
        return python
    shutil.rmtree(TOOL_VENV, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(TOOL_VENV)], check=True)
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", PROTOC_TOOLS], check=True
    )
    stamp.write_text(PROTOC_TOOLS)
    return python


def generate(out: Path) -> None:
    """Run protoc (python, grpc and mypy stubs) for every proto into `out`."""
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    python = protoc_python()
    include = subprocess.run(
        [str(python), "-c", "import grpc_tools, os; print(os.path.join(grpc_tools.__path__[0], '_proto'))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    for package in GENERATED_PACKAGES:
        shutil.rmtree(out / package, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    bin_dir = Path(sys.executable).parent  # the mypy-protobuf plugins live beside this python
    args = [
        f"--plugin=protoc-gen-mypy={bin_dir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bin_dir / 'protoc-gen-mypy_grpc'}",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *protos,
    ]
    if subprocess.run([str(python), "-m", "grpc_tools.protoc", *args], check=False).returncode != 0:
        raise SystemExit("protoc failed")
    # protoc writes modules, not packages: mark every generated folder as a typed package.
    for folder in {p.parent for p in out.rglob("*_pb2.py")}:
        while folder != out:
            (folder / "__init__.py").touch()
            (folder / "py.typed").touch()
            folder = folder.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT / "api")
    generate(parser.parse_args().out)


if __name__ == "__main__":
    main()
