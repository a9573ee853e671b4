"""Structured configs: every setting declared once with its default, registered in Hydra's ConfigStore
so that typos and wrong types fail when the config is composed, before any training."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import math
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from normsweep import files
from normsweep.norms import NORM_WIDTHS, NORMS


class Choice(str, Enum):
    """A choice in the schema: Hydra refuses a value not listed ("Invalid value 'xyz', expected one of [...]") when
    the config is composed; the code and the files see the plain string ("bn")."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


CONF_DIR = files.CHECKOUT / "conf"  # run.py's own config folder


def _choice(name: str, values) -> type[Choice]:
    return Choice(name, {value: value for value in values}, module=__name__, qualname=name)


# Each list has one owner: the norms are norms.NORMS (torch-free; model.py maps them to layers and checks it), the
# regularizers the table's row labels, the objectives the metrics a job's summary holds; the rest are listed here.
NormName = _choice("NormName", NORMS)
RegName = _choice("RegName", files.REG_SUFFIXES)
DataName = _choice("DataName", ("mnist", "fashion_mnist", "fake"))  # data.DATASETS, which a test pins to this
Device = _choice("Device", ("auto", "cpu", "cuda"))
Precision = _choice("Precision", ("fp32", "bf16"))
Logger = _choice("Logger", ("none", "tensorboard", "mlflow"))
Objective = _choice("Objective", files.JOB_METRICS)


def objective_direction(objective: str) -> str:
    """What a search does with the objective: losses are minimized, accuracies maximized."""
    return "minimize" if "loss" in str(objective) else "maximize"


@dataclass
class NormConfig:
    name: NormName = NormName.bn  # bn: BatchNorm2d, gn: GroupNorm, ln: GroupNorm(1, C) = layer norm over C,H,W
    groups: int = 4  # gn only: groups per norm layer; must divide every normalized layer's channels (8 and 16)
    # the block after the global average pool normalizes its 1x1 map too (conv -> ReLU -> norm -> dropout), as the
    # reference net does; false: conv -> ReLU there, as for a norm that needs pixels (docs/results/post_pool)
    after_pool: bool = True


@dataclass
class RegConfig:
    name: RegName = RegName.none  # none | l1 | l2 | l1l2: must agree with the factors below, which do the work
    l1: float = 0.0  # L1 factor: l1 * sum|w| over the weights, added to the training loss
    l2: float = 0.0  # L2 factor: SGD weight_decay


@dataclass
class OptimConfig:
    momentum: float = 0.7  # SGD momentum
    max_lr: float = 0.015  # OneCycleLR peak learning rate
    # OneCycleLR's default, as in the reference: momentum cycles 0.95 -> 0.85 -> 0.95 against the learning
    # rate, which overrides `momentum` above; false keeps momentum fixed at `momentum`
    cycle_momentum: bool = True


@dataclass
class LoggerConfig:
    # none | tensorboard: per-epoch scalars and HParams into <job>/tensorboard/ (pip install -e '.[tensorboard]') |
    # mlflow: a run per job under a run per sweep (pip install -e '.[mlflow]')
    name: Logger = Logger.none
    # mlflow only: where runs go; null = an SQLite file in the sweep folder (<sweep>/mlflow.db), or the run folder
    tracking_uri: Optional[str] = None


@dataclass
class DataConfig:
    name: DataName = DataName.mnist  # mnist | fashion_mnist | fake (small synthetic digits for tests and smoke runs)
    # folder holding MNIST/raw/ or FashionMNIST/raw/ (fetched there if absent; Fashion-MNIST is also read from
    # Debian's dataset-fashion-mnist package); relative to where you run
    root: str = "data"
    train_limit: Optional[int] = None  # use only the first N training images (null = all)
    test_limit: Optional[int] = None  # use only the first N test images (null = all)
    augment: bool = True  # rotation/shear/translate/scale + brightness/contrast jitter on training batches
    # training images held out for validation (0: none): the differences table then tests the test accuracy at the
    # epoch of best validation accuracy, a number not selected on the test set. 5000 in conf/data/mnist.yaml and
    # fashion_mnist.yaml, the reference_* presets included (they train on 55,000 images, the published table on
    # 60,000: the price of a headline that is not picked on the test set); 0 for data=fake (too few images)
    val_size: int = 0
    split_seed: int = 0  # draws which images are held out; not the run's seed, so every job of a study shares them


