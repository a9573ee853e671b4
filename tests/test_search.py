"""hydra/sweeper=search: normsweep's own Optuna (>= 4) search. The study lives in the sweep folder's journal and a
rerun continues it to n_trials in all; it optimizes a validation number; jobs report each epoch's validation
accuracy and a pruner may stop them; diverged jobs are failed trials; it works through every launcher here."""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
import yaml

from conftest import jobs_in, run, run_py
from normsweep import files

optuna = pytest.importorskip("optuna")  # the optional extra: make test installs it
pytestmark = pytest.mark.slow  # sweeps in subprocesses

SEARCH = ("hydra/sweeper=search", "reg=l1l2", "epochs=1", "data.train_limit=400", "data.val_size=200",
          "hydra.sweeper.seed=7")


def summaries(sweep) -> list[dict]:
    return [json.loads((job / files.SUMMARY).read_text()) for job in jobs_in(sweep)]


def trials(sweep) -> list:
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    storage = JournalStorage(JournalFileBackend(str(sweep / "study.journal")))
    return optuna.load_study(study_name="normsweep", storage=storage).trials


def test_search_optimizes_the_validation_accuracy(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run(*SEARCH, "hydra.sweeper.n_trials=3", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    jobs = summaries(sweep)
    assert len(jobs) == 3 and all(job["status"] == files.STATUS_COMPLETED for job in jobs)
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert result["best_value"] == pytest.approx(max(job["best_val_acc"] for job in jobs))
    assert sorted(t.value for t in trials(sweep)) == pytest.approx(sorted(job["best_val_acc"] for job in jobs))
    configs = [yaml.safe_load((job / files.CONFIG).read_text())["reg"] for job in jobs_in(sweep)]
    assert len({(c["l1"], c["l2"]) for c in configs}) == 3
    assert all(1e-5 <= c["l1"] <= 1e-2 and 1e-5 <= c["l2"] <= 1e-2 for c in configs)
    assert {t.state.name for t in trials(sweep)} == {"COMPLETE"}


def test_a_killed_search_rerun_ends_with_exactly_n_trials(tmp_path):
    sweep = tmp_path / "sweep"
    command = run_py(*SEARCH, "epochs=3", "hydra.sweeper.n_trials=3", f"hydra.sweep.dir={sweep}")
    proc = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 180
    while not list(sweep.glob("*/" + files.CHECKPOINT)) and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # mid-trial: its trial stays RUNNING in the journal
    proc.wait()
    assert any(t.state.name == "RUNNING" for t in trials(sweep))
    assert subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300).returncode == 0
    assert len(trials(sweep)) == 3 and {t.state.name for t in trials(sweep)} == {"COMPLETE"}
    assert len(jobs_in(sweep)) == 3
    assert any("resuming from the checkpoint" in (job / "run.log").read_text() for job in jobs_in(sweep))


def test_a_pruner_that_must_prune_prunes_and_the_job_says_so(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run(*SEARCH, "epochs=2", "hydra.sweeper.n_trials=2", "hydra.sweeper.pruner=threshold",
               "hydra.sweeper.pruner_lower=101", f"hydra.sweep.dir={sweep}", cwd=tmp_path)  # accuracy < 101 always
    assert proc.returncode == 1, proc.stderr  # the sweep says its jobs did not complete
    assert [job["status"] for job in summaries(sweep)] == [files.STATUS_PRUNED] * 2
    assert all(job["epochs_done"] == 1 for job in summaries(sweep))
    assert {t.state.name for t in trials(sweep)} == {"PRUNED"}


def test_a_search_through_the_gpu_launcher_gets_numbers(tmp_path):
    """hydra/launcher=gpu trains each batch side by side (fused: the trials share every shape), and every trial
    gets its objective from the task's finish half, as under the basic launcher."""
    sweep = tmp_path / "sweep"
    proc = run(*SEARCH, "hydra.sweeper.n_trials=4", "hydra.sweeper.n_jobs=2", "hydra/launcher=gpu",
               f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert all(isinstance(t.value, float) for t in trials(sweep)) and len(trials(sweep)) == 4
    assert "trained fused with 1 other job" in proc.stdout + proc.stderr


def test_a_diverged_job_is_a_failed_trial_not_a_number(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run(*SEARCH, "hydra.sweeper.n_trials=4", "optim.max_lr=choice(0.015,1000000000.0)",
               f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    statuses = [job["status"] for job in summaries(sweep)]
    assert files.STATUS_DIVERGED in statuses and files.STATUS_COMPLETED in statuses, statuses
    assert proc.returncode == 1
    states = [t.state.name for t in trials(sweep)]
    assert states.count("FAIL") == statuses.count(files.STATUS_DIVERGED) and "COMPLETE" in states


@pytest.mark.parametrize("overrides, message", [
    (("hydra.sweeper.n_trials=0",), "hydra.sweeper.n_trials=0 and n_jobs=1 must be at least 1"),
    (("optim.lrr=interval(0.01,0.1)",), "optim.lrr is not a key of the config"),
])
def test_bad_search_settings_are_one_line_before_any_trial(tmp_path, overrides, message):
    sweep = tmp_path / "sweep"
    proc = run(*SEARCH, *overrides, f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert proc.returncode == 2 and message in proc.stderr
    assert len([line for line in proc.stderr.splitlines() if line.strip()]) == 1, proc.stderr
    assert not sweep.exists()


def test_a_journal_of_another_search_is_refused_not_merged(tmp_path):
    sweep = tmp_path / "sweep"
    assert run(*SEARCH, "hydra.sweeper.n_trials=1", f"hydra.sweep.dir={sweep}", cwd=tmp_path).returncode == 0
    before = (sweep / "study.journal").read_bytes()
    proc = run(*SEARCH, "hydra.sweeper.n_trials=2", "reg.l1=interval(0.001,0.01)",
               f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert proc.returncode == 2 and "holds a study of another search" in proc.stderr
    assert (sweep / "study.journal").read_bytes() == before


def test_a_trials_recorded_command_reruns_that_trial_not_the_search(tmp_path):
    """The command in a trial's summary.json names that trial's point and never the sweeper nor its trial: it finds
    the trial completed and skips it, and the study keeps its trials."""
    sweep = tmp_path / "sweep"
    assert run(*SEARCH, "hydra.sweeper.n_trials=2", f"hydra.sweep.dir={sweep}", cwd=tmp_path).returncode == 0
    results = (sweep / "optimization_results.yaml").read_text()
    job = jobs_in(sweep)[0]
    command = json.loads((job / files.SUMMARY).read_text())["command"]
    assert "hydra/sweeper" not in command and "hydra.sweeper" not in command and "NORMSWEEP_TRIAL" not in command
    proc = subprocess.run(f"{shlex.quote(sys.executable)} {command}", shell=True, cwd=tmp_path, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    assert "already completed with the same config" in proc.stdout + proc.stderr
    assert len(jobs_in(sweep)) == 2 and (sweep / "optimization_results.yaml").read_text() == results
    assert len(trials(sweep)) == 2


def test_a_search_through_the_gpu_launcher_refills_a_slot_as_its_trial_ends(tmp_path):
    """n_jobs=2 slots, trials of 1 and 4 epochs: the third trial is asked and starts when the short one ends, while
    the long one still trains (a batch-at-a-time search would wait for both)."""
    sweep = tmp_path / "sweep"
    proc = run(*SEARCH, "epochs=choice(1,4)", "hydra.sweeper.n_trials=4", "hydra.sweeper.n_jobs=2",
               "hydra/launcher=gpu", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    first, second, third, _ = trials(sweep)
    assert {first.params["epochs"], second.params["epochs"]} == {1, 4}  # what hydra.sweeper.seed=7 draws
    long_one = max(first, second, key=lambda t: t.params["epochs"])
    assert third.datetime_start < long_one.datetime_complete
    assert all(isinstance(t.value, float) for t in trials(sweep))
    assert len(jobs_in(sweep)) == 4


def test_trials_of_equal_values_share_a_job_and_its_result_not_a_failure(tmp_path):
    """A space of one point: every trial is the same job. Under the refilling gpu launcher a trial asked while its
    twin trains finds the folder locked (skipped, running elsewhere); it is told the twin's result when that ends,
    instead of failing, and the next trial is asked at once."""
    sweep = tmp_path / "sweep"
    proc = run(*SEARCH, "hydra.sweeper.params={reg.l1:'choice(0.001)',reg.l2:'choice(0.001)'}",
               "hydra.sweeper.n_trials=3", "hydra.sweeper.n_jobs=2", "hydra/launcher=gpu", f"hydra.sweep.dir={sweep}",
               cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "skipped, running elsewhere" in proc.stdout + proc.stderr
    assert [t.state.name for t in trials(sweep)] == ["COMPLETE"] * 3
    assert len({t.value for t in trials(sweep)}) == 1 and len(jobs_in(sweep)) == 1


def test_a_refilled_trial_that_is_refused_fails_while_the_others_train_on(tmp_path):
    """norm.groups=3 does not divide the widths: a refilled trial that draws it is refused in its line and is a
    failed trial; the trials in flight finish."""
    sweep = tmp_path / "sweep"
    seeded = [a for a in SEARCH if not a.startswith("hydra.sweeper.seed=")]  # seed 24 draws groups 4, 4, then 3
    proc = run(*seeded, "hydra.sweeper.seed=24", "norm=gn",
               "hydra.sweeper.params={reg.l1:'choice(0.001)',reg.l2:'choice(0.001)'}",
               "norm.groups=choice(4,3)", "seed=choice(1,2,3,4)", "hydra.sweeper.sampler=random",
               "hydra.sweeper.n_trials=6", "hydra.sweeper.n_jobs=2", "hydra/launcher=gpu", f"hydra.sweep.dir={sweep}",
               cwd=tmp_path)
    assert [t.params["norm.groups"] for t in trials(sweep)[:3]] == [4, 4, 3]
    states = {(t.params["norm.groups"], t.state.name) for t in trials(sweep)}
    assert len(trials(sweep)) == 6 and not any(t.state.name == "RUNNING" for t in trials(sweep)), proc.stderr
    assert (3, "FAIL") in states and (4, "COMPLETE") in states, (states, proc.stderr)
    assert "norm.groups=3 must divide" in proc.stderr
