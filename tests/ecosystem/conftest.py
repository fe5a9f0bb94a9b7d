"""Ecosystem tests import their helpers (ecosystem_helpers) and the monitoring engineer's Prometheus
support (tests/monitoring) by module name."""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
for folder in (HERE, HERE.parent / "monitoring"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