@dataclass
class Config:
    norm: NormConfig = field(default_factory=NormConfig)
    reg: RegConfig = field(default_factory=RegConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    batch_size: int = 64  # training batch size
    epochs: int = 20  # training epochs
    seed: int = 1  # seeds torch's RNGs: weights, shuffling, augmentation, dropout
    dropout: float = 0.03  # dropout after every conv block
    device: Device = Device.auto  # auto (cuda if available) | cpu | cuda
    precision: Precision = Precision.fp32  # fp32 | bf16: autocast the training forward pass to bfloat16 (faster on CPUs with AMX/AVX512-BF16 and on GPUs)
    # on cuda, capture the training step as CUDA graphs (one per batch size of an epoch) and replay them;
    # false keeps the eager step. No effect on CPU.
    cuda_graphs: bool = True
    # torch CPU threads for this job. 1 by default: it never collapses when other work shares the cores (two threads
    # did 13x slower beside CPU-bound processes: benchmarks/load.py), and it gives the same numbers on any machine.
    # 0 = all cores given to the process, or their share per job (hydra/launcher=joblib; SLURM's cpus_per_task)
    threads: int = 1
    # what a job returns to Hydra's sweeper when it completes (hydra/sweeper=optuna optimizes it); a job that
    # failed or diverged returns its status instead, which Optuna records as a failed trial
    objective: Objective = Objective.best_test_acc
    fail_fast: bool = False  # stop a multirun at its first failed job (default: record the failure, go on)
    logger: LoggerConfig = field(default_factory=LoggerConfig)  # group: logger=none|tensorboard|mlflow


def register_configs() -> None:
    """The schema: conf/config.yaml lists `base_config` first in its defaults, so every group file and
    command-line override is merged into these dataclasses and checked for unknown keys and wrong types."""
    ConfigStore.instance().store(name="base_config", node=Config)
    # job folder suffix: "-dropout=0.1" for overrides outside the folder-name keys, "" when there are none
    OmegaConf.register_new_resolver("job_suffix", lambda overrides: f"-{overrides.replace('/', '_')}" if overrides else "",
                                    replace=True)
    # job folder suffix: "-c3f2a1" when the name does not say the whole config (see config_tag), "" otherwise
    OmegaConf.register_new_resolver("config_tag", config_tag, replace=True)
    # a job's folder name, for its log lines (hydra.job_logging)
    OmegaConf.register_new_resolver("basename", lambda path: Path(str(path)).name, replace=True)
    # the linear scaling rule (Goyal et al. 2017): a learning rate tuned at batch 64, scaled to batch_size
    OmegaConf.register_new_resolver("lr_for_batch", lambda lr, batch_size: lr * batch_size / 64, replace=True)
    # hydra/sweeper=search: maximize or minimize as the objective implies
    OmegaConf.register_new_resolver("objective_direction", objective_direction, replace=True)


def config_tag(*, _root_: DictConfig) -> str:
    """'-' and 8 hex digits of the job's config (runtime keys aside; the settings that differ from the schema's
    defaults) when its folder name, made from its choices and its command-line overrides, does not say all of it:
    when a preset (experiment=...) or a config of the user's own (--config-dir, --config-path, --config-name) set
    values. Two such jobs then never share a folder. '' else."""
    if not config_source_args(_root_.hydra) and _root_.hydra.runtime.choices.get("experiment") is None:
        return ""
    task = {key: OmegaConf.to_container(_root_[key], resolve=True, enum_to_str=True) if OmegaConf.is_config(
        _root_[key]) else _root_[key] for key in _root_ if key != "hydra"}  # hydra holds this very interpolation
    # what differs from the schema's defaults, which tells two configs apart as well as the whole config does: a
    # setting added to the schema later, at its default, then leaves the names of earlier jobs as they were, so that
    # an interrupted preset sweep resumes (not retrains) across the upgrade
    defaults = schema_defaults()
    settings = {k: v for k, v in files.flatten(task).items()
                if not files.is_runtime_key(k) and (k not in defaults or defaults[k] != v)}
    return "-" + hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:8]


def schema_defaults() -> dict[str, object]:
    """Every setting's default, flattened ({'norm.after_pool': True, ...}): what a job's config.yaml written before a
    setting existed stands for (an option is added at the default that keeps the old behaviour)."""
    return files.flatten(OmegaConf.to_container(OmegaConf.structured(Config), resolve=True, enum_to_str=True))


def config_source_args(hydra_cfg: DictConfig) -> list[str]:
    """--config-path / --config-dir / --config-name of a job's config when they are not run.py's own (conf/config.yaml
    of this checkout); [] when they are."""
    args = []
    for source in hydra_cfg.runtime.config_sources:
        if source.schema != "file":
            continue
        path = Path(str(source.path)).resolve()
        if source.provider == "main" and path != CONF_DIR:
            args += ["--config-path", str(path)]
        elif source.provider == "command-line":
            args += ["--config-dir", str(path)]
    if hydra_cfg.job.config_name != "config":
        args += ["--config-name", str(hydra_cfg.job.config_name)]
    return args


