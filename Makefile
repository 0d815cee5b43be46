# Everything the project needs is installed by these targets (Python 3.11+, Java 17+ and Maven on PATH).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install lock browser netns redis images demo test test-long test-unit test-integration bench stack-up stack-down clean

# PYTHONWARNINGS: setuptools boxes a warning about an editable install of a mapped package folder (schemas/
# ships as streams/schemas); harmless here, so the first `make demo` does not show it
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	PYTHONWARNINGS=ignore::UserWarning $(PY) -m pip install -q -c constraints.txt -e '.[test,bench]'
	touch $(STAMP)

# constraints.txt anew: a fresh venv resolves pyproject.toml's ranges today, and pins what it got
lock:
	rm -rf build/lock-venv && $(PYTHON) -m venv build/lock-venv
	build/lock-venv/bin/pip install -q '.[test,bench]'
	{ sed -n '/^#/p' constraints.txt; build/lock-venv/bin/pip freeze --exclude-editable | grep -vi '^imagefork'; } > constraints.new
	mv constraints.new constraints.txt && rm -rf build/lock-venv

install: $(STAMP)

# Debian's chromium, for the dashboard's browser test (tests/integration/test_dashboard.py; Playwright
# drives it, nothing is fetched from Playwright's CDN). Installed with apt-get only when missing and only
# as root (CI); elsewhere nothing happens and that test skips, saying why.
browser:
	@if command -v chromium >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing Debian's chromium with apt-get (for the dashboard test)"; start=$$(date +%s); \
	  export DEBIAN_FRONTEND=noninteractive; \
	  { apt-get update -q && apt-get install -y -q --no-install-recommends chromium; } >/tmp/imagefork-apt.log 2>&1 \
	    || { tail -20 /tmp/imagefork-apt.log; echo "apt-get install chromium failed (whole log: /tmp/imagefork-apt.log)"; exit 1; }; \
	  echo "chromium installed in $$(( $$(date +%s) - start ))s: $$(chromium --version 2>/dev/null)"; \
	fi

# Debian's iproute2 (ip, tc) and iptables, for the hosts of tests/hosts.py (network namespaces on a bridge:
# tests/integration/test_hosts.py, bench/scale.py). Installed with apt-get only when missing and only as
# root; elsewhere nothing happens and those tests skip, saying why (they need root anyway).
netns:
	@if command -v ip >/dev/null 2>&1 && command -v tc >/dev/null 2>&1 && command -v iptables >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing Debian's iproute2 and iptables with apt-get (for the hosts tests)"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  { apt-get update -q && apt-get install -y -q --no-install-recommends iproute2 iptables; } >/tmp/imagefork-apt-netns.log 2>&1 \
	    || { tail -20 /tmp/imagefork-apt-netns.log; echo "apt-get install iproute2 iptables failed (whole log: /tmp/imagefork-apt-netns.log)"; exit 1; }; \
	fi

# Debian's redis-server, for bench/peer.py (the same workload on a Celery chord over Redis; the bench
# starts its own redis-server on a free loopback port, no persistence, and stops it). Installed with
# apt-get only when missing and only as root (CI); elsewhere it says what to do, and bench/peer.py fails.
redis:
	@if command -v redis-server >/dev/null 2>&1 || [ -x /usr/bin/redis-server ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing Debian's redis-server with apt-get (for bench/peer.py)"; start=$$(date +%s); \
	  export DEBIAN_FRONTEND=noninteractive; \
	  { apt-get update -q && apt-get install -y -q --no-install-recommends redis-server; } >/tmp/imagefork-apt-redis.log 2>&1 \
	    || { tail -20 /tmp/imagefork-apt-redis.log; echo "apt-get install redis-server failed (whole log: /tmp/imagefork-apt-redis.log)"; exit 1; }; \
	  echo "redis-server installed in $$(( $$(date +%s) - start ))s: $$(/usr/bin/redis-server --version 2>/dev/null)"; \
	else \
	  echo "redis-server is missing: bench/peer.py needs it (as root: apt-get install redis-server)"; \
	fi

# The Docker images (Kafka, S3Proxy, the app), built from Debian's mirror, Maven Central and PyPI only:
# needs a Docker engine that answers (as root here: `eval "export $$(scripts/dockerd.sh start)"`)
# and debootstrap for the Debian base. Reuses what is built already (streams/stack/images.py).
images: $(STAMP)
	$(PY) -m streams.stack.images

demo: $(STAMP)
	$(PY) -m streams demo

# two pytest-xdist workers (TEST_WORKERS=0: one process), each file's tests on one worker (tests/conftest.py);
# most integration tests wait on the broker's clocks (sessions, timeouts), not on the CPU
TEST_WORKERS ?= 2
test: $(STAMP) browser netns
	$(PY) -m pytest -q -ra --durations=25 -m "not long" -n $(TEST_WORKERS) --dist loadgroup

# the long runs (tests/conftest.py LONG: each with its reason and its shorter sibling in `make test`)
test-long: $(STAMP) browser netns
	$(PY) -m pytest -q -ra --durations=10 -m long

test-unit: $(STAMP)
	$(PY) -m pytest -q -ra tests/unit

test-integration: $(STAMP) browser netns
	$(PY) -m pytest -q -ra tests/integration

bench: $(STAMP) redis netns
	$(PY) bench/encoders.py
	$(PY) bench/facts.py
	$(PY) bench/timeline.py
	$(PY) bench/join.py
	$(PY) bench/breakdown.py
	$(PY) bench/peer.py
	@if [ "$$(id -u)" = 0 ]; then $(PY) bench/scale.py && $(PY) bench/drain.py && $(PY) bench/overhead.py; \
	else echo "bench/scale.py, drain.py and overhead.py left out: their hosts need root"; fi
	$(PY) bench/pipeline.py  # last: its last line is the throughput ratio

stack-up: $(STAMP)
	$(PY) -m streams stack up

stack-down: $(STAMP)
	$(PY) -m streams stack down

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
