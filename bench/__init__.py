"""genserve's benchmark (a benchmark, not a test): `python -m bench.run`, see bench/README.md."""
