# Understudy: `make demo` runs the whole thing on embedded defaults; `make test` runs every test
# against real Triton and a real Kafka broker. Both build their own virtualenv first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install demo test unit lint bench load models kafka-start kafka-stop clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,triton]'
	touch $(STAMP)

install: $(STAMP)

models: install  ## regenerate the demo models (deterministic)
	$(PY) deploy/triton/generate_models.py

demo: install
	$(PY) -m understudy_demo.run

test: install
	bash tests/run.sh

unit: install  ## the fast tier: no Triton, Kafka, helm or Spark (tests/unit plus the unit tests of mixed files)
	.venv/bin/pytest -q -p no:cacheprovider -m "not slow and not triton and not kafka and not helm and not spark" tests

lint: install  ## ruff; mypy --strict clean for understudy/ and gateway/; the evaluator's count only goes down
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy understudy gateway
	$(PY) -m devtools.mypy_ratchet

bench: install
	bash loadtests/bench.sh

load: install
	bash loadtests/load.sh

kafka-start: install  ## a local single-node Kafka broker (var/kafka, port 9092) for a Kafka-backed demo
	$(PY) -m devtools.kafka_broker start

kafka-stop: install
	$(PY) -m devtools.kafka_broker stop

clean:
	rm -rf var .pytest_cache .ruff_cache
