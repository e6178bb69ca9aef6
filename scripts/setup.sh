#!/usr/bin/env bash
# Set up a virtual environment in .venv with everything the project needs.
#
#   bash scripts/setup.sh          # the runtime: torch==2.13.0 (the build your pip index serves:
#                                  #   CUDA from PyPI, or CPU where pip is configured so), DALI,
#                                  #   numpy, pillow, opencv, rich, matplotlib
#   bash scripts/setup.sh --test   # + pytest, scikit-image, tensorboard and the FFCV baseline
#                                  #   (apt, as root or with sudo: pkg-config libturbojpeg0-dev libopencv-dev)
#
# Safe to rerun; it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
if [ "${1:-}" = "--test" ]; then
  extras="[ffcv,test]"
  need=()
  for p in pkg-config libturbojpeg0-dev libopencv-dev; do
    dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
  done
  if [ "${#need[@]}" -gt 0 ]; then
    sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "setup: installing ${need[*]} with apt-get (FFCV builds against them)"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
  fi
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e ".${extras}"
echo "setup: ready (.venv/bin/python)"
