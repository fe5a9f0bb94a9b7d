"""The committed stubs in api/ are exactly what scripts/gen_protos.py makes from protos/."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _tree(folder: Path) -> set[str]:
    return {
        str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts
    }


def test_generated_stubs_are_fresh(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--out", str(tmp_path)], check=True
    )
    for package in ("genserve", "inference"):
        fresh, committed = tmp_path / package, ROOT / "api" / package
        if not fresh.exists():
            assert not committed.exists(), f"api/{package} has no .proto left in protos/"
            continue
        fresh_files, committed_files = _tree(fresh), _tree(committed)
        assert fresh_files == committed_files, "stub files differ: run `make protos`"
        stale = [f for f in sorted(fresh_files) if not filecmp.cmp(fresh / f, committed / f, shallow=False)]
        assert not stale, f"stale stubs {stale}: run `make protos`"
