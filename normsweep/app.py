"""The Hydra task behind `python run.py`: from the composed config to a job in its folder (threads, data root and
the job's own command line settled here), with bad input stopped by one line and exit code 2."""
from __future__ import annotations

import difflib
import json
import logging
import os
import shlex
import shutil
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from normsweep import files
from normsweep.config import Config
from normsweep.data import DataError
from normsweep.job import JobRun, prepare_job
from normsweep.train import cores_given

RUN_PY = files.CHECKOUT / "run.py"
log = logging.getLogger(__name__)


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
    if threads > cores_given():
        log.warning("threads=%d is more than the %d cores given to this process: using %d", threads, cores_given(),
                    cores_given())
        return cores_given()
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
    """The command line that reruns exactly this job into its own folder, whatever launched it (a sweep's command
    would rerun the whole sweep; a submitit job's process is `python -m submitit.core._submit ...`)."""
    if hydra_cfg.mode == RunMode.MULTIRUN:
        mode, dir_key, folder = ["-m"], "hydra.sweep.dir", hydra_cfg.sweep.dir
    else:
        mode, dir_key, folder = [], "hydra.run.dir", hydra_cfg.runtime.output_dir
    hydra_overrides = [o for o in hydra_cfg.overrides.hydra
                       if not o.startswith(("hydra.mode=", f"{dir_key}="))]  # hydra.mode=MULTIRUN is the -m
    folder_override = f"{dir_key}={Path(hydra.utils.to_absolute_path(str(folder)))}"
    return shlex.join([str(RUN_PY), *mode, *hydra_overrides, folder_override, *hydra_cfg.overrides.task])


def let_job_processes_import_normsweep() -> None:
    """hydra/launcher=slurm and submitit_local run each job in a new Python process (started in this working
    directory, on SLURM maybe on another node) that unpickles main() and so imports normsweep: let it find this
    checkout even when the project is not installed (pip install -e .) and run.py was started from elsewhere."""
    here, paths = str(files.CHECKOUT), os.environ.get("PYTHONPATH", "")
    if here not in paths.split(os.pathsep):
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [here, paths]))


def with_schema(cfg: DictConfig) -> DictConfig:
    """cfg merged into the schema: a key the schema lacks (`+epoch=1`, a typo of epochs) or a value of the wrong
    type raises ValueError naming it. Also types a config composed without the schema, such as a job's snapshot
    (`--config-path <job>/.hydra --config-name config`)."""
    try:
        # from a plain container: a DictConfig that Hydra opened for a `+key` carries that key through a merge
        return OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.to_container(cfg))
    except ConfigKeyError as e:
        key = e.full_key or e.key
        known = [k for k in files.flatten(OmegaConf.to_container(OmegaConf.structured(Config)))]
        closest = difflib.get_close_matches(str(key), known, n=1)
        hint = f"; did you mean {closest[0]}?" if closest else " (python run.py --help lists every key)"
        raise ValueError(f"unknown key {key}{hint}") from None
    except ValidationError as e:
        raise ValueError(" ".join(str(e).split("\n")[0].split())) from None


def prepare(cfg: DictConfig) -> JobRun | str:
    """The job of this Hydra config, ready to train, or its status when it already completed or runs elsewhere.
    Bad settings or data: one line on stderr, no folder left behind, SystemExit(2), which stops a sweep."""
    hydra_cfg = HydraConfig.get()
    job_dir = Path(hydra_cfg.runtime.output_dir)
    try:
        cfg = with_schema(cfg)
        cfg.data.root = hydra.utils.to_absolute_path(cfg.data.root)  # Hydra may run jobs from other folders
        cfg.threads = threads_per_job(cfg.threads, hydra_cfg.launcher)
        sweep_dir = job_dir.parent if hydra_cfg.mode == RunMode.MULTIRUN else job_dir
        resolved = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)  # as config.yaml will hold it
        return prepare_job(OmegaConf.to_object(cfg), resolved, job_dir, job_command(hydra_cfg), sweep_dir)
    except (ValueError, DataError) as e:
        remove_if_empty_result(job_dir, hydra_cfg.mode)
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from e  # SystemExit passes through Hydra's launchers: a bad input stops the sweep


def stop_unless_completed(job_dir: Path, status: str, stop: bool) -> None:
    """A single run, or a sweep with fail_fast=true, exits non-zero when its job did not complete."""
    if status == files.STATUS_COMPLETED or not stop:
        return
    if status == files.STATUS_RUNNING:
        raise SystemExit(f"{job_dir.name} is running in {files.FolderLock(job_dir).holder()}: not run again")
    raise SystemExit(f"{job_dir.name} {status}: see {job_dir / files.SUMMARY} and the log beside it")


def main(cfg: DictConfig) -> float | str:
    """`python run.py ...`: one job, trained to its end in this process. -> its objective (cfg.objective from its
    summary.json) when it completed, for a sweeper that optimizes it; else its status."""
    job = prepare(cfg)
    status = job if isinstance(job, str) else job.run()
    job_dir = Path(HydraConfig.get().runtime.output_dir)
    stop_unless_completed(job_dir, status, HydraConfig.get().mode == RunMode.RUN or cfg.fail_fast)
    return objective_of(job_dir, str(cfg.objective)) if status == files.STATUS_COMPLETED else status


def objective_of(job_dir: Path, objective: str) -> float | str:
    try:
        value = json.loads((job_dir / files.SUMMARY).read_text())[objective]
    except (OSError, ValueError, KeyError):
        return files.STATUS_COMPLETED
    return files.STATUS_COMPLETED if value is None else float(value)
