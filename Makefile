# The few verbs people type. Each sets up what it needs first (virtualenv, pinned CPU torch,
# redis-server from the system packages, helm for the chart tests, prometheus and promtool for the
# monitoring tests), so on a fresh Debian/Ubuntu machine with Python 3.11 `make run` and `make test`
# are the whole set-up.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
JOB    ?= examples/digits.yaml
WHEELHOUSE ?= $(HOME)/.cache/p2ptrain/wheelhouse

.PHONY: setup run test lint typecheck unit bench bench-reports clean tools cluster-tools cluster-test node-tools e2e image chaos robustness compare

setup: $(STAMP)

$(STAMP): pyproject.toml
	@command -v redis-server >/dev/null 2>&1 || { \
	  echo "installing redis-server (system package)"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq redis-server >/dev/null; }
	@command -v gcc >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq gcc >/dev/null; }
	@[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# Pinned torch first (an unpinned one would pull whatever is newest): the local CPU wheel where pip's
	# find-links has one, else PyPI's build. Its wheels are kept in a wheelhouse on this machine (the
	# registry's replies are not cached by pip), so a fresh clone does not download GBs again.
	$(BIN)/python -m pip download -q --dest $(WHEELHOUSE) torch==2.13.0
	$(BIN)/python -m pip install -q --find-links $(WHEELHOUSE) torch==2.13.0 numpy
	$(BIN)/python -m pip install -q -e '.[test]'
	@touch $@

tools:
	@bash hack/install-tools.sh
	@bash hack/install-prometheus.sh

# The cluster tier's control plane (kube-apiserver, kube-controller-manager, kube-scheduler, etcd) built
# from upstream Go modules into .tools/bin/p2p-kube: about 7 minutes the first time on 2 cores, seconds
# after that (Go's module and build caches). Needs a Go toolchain (1.26+) and the Go module proxy.
cluster-tools:
	@bash hack/cluster/build.sh

run: $(STAMP)
	$(BIN)/p2ptrain run $(JOB)

lint: $(STAMP)
	$(BIN)/ruff check .

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest tests/unit -q

# Every tier but the node's (tests/node needs the image: `make e2e`).
test: $(STAMP) tools cluster-tools lint typecheck
	$(BIN)/pytest -q --ignore=tests/node

# Only the cluster tier: the CRD, chart and operator against a real control plane (tests/cluster).
cluster-test: $(STAMP) tools cluster-tools
	$(BIN)/pytest -q tests/cluster

# The node tier's runtime (containerd, runc, CNI plugins, nftables: Debian packages). Root (or sudo).
node-tools:
	@bash hack/install-node-tools.sh

# The node tier: the control plane with one real node (kubelet, kube-proxy, containerd, CoreDNS), the
# image imported from its archive, the chart installed by helm, jobs trained by pods (tests/node).
# The archive is rebuilt when a file it is built from is newer. Root (containerd, kubelet).
IMAGE_ARCHIVE ?= build/p2ptrain-image.tar
e2e: $(STAMP) tools cluster-tools node-tools $(IMAGE_ARCHIVE)
	P2PTRAIN_IMAGE_ARCHIVE=$(IMAGE_ARCHIVE) $(BIN)/pytest -q tests/node

$(IMAGE_ARCHIVE): Dockerfile pyproject.toml hack/build-image.sh $(shell git ls-files p2ptrain operator functions 2>/dev/null)
	IMAGE_ARCHIVE=$(abspath $@) bash hack/build-image.sh

# Builds the image from the Dockerfile with buildah (no Docker engine or registry needed), exports
# build/p2ptrain-image.tar for `kind load image-archive` and checks it from the inside. Root (or sudo).
image:
	bash hack/build-image.sh

# docs/performance.md and its plots (6 minutes on 2 idle cores, longer under load; `BENCH_ARGS=--quick`: fewer rounds, up to 10^6 parameters).
bench: $(STAMP)
	$(BIN)/python bench/performance.py $(BENCH_ARGS)

# The older one-topic reports (docs/bench-*.md), each with more detail than docs/performance.md.
bench-reports: $(STAMP)
	$(BIN)/python bench/accumulate.py
	$(BIN)/python bench/round.py
	$(BIN)/python bench/aggregate.py
	$(BIN)/python bench/update.py

# Fault drills on a 5-peer local run (peer, Redis and operator kills, failing functions): docs/chaos.md
chaos: $(STAMP)
	$(BIN)/python bench/chaos.py

# Every aggregation rule under every attack (2 of 7 and 3 of 10 Byzantine, digits): writes
# docs/robustness.md and its plots. 280 runs (every rule with and without worker momentum) of about
# 1 s each: 3 minutes on two cores; the 140 runs without worker momentum once took 37 minutes on two
# cores shared with seven other jobs (load average ~20).
robustness: $(STAMP)
	$(BIN)/python bench/robustness.py

# P2P vs parameter server vs inline vs DDP on the same jobs, with a peer and the aggregator killed
# mid-run: writes docs/p2p-vs-ps.md and docs/img/compare/ (14 minutes on 2 idle cores; `COMPARE_ARGS=--quick`: fewer jobs and rounds).
compare: $(STAMP)
	$(BIN)/python bench/compare.py $(COMPARE_ARGS)

clean:
	rm -rf $(VENV) .tools .mypy_cache .ruff_cache .pytest_cache
