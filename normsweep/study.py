"""hydra/sweeper=search's loop (the plugin hydra_plugins/normsweep_launcher/study_sweeper.py calls run()): an Optuna
(>= 4) study in the sweep folder's journal file, asked a batch of trials at a time, each batch one launch of the
configured launcher, each trial told its job's objective (a number), pruned or failed. A rerun of the same command
continues the same study to n_trials in all; a trial a kill left running is run again (its job resumes from its
checkpoint) and told under its own number. Jobs report their per-epoch validation accuracy to the study, whose
pruner may stop them: such a job ends with status pruned."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep
from omegaconf import OmegaConf, open_dict

from normsweep import app, cli, files, progress
from normsweep.config import objective_direction
from normsweep.trial import STUDY_NAME, _pruner, _study

log = logging.getLogger(__name__)

TRIAL_OVERRIDE = progress.TRIAL_OVERRIDE  # each trial's job gets {"journal", "trial_id", "pruner", "pruner_lower"}


def _distribution(key: str, value: Any):
    import optuna.distributions as d

    if isinstance(value, IntervalSweep):
        log_scale = "log" in value.tags
        if all(isinstance(v, int) for v in (value.start, value.end)):
            return d.IntDistribution(int(value.start), int(value.end), log=log_scale)
        return d.FloatDistribution(float(value.start), float(value.end), log=log_scale)
    if isinstance(value, ChoiceSweep):
        return d.CategoricalDistribution([c for c in value.list])
    raise ValueError(f"hydra.sweeper.params.{key}={value!r}: use interval(a, b), tag(log, interval(a, b)) or choice(...)")


def search_space(config, params: dict) -> dict:
    """{key: optuna distribution} from the plugin's grammar; a key outside the composed config is one line."""
    parser = OverridesParser.create()
    space = {}
    for key, text in params.items():
        if OmegaConf.select(config, key, default="__missing__") == "__missing__":
            raise ValueError(f"hydra.sweeper.params.{key}: {key} is not a key of the config (python run.py --help "
                             "lists them)")
        value = parser.parse_override(f"{key}={text}").value() if isinstance(text, str) else text
        space[key] = _distribution(key, value)
    if not space:
        raise ValueError("hydra.sweeper.params is empty: name the keys to search, e.g. reg.l1='tag(log, interval(1e-5, 1e-2))'")
    return space


