#!/usr/bin/env bash
# `make test`: start a real single-node Kafka broker, run the whole suite, always stop the broker.
# Triton is started by the pytest session fixture (tests/support/triton.py) on free ports.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
KAFKA_DIR=${UNDERSTUDY_TEST_KAFKA_DIR:-var/test-kafka}
KAFKA_PORT=${UNDERSTUDY_TEST_KAFKA_PORT:-$($PY -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')}

$PY -m devtools.kafka_broker fetch
# wrk and nginx: the load-test kit's smoke tests drive them (no-op when installed).
source loadtests/tools.sh
ensure_tools
# helm for the chart tests (tests/integration/test_helm.py): built from its Go module once,
# cached in ~/.cache/understudy (minutes on a fresh machine; docs/DEPLOY.md, "Helm").
$PY -m devtools.helm build
$PY -m devtools.kafka_broker start --fresh --port "$KAFKA_PORT" --dir "$KAFKA_DIR"
trap '$PY -m devtools.kafka_broker stop --dir "$KAFKA_DIR" || true' EXIT
export UNDERSTUDY_TEST_KAFKA_BOOTSTRAP="127.0.0.1:$KAFKA_PORT"
export UNDERSTUDY_TEST_KAFKA_DIR="$KAFKA_DIR"

.venv/bin/ruff check .
.venv/bin/pytest -q -p no:cacheprovider "$@"
