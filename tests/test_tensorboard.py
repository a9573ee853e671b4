"""logger=tensorboard: every per-epoch metric as a scalar in <job>/tensorboard/<run label>/, read back the way
TensorBoard reads it; exact after a resume; a missing package is one clear line before any training."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

from normsweep import files
from normsweep.config import Config, DataConfig, LoggerConfig, NormConfig, RegConfig, validate
from normsweep.files import read_jsonl
from normsweep.job import run_job

RUN_NAME = "BatchNorm with L1, seed 3"  # the table's row label, and the seed


def config(**overrides) -> Config:
    settings = dict(epochs=2, seed=3, threads=1, device="cpu", logger=LoggerConfig(name="tensorboard"), reg=RegConfig(name="l1", l1=0.001),
                    data=DataConfig(name="fake", train_limit=256, test_limit=100))
    return Config(**{**settings, **overrides})


def run(job_dir: Path, cfg: Config) -> str:
    return run_job(cfg, OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True), job_dir)


def read_board(job_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} as `tensorboard --logdir` would show the run."""
    (run_dir,) = (job_dir / files.TENSORBOARD_DIR).iterdir()
    assert run_dir.name == RUN_NAME
    board = EventAccumulator(str(run_dir))
    board.Reload()
    return {tag: [(event.step, event.value) for event in board.Scalars(tag)] for tag in board.Tags()["scalars"]
            if not tag.startswith("hparams/")}  # the HParams metrics: test_hparams_show_a_sweep


def expected_scalars(job_dir: Path) -> dict[str, list[tuple[int, float]]]:
    rows = read_jsonl(job_dir / files.METRICS)
    return {key: [(row["epoch"], pytest.approx(row[key], rel=1e-6)) for row in rows]  # stored as float32
            for key in rows[0] if key not in files.ROW_FACTS}


def test_every_epoch_metric_is_a_scalar(tmp_path):
    assert run(tmp_path, config()) == files.STATUS_COMPLETED
    scalars = read_board(tmp_path)
    assert set(scalars) == {"train_loss", "train_acc", "test_loss", "test_acc", "lr", "train_seconds", "test_seconds"}
    assert scalars == expected_scalars(tmp_path)


def test_resumed_job_shows_each_epoch_once(tmp_path, killed_at_second_checkpoint):
    assert run(tmp_path, config()) == files.STATUS_FAILED
    # loggers log an epoch after its checkpoint: the epoch that died before its own is not on the board
    assert [step for step, _ in read_board(tmp_path)["test_acc"]] == [1]
    killed_at_second_checkpoint()  # lifted: the rerun resumes from epoch 1's checkpoint
    assert run(tmp_path, config()) == files.STATUS_COMPLETED
    assert len(list((tmp_path / files.TENSORBOARD_DIR / RUN_NAME).iterdir())) == 2  # one event file per writer
    assert read_board(tmp_path) == expected_scalars(tmp_path)  # each epoch once: the rerun rewrote its history


def test_off_by_default_and_bad_values_fail(tmp_path):
    assert Config().logger.name == "none"
    with pytest.raises(ValidationError, match=r"Invalid value 'wandb', expected one of \[none, tensorboard, mlflow\]"):
        OmegaConf.merge(OmegaConf.structured(Config), {"logger": {"name": "wandb"}})


def test_missing_package_fails_before_any_file_is_written(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # Python now finds no such package, as if not installed
    message = "logger=tensorboard needs the tensorboard package: pip install tensorboard, or pip install -e '.[tensorboard]'"
    with pytest.raises(ValueError) as error:  # run.py prints it as one line, "error: ...", and exits 2
        run(tmp_path, config())  # tmp_path: the job folder Hydra made
    assert str(error.value) == message
    assert list(tmp_path.iterdir()) == []  # nothing trained, nothing written
    validate(config(logger=LoggerConfig()))  # only the logger needs it


def read_hparams(run_dir: Path) -> tuple[dict[str, object], dict[str, float]]:
    """One run's settings and metrics as TensorBoard's HParams plugin reads them from the event files."""
    board = EventAccumulator(str(run_dir))
    board.Reload()
    content = board.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    settings = {name: getattr(value, value.WhichOneof("kind")) for name, value in start.hparams.items()}
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    metrics = {info.name.tag: board.Scalars(info.name.tag)[-1].value for info in experiment.metric_infos}
    return settings, metrics


def test_hparams_show_a_sweep_with_its_settings_and_metrics(tmp_path):
    jobs = {"bn-l1": config(), "gn-l2": config(norm=NormConfig(name="gn"), reg=RegConfig(name="l2", l2=0.001)),
            "ln-none-bs32": config(norm=NormConfig(name="ln"), reg=RegConfig(), batch_size=32),
            "bn-l1-s4": config(seed=4)}
    for name, cfg in jobs.items():
        (tmp_path / name).mkdir()  # the job folder, as Hydra makes it
        assert run(tmp_path / name, cfg) == files.STATUS_COMPLETED
    for name, cfg in jobs.items():
        (run_dir,) = (tmp_path / name / files.TENSORBOARD_DIR).iterdir()
        settings, metrics = read_hparams(run_dir)
        # the flattened resolved config minus the runtime keys, as the collector's columns
        assert settings["norm.name"] == cfg.norm.name and settings["reg.name"] == cfg.reg.name
        assert (settings["reg.l1"], settings["reg.l2"]) == (cfg.reg.l1, cfg.reg.l2)
        assert (settings["batch_size"], settings["seed"], settings["epochs"]) == (cfg.batch_size, cfg.seed, 2)
        assert {"optim.max_lr", "optim.momentum", "dropout", "data.name", "data.augment"} <= set(settings)
        assert not {"threads", "device", "data.root", "logger.name"} & set(settings)
        summary = json.loads((tmp_path / name / files.SUMMARY).read_text())
        assert metrics == {f"hparams/{key}": pytest.approx(summary[key], rel=1e-6)
                           for key in ("best_test_acc", "best_test_loss", "final_test_acc")}
