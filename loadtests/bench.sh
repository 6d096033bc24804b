#!/usr/bin/env bash
# `make bench`: the one-run benchmark (loadtests/bench.py) on this machine.
#   bash loadtests/bench.sh [bench.py flags]    e.g. --quick, --overload-seconds 30, --no-kafka
# Extra flags can also come from $BENCH_ARGS. Results: var/bench/results.json and the
# generated section of docs/BENCHMARKS.md. Bounded: the default run takes about 22 minutes.
#
# $GATEWAY_PYTHON: run the gateways under test on that interpreter (same minor version), e.g. a
# build like the image's (deploy/Dockerfile: python:3.11-slim, built with PGO and LTO) when the
# virtualenv's Python is not one. Its own virtualenv, var/bench/gateway-venv, gets the gateway's
# dependencies; the report names the interpreter. Unset: the gateways run on the virtualenv's.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
source loadtests/tools.sh
ensure_tools
ensure_py_spy
gateway_python=()
if [ -n "${GATEWAY_PYTHON:-}" ]; then
  venv=var/bench/gateway-venv
  if [ ! -x "$venv/bin/python" ] || [ "$(readlink -f "$venv/bin/python")" != "$(readlink -f "$GATEWAY_PYTHON")" ]; then
    rm -rf "$venv"
    "$GATEWAY_PYTHON" -m venv --without-pip "$venv"  # pip comes from the main virtualenv
  fi
  "$PY" -m pip --python "$venv/bin/python" install --quiet -e '.[gateway]'
  gateway_python=(--gateway-python "$venv/bin/python")
fi
# shellcheck disable=SC2086
exec "$PY" loadtests/bench.py "${gateway_python[@]}" ${BENCH_ARGS:-} "$@"
