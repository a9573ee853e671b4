"""hydra/sweeper=search (hydra-optuna-sweeper): an Optuna search over the L1/L2 factors that optimizes the jobs'
objective, where a diverged job is a failed trial, never a number."""
from __future__ import annotations

import json
import shlex
import subprocess
import sys

import pytest
import yaml

from conftest import jobs_in, run
from normsweep import files

pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")  # the optional extra: make test installs it
pytestmark = pytest.mark.slow  # sweeps in subprocesses

SEARCH = ("hydra/sweeper=search", "reg=l1l2", "epochs=1", "data.train_limit=256", "hydra.sweeper.sampler.seed=7")


def summaries(sweep) -> list[dict]:
    return [json.loads((job / files.SUMMARY).read_text()) for job in jobs_in(sweep)]


@pytest.mark.parametrize("objective, direction, best", [("best_test_acc", "maximize", max),
                                                        ("best_test_loss", "minimize", min)])
def test_search_optimizes_the_objective_in_its_direction(tmp_path, objective, direction, best):
    sweep = tmp_path / "sweep"
    proc = run(*SEARCH, "hydra.sweeper.n_trials=3", f"objective={objective}", f"hydra.sweep.dir={sweep}",
               cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    jobs = summaries(sweep)
    assert len(jobs) == 3 and all(job["status"] == files.STATUS_COMPLETED for job in jobs)
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert result["best_value"] == pytest.approx(best(job[objective] for job in jobs))
    assert f"Directions: ['{direction}']" in proc.stdout + proc.stderr
    configs = [yaml.safe_load((job / files.CONFIG).read_text())["reg"] for job in jobs_in(sweep)]
    assert len({(c["l1"], c["l2"]) for c in configs}) == 3  # three sampled points, each in its own folder
    assert all(1e-5 <= c["l1"] <= 1e-2 and 1e-5 <= c["l2"] <= 1e-2 for c in configs)
    assert (sweep / files.FACTORS_PNG).exists() and (sweep / files.RESULTS_MD).exists()


def test_a_diverged_job_is_a_failed_trial_not_a_number(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run(*SEARCH, "hydra.sweeper.n_trials=4", "optim.max_lr=choice(0.015,1000000000.0)",
               f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    jobs = summaries(sweep)
    statuses = [job["status"] for job in jobs]
    assert files.STATUS_DIVERGED in statuses and files.STATUS_COMPLETED in statuses, statuses
    assert proc.returncode == 1  # the sweep says some jobs did not complete
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    completed = [job["best_test_acc"] for job in jobs if job["status"] == files.STATUS_COMPLETED]
    assert result["best_value"] == pytest.approx(max(completed))  # diverged trials never counted as values
    failed = proc.stdout.count("Failed experiment") + proc.stderr.count("Failed experiment")
    assert failed == statuses.count(files.STATUS_DIVERGED)


def test_a_trials_recorded_command_reruns_that_trial_not_the_search(tmp_path):
    """The command in a trial's summary.json names that trial's point and never the sweeper: it finds the trial
    completed and skips it, and the search's optimization_results.yaml keeps its best point."""
    sweep = tmp_path / "sweep"
    assert run(*SEARCH, "hydra.sweeper.n_trials=2", f"hydra.sweep.dir={sweep}", cwd=tmp_path).returncode == 0
    results = (sweep / "optimization_results.yaml").read_text()
    job = jobs_in(sweep)[0]
    command = json.loads((job / files.SUMMARY).read_text())["command"]
    assert "hydra/sweeper" not in command and "hydra.sweeper" not in command
    proc = subprocess.run(f"{shlex.quote(sys.executable)} {command}", shell=True, cwd=tmp_path, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    assert "already completed with the same config" in proc.stdout + proc.stderr
    assert len(jobs_in(sweep)) == 2 and (sweep / "optimization_results.yaml").read_text() == results


def test_a_search_through_the_gpu_launcher_gets_numbers(tmp_path):
    """hydra/launcher=gpu trains each asked batch side by side (fused: the trials share every shape), and every trial
    gets its objective from the task's finish half, as under the basic launcher."""
    sweep = tmp_path / "sweep"
    proc = run(*SEARCH, "hydra.sweeper.n_trials=4", "hydra.sweeper.n_jobs=2", "hydra/launcher=gpu",
               f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    jobs = summaries(sweep)
    assert len(jobs) == 4 and all(job["status"] == files.STATUS_COMPLETED for job in jobs)
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert result["best_value"] == pytest.approx(max(job["best_test_acc"] for job in jobs))
    assert "trained fused with 1 other job" in proc.stdout + proc.stderr
