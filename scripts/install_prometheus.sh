#!/usr/bin/env bash
# Installs Prometheus and promtool (Debian package `prometheus`) for the monitoring tests.
#
# Idempotent: when both `prometheus` and `promtool` are already on PATH it does nothing.
# Otherwise it needs root and apt (Debian/Ubuntu). The package's maintainer scripts would start a
# prometheus service; in a container (no init) that either fails or leaves a daemon bound to
# :9090, so a temporary /usr/sbin/policy-rc.d forbids service starts while apt runs. The tests
# start their own Prometheus on a loopback port instead.
#
# Usage: scripts/install_prometheus.sh          (exit 0 when prometheus + promtool are usable)
set -euo pipefail

if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then
  echo "install_prometheus: already installed: $(command -v prometheus), $(command -v promtool)"
  exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
  echo "install_prometheus: no apt-get here; install Prometheus (prometheus + promtool) by hand" >&2
  exit 1
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then
    SUDO="sudo"
  else
    echo "install_prometheus: needs root (or sudo) to apt-get install prometheus" >&2
    exit 1
  fi
fi

POLICY=/usr/sbin/policy-rc.d
ADDED_POLICY=0
if [ ! -e "$POLICY" ]; then
  # 101 = "action forbidden by policy": invoke-rc.d then skips starting the service.
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$POLICY" >/dev/null
  $SUDO chmod 0755 "$POLICY"
  ADDED_POLICY=1
fi
cleanup() {
  if [ "$ADDED_POLICY" -eq 1 ]; then
    $SUDO rm -f "$POLICY"
  fi
}
trap cleanup EXIT

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus

for tool in prometheus promtool; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "install_prometheus: package installed but $tool is not on PATH" >&2
    exit 1
  fi
done
echo "install_prometheus: installed $(prometheus --version 2>&1 | head -n 1)"
