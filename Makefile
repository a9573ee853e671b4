# Two commands on a fresh machine: `make test` and `make sweep`. Everything lands in .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DATA_ROOT ?= data

.PHONY: test test-fast sweep data

$(PY):
	$(PYTHON) -m venv $(VENV)

# reinstall when the dependencies change. editable_mode=compat puts the checkout itself on sys.path, so that Hydra's
# plugin scan (pkgutil) finds hydra_plugins/ in any process; setuptools' default editable finder hides it from pkgutil
$(STAMP): setup.cfg pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[dev,parallel,slurm,mlflow,search]' --config-settings editable_mode=compat  # their tests run in make test
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

# the edit-test loop: everything but the end-to-end sweeps in subprocesses (marked slow), one worker per core,
# with bytecode caches written (some containers set PYTHONDONTWRITEBYTECODE): each worker then skips recompiling
# and pytest's assertion rewriting of every test module
test-fast: $(STAMP)
	PYTHONDONTWRITEBYTECODE= $(PY) -m pytest -m "not slow" -n auto --dist loadgroup

data: $(STAMP)
	$(PY) -c "import logging; logging.basicConfig(level=logging.INFO, format='%(message)s'); \
		from normsweep.data import obtain_mnist; obtain_mnist('$(DATA_ROOT)')"  # one line: where the files came from

# A fixed folder, so that a second `make sweep` (after Ctrl-C, a reboot) resumes the first: completed jobs are
# skipped, interrupted ones resume from their last epoch. `make sweep SWEEP=outputs/sweeps/other` starts another.
SWEEP ?= outputs/sweeps/first
# The fastest launcher for this machine (benchmarks/speed.py --sweep measures them): one process for all six jobs on
# a CUDA GPU; else joblib, one single-threaded job per core (up to the six jobs), which beat one job at a time with
# every thread on 2 cores, idle and busy alike (README, "Speed").
LAUNCHER ?= $(shell $(PY) -c "import os, torch; print('hydra/launcher=gpu' if torch.cuda.is_available() else \
	f'hydra/launcher=joblib hydra.launcher.n_jobs={min(6, len(os.sched_getaffinity(0)))}')")

sweep: data
	$(PY) run.py -m norm=bn,gn,ln reg=l1,l2 data.root=$(DATA_ROOT) hydra.sweep.dir=$(SWEEP) $(LAUNCHER)
