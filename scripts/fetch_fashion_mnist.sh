#!/usr/bin/env bash
# Fetch Fashion-MNIST for the cgan-fashion recipe into a cache folder outside git (never at serve time).
#
# Source: Debian package dataset-fashion-mnist (MIT/Expat, Zalando SE): the four IDX files under
# usr/share/datasets/fashion-mnist/ (60,000 training + 10,000 test images, 28x28 gray, 10 classes).
# The package is downloaded with `apt-get download` and unpacked with dpkg-deb, never installed.
#
# Cache: ${GENSERVE_DATA_DIR:-$HOME/.cache/genserve/data}/fashion-mnist/ (what genserve_export.data.fashion reads).
set -euo pipefail

PACKAGE=dataset-fashion-mnist
DEST="${GENSERVE_DATA_DIR:-$HOME/.cache/genserve/data}/fashion-mnist"
# sha256 of the IDX files (Debian 0.0~git20200523.55506a9-1), checked whatever package version comes
declare -A SHA256=(
    [train-images-idx3-ubyte.gz]=b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7
    [train-labels-idx1-ubyte.gz]=0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056
    [t10k-images-idx3-ubyte.gz]=cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa
    [t10k-labels-idx1-ubyte.gz]=8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05
)

if [[ -f "$DEST/t10k-labels-idx1-ubyte.gz" ]]; then
    echo "Fashion-MNIST already in $DEST"
    exit 0
fi
for tool in apt-get dpkg-deb; do
    if ! command -v "$tool" >/dev/null; then
        echo "fetch_fashion_mnist: $tool is needed (Debian package $PACKAGE)" >&2
        exit 1
    fi
done
work=$(mktemp -d)
part=""
trap 'rm -rf "$work"; [[ -z "$part" ]] || rm -f "$part"' EXIT
download() { (cd "$work" && apt-get download -q "$PACKAGE" >/dev/null 2>"$work/apt.log"); }
if ! download; then
    # a fresh machine may have no package lists yet: refresh them once (as root) and retry
    if [[ $(id -u) -ne 0 ]] || ! apt-get update -qq >/dev/null 2>>"$work/apt.log" || ! download; then
        cat "$work/apt.log" >&2
        echo "fetch_fashion_mnist: apt-get download $PACKAGE failed (run 'apt-get update' as root first)" >&2
        exit 1
    fi
fi
dpkg-deb --fsys-tarfile "$work"/"$PACKAGE"_*.deb | tar -x -C "$work" ./usr/share/datasets/fashion-mnist \
    ./usr/share/doc/"$PACKAGE"/copyright
src="$work/usr/share/datasets/fashion-mnist"
for file in "${!SHA256[@]}"; do
    echo "${SHA256[$file]}  $src/$file" | sha256sum --check --quiet
done
mkdir -p "$DEST"
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
publish "$work/usr/share/doc/$PACKAGE/copyright" "COPYRIGHT.$PACKAGE"
# labels of the test set last: their presence marks a complete cache (see the check above)
for file in train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz \
    t10k-labels-idx1-ubyte.gz; do
    publish "$src/$file" "$file"
done
echo "Fashion-MNIST (60,000 + 10,000 images) in $DEST"
