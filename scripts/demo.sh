#!/usr/bin/env bash
# Sets up the environment (scripts/setup_env.sh) and runs the demo (the main job).
# Extra arguments go to the demo, e.g. `bash scripts/demo.sh --quick`; it runs in the folder
# the command was typed in, so a relative --out (default ./demo_report) lands there.
set -euo pipefail
HERE=$PWD
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
VENV=${CHASE_VENV:-.venv}
[[ $VENV == /* ]] || VENV=$PWD/$VENV
cd "$HERE"
exec "$VENV/bin/chase-demo" "$@"
