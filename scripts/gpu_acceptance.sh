#!/usr/bin/env bash
# The GPU acceptance run of issue 21, end to end, in ONE device call (see ../shared/GPU.md):
#   1. put onnxruntime-gpu on the path: from the staged wheel parts (cat, sha256 check, unpack into
#      $GPU_SITE), unless an onnxruntime with the CUDA provider is importable already;
#   2. let ORT find pip's CUDA/cuDNN libraries (nvidia/*/lib on LD_LIBRARY_PATH);
#   3. run the gpu-marked tests (tests/perf/test_gpu.py, tests/perf/test_gpu_path.py);
#   4. run scripts/gpu_acceptance.py: one check per defect, figures in $OUT/gpu_acceptance.json.
#
# Usage: scripts/gpu_acceptance.sh [--dry] [--rehearse-on-cpu]
#   --dry               no GPU work: skip the wheel and every GPU check (CPU hosts, CI)
#   --rehearse-on-cpu   also run the checks that can on the CPU provider (tries the script itself)
# Environment:
#   OUT           where results go (the device tool's $OUT; default ./gpu-acceptance-out)
#   PYTHON        interpreter (default python3)
#   GPU_WHEEL_PARTS  the wheel's split parts, in order (default: $GPU_STAGE/p*/* then .gpuwhl/p*/*)
#   GPU_STAGE     folder outside the tree where earlier calls copied their parts (default /tmp/gpuwhl-stage)
#   GPU_SITE      where the wheel is unpacked (default /tmp/ort-gpu-site)
#   WHEEL_SHA256  the wheel's sha256 (default: the first line of .gpuwhl/SHA256 when present)
# Exit status: 0 when every check passed (or, with --dry, was skipped), 1 when one failed, 3 when no
# session ran on CUDA (no onnxruntime-gpu, no device): nothing was checked on a GPU, which must not
# read as a pass. The JSON says which checks ran.
#
# Staging (one device call carries at most 64 MiB of tree), as run on an H200 on 2026-12-04 in
# ~80 s of device time, the machine's start included:
#   here:   echo /.gpuwhl/ >> .git/info/exclude
#           pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#             --platform manylinux_2_28_x86_64 -d /tmp/whl onnxruntime-gpu==1.31.1 protobuf==7.36.2
#           scripts/gpu_payload.sh /tmp/whl 59      # 195 MiB xz payload -> .gpuwhl/p1..p4 + SHA256
#           git rm -r -q --cached models && echo /models/ >> .git/info/exclude   # 3.7 MiB of tree
#   calls 1..N-1 (back to back, the machine stays warm ~30 s): carry [".gpuwhl/pK"],
#           command: mkdir -p /tmp/gpuwhl-stage && cp -r .gpuwhl/pK /tmp/gpuwhl-stage/
#   last call: carry ["models", ".gpuwhl/pN", ".gpuwhl/SHA256"], command: scripts/gpu_acceptance.sh
#           (then scripts/gpu_bench.sh in the same call, if wanted)
#   after:  git reset -q -- models && sed -i '/^\/models\/$/d' .git/info/exclude
#   (parts are joined as $GPU_STAGE/p*/* then .gpuwhl/p*/*: keep N <= 9 so p1..pN sort). A plain
#   wheel split into parts (41 MiB each with the whole tree: six calls) is installed the same way.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
DRY=0
EXTRA=()
for arg in "$@"; do
  case "$arg" in
    --dry) DRY=1; EXTRA+=(--dry) ;;
    --rehearse-on-cpu) EXTRA+=(--rehearse-on-cpu) ;;
    *) echo "unknown argument: $arg" >&2; exit 2 ;;
  esac
done
OUT="${OUT:-$ROOT/gpu-acceptance-out}"
PYTHON="${PYTHON:-python3}"
GPU_STAGE="${GPU_STAGE:-/tmp/gpuwhl-stage}"
GPU_SITE="${GPU_SITE:-/tmp/ort-gpu-site}"
mkdir -p "$OUT"
LOG="$OUT/gpu_acceptance.log"
: >"$LOG"
say() { echo "[gpu_acceptance] $*" | tee -a "$LOG"; }

has_cuda_provider() {
  "$PYTHON" -c 'import onnxruntime as o, sys; sys.exit(0 if "CUDAExecutionProvider" in o.get_available_providers() else 1)' \
    >/dev/null 2>&1
}

