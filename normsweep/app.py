"""The Hydra task behind `python run.py`: from the composed config to a job in its folder (threads, data root and
the job's own command line settled here), with bad input stopped by one line and exit code 2."""
from __future__ import annotations

import difflib
import json
import logging
import os
import shlex
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import hydra
from hydra.core.config_loader import ConfigLoader
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from normsweep import cli, files, progress
from normsweep.config import Config, config_source_args, validate
from normsweep.files import DataError
from normsweep.runtime import cores_given

if TYPE_CHECKING:
    from normsweep.job import JobRun

# job (and with it torch and the trainer) is imported where a job is checked beyond its values or prepared: a
# refused value, --help and Hydra's own errors cost no torch import (seconds on a busy machine)

RUN_PY = files.CHECKOUT / "run.py"
MULTIRUN_YAML = "multirun.yaml"  # Hydra writes it into the sweep folder
# Taken when this module loads, before Hydra writes a job's files: a file older than this is not this run's to remove
# (a second back: the file system's clock is coarser than time.time()).
STARTED = time.time() - 1.0
log = logging.getLogger(__name__)


def remove_what_hydra_made(hydra_cfg: DictConfig) -> None:
    """Bad input found after Hydra made the job folder: take back Hydra's files (the .hydra snapshot, the job's log,
    a sweep's multirun.yaml) and the folders it made, and only those. files.remove_created keeps everything when a
    folder holds anything else, so a user's folder (hydra.run.dir=.) and an earlier run's results always stay."""
    job_dir = Path(hydra_cfg.runtime.output_dir)
    own = [f"{hydra_cfg.job.name}.log", files.LOCK]  # the lock: prepare_job may have taken it before refusing
    if hydra_cfg.output_subdir is not None:
        own += [f"{hydra_cfg.output_subdir}/{name}" for name in ("config.yaml", "hydra.yaml", "overrides.yaml")]
    def remove(folder: Path, names: list[str]) -> None:
        if str(folder) in NEW_FOLDERS:  # made by Hydra for this run: a folder that was there before always stays
            files.remove_created(folder, names, STARTED)

    if hydra_cfg.mode != RunMode.MULTIRUN:
        remove(job_dir, own)
        return
    sweep_dir = Path(os.path.abspath(hydra.utils.to_absolute_path(str(hydra_cfg.sweep.dir))))
    if sweep_dir == job_dir:  # hydra.sweep.subdir=.
        remove(job_dir, [*own, MULTIRUN_YAML])
        return
    remove(job_dir, own)
    if sweep_dir in job_dir.parents:  # never a folder above the sweep's
        remove(sweep_dir, [MULTIRUN_YAML])


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
    """The command line that reruns exactly this job into its own folder, whatever launched it and from any folder:
    its config source (--config-dir, --config-path, --config-name), its overrides, its folder, and never the
    sweeper (a search trial's command reruns that trial; a sweep's command would rerun the whole sweep; a submitit
    job's process is `python -m submitit.core._submit ...`)."""
    if hydra_cfg.mode == RunMode.MULTIRUN:
        mode, dir_key, folder = ["-m"], "hydra.sweep.dir", hydra_cfg.sweep.dir
    else:
        mode, dir_key, folder = [], "hydra.run.dir", hydra_cfg.runtime.output_dir
    hydra_overrides = [o for o in hydra_cfg.overrides.hydra
                       if not o.startswith(("hydra.mode=", f"{dir_key}=", "hydra/sweeper=", "hydra.sweeper.",
                                            progress.SWEEP_FACTS_OVERRIDE, progress.TRIAL_OVERRIDE))]
    folder_override = f"{dir_key}={cli.hydra_quote(str(Path(hydra.utils.to_absolute_path(str(folder)))))}"
    return shlex.join([str(RUN_PY), *config_source_args(hydra_cfg), *mode, *hydra_overrides, folder_override,
                       *hydra_cfg.overrides.task])


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
    except OmegaConfBaseException as e:  # a wrong type, an interpolation that does not resolve (${nope}), ...
        raise ValueError(" ".join(str(e).split("\n")[0].split())) from None


def settle(cfg: DictConfig, hydra_cfg: DictConfig) -> tuple[Config, dict]:
    """The job's config as it will train: typed by the schema, data.root absolute (Hydra may run jobs from other
    folders), its thread count. -> (the Config, the resolved dict that config.yaml will hold). Raises ValueError."""
    cfg = with_schema(cfg)
    cfg.data.root = str(Path(str(hydra_cfg.runtime.cwd), cfg.data.root))  # an absolute root stays as it is
    cfg.threads = threads_per_job(cfg.threads, hydra_cfg.launcher)
    return OmegaConf.to_object(cfg), OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)


def job_dir_of(hydra_cfg: DictConfig) -> Path:
    """The folder Hydra will make for this job (hydra.runtime.output_dir once it runs)."""
    if hydra_cfg.mode == RunMode.MULTIRUN:
        folder = Path(str(hydra_cfg.sweep.dir)) / str(hydra_cfg.sweep.subdir)
    else:
        folder = Path(str(hydra_cfg.run.dir))
    return Path(os.path.abspath(Path(str(hydra_cfg.runtime.cwd)) / folder))


