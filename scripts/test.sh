#!/usr/bin/env bash
# Sets up the environment (scripts/setup_env.sh) and runs the test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k ops -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
VENV=${CHASE_VENV:-.venv}
exec "$VENV/bin/pytest" -p no:cacheprovider "$@"
