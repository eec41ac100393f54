#!/usr/bin/env bash
# Creates (or reuses) a virtual environment with torch and installs chase_ext into it
# (editable, kernels compiled against that torch). Idempotent.
#   CHASE_VENV   where the environment lives (default: .venv in the repository)
#   TORCH_SPEC   which torch to install (default: torch==2.13.0; the project's machines
#                serve its CPU wheel, PyPI alone serves the CUDA build)
#   TORCH_INDEX  an extra index for torch, e.g. https://download.pytorch.org/whl/cpu for
#                the CPU wheel where pip reaches PyPI only (its +cpu local version wins)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${CHASE_VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip -q --disable-pip-version-check)
"${PIP[@]}" install ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"} "$TORCH_SPEC" setuptools wheel ninja numpy
# --no-build-isolation: compile against the torch above, not a freshly downloaded one
"${PIP[@]}" install --no-build-isolation -e ".[test]"
