# Two commands on a fresh machine: `make test` and `make sweep`. Everything lands in .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DATA_ROOT ?= data

.PHONY: test test-fast sweep data

$(PY):
	$(PYTHON) -m venv $(VENV)

# reinstall when the dependencies change
$(STAMP): setup.cfg pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[dev,parallel,slurm,mlflow,search]'  # their tests run in make test
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

# the edit-test loop: everything but the end-to-end sweeps in subprocesses (marked slow), one worker per core,
# with bytecode caches written (some containers set PYTHONDONTWRITEBYTECODE): each worker then skips recompiling
# and pytest's assertion rewriting of every test module
test-fast: $(STAMP)
	PYTHONDONTWRITEBYTECODE= $(PY) -m pytest -m "not slow" -n auto --dist loadgroup

data: $(STAMP)
	$(PY) -c "from normsweep.data import obtain_mnist; print(obtain_mnist('$(DATA_ROOT)'))"

sweep: data
	$(PY) run.py -m norm=bn,gn,ln reg=l1,l2 data.root=$(DATA_ROOT)
