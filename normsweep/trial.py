"""A search trial's side of hydra/sweeper=search (study.py runs the search): the study in its journal, its pruner,
and the reporter a trial's job tells each epoch's validation accuracy. optuna is imported where it is used."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

STUDY_NAME = "normsweep"


def _pruner(name: str, lower: float):
    import optuna

    pruners = {"none": lambda: optuna.pruners.NopPruner(), "median": lambda: optuna.pruners.MedianPruner(),
               "threshold": lambda: optuna.pruners.ThresholdPruner(lower=lower)}
    if name not in pruners:
        raise ValueError(f"hydra.sweeper.pruner={name}: choose one of {', '.join(pruners)}")
    return pruners[name]()


def _study(journal: Path, direction: str | None, sampler: Any, pruner: Any):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = JournalStorage(JournalFileBackend(str(journal)))
    try:  # load first: create_study(load_if_exists=True) appends a create to the journal even when it loads
        return optuna.load_study(study_name=STUDY_NAME, storage=storage, sampler=sampler, pruner=pruner)
    except KeyError:
        return optuna.create_study(study_name=STUDY_NAME, storage=storage, direction=direction, sampler=sampler,
                                   pruner=pruner)


def reporter(spec: dict) -> Callable[[dict], bool]:
    """For a trial's job: report each epoch's validation accuracy to the study; -> True when its pruner says stop."""
    import optuna

    study = _study(Path(spec["journal"]), None, None, _pruner(spec["pruner"], spec["pruner_lower"]))
    trial = optuna.trial.Trial(study, spec["trial_id"])

    def report(row: dict) -> bool:
        if row.get("val_acc") is None:
            return False
        trial.report(row["val_acc"], row["epoch"])
        return trial.should_prune()

    return report
