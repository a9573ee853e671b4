"""Sweeps through hydra-submitit-launcher: hydra/launcher=slurm composes with its documented defaults, and a real
submitit_local sweep (each job in its own process) leaves complete run folders, the table, and resumes."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import REPO, snapshot
from normsweep import files
from normsweep.files import read_jsonl
from normsweep.app import threads_per_job
from normsweep.config import register_configs
from normsweep.runtime import cores_given

JOBS = [f"{norm}-none-bs64-s1-data.test_limit=100-data.train_limit=256-data=fake-epochs=1" for norm in ("bn", "gn")]
register_configs()


def slurm_launcher(*overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["hydra/launcher=slurm", *overrides], return_hydra_config=True)
    return cfg.hydra.launcher


def test_slurm_launcher_defaults_and_overrides():
    launcher = slurm_launcher()
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.partition, launcher.timeout_min, launcher.cpus_per_task, launcher.gpus_per_node, launcher.mem_gb,
            launcher.array_parallelism, launcher.max_num_timeout) == (None, 60, 1, None, 8, 32, 2)
    launcher = slurm_launcher("hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=1",
                              "hydra.launcher.timeout_min=120")
    assert (launcher.partition, launcher.gpus_per_node, launcher.timeout_min) == ("gpu", 1, 120)


def test_threads_per_job_follows_the_launcher():
    cores = cores_given()
    launcher = lambda **keys: OmegaConf.create(keys)
    assert threads_per_job(0, launcher()) == 0  # basic launcher: torch's default, every core
    assert threads_per_job(0, launcher(cpus_per_task=1)) == 1  # submitit: what the job asked for
    assert threads_per_job(0, launcher(cpus_per_task=cores + 7)) == cores  # never more than it was given
    assert threads_per_job(0, launcher(cpus_per_task=None)) == 0
    assert threads_per_job(1, launcher(cpus_per_task=cores)) == 1  # an explicit threads=N wins
    assert threads_per_job(cores + 5, launcher()) == cores  # but never more threads than cores
    assert threads_per_job(0, launcher(n_jobs=cores)) == 1  # joblib: the cores split between its jobs


@pytest.mark.slow
def test_submitit_local_sweep_completes_and_resumes(tmp_path):
    sweep = tmp_path / "sweep"
    # No threads=N: the job's cpus_per_task decides. A relative data.root, and a working directory that is neither
    # the repository nor the sweep folder: the jobs run in other processes and must still resolve both.
    command = [sys.executable, str(REPO / "run.py"), "-m", "norm=bn,gn", "reg=none", "epochs=1", "data=fake",
               "data.train_limit=256", "data.test_limit=100", "device=cpu", "data.root=somewhere",
               "hydra/launcher=submitit_local", "hydra.launcher.cpus_per_task=1", f"hydra.sweep.dir={sweep}"]
    proc = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr

    assert {p.name for p in sweep.iterdir() if p.is_dir() and not p.name.startswith(".")} == set(JOBS)
    _, _, *rows = (sweep / files.RESULTS_MD).read_text().split("\n\n")[0].splitlines()  # the first table
    assert [row.split("|")[1].strip() for row in rows] == ["BatchNorm", "GroupNorm"]
    for name in JOBS:
        job = sweep / name
        summary = json.loads((job / files.SUMMARY).read_text())
        assert summary["status"] == files.STATUS_COMPLETED and summary["epochs_done"] == 1
        assert summary["threads"] == 1
        assert "submitit" not in summary["command"].split()[0]  # the job's own command, not submitit's
        assert f"norm={name[:2]}" in summary["command"] and "hydra/launcher=submitit_local" in summary["command"]
        assert yaml.safe_load((job / files.CONFIG).read_text())["data"]["root"] == str(tmp_path / "somewhere")
        assert (job / files.CHECKPOINT).exists() and (job / files.MISCLASSIFIED_PNG).exists()
        assert [row["epoch"] for row in read_jsonl(job / files.METRICS)] == [1]
    before = {name: snapshot(sweep / name) for name in JOBS}
    (sweep / files.RESULTS_MD).unlink()

    proc = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    for name in JOBS:
        assert snapshot(sweep / name) == before[name]
    assert (sweep / files.RESULTS_MD).exists()