def check(config: DictConfig) -> tuple[Path, dict]:
    """Everything that refuses a job, for a composed config (Hydra's node included) before Hydra makes its folder:
    the sweeper runs it for every job of a sweep, and CheckFirst for a single run. -> (its folder, its resolved
    config). Raises ValueError or DataError with one line."""
    hydra_cfg = config.hydra
    job_dir = job_dir_of(hydra_cfg)
    task = OmegaConf.masked_copy(config, [k for k in config if k != "hydra"])
    cfg, resolved = settle(task, hydra_cfg)
    validate(cfg)  # before the checks that need torch
    from normsweep.job import check_job

    sweep_dir = sweep_dir_of(hydra_cfg, job_dir)
    check_hydras_paths(hydra_cfg, job_dir, sweep_dir)
    check_job(cfg, resolved, job_dir, sweep_dir)
    NEW_FOLDERS.update(str(folder) for folder in (job_dir, sweep_dir) if not os.path.lexists(folder))
    cli.note_folder(*(("hydra.sweep.dir", sweep_dir) if hydra_cfg.mode == RunMode.MULTIRUN else ("hydra.run.dir", job_dir)))
    return job_dir, resolved


def check_hydras_paths(hydra_cfg: DictConfig, job_dir: Path, sweep_dir: Path) -> None:
    """Hydra writes the job's snapshot and log and the sweep's multirun.yaml through whatever is there (a symlink's
    target, a FIFO it then blocks on), and so would the loggers and the collector: refuse anything there but a
    regular file or folder of one's own. Raises ValueError."""
    for folder in {job_dir, sweep_dir}:
        if folder.is_symlink():
            raise ValueError(f"{folder} is a symlink: normsweep writes only into folders that are what they say; "
                             "point hydra.run.dir / hydra.sweep.dir at the real folder")
    snapshot = job_dir / str(hydra_cfg.output_subdir) if hydra_cfg.output_subdir is not None else None
    if snapshot is not None and os.path.abspath(snapshot) == str(job_dir):
        raise ValueError(f"hydra.output_subdir={hydra_cfg.output_subdir} puts Hydra's config.yaml where the job keeps "
                         "its own: leave it at .hydra (or null for no snapshot)")
    if snapshot is not None and not _normsweeps_snapshot(snapshot / "config.yaml"):
        raise ValueError(f"{snapshot} holds another app's Hydra snapshot, which a run here would overwrite: move it "
                         "away, or pick another hydra.run.dir / hydra.sweep.dir")
    for folder in filter(None, (snapshot, job_dir / files.TENSORBOARD_DIR, sweep_dir / "mlartifacts")):
        if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
            raise ValueError(f"{folder} is not a folder of normsweep's (a symlink or a file): move it away and rerun")
    for lock in (files.COLLECT_LOCK, files.MLFLOW_LOCK):
        files.check_lock_file(sweep_dir / lock)
    for name in (files.RESULTS_MD, files.RESULTS_CSV):  # the end-of-sweep collection writes them: a user's stay
        files.check_collectors_file(sweep_dir / name)  # (a plot that is not the collector's is left undrawn)
    for name in files.SWEEP_FILES:
        files.check_own_file(sweep_dir / name)
    own = [job_dir / f"{hydra_cfg.job.name}.log", sweep_dir / "mlflow.db"]
    if snapshot is not None:
        own += [snapshot / name for name in ("config.yaml", "hydra.yaml", "overrides.yaml")]
    if hydra_cfg.mode == RunMode.MULTIRUN:
        own.append(sweep_dir / MULTIRUN_YAML)
    for path in own:
        files.check_own_file(path)


def _normsweeps_snapshot(path: Path) -> bool:
    """True when there is no snapshot there, or it is a normsweep job's (an earlier run of this folder, killed or
    not): a config with the keys every job has. Anything else (another Hydra app's, a user's file) is not ours."""
    if not path.is_file() or path.is_symlink():
        return not os.path.lexists(path) or path.is_file()  # a link or a FIFO: check_own_file's to refuse
    try:
        import yaml

        with open(path, "rb") as f:
            content = yaml.safe_load(f.read(1 << 20))
    except (OSError, ValueError, yaml.YAMLError):
        return False
    return isinstance(content, dict) and all(key in content for key in ("norm", "reg", "batch_size", "seed"))


# Folders that did not exist when check() saw them (so Hydra made them for this process), noted before Hydra makes
# them: remove_what_hydra_made removes a folder only when it is here. Jobs that other processes prepare (joblib,
# submitit) were not checked by them, so their folders are never removed, only ever left behind.
NEW_FOLDERS: set[str] = set()


def sweep_dir_of(hydra_cfg: DictConfig, job_dir: Path) -> Path:
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return job_dir
    return Path(os.path.abspath(Path(str(hydra_cfg.runtime.cwd)) / str(hydra_cfg.sweep.dir)))


