# make demo: fresh machine -> venv, requirements, Fashion-MNIST, train the quickstart, samples.
# make test: the test suite (what CI runs). --no-compile: no .pyc for all of torch up front (~25 s).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
WORKDIR ?= runs/fashion_mnist
FMNIST_DIR ?= /usr/share/datasets/fashion-mnist

.PHONY: demo test test-fast venv venv-test data clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

venv: $(BIN)/python
	$(BIN)/python -m pip install -q --no-compile -r requirements.txt

venv-test: $(BIN)/python
	$(BIN)/python -m pip install -q --no-compile -r requirements-test.txt

data:
	@bash scripts/get_fashion_mnist.sh "$(FMNIST_DIR)"

demo: venv data
	$(BIN)/python main.py --config=configs/fashion_mnist.py --workdir=$(WORKDIR) --mode=train
	$(BIN)/python main.py --config=configs/fashion_mnist.py --workdir=$(WORKDIR) --mode=sample
	@echo "Samples: $(WORKDIR)/samples/ (PNG grid + samples.npz)"

# pytest's XLA:CPU buffers on huge pages, as main.py's (diffusion_jax/huge_pages.py); yours wins.
# .pyc files are written: the tests start ~25 Python processes, and without them each one
# compiles the sources of jax, flax and torch again (~4 s apiece).
TEST_ENV := GLIBC_TUNABLES=$${GLIBC_TUNABLES-glibc.malloc.hugetlb=1} PYTHONDONTWRITEBYTECODE=
# two pytest workers (pytest-xdist; worksteal: a worker that runs dry takes tests queued for the
# other, so that minute-long tests do not leave it idle at the end): much of a test is
# single-threaded tracing and compiling;
# a passing test's tmp_path is deleted when it ends (the suite writes model files, checkpoints
# and runs: 1.1 GB a session under /tmp/pytest-of-$USER otherwise, and pytest keeps three)
PYTEST := $(BIN)/python -m pytest -q -ra --durations=15 -n $${PYTEST_WORKERS-2} --dist worksteal \
	-o tmp_path_retention_policy=failed

test: venv-test
	$(TEST_ENV) $(PYTEST) tests

test-fast: venv-test
	$(TEST_ENV) $(PYTEST) -m "not slow and not multihost" tests

clean:
	rm -rf $(VENV) runs .pytest_cache
