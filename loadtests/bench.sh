#!/usr/bin/env bash
# `make bench`: the one-run benchmark (loadtests/bench.py) on this machine.
#   bash loadtests/bench.sh [bench.py flags]    e.g. --quick, --overload-seconds 30, --no-kafka
# Extra flags can also come from $BENCH_ARGS. Results: var/bench/results.json and the
# generated section of docs/BENCHMARKS.md. Bounded: the default run takes about 22 minutes.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
source loadtests/tools.sh
ensure_tools
ensure_py_spy
# shellcheck disable=SC2086
exec "$PY" loadtests/bench.py ${BENCH_ARGS:-} "$@"
