#!/usr/bin/env bash
# `make load`: real Triton + the gateway + locust headless for a bounded time.
#   bash loadtests/load.sh [load.py flags]     e.g. --duration 120 --users 50 --sink kafka
# Defaults: 60 s, 20 users ($LOAD_DURATION, $LOAD_USERS, or flags; more flags in $LOAD_ARGS).
# locust CSV/HTML and the gateway log land in var/load/; everything started is stopped.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
source loadtests/tools.sh
ensure_tools
# shellcheck disable=SC2086
exec "$PY" loadtests/load.py ${LOAD_ARGS:-} "$@"
