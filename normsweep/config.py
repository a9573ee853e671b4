"""Structured configs: every setting declared once with its default, registered in Hydra's ConfigStore
so that typos and wrong types fail when the config is composed, before any training."""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Optional

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

NORMS = ("bn", "gn", "ln")
REGS = ("none", "l1", "l2", "l1l2")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "bf16")
LOGGERS = ("none", "tensorboard")


@dataclass
class NormConfig:
    name: str = "bn"  # bn: BatchNorm2d, gn: GroupNorm, ln: GroupNorm(1, C) = layer norm over C,H,W
    groups: int = 4  # gn only: groups per norm layer; must divide every layer's channel count (8 and 16)


@dataclass
class RegConfig:
    name: str = "none"  # none | l1 | l2 | l1l2 (the label only; the factors below do the work)
    l1: float = 0.0  # L1 factor: l1 * sum|w| over the weights, added to the training loss
    l2: float = 0.0  # L2 factor: SGD weight_decay


@dataclass
class OptimConfig:
    lr: float = 0.015  # SGD learning rate (OneCycleLR overrides it per step; kept for the record)
    momentum: float = 0.7  # SGD momentum
    max_lr: float = 0.015  # OneCycleLR peak learning rate
    # OneCycleLR's default, as in the reference: momentum cycles 0.95 -> 0.85 -> 0.95 against the learning
    # rate, which overrides `momentum` above; false keeps momentum fixed at `momentum`
    cycle_momentum: bool = True


@dataclass
class DataConfig:
    name: str = "mnist"  # mnist | fashion_mnist | fake (small synthetic digits for tests and smoke runs)
    # folder holding MNIST/raw/ or FashionMNIST/raw/ (fetched there if absent; Fashion-MNIST is also read from
    # Debian's dataset-fashion-mnist package); relative to where you run
    root: str = "data"
    train_limit: Optional[int] = None  # use only the first N training images (null = all)
    test_limit: Optional[int] = None  # use only the first N test images (null = all)
    augment: bool = True  # rotation/shear/translate/scale + brightness/contrast jitter on training batches


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
    device: str = "auto"  # auto (cuda if available) | cpu | cuda
    precision: str = "fp32"  # fp32 | bf16: autocast the training forward pass to bfloat16 (faster on CPUs with AMX/AVX512-BF16 and on GPUs)
    # on cuda, capture the training step as CUDA graphs (one per batch size of an epoch) and replay them;
    # false keeps the eager step. No effect on CPU.
    cuda_graphs: bool = True
    threads: int = 0  # torch CPU threads for this job; 0 = all cores given to the process
    fail_fast: bool = False  # stop a multirun at its first failed job (default: record the failure, go on)
    # none | tensorboard: also write every per-epoch metric as TensorBoard scalars into <job>/tensorboard/
    # (needs the tensorboard package: pip install -e '.[tensorboard]')
    logger: str = "none"


def register_configs() -> None:
    """The schema: conf/config.yaml lists `base_config` first in its defaults, so every group file and
    command-line override is merged into these dataclasses and checked for unknown keys and wrong types."""
    ConfigStore.instance().store(name="base_config", node=Config)
    # job folder suffix: "-dropout=0.1" for overrides outside the folder-name keys, "" when there are none
    OmegaConf.register_new_resolver("job_suffix", lambda overrides: f"-{overrides.replace('/', '_')}" if overrides else "",
                                    replace=True)
    # the linear scaling rule (Goyal et al. 2017): a learning rate tuned at batch 64, scaled to batch_size
    OmegaConf.register_new_resolver("lr_for_batch", lambda lr, batch_size: lr * batch_size / 64, replace=True)


def validate(cfg: Config) -> None:
    """Range checks the schema cannot express; raises ValueError with one line naming the key and the valid range."""
    checks = [
        (cfg.norm.name in NORMS, f"norm.name={cfg.norm.name!r} is not one of {', '.join(NORMS)}"),
        (cfg.reg.name in REGS, f"reg.name={cfg.reg.name!r} is not one of {', '.join(REGS)}"),
        (cfg.batch_size > 0, f"batch_size={cfg.batch_size} must be a positive integer"),
        (cfg.epochs > 0, f"epochs={cfg.epochs} must be a positive integer"),
        (cfg.reg.l1 >= 0, f"reg.l1={cfg.reg.l1} must be >= 0"),
        (cfg.reg.l2 >= 0, f"reg.l2={cfg.reg.l2} must be >= 0"),
        (0 <= cfg.dropout < 1, f"dropout={cfg.dropout} must be in [0, 1)"),
        (cfg.optim.lr >= 0, f"optim.lr={cfg.optim.lr} must be >= 0"),
        (cfg.optim.max_lr > 0, f"optim.max_lr={cfg.optim.max_lr} must be > 0"),
        (cfg.optim.momentum >= 0, f"optim.momentum={cfg.optim.momentum} must be >= 0"),
        (cfg.device in DEVICES, f"device={cfg.device!r} is not one of {', '.join(DEVICES)}"),
        (cfg.precision in PRECISIONS, f"precision={cfg.precision!r} is not one of {', '.join(PRECISIONS)}"),
        (cfg.logger in LOGGERS, f"logger={cfg.logger!r} is not one of {', '.join(LOGGERS)}"),
        # checked here, not at the first epoch's end: a sweep must not train for nothing
        (cfg.logger != "tensorboard" or importlib.util.find_spec("tensorboard") is not None,
         "logger=tensorboard needs the tensorboard package: pip install tensorboard, or pip install -e '.[tensorboard]'"),
        (cfg.threads >= 0, f"threads={cfg.threads} must be >= 0 (0 = all cores)"),
        (cfg.data.train_limit is None or cfg.data.train_limit > 0, "data.train_limit must be null or a positive integer"),
        (cfg.data.test_limit is None or cfg.data.test_limit > 0, "data.test_limit must be null or a positive integer"),
    ]
    if cfg.norm.name == "bn":  # BatchNorm cannot normalize a batch of one sample
        checks += [(cfg.batch_size >= 2, f"batch_size={cfg.batch_size}: norm=bn needs at least 2 samples in every "
                    "training batch"),
                   (cfg.data.train_limit is None or cfg.data.train_limit >= 2,
                    f"data.train_limit={cfg.data.train_limit}: norm=bn needs at least 2 training images")]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    if cfg.norm.name == "gn":
        for channels in (8, 16):
            if cfg.norm.groups <= 0 or channels % cfg.norm.groups:
                raise ValueError(f"norm.groups={cfg.norm.groups} must divide every layer's channel count (8 and 16): use 1, 2, 4 or 8")
