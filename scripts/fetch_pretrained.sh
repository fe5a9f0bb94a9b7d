#!/usr/bin/env bash
# Fetch the pretrained models' npm packages into .cache/pretrained/ (git-ignored), for
# `genserve-export import-rrdn`. Build time only: serving never needs npm or the network.
# Each tarball is checked against the sha256 recorded below (a changed package is refused).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${PRETRAINED_CACHE:-.cache/pretrained}
mkdir -p "$DEST"
# npm pack writes into a folder of this run's own, and a tarball is moved into $DEST only once its
# sha256 is checked: a run stopped mid-download (or a failed one) leaves no partial tarball there,
# which every later run would have refused as a changed package instead of fetching it again.
# The folder is made on the first fetch: a read-only cache that holds every tarball is only checked.
work=
trap '[[ -z "$work" ]] || rm -rf "$work"' EXIT
# package@version  tarball name  sha256 of the tarball
PACKAGES=(
  "@upscalerjs/esrgan-thick@1.0.0 upscalerjs-esrgan-thick-1.0.0.tgz 3d38971084d8281bf68da443085c7eb65355fb28aa81b33b54f950cca6328a15"
  "@upscalerjs/esrgan-slim@1.0.0 upscalerjs-esrgan-slim-1.0.0.tgz b53070ff01363e74d33138106dcc72b58d341c9fb7e8fd648554a4e7744142b5"
)
for entry in "${PACKAGES[@]}"; do
  read -r spec tarball sha <<<"$entry"
  if [[ -f "$DEST/$tarball" ]]; then
    if echo "$sha  $DEST/$tarball" | sha256sum -c --quiet >/dev/null 2>&1; then
      echo "ok $DEST/$tarball"
      continue
    fi
    # A partial download of a run from before the download folder, or a changed file: fetched
    # again, and it replaces the cached one only once the new one is checked.
    echo "$DEST/$tarball: unexpected sha256, fetching it again" >&2
  fi
  [[ -n "$work" ]] || work=$(mktemp -d "$DEST/.fetching.XXXXXX")
  echo "npm pack $spec -> $DEST/"
  (cd "$work" && npm pack --silent "$spec" >/dev/null)
  echo "$sha  $work/$tarball" | sha256sum -c --quiet || { echo "$spec: unexpected sha256 (not kept)" >&2; exit 1; }
  mv "$work/$tarball" "$DEST/$tarball"
  echo "ok $DEST/$tarball"
done
