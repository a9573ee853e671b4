"""hydra/launcher=slurm against a real one-node SLURM cluster started here (tests/slurm_cluster.py): a sweep
completes, a job past its time limit is requeued and resumes from its checkpoint, a rerun skips completed jobs.
Skipped where SLURM and munge are not installed (apt-get install slurmctld slurmd slurm-client munge)."""
from __future__ import annotations

import math
import re
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest

import slurm_cluster
from conftest import jobs_in, read_json, run_py
from normsweep import files

pytestmark = pytest.mark.slow
# One core and 1 GB per job: fits any machine (mem_gb's default, 8, may be more than a CI machine has).
SLURM = ("hydra/launcher=slurm", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1")
SWEEP = ("norm=bn,gn", "reg=none", "epochs=1", "data.train_limit=256")
# sbatch --time=1 --signal=USR2@20: slurmctld sends the signal at its first 30-s time-limit check with at most
# 20 + 30 s left, so 10-40 s into a run; submitit then requeues the job, and it resumes from its checkpoint.
# The first run trains at most ~40 s before its signal. A requeued run starts ~12 s after the signal
# and is signalled at the next check, so it trains ~10-15 s: 5-8 runs in all, more on a busy machine.
# 90 s of training at the probe's fastest epoch: still past the first signal if the job then runs 1.5x faster
# than the probe did, and within 15 requeues if it runs 2x slower.
REQUEUE_TRAINING_S = 90
REQUEUE_LIMITS = ("hydra.launcher.timeout_min=1", "hydra.launcher.signal_delay_s=20",
                  "hydra.launcher.max_num_timeout=15")


@pytest.fixture(scope="module")
def slurm_env(tmp_path_factory) -> Iterator[dict[str, str]]:
    """The cluster, up for this module's tests; -> the environment (SLURM_CONF) that sweeps submit to it with."""
    reason = slurm_cluster.why_not_available()
    if reason:
        pytest.skip(reason)
    with slurm_cluster.slurm_cluster(tmp_path_factory.mktemp("cluster")) as env:
        yield env


def run_sweep(sweep: Path, overrides: tuple[str, ...], env: dict[str, str], timeout: float) -> float:
    """`python run.py -m ...` into sweep, its jobs submitted to the cluster; asserts it exits 0; -> seconds taken."""
    started = time.monotonic()
    try:
        proc = subprocess.run(run_py(*overrides, *SLURM, f"hydra.sweep.dir={sweep}"), cwd=sweep.parent, env=env,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        # Without accounting (no sacct) submitit only learns that a job ended from its result file, so a job
        # that died without one (see its log) leaves the sweep waiting until this timeout.
        logs = "\n".join(f"{log}:\n{log.read_text()[-2000:]}" for log in sorted(sweep.glob(".submitit/*/*.err")))
        pytest.fail(f"sweep still running after {timeout} s; submitit's job logs:\n{logs}")
    assert proc.returncode == 0, proc.stderr
    return time.monotonic() - started


@pytest.fixture(scope="module")
def slurm_sweep(slurm_env, tmp_path_factory) -> Path:
    """bn, gn for one epoch, each a task of a SLURM job array: a finished sweep that the tests below read."""
    sweep = tmp_path_factory.mktemp("slurm") / "sweep"
    print(f"slurm sweep of 2 jobs: {run_sweep(sweep, SWEEP, slurm_env, timeout=240):.0f} s")
    return sweep


def test_sweep_completes_on_slurm(slurm_sweep):
    jobs = jobs_in(slurm_sweep)
    assert [job.name[:2] for job in jobs] == ["bn", "gn"]
    for job in jobs:
        summary = read_json(job / files.SUMMARY)
        assert summary["status"] == files.STATUS_COMPLETED and summary["epochs_done"] == 1
        assert not files.is_locked(job)
    assert list(slurm_sweep.glob(".submitit/*/*_submission.sh"))  # it went through sbatch
    assert (slurm_sweep / files.RESULTS_MD).exists()


def test_rerun_skips_completed_jobs(slurm_sweep, slurm_env):
    before = {job: (job / files.SUMMARY).stat().st_mtime_ns for job in jobs_in(slurm_sweep)}
    (slurm_sweep / files.RESULTS_MD).unlink()
    print(f"slurm rerun of 2 completed jobs: {run_sweep(slurm_sweep, SWEEP, slurm_env, timeout=240):.0f} s")
    assert {job: (job / files.SUMMARY).stat().st_mtime_ns for job in jobs_in(slurm_sweep)} == before
    assert (slurm_sweep / files.RESULTS_MD).exists()  # the table is written again


def seconds_per_epoch(tmp_path: Path, *overrides: str) -> float:
    """One CPU core's time for an epoch of this job on this machine, from a 3-epoch run outside SLURM: the fastest
    epoch after the first, so that a machine busier during the probe than during the job does not shorten the job."""
    proc = subprocess.run(run_py(*overrides, "epochs=3", f"hydra.run.dir={tmp_path / 'probe'}", multirun=False),
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = files.read_jsonl(tmp_path / "probe" / files.METRICS)[1:]  # the first epoch includes warm-up
    return min(row["train_seconds"] + row["test_seconds"] for row in rows)


def test_job_past_its_time_limit_is_requeued_and_resumes(slurm_env, tmp_path):
    job_overrides = ("norm=bn", "reg=none", "data.train_limit=2000")
    # Enough epochs for REQUEUE_TRAINING_S on this machine: fixed epochs would finish before the first signal on
    # a fast machine, or run out of requeues on a slow one.
    epochs = max(10, math.ceil(REQUEUE_TRAINING_S / seconds_per_epoch(tmp_path, *job_overrides)))
    sweep = tmp_path / "sweep"
    seconds = run_sweep(sweep, (*job_overrides, f"epochs={epochs}", *REQUEUE_LIMITS), slurm_env, timeout=600)
    [job] = jobs_in(sweep)
    resumed = [int(n) for n in re.findall(rf"resuming from the checkpoint after epoch (\d+) of {epochs}",
                                          (job / "run.log").read_text())]
    print(f"job of {epochs} epochs, resumed after epochs {resumed}: {seconds:.0f} s")
    summary = read_json(job / files.SUMMARY)
    assert summary["status"] == files.STATUS_COMPLETED and summary["epochs_done"] == epochs
    assert [row["epoch"] for row in files.read_jsonl(job / files.METRICS)] == list(range(1, epochs + 1))
    # The last run trained only the epochs after its checkpoint: less time than all epochs together took.
    assert summary["wall_seconds_this_invocation"] < summary["seconds"]
    assert resumed and all(0 < n < epochs for n in resumed), "never resumed: the job was not requeued"
    assert not files.is_locked(job)  # the signalled runs' flock went with their processes; the last released its own


PACKED = ("hydra/launcher=slurm_packed", "hydra.launcher.jobs_per_task=3", "hydra.launcher.cpus_per_task=1",
          "hydra.launcher.mem_gb=1")


def test_a_packed_sweep_of_6_jobs_runs_as_2_tasks_and_a_rerun_skips_them(slurm_env, tmp_path):
    """hydra/launcher=slurm_packed: 6 jobs in 2 array tasks of 3, each task training its jobs in one process (the
    gpu launcher's loop: jobs of one norm fused); every job completes in its own folder, the table is written, and
    the same command again skips every job."""
    sweep = tmp_path / "sweep"
    grid = ("norm=bn,gn,ln", "reg=l1,l2", "epochs=1", "data.train_limit=256", *PACKED, f"hydra.sweep.dir={sweep}")
    proc = subprocess.run(run_py(*grid), cwd=tmp_path, env=slurm_env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr
    assert "Packing 6 jobs into 2 SLURM array tasks of up to 3 jobs each" in proc.stdout + proc.stderr
    jobs = jobs_in(sweep)
    assert len(jobs) == 6
    for job in jobs:
        assert read_json(job / files.SUMMARY)["status"] == files.STATUS_COMPLETED
    assert len(list(sweep.glob(".submitit/*/*_0_log.out"))) == 2  # two array tasks, not six
    assert (sweep / files.RESULTS_MD).exists()
    before = {job: (job / files.SUMMARY).stat().st_mtime_ns for job in jobs}
    proc = subprocess.run(run_py(*grid), cwd=tmp_path, env=slurm_env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr
    assert {job: (job / files.SUMMARY).stat().st_mtime_ns for job in jobs} == before


def test_a_packed_launcher_refuses_a_chunk_below_one(tmp_path):
    proc = subprocess.run(run_py("norm=bn", *PACKED[:1], "hydra.launcher.jobs_per_task=0",
                                 f"hydra.sweep.dir={tmp_path / 'sweep'}"), cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "hydra.launcher.jobs_per_task=0 must be at least 1" in proc.stderr
    assert len([line for line in proc.stderr.splitlines() if line.strip()]) == 1, proc.stderr
    assert not (tmp_path / "sweep").exists()


def test_a_packed_task_past_its_time_limit_is_requeued_and_resumes_its_jobs(slurm_env, tmp_path):
    """Two jobs in one task, trained for longer than the task's limit: submitit requeues the task, which resumes both
    jobs from their checkpoints until they complete."""
    job_overrides = ("norm=bn", "reg=none", "data.train_limit=2000")
    # two jobs take turns in the task: each gets half its time
    epochs = max(10, math.ceil(REQUEUE_TRAINING_S / 2 / seconds_per_epoch(tmp_path, *job_overrides)))
    sweep = tmp_path / "sweep"
    proc = subprocess.run(run_py(*job_overrides, "seed=1,2", f"epochs={epochs}", *PACKED, *REQUEUE_LIMITS,
                                 f"hydra.sweep.dir={sweep}"), cwd=tmp_path, env=slurm_env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    for job in jobs_in(sweep):
        summary = read_json(job / files.SUMMARY)
        assert summary["status"] == files.STATUS_COMPLETED and summary["epochs_done"] == epochs
        assert "resuming from the checkpoint after epoch" in (job / "run.log").read_text()


@pytest.mark.parametrize("launcher", [PACKED, SLURM], ids=["slurm_packed", "slurm"])
def test_a_partition_that_does_not_exist_is_one_line(slurm_env, tmp_path, launcher):
    """sbatch's refusal, as submitit raises it, is one line on stderr with exit code 2: no traceback. (Under
    hydra/launcher=slurm, hydra-submitit-launcher's own submission prints sbatch's lines before it.)"""
    sweep = tmp_path / "sweep"
    proc = subprocess.run(run_py(*SWEEP, *launcher, "hydra.launcher.partition=nope", f"hydra.sweep.dir={sweep}"),
                          cwd=tmp_path, env=slurm_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"error: SLURM did not take the jobs: .*partition.*", last, re.IGNORECASE), proc.stderr
    assert "Traceback" not in proc.stderr
    print(last)
    if launcher is PACKED:
        assert proc.stderr.strip() == last
