# Two commands for a fresh machine (see README):
#   make quickstart   set up, then train the quickstart model on the Python standard library
#   make test         set up, build the local Kubernetes control plane, run ruff, mypy, pytest
# Everything is installed by these targets: apt packages, the virtualenv (torch pinned
# first so pip never swaps its build), the project, and the Go-built control plane.

SHELL := /bin/bash
PY_VERSION_OK := $(shell python3 -c 'import sys; print(int(sys.version_info >= (3, 11)))')
VENV := .venv
# `-P` (Python >= 3.11): never put the working directory on sys.path. This repository's
# root holds `operator/` (the source of llmtrain.operator), which would shadow the standard
# library's `operator` for any `python -m ...` started here; in a fresh venv nothing has
# imported the real one yet, and `python -m pip` dies with "cannot import name 'eq'".
PY := $(VENV)/bin/python -P
# The torch build every environment uses; pyproject's `runtime` extra pins the same.
TORCH := torch==2.11.0
APT_PACKAGES := openssl containerd runc containernetworking-plugins iptables conntrack gcc libc6-dev nftables patch curl
# The image builder (tools/images.sh): buildah, mmdebstrap for the local Debian base, and
# containerd for the import check of the archives.
APT_PACKAGES += buildah mmdebstrap containerd
PYTEST_ARGS ?=

.PHONY: setup apt venv austen cluster-tools images lint typecheck test quickstart k8s-demo clean

setup: apt venv

apt:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing apt packages:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing; \
	fi

# English test text: Jane Austen's novels from Debian's r-cran-janeaustenr, fetched with
# `apt-get download` and read without R (tests/data/janeausten.py), cached in ~/.cache/llmtrain.
austen: venv
	@$(PY) -c 'import sys; sys.path.insert(0, "tests/data"); import janeausten; print("Jane Austen:", len(janeausten.austen_books()), "novels cached")' \
	  || { apt-get update -qq && $(PY) -c 'import sys; sys.path.insert(0, "tests/data"); import janeausten; janeausten.austen_books()'; }

$(VENV)/.installed: pyproject.toml
	@[ "$(PY_VERSION_OK)" = 1 ] || { echo "python3 >= 3.11 is required"; exit 1; }
	[ -x $(VENV)/bin/python ] || python3 -P -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[operator,runtime,test]"
	touch $@

venv: $(VENV)/.installed

cluster-tools:
	bash tests/cluster/build.sh all

# The Dockerfile's `operator` and `runtime` images, built with buildah on a local Debian
# base (no registry is needed), as archives for `ctr images import` under
# ~/.cache/llmtrain/images; layers cached in ~/.cache/llmtrain/containers (tools/images.sh).
images: apt
	bash tools/images.sh all

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: venv
	$(PY) tools/typecheck.py

test: setup austen cluster-tools images lint typecheck
	$(PY) -m pytest $(PYTEST_ARGS)

quickstart: setup
	$(VENV)/bin/llmtrain run examples/quickstart.yaml

# The operator end to end on this machine: local control plane + a real node (netns
# llmtrain-node) + the Helm chart (operator pod from `make images`) + moto S3; applies
# examples/k8s-demo.yaml and prints `kubectl get ltj -w` until it ends (tools/k8s_demo.py).
# ARGS=--standin: KWOK pods and a local token-auth Ray cluster standing in for them.
k8s-demo: setup cluster-tools images
	$(PY) tools/k8s_demo.py $(ARGS)

clean:
	rm -rf $(VENV) runs .mypy_cache .pytest_cache .ruff_cache