install_wheel() {
  local parts=()
  if [[ -n "${GPU_WHEEL_PARTS:-}" ]]; then
    read -r -a parts <<<"$GPU_WHEEL_PARTS"
  else
    shopt -s nullglob
    parts=("$GPU_STAGE"/p*/* "$ROOT"/.gpuwhl/p*/*)
    shopt -u nullglob
  fi
  if [[ ${#parts[@]} -eq 0 ]]; then
    say "no wheel parts found (GPU_WHEEL_PARTS, $GPU_STAGE/p*/*, .gpuwhl/p*/*)"
    return 1
  fi
  local wheel=/tmp/gpu-acceptance-wheel.zip
  cat "${parts[@]}" >"$wheel"
  local want="${WHEEL_SHA256:-}"
  [[ -z "$want" && -f "$ROOT/.gpuwhl/SHA256" ]] && want="$(head -n1 "$ROOT/.gpuwhl/SHA256" | cut -d' ' -f1)"
  local got
  got="$(sha256sum "$wheel" | cut -d' ' -f1)"
  say "wheel from ${#parts[@]} parts: sha256 $got"
  if [[ -n "$want" && "$got" != "$want" ]]; then
    say "sha256 mismatch: expected $want"
    return 1
  fi
  rm -rf "$GPU_SITE" && mkdir -p "$GPU_SITE"
  SITE_PATHS="$GPU_SITE"
  if xz -t "$wheel" 2>/dev/null; then
    # A payload (scripts/gpu_payload.sh pack): the wheel already unpacked, xz-compressed; ORT's CUDA
    # provider shrinks 221 -> 178 MiB, one staging call fewer. Protobuf rides along for the stubs'
    # gencode floor, used only where the machine's own is older.
    say "unpacking the xz payload into $GPU_SITE"
    xz -dc -T0 "$wheel" | tar -x -C "$GPU_SITE" || return 1
    SITE_PATHS="$GPU_SITE/site"
    if ! "$PYTHON" -c 'import sys, google.protobuf as p; sys.exit(tuple(map(int, p.__version__.split(".")[:2])) < (6, 33))' 2>/dev/null; then
      say "protobuf older than the stubs' gencode (6.33): using the payload's"
      SITE_PATHS="$SITE_PATHS:$GPU_SITE/pb"
    fi
    return 0
  fi
  # pip wants the wheel's own file name: rebuilt from its dist-info (name, version, tags).
  local named
  named="$("$PYTHON" "$ROOT/scripts/wheel_name.py" "$wheel")" && mv "$wheel" "/tmp/$named" \
    && wheel="/tmp/$named"
  say "installing $(basename "$wheel") into $GPU_SITE"
  # pip when it is there; a wheel is a zip file, so unpacking it is the same install without pip.
  if ! "$PYTHON" -m pip install -q --no-index --no-deps --target "$GPU_SITE" "$wheel" >>"$LOG" 2>&1; then
    say "pip install failed; unpacking the wheel instead"
    "$PYTHON" -m zipfile -e "$wheel" "$GPU_SITE" || return 1
  fi
}

if [[ $DRY -eq 0 ]]; then
  if has_cuda_provider; then
    say "onnxruntime with the CUDA provider already importable: no wheel install"
  elif install_wheel; then
    export PYTHONPATH="$SITE_PATHS${PYTHONPATH:+:$PYTHONPATH}"
  else
    say "no onnxruntime-gpu: the GPU checks will be skipped"
  fi
  # pip's CUDA 13 / cuDNN 9 libraries (ORT's preload_dlls() is called by the server too).
  NVLIBS="$("$PYTHON" - <<'EOF' 2>/dev/null
import glob, os
try:
    import nvidia
    roots = list(nvidia.__path__)
except ImportError:
    roots = []
print(":".join(sorted({d for r in roots for d in glob.glob(os.path.join(r, "*", "lib")) + glob.glob(os.path.join(r, "cu*", "lib"))})))
EOF
)"
  [[ -n "$NVLIBS" ]] && export LD_LIBRARY_PATH="$NVLIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$ROOT/api:$ROOT/server:$ROOT/clients:$ROOT/export"
say "python $("$PYTHON" -c 'import sys; print(sys.version.split()[0])'), onnxruntime $("$PYTHON" -c 'import onnxruntime as o; print(o.__version__, o.get_available_providers())' 2>&1 | tail -n1)"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$LOG"

status=0
if [[ $DRY -eq 0 ]]; then
  say "gpu-marked tests"
  "$PYTHON" -m pytest -m gpu tests/perf/test_gpu.py tests/perf/test_gpu_path.py -q -p no:cacheprovider \
    --junitxml="$OUT/gpu_pytest.xml" >>"$LOG" 2>&1 || status=1
  tail -n 5 "$LOG"
fi
say "acceptance checks"
"$PYTHON" "$ROOT/scripts/gpu_acceptance.py" --out "$OUT/gpu_acceptance.json" "${EXTRA[@]}" 2>&1 | tee -a "$LOG"
checks=${PIPESTATUS[0]}
if [[ $checks -eq 3 && $status -eq 0 ]]; then
  say "no session ran on CUDA: nothing was checked on a GPU"
  status=3
elif [[ $checks -ne 0 && $checks -ne 3 ]]; then
  status=1
fi
say "done: status $status, figures in $OUT/gpu_acceptance.json"
exit $status
