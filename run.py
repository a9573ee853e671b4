"""Hydra entry point: `python run.py norm=gn reg=l2` for one run, `python run.py -m norm=bn,gn,ln reg=l1,l2` for a sweep."""
from __future__ import annotations

import os
import shlex
import shutil
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from normsweep import files
from normsweep.config import register_configs
from normsweep.data import DataError
from normsweep.job import run_job
from normsweep.train import cores_given

register_configs()


def remove_if_empty_result(job_dir: Path, mode: RunMode) -> None:
    """Bad input leaves no folder that looks like a result: Hydra made the job folder before we could check."""
    if (job_dir / files.CONFIG).exists():
        return  # an earlier run's results: keep them
    shutil.rmtree(job_dir, ignore_errors=True)
    sweep_dir = job_dir.parent
    if mode == RunMode.MULTIRUN and {p.name for p in sweep_dir.iterdir()} <= {"multirun.yaml"}:
        shutil.rmtree(sweep_dir, ignore_errors=True)


def threads_per_job(threads: int, launcher: DictConfig) -> int:
    """With hydra/launcher=joblib, jobs run side by side: split the cores between them so that together they
    use every core once (more threads than cores slows everything down). A submitit job (hydra/launcher=slurm,
    submitit_local) uses the cpus_per_task it asked for, when it asked. 0 leaves torch's default."""
    if threads:
        return threads
    cpus_per_task = launcher.get("cpus_per_task")
    if cpus_per_task:  # SLURM usually pins the job to them already; submitit_local and some clusters do not
        return min(cpus_per_task, cores_given())
    n_jobs = launcher.get("n_jobs")
    if n_jobs is None:
        return threads
    cores = cores_given()
    jobs = n_jobs if n_jobs > 0 else max(1, cores + 1 + n_jobs)  # joblib's meaning of negative n_jobs
    return max(1, cores // jobs)


def job_command(hydra_cfg: DictConfig) -> str:
    """The command line to record with the job's results. A submitit job runs in a process of its own
    (`python -m submitit.core._submit ...`), so it is rebuilt from the job's overrides: run, it runs this job again."""
    if "submitit" not in hydra_cfg.launcher.get("_target_", ""):
        return shlex.join(sys.argv)
    hydra_overrides = [o for o in hydra_cfg.overrides.hydra if not o.startswith("hydra.mode=")]  # that is the -m
    return shlex.join([str(Path(__file__).resolve()), "-m", *hydra_overrides, *hydra_cfg.overrides.task])


def let_job_processes_import_normsweep() -> None:
    """hydra/launcher=slurm and submitit_local run each job in a new Python process (started in this working
    directory, on SLURM maybe on another node) that unpickles main() and so imports normsweep: let it find this
    checkout even when the project is not installed (pip install -e .) and run.py was started from elsewhere."""
    here, paths = str(Path(__file__).resolve().parent), os.environ.get("PYTHONPATH", "")
    if here not in paths.split(os.pathsep):
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [here, paths]))


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> str:
    hydra_cfg = HydraConfig.get()
    job_dir = Path(hydra_cfg.runtime.output_dir)
    cfg.data.root = hydra.utils.to_absolute_path(cfg.data.root)  # Hydra may run jobs from other folders
    cfg.threads = threads_per_job(cfg.threads, hydra_cfg.launcher)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    try:
        status = run_job(OmegaConf.to_object(cfg), resolved, job_dir, job_command(hydra_cfg))
    except (ValueError, DataError) as e:
        remove_if_empty_result(job_dir, hydra_cfg.mode)
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from e  # SystemExit passes through Hydra's launcher: a bad input stops the sweep
    if status != files.STATUS_COMPLETED and (hydra_cfg.mode == RunMode.RUN or cfg.fail_fast):
        raise SystemExit(f"{job_dir.name} {status}: see {job_dir / files.SUMMARY} and the log beside it")
    return status


if __name__ == "__main__":
    let_job_processes_import_normsweep()
    main()
