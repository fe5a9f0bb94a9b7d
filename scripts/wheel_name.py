"""Print the file name pip expects for a wheel staged under any name (stdlib only: it runs before
the wheel is installed). Used by scripts/gpu_acceptance.sh.

    python scripts/wheel_name.py STAGED_FILE
"""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path


def wheel_file_name(path: Path) -> str:
    """`{dist}-{version}-{python}-{abi}-{platform}.whl` from the wheel's dist-info WHEEL tags."""
    with zipfile.ZipFile(path) as wheel:
        info = next(n for n in wheel.namelist() if n.endswith(".dist-info/WHEEL"))
        lines = wheel.read(info).decode().splitlines()
    tags = [line.split(":", 1)[1].strip() for line in lines if line.startswith("Tag:")]
    dist = info.split("/")[0].removesuffix(".dist-info")
    python, abi, platform = (".".join(sorted({t.split("-")[i] for t in tags})) for i in range(3))
    return f"{dist}-{python}-{abi}-{platform}.whl"


if __name__ == "__main__":
    sys.stdout.write(wheel_file_name(Path(sys.argv[1])) + "\n")
