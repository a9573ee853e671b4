"""Config composition for every choice, and bad settings failing with one clear line before any training."""
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from normsweep import data, files, model
from normsweep.config import Config, DataName, NormName, RegName, register_configs, validate

ROOT = Path(__file__).resolve().parent.parent
register_configs()


def make(*overrides: str) -> Config:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return OmegaConf.to_object(compose(config_name="config", overrides=list(overrides)))


@pytest.mark.parametrize("norm", [n.value for n in NormName])
@pytest.mark.parametrize("reg", [r.value for r in RegName])
def test_every_norm_and_reg_composes(norm, reg):
    cfg = make(f"norm={norm}", f"reg={reg}")
    validate(cfg)
    assert (cfg.norm.name, cfg.reg.name) == (norm, reg)
    expected = {"none": (0, 0), "l1": (0.001, 0), "l2": (0, 0.001), "l1l2": (0.001, 0.002)}[reg]
    assert (cfg.reg.l1, cfg.reg.l2) == expected


def test_defaults_match_the_reference():
    cfg = make()
    assert (cfg.batch_size, cfg.epochs, cfg.seed, cfg.dropout) == (64, 20, 1, 0.03)
    assert (cfg.optim.momentum, cfg.optim.max_lr) == (0.7, 0.015)
    assert (cfg.data.name, cfg.data.root, cfg.data.augment, cfg.device) == ("mnist", "data", True, "auto")
    assert make("data=fake").data.name == "fake"


@pytest.mark.parametrize("override", ["batch_sise=3", "norm.group=2", "batch_size=abc", "data.augment=maybe",
                                      "norm.name=xx", "device=tpu", "precision=fp8", "logger=wandb", "reg.name=l3"])
def test_typos_wrong_types_and_unknown_choices_fail_at_composition(override):
    with pytest.raises(ConfigCompositionException):
        make(override)


def test_each_list_of_names_has_one_owner():
    """The choices are derived from their owners; where a list is repeated across files, this pins them together."""
    assert [n.value for n in NormName] == list(model.NORM_LAYERS) and set(model.NORM_LAYERS) == set(files.NORM_NAMES)
    assert [r.value for r in RegName] == list(files.REG_SUFFIXES)
    assert {d.value for d in DataName} == set(data.DATASETS)
    assert tuple(files.summarize([])) == files.JOB_METRICS  # the objectives and the table's values derive from it
    assert {p.stem for p in (ROOT / "conf" / "norm").glob("*.yaml")} == set(model.NORM_LAYERS)
    assert {p.stem for p in (ROOT / "conf" / "reg").glob("*.yaml")} == set(files.REG_SUFFIXES)
    # Hydra keeps the runtime keys out of folder names; the same keys are ignored when deciding "same job"
    hydra_conf = yaml.safe_load((ROOT / "conf" / "config.yaml").read_text())["hydra"]
    exclude = hydra_conf["job"]["config"]["override_dirname"]["exclude_keys"]
    in_folder_name = ["norm", "reg", "batch_size", "seed", "experiment"]
    assert set(files.RUNTIME_KEYS) <= set(exclude)
    assert all(files.is_runtime_key(key) for key in exclude if key not in in_folder_name)


@pytest.mark.parametrize("override, message", [
    ("batch_size=0", "batch_size=0 must be a positive integer"),
    ("epochs=-1", "epochs=-1 must be a positive integer"),
    ("reg.l1=-0.1", "reg.l1=-0.1 must be >= 0"),
    ("reg.l2=-1", "reg.l2=-1.0 must be >= 0"),
    ("dropout=1.0", "dropout=1.0 must be in [0, 1)"),
    ("dropout=-0.1", "dropout=-0.1 must be in [0, 1)"),
    ("norm=gn norm.groups=3", "norm.groups=3 must divide every normalized layer's channel count (8 and 16): "
                               "use 1, 2, 4, 8"),
    ("reg=none reg.l2=0.001", "reg.name=none contradicts reg.l1=0.0, reg.l2=0.001, which make it l2"),
    ("reg=l1l2 reg.l1=0", "reg.name=l1l2 contradicts reg.l1=0.0, reg.l2=0.002, which make it l2"),
    ("norm=bn batch_size=1", "batch_size=1: norm=bn needs at least 2 samples in every training batch"),
])
def test_bad_values_fail_validation(override, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        validate(make(*override.split()))


def run_cli(tmp_path, *args):
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args, f"hydra.run.dir={tmp_path}/run",
                           f"hydra.sweep.dir={tmp_path}/sweep"], capture_output=True, text=True, cwd=tmp_path, timeout=120)


@pytest.mark.parametrize("args, expected", [
    (["batch_size=0", "data=fake"], "batch_size=0 must be a positive integer"),
    (["-m", "norm=bn", "dropout=1.5", "data=fake"], "dropout=1.5 must be in [0, 1)"),
    (["norm=gn", "norm.groups=3", "data=fake"], "norm.groups=3 must divide"),
    (["norm=xyz", "data=fake"], "error: norm=xyz is not a choice; choose one of bn, gn, ln"),
])
@pytest.mark.slow
def test_cli_bad_input_exits_nonzero_with_one_line_and_no_result_folder(tmp_path, args, expected):
    proc = run_cli(tmp_path, *args)
    assert proc.returncode != 0
    assert expected in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "sweep").exists()


@pytest.mark.slow
def test_cli_corrupt_data_root_fails_before_training(tmp_path):
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (raw / name).write_bytes(b"\x00\x00\x08\x03truncated")
    proc = run_cli(tmp_path, f"data.root={tmp_path}/data")
    assert proc.returncode != 0
    assert "train-images-idx3-ubyte" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


def test_a_setting_at_its_default_leaves_a_presets_folder_name_as_it_was():
    """A preset's folder name ends in a hash of the settings that differ from the schema's defaults: an option the
    schema gains later, at its default (as norm.after_pool was), renames no earlier job's folder, so an interrupted
    preset sweep resumes across the upgrade; a setting that differs still changes it."""
    import re

    from normsweep.config import config_tag

    def root(*overrides: str):
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            return compose(config_name="config", overrides=["experiment=reference_bn_l1", *overrides],
                           return_hydra_config=True)

    preset = root()
    tag = config_tag(_root_=preset)
    assert re.fullmatch(r"-[0-9a-f]{8}", tag)
    older = OmegaConf.create(OmegaConf.to_container(preset))  # untyped, so that a key can go
    del older.norm["after_pool"]  # the config as a schema without that option composed it
    assert config_tag(_root_=older) == tag
    assert config_tag(_root_=root("norm.after_pool=false")) != tag
    assert config_tag(_root_=root("dropout=0.2")) != tag
