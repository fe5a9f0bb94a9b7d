"""Ecosystem tests import their helpers (ecosystem_helpers) and the monitoring engineer's Prometheus
support (tests/monitoring) by module name: both folders are on pytest's `pythonpath` (pyproject.toml)."""
