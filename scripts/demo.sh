#!/usr/bin/env bash
# Sets up the environment (scripts/setup_env.sh) and runs the demo (the main job).
# Extra arguments go to the demo, e.g. `bash scripts/demo.sh --quick`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
VENV=${CHASE_VENV:-.venv}
exec "$VENV/bin/chase-demo" "$@"