def run(sweeper, arguments: list[str]) -> list:
    """The search, to n_trials trials in its journal. Bad settings: one line and exit 2, before any trial."""
    import optuna

    settings, config = sweeper.settings, sweeper.config
    try:
        if settings["n_trials"] < 1 or settings["n_jobs"] < 1:
            raise ValueError(f"hydra.sweeper.n_trials={settings['n_trials']} and n_jobs={settings['n_jobs']} must be "
                             "at least 1")
        if settings["objective"] not in files.JOB_METRICS:
            raise ValueError(f"hydra.sweeper.objective={settings['objective']}: choose one of "
                             f"{', '.join(files.JOB_METRICS)}")
        # a swept value on the command line (choice(...), interval(...)) is searched too, as with the plugin
        params, fixed, parser = dict(settings["params"] or {}), [], OverridesParser.create()
        for argument in arguments:
            override = parser.parse_override(argument)
            if override.is_sweep_override():
                params[override.get_key_element()] = override.value()  # the parsed sweep itself
            else:
                fixed.append(argument)
        arguments = fixed
        space = search_space(config, params)
        pruner = _pruner(settings["pruner"], settings["pruner_lower"])
    except ValueError as e:
        app.refuse(e)
    objective = settings["objective"]
    direction = settings["direction"] or objective_direction(objective)

    def sampler(done: int):
        # a continued study's sampler is seeded past the trials it has: the same seed would draw its first points
        # again
        seed = None if settings["seed"] is None else settings["seed"] + done
        return (optuna.samplers.RandomSampler(seed=seed) if settings["sampler"] == "random"
                else optuna.samplers.TPESampler(seed=seed))

    sweep_dir = Path(os.path.abspath(str(config.hydra.sweep.dir)))
    journal = sweep_dir / settings["journal"]
    files.check_own_file(journal)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    study = _study(journal, direction, sampler(0), pruner)
    study.sampler = sampler(len(study.trials))
    fingerprint = json.dumps({"space": {k: repr(v) for k, v in space.items()}, "objective": objective,
                              "direction": direction}, sort_keys=True)
    if study.user_attrs.get("search") is None:
        study.set_user_attr("search", fingerprint)
    elif study.user_attrs["search"] != fingerprint:
        app.refuse(ValueError(f"{journal} holds a study of another search ({study.user_attrs['search']}), which is "
                              "never merged: pick another hydra.sweep.dir, or move the journal away"))
    launched: set[int] = set()  # trials this run has started

    def next_trials(k: int) -> list:
        """Up to k trials to run: first those a kill left running (rerun under their numbers), then new ones."""
        stale = [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING and t.number not in launched]
        batch = stale[:k]
        batch += [study.ask(space) for _ in range(min(max(0, settings["n_trials"] - len(study.trials)), k - len(batch)))]
        launched.update(t.number for t in batch)
        return batch

    def job_of(trial) -> list[str]:
        values = (repr(v) if isinstance(v, str) else str(v) for v in (trial.params[k] for k in space))
        return [*arguments, *(f"{k}={cli.hydra_quote(v)}" for k, v in zip(space, values)), f"objective={objective}",
                f"{TRIAL_OVERRIDE}={cli.hydra_quote(json.dumps(_trial_spec(journal, trial._trial_id, settings)))}"]

    def checked(jobs: list[list[str]], planned: int) -> tuple[list[Path], dict]:
        """The jobs checked before they train, their folders, and the facts of the progress lines for `planned` jobs
        (a refilling launch runs every trial of this run, the first batch's facts standing for all)."""
        facts, folders = app.check_sweep(sweeper.hydra_context.config_loader, config, jobs)
        facts = {**facts, "jobs": planned, "epochs": facts["epochs"] * planned // len(jobs)}
        with open_dict(config):
            config.hydra.overrides.hydra = [o for o in config.hydra.overrides.hydra
                                            if not o.startswith(progress.SWEEP_FACTS_OVERRIDE)]
            config.hydra.overrides.hydra.append(f"{progress.SWEEP_FACTS_OVERRIDE}={cli.hydra_quote(json.dumps(facts))}")
        return folders, facts

    refilling = getattr(sweeper.launcher, "launch_refilling", None)
    returns, number = [], 0
    while True:
        planned = sum(t.state == optuna.trial.TrialState.RUNNING for t in study.trials) + max(
            0, settings["n_trials"] - len(study.trials))
        batch = next_trials(settings["n_jobs"])
        if not batch:
            break
        jobs = [job_of(t) for t in batch]
        folders, facts = checked(jobs, planned if refilling else len(jobs))
        number_of = {t._trial_id: t.number for t in batch}

        def more(ended) -> list[list[str]]:
            """A trial ended: tell the study, and start the next in its slot (hydra/launcher=gpu refills)."""
            spec = json.loads(ended.hydra_cfg.hydra.job.env_set[progress.TRIAL_ENV])
            twins.tell(number_of.pop(spec["trial_id"]), ended)
            while trials := next_trials(1):
                trial = trials[0]
                try:  # checked as every batch is; the sweep's facts stay the first launch's
                    folders.extend(app.check_sweep(sweeper.hydra_context.config_loader, config, [job_of(trial)])[1])
                except SystemExit:  # refused, in its one line: a failed trial, while the trials in flight train on
                    study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
                    continue
                number_of[trial._trial_id] = trial.number
                return [job_of(trial)]
            return []

        twins = Twins(study)
        with progress.sweep_bar(folders, facts):
            if refilling:  # every trial of this run in one launch, each slot refilled as its trial ends
                returns.append(refilling(jobs, number, more))
                twins.fail_the_rest()
                break
            results = sweeper.launcher.launch(jobs, initial_job_idx=number)
        number += len(jobs)
        for trial, ret in zip(batch, results):
            twins.tell(trial.number, ret)
        twins.fail_the_rest()
        returns.append(results)
    best = study.best_trial if any(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials) else None
    files.write_atomic(sweep_dir / "optimization_results.yaml", OmegaConf.to_yaml(OmegaConf.create(
        {"name": STUDY_NAME, "trials": len(study.trials), "best_params": best.params if best else {},
         "best_value": best.value if best else None})))
    log.info("study: %d trials in %s; best %s = %s", len(study.trials), journal, objective,
             best.value if best else "none (no trial completed)")
    return returns


def _trial_spec(journal: Path, trial_id: int, settings: dict) -> dict:
    return {"journal": str(journal), "trial_id": trial_id, "pruner": settings["pruner"],
            "pruner_lower": settings["pruner_lower"]}


class Twins:
    """Tells the study each trial's end. Trials of equal values share a job folder: the one whose job was skipped as
    running elsewhere (its twin of this run held the folder's lock) is told its twin's result when that ends, not a
    failure (which a small categorical space would make of most trials)."""

    def __init__(self, study):
        self.study, self.waiting = study, {}  # job folder -> [(trial number, its job's return)]

    def tell(self, number: int, ret) -> None:
        hydra_cfg = getattr(ret, "hydra_cfg", None)
        folder = str(hydra_cfg.hydra.runtime.output_dir) if hydra_cfg is not None else None
        if getattr(ret, "_return_value", None) == files.STATUS_RUNNING and folder:
            self.waiting.setdefault(folder, []).append((number, ret))
            return
        _tell(self.study, number, ret)
        for twin, _ in self.waiting.pop(folder, []):
            _tell(self.study, twin, ret)

    def fail_the_rest(self) -> None:
        """Trials whose twin was no trial of this run (a job running in another process): failed, as before."""
        for twins in self.waiting.values():
            for number, ret in twins:
                _tell(self.study, number, ret)
        self.waiting.clear()


def _tell(study, number: int, ret) -> None:
    import optuna

    value = getattr(ret, "_return_value", None)
    if isinstance(value, float):
        study.tell(number, value)
    elif value == files.STATUS_PRUNED:
        study.tell(number, state=optuna.trial.TrialState.PRUNED)
    else:  # failed, diverged, or no number (an objective the job does not have)
        study.tell(number, state=optuna.trial.TrialState.FAIL)
