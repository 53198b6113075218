# lazyshim: one entry point for setting up, testing, demoing and benchmarking.
# Every target installs what it needs (idempotently), so a fresh machine needs only `make test`.

VENV      ?= .venv
PY        := $(VENV)/bin/python
# Debian's interpreter, not a per-user one: rootless tests run the venv as an ordinary user.
PYTHON3   ?= $(shell test -x /usr/bin/python3 && echo /usr/bin/python3 || echo python3)
APT_PKGS  := runc crun podman docker-registry stargz-snapshotter containerd skopeo umoci \
             busybox-static uidmap iptables debootstrap python3-venv
PYTEST_ARGS ?=

.PHONY: all deps apt venv test unit integration lint demo bench clean

all: test

deps: apt venv

# Install the Debian packages the suite drives for real (registry, runtimes, converters).
apt:
	@missing=""; for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "apt: installing$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

venv: apt $(VENV)/.stamp

$(VENV)/.stamp: requirements.lock pyproject.toml
	rm -rf $(VENV)
	$(PYTHON3) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -r requirements.lock
	$(VENV)/bin/pip install -q --disable-pip-version-check --no-deps -e . --config-settings editable_mode=compat
	touch $@

lint: venv
	$(VENV)/bin/ruff check shim runtime seccomp tests integration

unit: venv
	$(PY) -m pytest -q tests $(PYTEST_ARGS)

integration: deps
	$(PY) -m pytest -q integration $(PYTEST_ARGS)

test: deps lint
	$(PY) -m pytest -q tests integration $(PYTEST_ARGS)

demo: deps
	$(PY) -m integration.demo

# Benchmark: the chart needs matplotlib, kept out of the test venv's lock (requirements-bench.lock).
BENCH_ARGS ?= --image py --link 100mbit:20ms --runs 3 --variants podman,podman-zstd,lazyshim,lazyshim-zstd \
              --micro --json docs/bench/py.json --png docs/bench/py.png

$(VENV)/.bench-stamp: $(VENV)/.stamp requirements-bench.lock
	$(VENV)/bin/pip install -q --disable-pip-version-check -r requirements-bench.lock
	touch $@

bench: deps $(VENV)/.bench-stamp
	@mkdir -p docs/bench
	$(PY) -m integration.bench $(BENCH_ARGS)
	$(PY) -m integration.pull_load_bench --runs 3 | tee docs/bench/pull-under-load.md

clean:
	rm -rf $(VENV) .cache
