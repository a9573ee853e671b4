"""hydra/launcher=gpu on the CPU (its eager fallback, the same interleaved loop): jobs with different norms, batch
sizes and epochs trained side by side in one process, each leaving exactly what the basic launcher leaves."""
from __future__ import annotations

import json
import subprocess
import sys
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
