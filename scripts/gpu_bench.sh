#!/usr/bin/env bash
# GPU figures owed by the benches, in the same device call right after scripts/gpu_acceptance.sh
# (which unpacked onnxruntime-gpu into $GPU_SITE): step-level vs request-level batching of the
# VQ-VAE-2 priors on CUDA (issue 19's premise: a step costs about the same for 1 or 8 rows there),
# and bench.run --quick (genserve vs the naive servers, all on CUDA) for a few bundled models.
# Knobs: STEP_BENCH=0 skips the step bench, STEP_SHAPES (default "on"), STEP_SCOPES (default "level
# chain": the request-level baselines, bench.step_batching --request-scope), STEP_RATES, STEP_DURATION;
# RUN_QUICK=0 skips bench.run, RUN_MODELS; IDLE_SPIN_AB=0 skips the idle_spin_s A/B; AB_BASE_TREE (+ AB_MODELS, AB_ROUNDS): bench.ab against a
# carried source tree, e.g. a079273's server/ and api/ for the cgan-digits drop (bench/README.md):
#   here: echo /.abbase/ >> .git/info/exclude; mkdir -p .abbase; git archive a079273 server api | tar -x -C .abbase
#   the last call: carry [..., ".abbase"], command: ... AB_BASE_TREE=.abbase bash scripts/gpu_bench.sh
# The device lacks grpcio-health-checking / -reflection and its grpcio may be older than the stubs'
# floor: grpcio, grpcio-health-checking and grpcio-reflection 1.85.1 (cp312 manylinux) travel in
# .gpuwhl/extra (pip download --no-deps --only-binary=:all: --python-version 3.12 ... -d .gpuwhl/extra).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/gpu-acceptance-out}"
PYTHON="${PYTHON:-python3}"
GPU_SITE="${GPU_SITE:-/tmp/ort-gpu-site}"
EXTRA_SITE=/tmp/gpu-bench-site
mkdir -p "$OUT"
if compgen -G ".gpuwhl/extra/*.whl" >/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --target "$EXTRA_SITE" .gpuwhl/extra/*.whl
fi
site="$GPU_SITE"
[[ -d "$GPU_SITE/site" ]] && site="$GPU_SITE/site"
# The payload's protobuf only where the machine's own is older than the stubs' gencode (as gpu_acceptance.sh).
if [[ -d "$GPU_SITE/pb" ]] && ! "$PYTHON" -c 'import sys, google.protobuf as p; sys.exit(tuple(map(int, p.__version__.split(".")[:2])) < (6, 33))' 2>/dev/null; then
  site="$site:$GPU_SITE/pb"
fi
export PYTHONPATH="$site:$EXTRA_SITE:$ROOT:$ROOT/api:$ROOT/server:$ROOT/clients:$ROOT/export:$ROOT/tests/server"
NVLIBS="$("$PYTHON" -c 'import glob, os, nvidia; print(":".join(sorted({d for r in nvidia.__path__ for d in glob.glob(os.path.join(r, "*", "lib"))})))' 2>/dev/null)"
[[ -n "$NVLIBS" ]] && export LD_LIBRARY_PATH="$NVLIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PYTHONUNBUFFERED=1
status=0
# What one step of each prior costs on the device at 1, 8 and 64 rows (the step bench's premise).
"$PYTHON" - <<'PY' 2>&1 | tee "$OUT/gpu_bench.log"
import time, numpy as np, onnxruntime as ort
for name in ("vqvae-digits-top-prior", "vqvae-digits-prior"):
    s = ort.InferenceSession(f"models/{name}/1/model.onnx", providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    line = [f"{name} on {s.get_providers()[0]}:"]
    for b in (1, 8, 64):
        feeds = {i.name: np.zeros([b, *i.shape[1:]], np.int64) for i in s.get_inputs()}
        for _ in range(20):
            s.run(None, feeds)
        t = []
        for _ in range(200):
            t0 = time.perf_counter(); s.run(None, feeds); t.append(time.perf_counter() - t0)
        line.append(f"b{b} {1e3 * float(np.median(t)):.3f} ms")
    print(" ".join(line))
PY
if [[ "${STEP_BENCH:-1}" == 1 ]]; then
  # With stable shapes (StepScheduler pads each step to a bucket of rows: ORT's CUDA Conv rebuilds
  # its cuDNN plans on every new input shape, 52-84 ms a call on the H200; "off" loses 1.5-3.7x,
  # measured twice), against both request-level baselines: per level (pipelined) and per chain (a
  # batch leaves the decoder before the next enters: the issue's "wait for a batch, run it to the
  # end"). --shape-probe times each prior at a fixed and at an alternating number of rows first.
  for scope in ${STEP_SCOPES:-level chain}; do
    for shapes in ${STEP_SHAPES:-on}; do
      "$PYTHON" -m bench.step_batching --providers CUDAExecutionProvider,CPUExecutionProvider --models models \
        --rows 8 --duration "${STEP_DURATION:-5}" --rounds 2 --rates "${STEP_RATES:-0.2,0.5,0.8,1.1}" \
        --shape-probe --stable-shapes "$shapes" --request-scope "$scope" \
        --json "$OUT/step-batching-gpu-shapes-$shapes-$scope.json" 2>&1 \
        | tee -a "$OUT/gpu_bench.log" || status=1
    done
  done
fi
if [[ "${RUN_QUICK:-1}" == 1 ]]; then
  "$PYTHON" -m bench.run --quick --models ${RUN_MODELS:-dcgan-digits cgan-digits vae-digits-decoder sr-photos-x4} \
    --no-bench-models --no-priority --no-readme --out "$OUT/run-quick-gpu.json" 2>&1 | tee -a "$OUT/gpu_bench.log" \
    || status=1
fi
# idle_spin_s on the device (a host that idles into C-states rather than halting a vCPU): this
# tree with the spin off (A) against the default (B), same run (bench/profile.md, sixteenth round).
if [[ "${IDLE_SPIN_AB:-1}" == 1 ]]; then
  echo '{"idle_spin_s": 0}' > "$OUT/idle-spin-off.json"
  "$PYTHON" -m bench.ab --base-tree "$ROOT" --base-config "$OUT/idle-spin-off.json" \
    --models ${AB_MODELS:-vae-digits-decoder cgan-digits dcgan-digits} --rounds "${AB_ROUNDS:-3}" \
    --json "$OUT/ab-idle-spin-gpu.json" 2>&1 | tee -a "$OUT/gpu_bench.log" || status=1
fi
# An A/B of this tree against another source tree on the device (AB_BASE_TREE: a carried copy of
# server/ and api/ with one change undone; the device has no git history for --base).
if [[ -n "${AB_BASE_TREE:-}" ]]; then
  "$PYTHON" -m bench.ab --base-tree "$AB_BASE_TREE" --models ${AB_MODELS:-vae-digits-decoder cgan-digits dcgan-digits} \
    --rounds "${AB_ROUNDS:-3}" --json "$OUT/ab-gpu.json" 2>&1 | tee -a "$OUT/gpu_bench.log" || status=1
fi
exit $status
