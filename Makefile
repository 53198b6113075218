# lazyshim: one entry point for setting up, testing, demoing and benchmarking.
# Every target installs what it needs (idempotently), so a fresh machine needs only `make test`.

VENV      ?= .venv
PY        := $(VENV)/bin/python
# Debian's interpreter, not a per-user one: rootless tests run the venv as an ordinary user.
PYTHON3   ?= $(shell test -x /usr/bin/python3 && echo /usr/bin/python3 || echo python3)
APT_PKGS  := runc crun podman docker-registry stargz-snapshotter containerd skopeo umoci \
             busybox-static uidmap iptables debootstrap python3-venv fuse3 python3-numpy
PYTEST_ARGS ?=
# The benchmark's peer, stargz-snapshotter's stargz-store, built offline from Debian's Go sources.
PEER_APT_PKGS := golang-go golang-github-containerd-stargz-snapshotter-dev fuse3
PEERS_DIR := $(abspath .cache/peers)

.PHONY: all deps apt apt-peers venv test unit integration lint demo bench peers clean

all: test

deps: apt venv

# Install Debian packages that are missing (idempotent): $(call apt_install,PACKAGES)
define apt_install
	@missing=""; for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "apt: installing$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi
endef

# The Debian packages the suite drives for real (registry, runtimes, converters).
apt:
	$(call apt_install,$(APT_PKGS))

apt-peers:
	$(call apt_install,$(PEER_APT_PKGS))

# stargz-store: our own main.go (integration/peers/) against the packaged sources, GOPATH mode,
# no network. Rebuilt when main.go changes; the stamp names the package version it was built from.
peers: apt-peers $(PEERS_DIR)/.stamp

$(PEERS_DIR)/.stamp: integration/peers/stargz-store/main.go
	@mkdir -p $(PEERS_DIR)/gopath
	cd integration/peers/stargz-store && GO111MODULE=off GOPATH=$(PEERS_DIR)/gopath:/usr/share/gocode \
	  GOCACHE=$(PEERS_DIR)/gocache CGO_ENABLED=0 go build -o $(PEERS_DIR)/stargz-store.tmp .
	mv $(PEERS_DIR)/stargz-store.tmp $(PEERS_DIR)/stargz-store
	dpkg-query -W golang-github-containerd-stargz-snapshotter-dev > $@

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

demo: deps peers
	$(PY) -m integration.demo

# Benchmark: the chart needs matplotlib, kept out of the test venv's lock (requirements-bench.lock).
# stargz* = the peer (make peers); -opt = `ctr-remote image optimize` images.
BENCH_ARGS ?= --image py --link 100mbit:20ms --runs 3 \
              --variants podman,podman-zstd,lazyshim,lazyshim-zstd,stargz,stargz-opt,lazyshim-opt \
              --micro --json docs/bench/py.json --png docs/bench/py.png
# A 256 MiB weights file mapped and sampled (8 of 64 chunks): sub-file fills through the FUSE layer.
BENCH_WEIGHTS_ARGS ?= --image weights --link 100mbit:20ms --runs 2 \
              --variants podman,lazyshim,lazyshim-nobg,lazyshim-prof,lazyshim-warm,stargz --json docs/bench/weights.json

$(VENV)/.bench-stamp: $(VENV)/.stamp requirements-bench.lock
	$(VENV)/bin/pip install -q --disable-pip-version-check -r requirements-bench.lock
	touch $@

bench: deps peers $(VENV)/.bench-stamp
	@mkdir -p docs/bench
	$(PY) -m integration.bench $(BENCH_ARGS)
	$(PY) -m integration.bench $(BENCH_WEIGHTS_ARGS) | tee docs/bench/weights.md
	$(PY) -m integration.pull_load_bench --runs 3 | tee docs/bench/pull-under-load.md

clean:
	rm -rf $(VENV) .cache
