"""hydra/launcher=slurm against a real one-node SLURM cluster started here (tests/slurm_cluster.py): a sweep
completes, a job past its time limit is requeued and resumes from its checkpoint, a rerun skips completed jobs.
Skipped where slurmctld, slurmd or munged is not installed."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from normsweep import files

sys.path.insert(0, str(Path(__file__).parent))  # tests/ is no package: import the helper beside this file
import slurm_cluster  # noqa: E402

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
# One core and 1 GB per job: fits any machine; with 2 cores the two jobs of the sweep run side by side.
FAST = ("data=fake", "data.test_limit=100", "device=cpu", "hydra/launcher=slurm", "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.mem_gb=1")
SWEEP = ("norm=bn,gn", "reg=none", "epochs=1", "data.train_limit=256")
# The job gets a 1-minute limit and SIGUSR2 20 s before it (Slurm may send it up to a minute early): submitit
# then requeues it, and it resumes from its checkpoint. 60 epochs of 2000 images take ~50 s on one core of a
# 2020s CPU, more than one allotment, so the job cannot finish before its first signal.
REQUEUE_EPOCHS = 60
REQUEUE = ("norm=bn", "reg=none", f"epochs={REQUEUE_EPOCHS}", "data.train_limit=2000", "hydra.launcher.timeout_min=1",
           "hydra.launcher.signal_delay_s=20", "hydra.launcher.max_num_timeout=4")


@pytest.fixture(scope="module")
def slurm_env(tmp_path_factory) -> dict[str, str]:
    """The cluster, up for this module's tests; the environment for clients (SLURM_CONF) to run sweeps with."""
    reason = slurm_cluster.why_not_available()
    if reason:
        pytest.skip(reason)
    with slurm_cluster.slurm_cluster(tmp_path_factory.mktemp("cluster")) as env:
        yield env


def run_sweep(sweep: Path, overrides: tuple[str, ...], env: dict[str, str], timeout: float) -> tuple[int, float, str]:
    """`python run.py -m ...` into sweep, submitted to the cluster; -> exit code, seconds taken, stderr."""
    command = [sys.executable, str(REPO / "run.py"), "-m", *overrides, *FAST, f"hydra.sweep.dir={sweep}"]
    started = time.monotonic()
    proc = subprocess.run(command, cwd=sweep.parent, env=env, capture_output=True, text=True, timeout=timeout)
    return proc.returncode, time.monotonic() - started, proc.stderr


def job_dirs(sweep: Path) -> list[Path]:
    return sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))  # not .submitit


def summary(job: Path) -> dict:
    return json.loads((job / files.SUMMARY).read_text())


@pytest.fixture(scope="module")
def slurm_sweep(slurm_env, tmp_path_factory) -> Path:
    """bn, gn for one epoch, each a task of a SLURM job array: a finished sweep that the tests below read."""
    sweep = tmp_path_factory.mktemp("slurm") / "sweep"
    code, seconds, stderr = run_sweep(sweep, SWEEP, slurm_env, timeout=300)
    print(f"slurm sweep of 2 jobs: {seconds:.0f} s")
    assert code == 0, stderr
    return sweep


def test_sweep_completes_on_slurm(slurm_sweep):
    jobs = job_dirs(slurm_sweep)
    assert [job.name[:2] for job in jobs] == ["bn", "gn"]
    for job in jobs:
        assert summary(job)["status"] == files.STATUS_COMPLETED and summary(job)["epochs_done"] == 1
        assert summary(job)["threads"] == 1  # the cpus_per_task it asked for
        assert not files.is_locked(job)
    assert any((slurm_sweep / ".submitit").iterdir())  # it did go through submitit/sbatch
    assert (slurm_sweep / files.RESULTS_MD).exists()


def test_rerun_skips_completed_jobs(slurm_sweep, slurm_env):
    before = {job: (job / files.SUMMARY).stat().st_mtime_ns for job in job_dirs(slurm_sweep)}
    (slurm_sweep / files.RESULTS_MD).unlink()
    code, seconds, stderr = run_sweep(slurm_sweep, SWEEP, slurm_env, timeout=300)
    print(f"slurm rerun of 2 completed jobs: {seconds:.0f} s")
    assert code == 0, stderr
    assert {job: (job / files.SUMMARY).stat().st_mtime_ns for job in job_dirs(slurm_sweep)} == before
    assert (slurm_sweep / files.RESULTS_MD).exists()  # the table is written again


def test_job_past_its_time_limit_is_requeued_and_resumes(slurm_env, tmp_path):
    sweep = tmp_path / "sweep"
    code, seconds, stderr = run_sweep(sweep, REQUEUE, slurm_env, timeout=480)
    print(f"requeued job of {REQUEUE_EPOCHS} epochs: {seconds:.0f} s")
    assert code == 0, stderr
    [job] = job_dirs(sweep)
    result = summary(job)
    assert result["status"] == files.STATUS_COMPLETED and result["epochs_done"] == REQUEUE_EPOCHS
    metrics = [json.loads(line) for line in (job / files.METRICS).read_text().splitlines()]
    assert [row["epoch"] for row in metrics] == list(range(1, REQUEUE_EPOCHS + 1))  # each epoch once
    # The last process trained only the epochs after its checkpoint: less time than all epochs together took.
    assert result["wall_seconds_this_invocation"] < result["seconds"]
    resumed = [int(n) for n in re.findall(rf"resuming from the checkpoint after epoch (\d+) of {REQUEUE_EPOCHS}",
                                          (job / "run.log").read_text())]
    assert resumed and all(0 < n < REQUEUE_EPOCHS for n in resumed), "never resumed: the job was not requeued"
    assert not files.is_locked(job)  # the killed processes' flock went with them; the last one released its own
