# kumazone: `make run` serves the sample zones, `make test` runs the whole suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DNS_PORT ?= 5653
ZONE ?= zone-1

.PHONY: run test test-unit test-process test-lab lint bench tools bytecode clean

# editable_mode=compat puts the checkout itself on sys.path, so twistd finds
# twisted/plugins/kumazone_plugin.py (a strict editable install would hide it).
# The hot path's C loop (setup.py) needs a C compiler and Python's headers.
$(STAMP): setup.cfg setup.py pyproject.toml kumazone/dns/_hotloop.c
	@include=$$($(PYTHON) -c 'import sysconfig; print(sysconfig.get_paths()["include"])'); \
	if ! command -v gcc >/dev/null || [ ! -f "$$include/Python.h" ]; then \
		echo "installing gcc and python3-dev (the hot path's C loop)"; \
		apt-get install -y gcc python3-dev; \
	fi
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q --config-settings editable_mode=compat -e '.[test,dev,postgresql]'
	touch $(STAMP)

# The checkout's bytecode, written ahead (as pip does for an installed package):
# each twistd a test or a benchmark starts then loads it instead of compiling
# every module again, even where PYTHONDONTWRITEBYTECODE is set.  Only what
# changed is compiled again.
bytecode: $(STAMP)
	$(BIN)/python -m compileall -q kumazone twisted/plugins

# System tools the tests drive as real clients; installed only when missing.
tools:
	@missing=""; \
	command -v dig >/dev/null || missing="$$missing bind9-dnsutils"; \
	command -v kdig >/dev/null || missing="$$missing knot-dnsutils"; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  mkdir -p /etc/postgresql-common; \
	  test -e /etc/postgresql-common/createcluster.conf || \
	    echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.conf; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    -o Dpkg::Options::=--force-confold $$missing >/dev/null; \
	fi

run: $(STAMP) bytecode
	$(BIN)/twistd -n --pidfile= kumazone --role=zone --zone=$(ZONE) \
	  --resources=zones/$(ZONE) --dns-port=$(DNS_PORT) --data-dir=kumazone-data/$(ZONE)

# Tests by tier: tests/unit (no sockets, no processes), tests/process (real
# processes and sockets), tests/lab (network namespaces, root).  `make test` runs
# the checks and every tier; `make test-unit` is the fast one.  The unit tier runs
# on every core (pytest-xdist); the others one test at a time, as their timing
# bounds (a failover within 5 s, say) are meant for a machine that is not busy.
test: $(STAMP) bytecode tools lab-tools lint
	$(BIN)/twistd kumazone --help >/dev/null
	$(BIN)/pytest -q -n auto tests/unit
	$(BIN)/pytest -q tests/process tests/lab

test-unit: $(STAMP)
	$(BIN)/pytest -q -n auto tests/unit

test-process: $(STAMP) bytecode tools
	$(BIN)/pytest -q tests/process

test-lab: $(STAMP) bytecode lab-tools
	$(BIN)/pytest -q tests/lab

lint: $(STAMP)
	$(BIN)/ruff check kumazone tests twisted bench lab
	$(BIN)/ruff format --check kumazone tests twisted bench lab
	$(BIN)/mypy

# One table with every figure of issue 10 and its target (about 15 min; e.g.
# BENCH_ARGS="--million 100000" for a shorter run), then issue 13's data-plane
# table (about 5 min; DP_BENCH_ARGS="--quick" for a smoke run), then issue 14's
# zone and global replicas on PostgreSQL (about 3 min; REPLICA_BENCH_ARGS="--quick").
# bench/dns_bench.py and bench/federation.py also run on their own: see bench/README.md.
bench: $(STAMP) bytecode tools
	@missing=""; \
	command -v dnsperf >/dev/null || missing="$$missing dnsperf"; \
	command -v nsd >/dev/null || test -x /usr/sbin/nsd || missing="$$missing nsd"; \
	command -v taskset >/dev/null || missing="$$missing util-linux"; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
	$(BIN)/python bench/churn_bench.py $(BENCH_ARGS)
	$(BIN)/python bench/dataplane_bench.py $(DP_BENCH_ARGS)
	$(BIN)/python bench/replica_bench.py $(REPLICA_BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info twisted/plugins/dropin.cache .pytest_cache .mypy_cache .hypothesis

# The multi-zone lab (network namespaces, and the Docker Compose version).
-include lab/lab.mk
