"""hydra/launcher=gpu on the CPU (its eager fallback, the same interleaved loop): jobs with different norms, batch
sizes and epochs trained side by side in one process, each leaving exactly what the basic launcher leaves."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, metrics
from normsweep import files

pytestmark = pytest.mark.slow  # every test here runs run.py in subprocesses

FAST = ("data=fake", "data.train_limit=200", "data.test_limit=100", "device=cpu", "threads=1")
# one preset per job, so that a sweep over them has jobs that differ in norm, batch size, epochs, and one diverges
PRESETS = {
    "job_a": "defaults: [{override /norm: bn}]\nbatch_size: 32\nepochs: 2\n",
    "job_b": "defaults: [{override /norm: gn}]\nbatch_size: 64\nepochs: 1\n",
    "job_c": "defaults: [{override /norm: ln}]\nbatch_size: 48\nepochs: 2\noptim: {max_lr: 1.0e9}\n",  # diverges
    "job_d": "defaults: [{override /norm: ln}, {override /reg: l2}]\nbatch_size: 50\nepochs: 1\n",
}


def write_presets(config_dir: Path) -> None:
    (config_dir / "experiment").mkdir(parents=True)
    for name, body in PRESETS.items():
        (config_dir / "experiment" / f"{name}.yaml").write_text("# @package _global_\n" + body)


def sweep(sweep_dir: Path, config_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(REPO / "run.py"), "-m", f"--config-dir={config_dir}", *overrides, *FAST,
               f"hydra.sweep.dir={sweep_dir}"]
    return subprocess.run(command, cwd=sweep_dir.parent, capture_output=True, text=True, timeout=240)


def jobs_of(sweep_dir: Path) -> dict[str, Path]:
    """preset name -> job folder."""
    found = {}
    for job in sweep_dir.iterdir():
        if job.is_dir():
            overrides = (job / ".hydra" / "overrides.yaml").read_text()
            found[next(name for name in PRESETS if name in overrides)] = job
    return found


def summary(job: Path) -> dict:
    return json.loads((job / files.SUMMARY).read_text())


def test_gpu_launcher_trains_jobs_side_by_side_as_the_basic_launcher_would(tmp_path):
    write_presets(tmp_path / "conf")
    side_by_side, basic = tmp_path / "side_by_side", tmp_path / "basic"
    proc = sweep(side_by_side, tmp_path / "conf", "experiment=job_a,job_b,job_c,job_d", "hydra/launcher=gpu",
                 "hydra.launcher.max_parallel=3")
    assert proc.returncode == 1, proc.stderr  # one job diverged: the sweep says so with its exit code
    assert "no CUDA GPU here" in proc.stdout + proc.stderr  # the one line saying it ran eagerly
    jobs = jobs_of(side_by_side)
    assert set(jobs) == set(PRESETS)
    statuses = {name: summary(job)["status"] for name, job in jobs.items()}
    assert statuses == {"job_a": "completed", "job_b": "completed", "job_c": "diverged", "job_d": "completed"}
    assert [len(metrics(jobs[name])) for name in ("job_a", "job_b", "job_d")] == [2, 1, 1]
    for name, job in jobs.items():
        assert (job / ".hydra" / "config.yaml").exists() and (job / files.CONFIG).exists()
        assert f"experiment={name}" in summary(job)["command"]  # the command that reruns this one job
        log = (job / "run.log").read_text()
        assert f"#{list(PRESETS).index(name)} :" not in log  # the launcher's lines stay out of the jobs' logs
        assert len([line for line in log.splitlines() if "model:" in line]) == 1  # and no other job's lines
    assert (side_by_side / files.RESULTS_MD).exists()

    # the same jobs one after another with the basic launcher: the same numbers, to the last bit
    proc = sweep(basic, tmp_path / "conf", "experiment=job_a,job_b,job_d")
    assert proc.returncode == 0, proc.stderr
    for name, job in jobs_of(basic).items():
        assert metrics(job) == metrics(jobs[name])

    # a rerun skips the completed jobs and runs the diverged one again
    before = {name: (job / files.SUMMARY).stat().st_mtime_ns for name, job in jobs.items()}
    proc = sweep(side_by_side, tmp_path / "conf", "experiment=job_a,job_b,job_c,job_d", "hydra/launcher=gpu",
                 "hydra.launcher.max_parallel=3")
    assert proc.returncode == 1, proc.stderr
    after = {name: (job / files.SUMMARY).stat().st_mtime_ns for name, job in jobs.items()}
    assert {name for name in PRESETS if after[name] != before[name]} == {"job_c"}


def test_gpu_launcher_refuses_a_bad_max_parallel(tmp_path):
    write_presets(tmp_path / "conf")
    (tmp_path / "sweep").mkdir()
    proc = sweep(tmp_path / "sweep", tmp_path / "conf", "experiment=job_b", "hydra/launcher=gpu",
                 "hydra.launcher.max_parallel=0")
    assert proc.returncode != 0
    assert "hydra.launcher.max_parallel=0 must be at least 1" in proc.stderr
    assert not any((tmp_path / "sweep").iterdir())


def fused_sweep(sweep_dir: Path, *overrides: str, **popen) -> list[str]:
    """Four jobs of one shape (BatchNorm, batch 32, 2 epochs) that differ in seed and regularizer: one fused group."""
    return [sys.executable, str(REPO / "run.py"), "-m", "norm=bn", "reg=l1,l2", "seed=1,2", "epochs=2",
            "batch_size=32", *FAST, f"hydra.sweep.dir={sweep_dir}", *overrides]


def test_a_fused_group_trains_what_separate_jobs_train_and_logs_each_job_apart(tmp_path):
    fused, separate = tmp_path / "fused", tmp_path / "separate"
    proc = subprocess.run(fused_sweep(fused, "hydra/launcher=gpu"), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("trained fused with 3 other job(s)") + proc.stderr.count("trained fused with 3") == 4
    proc = subprocess.run(fused_sweep(separate, "hydra/launcher=gpu", "hydra.launcher.fuse=false"),
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    assert "trained fused" not in proc.stdout + proc.stderr
    for job in (p for p in fused.iterdir() if p.is_dir()):
        rows, alone = metrics(job), metrics(separate / job.name)
        assert [r["epoch"] for r in rows] == [1, 2] and summary(job)["status"] == files.STATUS_COMPLETED
        for row, expected in zip(rows, alone):  # float rounding of grouped convs: far below a seed's spread
            assert row["train_loss"] == pytest.approx(expected["train_loss"], rel=2e-2)
        log = (job / "run.log").read_text()
        assert log.count("model: ") == 1 and log.count(": epoch ") == 2  # its own lines, no other job's
        assert all(other.name not in log for other in fused.iterdir() if other.is_dir() and other != job)


def kill_after_first_checkpoint(command: list[str], sweep_dir: Path) -> None:
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 180
    while not list(sweep_dir.glob("*/" + files.CHECKPOINT)) and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.parametrize("first, then", [("hydra/launcher=gpu", "hydra/launcher=basic"),
                                         ("hydra/launcher=basic", "hydra/launcher=gpu")])
def test_a_killed_sweep_resumes_across_launchers_from_one_job_checkpoints(tmp_path, first, then):
    """kill -9 after the first checkpoint, then the same sweep under the other launcher: every job that had a
    checkpoint resumes from it (fused checkpoints are each job's own), and every job completes."""
    sweep_dir = tmp_path / "sweep"
    kill_after_first_checkpoint(fused_sweep(sweep_dir, first), sweep_dir)
    checkpointed = {job.parent.name for job in sweep_dir.glob("*/" + files.CHECKPOINT)}
    assert checkpointed
    proc = subprocess.run(fused_sweep(sweep_dir, then), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    jobs = [p for p in sweep_dir.iterdir() if p.is_dir()]
    assert len(jobs) == 4
    for job in jobs:
        assert summary(job)["status"] == files.STATUS_COMPLETED and [r["epoch"] for r in metrics(job)] == [1, 2]
        if job.name in checkpointed:
            assert "resuming from the checkpoint after epoch" in (job / "run.log").read_text()
