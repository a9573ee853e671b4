"""logger=mlflow against a real local store (SQLite, no mocks): a run per job under the sweep's run, with settings,
per-epoch metrics, tags and artifacts; a resumed job continues its run; a skipped job logs nothing."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from normsweep import files, tracking
from normsweep.config import Config, DataConfig, LoggerConfig, NormConfig, RegConfig, validate
from normsweep.job import prepare_job, run_job
from normsweep.loggers import settings_of

# the optional extra (make test installs it); found, not imported: its slow import would run in every collection
pytestmark = pytest.mark.skipif(importlib.util.find_spec("mlflow") is None, reason="needs mlflow")


def config(**overrides) -> Config:
    settings = dict(epochs=2, threads=1, device="cpu", logger=LoggerConfig(name="mlflow"),
                    data=DataConfig(name="fake", train_limit=128, test_limit=100))
    return Config(**{**settings, **overrides})


def run(sweep: Path, name: str, cfg: Config) -> str:
    (sweep / name).mkdir(parents=True, exist_ok=True)
    resolved = OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True)
    return run_job(cfg, resolved, sweep / name, "run.py ...", sweep_dir=sweep)


def store(sweep: Path):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking.default_uri(sweep))
    experiment = client.get_experiment_by_name(tracking.EXPERIMENT).experiment_id
    runs = {run.info.run_name: run for run in client.search_runs([experiment])}
    return client, runs


JOBS = {"bn-none": config(), "bn-l2": config(reg=RegConfig(name="l2", l2=0.001)),
        "gn-none": config(norm=NormConfig(name="gn")), "ln-none-bs32": config(norm=NormConfig(name="ln"), batch_size=32)}


@pytest.mark.slow  # MLflow's SQLite store: ~10 s of migrations and writes
def test_a_sweep_is_a_parent_run_with_a_child_run_per_job(tmp_path):
    sweep = tmp_path / "sweep"
    for name, cfg in JOBS.items():
        assert run(sweep, name, cfg) == files.STATUS_COMPLETED
    client, runs = store(sweep)
    assert set(runs) == {*JOBS, "sweep"}
    parent = runs.pop("sweep")
    for name, cfg in JOBS.items():
        child = runs[name]
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.info.status == "FINISHED" and child.data.tags[tracking.STATUS_TAG] == "completed"
        assert "normsweep.git_commit" in child.data.tags
        resolved = yaml.safe_load((sweep / name / files.CONFIG).read_text())
        assert child.data.params == {key: str(value) for key, value in settings_of(resolved).items()}
        rows = files.read_jsonl(sweep / name / files.METRICS)
        for key in ("train_loss", "test_acc", "lr"):
            history = client.get_metric_history(child.info.run_id, key)
            assert [(m.step, m.value) for m in history] == [(r["epoch"], pytest.approx(r[key])) for r in rows]
        artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert {files.CONFIG, files.SUMMARY, files.METRICS} <= artifacts


@pytest.mark.slow
def test_resume_continues_the_same_run_and_a_skipped_job_logs_nothing(tmp_path, killed_at_second_checkpoint):
    sweep = tmp_path / "sweep"
    assert run(sweep, "bn", config()) == files.STATUS_FAILED
    killed_at_second_checkpoint()  # lifted
    assert run(sweep, "bn", config()) == files.STATUS_COMPLETED  # resumed from epoch 1's checkpoint
    client, runs = store(sweep)
    assert set(runs) == {"bn", "sweep"}  # the same run, not a second one
    (job,) = [runs["bn"]]
    assert job.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(job.info.run_id, "test_acc")] == [1, 2]  # each epoch once

    assert run(sweep, "bn", config()) == files.STATUS_COMPLETED  # already completed: skipped
    client, runs_after = store(sweep)
    assert set(runs_after) == set(runs)
    assert runs_after["bn"].info.end_time == job.info.end_time
    assert [m.step for m in client.get_metric_history(job.info.run_id, "test_acc")] == [1, 2]


def test_unreachable_server_and_missing_package_are_one_line(tmp_path, monkeypatch):
    cfg = config(logger=LoggerConfig(name="mlflow", tracking_uri="http://127.0.0.1:9"))  # nothing listens there
    (tmp_path / "job").mkdir()
    with pytest.raises(ValueError, match=r"^logger.tracking_uri=http://127.0.0.1:9 is unreachable \(") as error:
        prepare_job(cfg, {}, tmp_path / "job")
    assert "\n" not in str(error.value)
    assert list((tmp_path / "job").iterdir()) == []  # nothing trained, nothing written
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed
    with pytest.raises(ValueError, match=r"logger=mlflow needs the mlflow package: pip install mlflow"):
        validate(config())
