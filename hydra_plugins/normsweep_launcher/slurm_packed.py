"""hydra/launcher=slurm_packed: a sweep's jobs cut into chunks of jobs_per_task, each chunk one task of a SLURM job
array (submitit stays the engine, through hydra-submitit-launcher), and each task trains its jobs in one process
with hydra/launcher=gpu's own loop (normsweep.launcher.launch: fused groups and streams on a GPU, taking turns on a
CPU). Every job keeps its folder, lock, skip, resume and failure isolation; a task past its time limit is requeued
by submitit and runs its chunk again, so its finished jobs are skipped and its unfinished ones resume from their
checkpoints. Here, not in normsweep/: Hydra instantiates launchers from the hydra_plugins package only. Imports no
torch at Hydra's plugin scan, and defines nothing where hydra-submitit-launcher is not installed."""
import contextlib
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, filter_overrides

try:
    from hydra_plugins.hydra_submitit_launcher import submitit_launcher
    from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf
except ImportError:  # the slurm extra is not installed: hydra/launcher=slurm_packed is then not a choice
    SlurmQueueConf = None

log = logging.getLogger(__name__)

if SlurmQueueConf is not None:

    @dataclass
    class PackedSlurmConf(SlurmQueueConf):
        _target_: str = "hydra_plugins.normsweep_launcher.slurm_packed.PackedSlurmLauncher"
        jobs_per_task: int = 6  # jobs per SLURM array task
        max_parallel: int = 6  # in a task: groups trained at once (hydra/launcher=gpu's key)
        fuse: bool = True  # in a task: jobs of one shape as one fused model
        max_fused: int = 18  # in a task: jobs in one fused group at most

    ConfigStore.instance().store(group="hydra/launcher", name="slurm_packed_base", node=PackedSlurmConf,
                                 provider="normsweep")

    class PackedSlurmLauncher(submitit_launcher.SlurmLauncher):
        def __init__(self, jobs_per_task: int = 6, max_parallel: int = 6, fuse: bool = True, max_fused: int = 18,
                     **params: Any) -> None:
            for key, value in (("jobs_per_task", jobs_per_task), ("max_parallel", max_parallel), ("max_fused", max_fused)):
                if value < 1:
                    raise ValueError(f"hydra.launcher.{key}={value} must be at least 1")
            super().__init__(**params)
            self.jobs_per_task, self.max_parallel, self.fuse, self.max_fused = jobs_per_task, max_parallel, fuse, max_fused

        def __call__(self, chunk: list[list[str]], first_idx: int, singleton_state: dict) -> list[JobReturn]:
            """One array task: its chunk of jobs, through the gpu launcher's loop, in this process."""
            from normsweep import launcher

            Singleton.set_state(singleton_state)
            return launcher.launch(self, chunk, first_idx)

        def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
            """One array task per chunk of jobs_per_task jobs; -> every job's return, in the sweep's order."""
            import submitit
            from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
            from omegaconf import OmegaConf

            # the executor as hydra-submitit-launcher sets it up from the same keys (its launch() submits one task per
            # job and cannot be handed chunks)
            init_keys = {"submitit_folder", "max_num_timeout"}
            executor = submitit.AutoExecutor(cluster=self._EXECUTOR, folder=self.params["submitit_folder"],
                                             **{f"{self._EXECUTOR}_max_num_timeout": self.params["max_num_timeout"]})
            base = set(OmegaConf.structured(BaseQueueConf).keys())
            executor.update_parameters(**{key if key in base else f"{self._EXECUTOR}_{key}": value
                                          for key, value in self.params.items() if key not in init_keys})
            Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
            chunks = [[list(overrides) for overrides in job_overrides[i:i + self.jobs_per_task]]
                      for i in range(0, len(job_overrides), self.jobs_per_task)]
            log.info(f"Packing {len(job_overrides)} jobs into {len(chunks)} SLURM array tasks of up to "
                     f"{self.jobs_per_task} jobs each")
            firsts = [initial_job_idx + n * self.jobs_per_task for n in range(len(chunks))]
            for number, (chunk, first) in enumerate(zip(chunks, firsts)):
                for offset, overrides in enumerate(chunk):
                    log.info(f"\ttask {number}, #{first + offset} : {' '.join(filter_overrides(overrides))}")
            # submitit prints sbatch's complaint (a partition that does not exist, ...) and then raises it: run.py's
            # entry point says it in one line (cli.submission_error), so the print is kept off the console
            with contextlib.redirect_stderr(io.StringIO()):
                tasks = executor.map_array(self, chunks, firsts, [Singleton.get_state()] * len(chunks))
            return [ret for task in tasks for ret in task.results()[0]]
