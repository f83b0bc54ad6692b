# Two entry points (see README): `make train` and `make test`. Both create/update .venv idempotently.
VENV   := .venv
PY     := $(VENV)/bin/python
CONFIG ?= experiments/configs/vqa.py
WORKDIR ?= workdir/vqa
export JAX_PLATFORMS ?= cpu
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: setup setup-test train test report

$(VENV)/.installed: requirements.txt setup.cfg pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed requirements-test.txt
	$(PY) -m pip install -q -r requirements-test.txt
	touch $@

setup: $(VENV)/.installed
setup-test: $(VENV)/.installed-test

train: setup
	$(PY) experiments/train.py --config=$(CONFIG) --workdir=$(WORKDIR)

test: setup-test
	$(PY) -m pytest -q -n 2 --dist loadscope tests  # one worker per core; a module stays on one worker (shared fixtures)

# Every figure the README quotes, from fresh runs (reused when finished): docs/results.md, docs/figures/, README.
report: setup
	$(PY) experiments/report.py --workdir=workdir/report
