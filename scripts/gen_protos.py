"""Regenerate the Python stubs of every .proto under protos/ into api/ (or --out DIR).

One command: `python scripts/gen_protos.py`. tests/test_protos_fresh.py regenerates into a
temporary folder and fails when the committed stubs differ.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
# `inference`: where the KServe stubs were generated before they moved under genserve/kserve/;
# removed so that a regeneration never leaves the old top-level package behind.
GENERATED_PACKAGES = ("genserve", "inference")


def generate(out: Path) -> None:
    """Run protoc (python, grpc and mypy stubs) for every proto into `out`."""
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    for package in GENERATED_PACKAGES:
        shutil.rmtree(out / package, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    bin_dir = Path(sys.executable).parent  # the mypy-protobuf plugins live beside this python
    args = [
        "protoc",
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
    if protoc.main(args) != 0:
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
