# lazyshim: one entry point for setting up, testing, demoing and benchmarking.
# Every target installs what it needs (idempotently), so a fresh machine needs only `make test`.

VENV      ?= .venv
PY        := $(VENV)/bin/python
PYTHON3   ?= python3
APT_PKGS  := runc crun podman docker-registry stargz-snapshotter containerd skopeo umoci \
             busybox-static uidmap iptables debootstrap
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

venv: $(VENV)/.stamp

$(VENV)/.stamp: requirements.lock pyproject.toml
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

bench: deps
	$(PY) -m integration.bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .cache
