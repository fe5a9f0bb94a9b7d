#!/usr/bin/env bash
# Packs onnxruntime-gpu (unpacked, xz-compressed) and protobuf into parts for the device's staging
# calls: 195 MiB in four calls where the 244 MiB wheel took six (see scripts/gpu_acceptance.sh).
#
# Usage: scripts/gpu_payload.sh WHEEL_DIR PART_MIB [DEST]
#   WHEEL_DIR holds onnxruntime_gpu-1.31.1-cp312-*.whl and protobuf-*-abi3-*.whl (pip download, as in
#   scripts/gpu_acceptance.sh); PART_MIB: 64 MiB less the tree that travels in a staging call.
# Writes DEST/pN/part and DEST/SHA256; DEST defaults to .gpuwhl (ignored: echo /.gpuwhl/ >>
# .git/info/exclude). scripts/gpu_acceptance.sh joins the parts, checks the sha256 and unpacks.
# Staging: while the tree that travels is ~3.7 MiB (models/ out of the index, carried only in the
# last call), 59 MiB parts make it p1..p3 (staging calls) + p4 (with the checks), 2026-12-04.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
wheels="$1"
part_mib="$2"
dest="${3:-$ROOT/.gpuwhl}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/site" "$work/pb"
python3 -m zipfile -e "$(ls "$wheels"/onnxruntime_gpu-*.whl)" "$work/site"
python3 -m zipfile -e "$(ls "$wheels"/protobuf-*.whl)" "$work/pb"
tar -cf - -C "$work" site pb | xz -T0 -6 >"$work/payload.tar.xz"
rm -rf "$dest" && mkdir -p "$dest"
sha256sum "$work/payload.tar.xz" | cut -d' ' -f1 >"$dest/SHA256"
split -b "${part_mib}M" -d "$work/payload.tar.xz" "$work/part."
i=1
for f in "$work"/part.*; do
  mkdir -p "$dest/p$i" && mv "$f" "$dest/p$i/part" && i=$((i + 1))
done
ls -l "$dest"/p*/part