def refuse(error: Exception) -> NoReturn:
    """One line on stderr and exit code 2, which passes through Hydra's launchers and stops a sweep."""
    print(f"error: {' '.join(str(error).splitlines()[0].split()) if str(error) else type(error).__name__}",
          file=sys.stderr)  # the first line: OmegaConf's errors add lines for the key and the object type
    raise SystemExit(2) from error


def prepare(cfg: DictConfig) -> "JobRun | str":
    """The job of this Hydra config, ready to train, or its status when it already completed or runs elsewhere.
    Bad settings or data: one line on stderr, nothing left that this run made, SystemExit(2), which stops a sweep."""
    from normsweep.job import prepare_job

    hydra_cfg = HydraConfig.get()
    job_dir = Path(hydra_cfg.runtime.output_dir)
    try:
        settled, resolved = settle(cfg, hydra_cfg)
        return prepare_job(settled, resolved, job_dir, job_command(hydra_cfg), sweep_dir_of(hydra_cfg, job_dir))
    except (ValueError, DataError) as e:
        remove_what_hydra_made(hydra_cfg)
        refuse(e)


def stop_unless_completed(job_dir: Path, status: str, stop: bool) -> None:
    """A single run, or a sweep with fail_fast=true, exits non-zero when its job did not complete."""
    if status == files.STATUS_COMPLETED or not stop:
        return
    if status == files.STATUS_RUNNING:
        raise SystemExit(f"{job_dir.name} is running in {files.FolderLock(job_dir).holder()}: not run again")
    raise SystemExit(f"{job_dir.name} {status}: see {job_dir / files.SUMMARY} and the log beside it")


def main(cfg: DictConfig) -> float | str:
    """`python run.py ...`: one job, trained to its end in this process. -> what finish makes of its status."""
    job = prepare(cfg)
    hydra_cfg = HydraConfig.get()
    job_dir = Path(hydra_cfg.runtime.output_dir)
    if isinstance(job, str):
        status = job
        progress.report(hydra_cfg, job_dir, progress.SKIPPED[status])
    else:
        progress.report(hydra_cfg, job_dir, "started")
        started = time.time()
        status = job.run()
        progress.report(hydra_cfg, job_dir, f"{status} in {progress.duration(time.time() - started)}")
    return finish(cfg, hydra_cfg, status)


def finish(cfg: DictConfig, hydra_cfg: DictConfig, status: str) -> float | str:
    """A job's return value to Hydra, whoever trained it: its objective (cfg.objective from its summary.json) when it
    completed, for a sweeper that optimizes it; else its status. A single run, or a sweep with fail_fast=true,
    exits non-zero instead when the job did not complete. hydra_cfg: the job's Hydra node."""
    job_dir = Path(hydra_cfg.runtime.output_dir)
    stop_unless_completed(job_dir, status, hydra_cfg.mode == RunMode.RUN or cfg.fail_fast)
    return objective_of(job_dir, str(cfg.objective)) if status == files.STATUS_COMPLETED else status


def task(function):
    """run.py's task function, carrying its two halves for launchers that train jobs themselves (hydra/launcher=gpu):
    prepare (config -> a JobRun to train, or the status of a job that needs none) and finish (status -> the value
    Hydra gets). Called whole, it is main: both halves with the training between."""
    function.prepare, function.finish = prepare, finish
    return function


def objective_of(job_dir: Path, objective: str) -> float | str:
    try:
        value = json.loads((job_dir / files.SUMMARY).read_text())[objective]
    except (OSError, ValueError, KeyError):
        return files.STATUS_COMPLETED
    return files.STATUS_COMPLETED if value is None else float(value)


def check_sweep(config_loader: ConfigLoader, config: DictConfig, jobs: list[list[str]]) -> tuple[dict, list[Path]]:
    """Every job of a sweep checked (check) before the first one trains or any folder is made: a bad combination,
    or two jobs of other configs that would share a folder, stops the sweep with one line naming it.
    -> (the facts its progress lines need: jobs, their epochs, the epochs their folders hold already, the start;
    the jobs' folders)."""
    from normsweep.job import same_job

    folders: dict[Path, tuple[list[str], dict]] = {}
    for overrides in jobs:
        try:
            job_dir, resolved = check(config_loader.load_sweep_config(config, list(overrides)))
            first, first_resolved = folders.setdefault(job_dir, (overrides, resolved))
            if not same_job(first_resolved, resolved):
                raise ValueError(f"it would share the folder {job_dir} with the job {' '.join(first)}, another "
                                 "config: add the setting that tells them apart to hydra.sweep.subdir")
        except (ValueError, DataError) as e:
            refuse(ValueError(f"the job {' '.join(overrides) or '(no overrides)'}: {e}"))
    facts = {"jobs": len(jobs), "epochs": sum(resolved["epochs"] for _, resolved in folders.values()),
             "epochs_before": progress.epochs_in(list(folders)), "started": time.time()}
    return facts, list(folders)
