# Everything the project needs is installed by these targets (Python 3.11+, Java 17+ and Maven on PATH).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-unit test-integration bench stack-up stack-down clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m streams demo

test: $(STAMP)
	$(PY) -m pytest -q -ra

test-unit: $(STAMP)
	$(PY) -m pytest -q -ra tests/unit

test-integration: $(STAMP)
	$(PY) -m pytest -q -ra tests/integration

bench: $(STAMP)
	$(PY) bench/encoders.py
	$(PY) bench/timeline.py
	$(PY) bench/join.py
	$(PY) bench/pipeline.py  # last: its last line is the throughput ratio

stack-up: $(STAMP)
	$(PY) -m streams stack up

stack-down: $(STAMP)
	$(PY) -m streams stack down

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