def validate(cfg: Config) -> None:
    """Range checks the schema cannot express; raises ValueError with one line naming the key and the valid range."""
    checks = [
        (cfg.batch_size > 0, f"batch_size={cfg.batch_size} must be a positive integer"),
        (cfg.epochs > 0, f"epochs={cfg.epochs} must be a positive integer"),
        (cfg.reg.l1 >= 0, f"reg.l1={cfg.reg.l1} must be >= 0"),
        (cfg.reg.l2 >= 0, f"reg.l2={cfg.reg.l2} must be >= 0"),
        (0 <= cfg.dropout < 1, f"dropout={cfg.dropout} must be in [0, 1)"),
        (math.isfinite(cfg.optim.max_lr) and cfg.optim.max_lr > 0, f"optim.max_lr={cfg.optim.max_lr} must be a "
         "finite number > 0"),
        (math.isfinite(cfg.optim.momentum) and cfg.optim.momentum >= 0,
         f"optim.momentum={cfg.optim.momentum} must be a finite number >= 0"),
        (math.isfinite(cfg.reg.l1) and math.isfinite(cfg.reg.l2), "reg.l1 and reg.l2 must be finite numbers"),
        # torch.manual_seed takes [-2**63, 2**64); a range every RNG library takes, so a seed means the same everywhere
        (0 <= cfg.seed < 2**32, f"seed={cfg.seed} must be in [0, 2**32)"),
        # checked here, not at the first epoch's end: a sweep must not train for nothing
        (cfg.logger.name != "tensorboard" or importlib.util.find_spec("tensorboard") is not None,
         "logger=tensorboard needs the tensorboard package: pip install tensorboard, or pip install -e '.[tensorboard]'"),
        (cfg.logger.name != "mlflow" or importlib.util.find_spec("mlflow") is not None,
         "logger=mlflow needs the mlflow package: pip install mlflow, or pip install -e '.[mlflow]'"),
        (cfg.threads >= 0, f"threads={cfg.threads} must be >= 0 (0 = all cores)"),
        (cfg.data.train_limit is None or cfg.data.train_limit > 0, "data.train_limit must be null or a positive integer"),
        (cfg.data.test_limit is None or cfg.data.test_limit > 0, "data.test_limit must be null or a positive integer"),
        (cfg.data.val_size >= 0, f"data.val_size={cfg.data.val_size} must be >= 0 (0 = no validation split)"),
        (0 <= cfg.data.split_seed < 2**32, f"data.split_seed={cfg.data.split_seed} must be in [0, 2**32)"),
    ]
    norm = NORMS[str(cfg.norm.name)]
    if norm.min_batch > 1:  # e.g. BatchNorm cannot normalize a batch of one sample
        checks += [(cfg.batch_size >= norm.min_batch, f"batch_size={cfg.batch_size}: norm={cfg.norm.name} needs at "
                    f"least {norm.min_batch} samples in every training batch"),
                   (cfg.data.train_limit is None or cfg.data.train_limit >= norm.min_batch,
                    f"data.train_limit={cfg.data.train_limit}: norm={cfg.norm.name} needs at least {norm.min_batch} "
                    "training images")]
    if norm.grouped:
        widths = " and ".join(map(str, NORM_WIDTHS))
        divisors = [g for g in range(1, min(NORM_WIDTHS) + 1) if all(w % g == 0 for w in NORM_WIDTHS)]
        checks.append((cfg.norm.groups > 0 and all(w % cfg.norm.groups == 0 for w in NORM_WIDTHS),
                       f"norm.groups={cfg.norm.groups} must divide every normalized layer's channel count ({widths}): "
                       f"use {', '.join(map(str, divisors))}"))
    implied = reg_name(cfg.reg.l1, cfg.reg.l2)
    checks.append((cfg.reg.name == implied, f"reg.name={cfg.reg.name} contradicts reg.l1={cfg.reg.l1}, "
                   f"reg.l2={cfg.reg.l2}, which make it {implied}: choose reg={implied}, or set the factors"))
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def reg_name(l1: float, l2: float) -> str:
    """The regularizer the factors amount to: none, l1, l2 or l1l2."""
    return {(False, False): "none", (True, False): "l1", (False, True): "l2", (True, True): "l1l2"}[(l1 > 0, l2 > 0)]
