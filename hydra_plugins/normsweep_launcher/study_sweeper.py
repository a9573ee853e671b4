"""hydra/sweeper=search: an Optuna (>= 4) search of normsweep's own, replacing hydra-optuna-sweeper (which pins
optuna < 3). The loop is ours (normsweep/study.py, imported in sweep()); this module only registers its config."""
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from hydra.plugins.sweeper import Sweeper


@dataclass
class StudySweeperConf:
    _target_: str = "hydra_plugins.normsweep_launcher.study_sweeper.StudySweeper"
    n_trials: int = 20  # trials in the study, in all: a rerun of the same command continues it to this many
    n_jobs: int = 1  # trials per batch handed to the launcher (hydra/launcher=gpu or joblib train a batch at once)
    objective: str = "best_val_acc"  # what each trial returns: never a number selected on the test set
    direction: Optional[str] = None  # maximize | minimize; null: as the objective implies (a loss is minimized)
    sampler: str = "tpe"  # tpe | random
    seed: Optional[int] = None  # the sampler's seed
    pruner: str = "none"  # none | median (MedianPruner) | threshold (prune below pruner_lower, on val_acc per epoch)
    pruner_lower: float = 0.0  # threshold's bound, in accuracy points
    journal: str = "study.journal"  # in the sweep folder: Optuna's JournalStorage file, which survives kills
    params: Dict[str, str] = field(default_factory=dict)  # key: tag(log, interval(a, b)) | interval(a, b) | choice(...)


ConfigStore.instance().store(group="hydra/sweeper", name="study", node=StudySweeperConf, provider="normsweep")


class StudySweeper(Sweeper):
    def __init__(self, **settings: Any) -> None:
        self.settings = settings
        self.config = self.launcher = self.hydra_context = None

    def setup(self, *, hydra_context, task_function, config) -> None:
        from hydra.core.plugins import Plugins

        self.config, self.hydra_context = config, hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(hydra_context=hydra_context,
                                                                task_function=task_function, config=config)

    def sweep(self, arguments: List[str]) -> Any:
        from normsweep import study  # here, not at Hydra's plugin scan: it loads optuna

        return study.run(self, arguments)
