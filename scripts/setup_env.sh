#!/usr/bin/env bash
# Creates (or reuses) a virtual environment with torch and installs chase_ext into it
# (editable, kernels compiled against that torch). Idempotent; a no-op (a second or so)
# while the environment's build matches the torch asked for and the build inputs.
#   CHASE_VENV   where the environment lives (default: .venv in the repository)
#   TORCH_SPEC   which torch to install (default: torch==2.13.0; the project's machines
#                serve its CPU wheel, PyPI alone serves the CUDA build)
#   TORCH_INDEX  an extra index for torch, e.g. https://download.pytorch.org/whl/cpu for
#                the CPU wheel where pip reaches PyPI only (its +cpu local version wins)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${CHASE_VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
# What the installed build depends on: the torch asked for and every build input. When the
# environment holds a working build of exactly these, the install is skipped (it would
# recompile the kernels, a minute or two, on every run of the two commands).
key=$(python3 - "$TORCH_SPEC" "${TORCH_INDEX:-}" <<'PY'
import hashlib, os, sys
# the build switches and toolchain the kernels were compiled with count too
env = [f"{k}={os.environ.get(k, '')}" for k in ("CHASE_EXT_CUDA", "TORCH_CUDA_ARCH_LIST", "CUDA_HOME", "CC", "CXX")]
h = hashlib.sha256("\n".join(sys.argv[1:] + env).encode())
files = ["pyproject.toml", "setup.py", "chase_ext/_build.py"]
for top in ("csrc", "build_backend"):
    files += [os.path.join(d, f) for d, _, fs in os.walk(top) for f in fs]
for f in sorted(files):
    h.update(f.encode())
    with open(f, "rb") as fh:
        h.update(fh.read())
print(h.hexdigest())
PY
)
STAMP=$VENV/.chase_ext_build_inputs
if [ -x "$VENV/bin/python" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$key" ] \
    && CHASE_EXT_BUILD_ON_IMPORT=0 "$VENV/bin/python" -c "import chase_ext._ops" 2>/dev/null; then
  # (=0: a library built for another torch than the one installed fails here, not recompiles)
  exit 0
fi
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
rm -f "$STAMP"
PIP=("$VENV/bin/python" -m pip -q --disable-pip-version-check)
"${PIP[@]}" install ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"} "$TORCH_SPEC" setuptools wheel ninja numpy
# --no-build-isolation: compile against the torch above, not a freshly downloaded one
"${PIP[@]}" install --no-build-isolation -e ".[test]"
echo "$key" > "$STAMP"
