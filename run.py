"""Hydra entry point: `python run.py norm=gn reg=l2` for one run, `python run.py -m norm=bn,gn,ln reg=l1,l2` for a sweep."""
from __future__ import annotations

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
    use every core once (more threads than cores slows everything down). 0 leaves torch's default."""
    n_jobs = launcher.get("n_jobs")
    if threads or n_jobs is None:
        return threads
    cores = cores_given()
    jobs = n_jobs if n_jobs > 0 else max(1, cores + 1 + n_jobs)  # joblib's meaning of negative n_jobs
    return max(1, cores // jobs)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> str:
    hydra_cfg = HydraConfig.get()
    job_dir = Path(hydra_cfg.runtime.output_dir)
    cfg.data.root = hydra.utils.to_absolute_path(cfg.data.root)  # Hydra may run jobs from other folders
    cfg.threads = threads_per_job(cfg.threads, hydra_cfg.launcher)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    try:
        status = run_job(OmegaConf.to_object(cfg), resolved, job_dir)
    except (ValueError, DataError) as e:
        remove_if_empty_result(job_dir, hydra_cfg.mode)
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from e  # SystemExit passes through Hydra's launcher: a bad input stops the sweep
    if status != files.STATUS_COMPLETED and (hydra_cfg.mode == RunMode.RUN or cfg.fail_fast):
        raise SystemExit(f"{job_dir.name} {status}: see {job_dir / files.SUMMARY} and the log beside it")
    return status


if __name__ == "__main__":
    main()
