"""hydra/launcher=gpu: one process trains a sweep's jobs side by side. Jobs of the same shapes (norm, its groups,
batch size, epochs, data, precision) train fused, as one model with a lane per job (up to max_fused lanes), and each
group takes its turn one training step at a time, on its own CUDA stream with its step replayed as a CUDA graph; up
to max_parallel groups train at once. Six processes sharing a GPU time-slice it and never overlap; streams of one
process do. Without CUDA the same loop runs on the CPU. Every job keeps its own folder, config snapshot, log,
checkpoint (in the one-job format: it resumes under any launcher), resume and summary.

For a task other than run.py's (one without its prepare and finish halves) it runs the jobs plainly, one after
another, as Hydra's basic launcher does. The config is registered here, so any Hydra app can pick it."""

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


@dataclass
class GpuLauncherConf:
    _target_: str = "hydra_plugins.normsweep_launcher.gpu_launcher.GpuLauncher"
    max_parallel: int = 6  # groups (fused or single jobs) trained at once; when one ends, the next starts
    fuse: bool = True  # false: every job its own model and step, as before fusion
    max_fused: int = 18  # jobs in one fused group at most


ConfigStore.instance().store(group="hydra/launcher", name="gpu", node=GpuLauncherConf, provider="normsweep")


class GpuLauncher(Launcher):
    def __init__(self, max_parallel: int = 6, fuse: bool = True, max_fused: int = 18) -> None:
        super().__init__()
        for key, value in (("max_parallel", max_parallel), ("max_fused", max_fused)):
            if value < 1:
                raise ValueError(f"hydra.launcher.{key}={value} must be at least 1")
        self.max_parallel, self.fuse, self.max_fused = max_parallel, fuse, max_fused
        self.config: Optional[DictConfig] = None
        self.hydra_context: Optional[HydraContext] = None
        self.task_function: Optional[TaskFunction] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from normsweep import launcher  # here, not at Hydra's plugin scan: it loads torch and the trainer

        return launcher.launch(self, job_overrides, initial_job_idx)

    def launch_refilling(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int,
                         more: Callable[[JobReturn], List[List[str]]]) -> Sequence[JobReturn]:
        """launch, and as each job ends, the jobs more(its return) names start in its place (hydra/sweeper=search:
        a trial's slot is refilled as it finishes or is pruned, not when its whole batch has ended)."""
        from normsweep import launcher

        return launcher.launch(self, job_overrides, initial_job_idx, more)
