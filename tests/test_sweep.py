"""End to end: real `python run.py -m ...` sweeps on fake data in temp dirs, checked through the files they leave."""
from __future__ import annotations

import csv
import importlib.metadata
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import FAST, PNG_MAGIC, REPO, read_json, snapshot, without_timings
from normsweep import files
from normsweep.files import read_jsonl

pytestmark = pytest.mark.slow  # every test here runs run.py in subprocesses

GRID = ("norm=bn,gn", "reg=none,l2", "seed=1", "epochs=1")
# Folder names: the choices, then the other overrides as Hydra sorts them (device and threads are left out).
GRID_JOBS = {f"{norm}-{reg}-bs64-s1-data.test_limit=100-data.train_limit=256-data=fake-epochs=1": (norm, reg)
             for norm in ("bn", "gn") for reg in ("none", "l2")}
LABELS = {("bn", "none"): "BatchNorm", ("bn", "l2"): "BatchNorm with L2",
          ("gn", "none"): "GroupNorm", ("gn", "l2"): "GroupNorm with L2"}
COLUMNS = ["Regularization", "Best Train Accuracy", "Best Test Accuracy", "Best Test Loss", "Batch Size", "L1 Factor",
           "L2 Factor", "Final Test Accuracy", "Seeds", "Epochs", "Status"]
METRIC_KEYS = {"epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "threads", "train_seconds",
               "test_seconds"}


def sweep_command(sweep_dir: Path, *overrides: str, train_limit: int = 256) -> list[str]:
    return [sys.executable, str(REPO / "run.py"), "-m", *overrides, *FAST, f"data.train_limit={train_limit}",
            f"hydra.sweep.dir={sweep_dir}"]


def run_sweep(sweep_dir: Path, *overrides: str, cwd: Path, train_limit: int = 256) -> subprocess.CompletedProcess:
    return subprocess.run(sweep_command(sweep_dir, *overrides, train_limit=train_limit), cwd=cwd, capture_output=True,
                          text=True, timeout=180)


def run_single(run_dir: Path, *overrides: str, cwd: Path, train_limit: int = 256) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "run.py"), *overrides, *FAST, f"data.train_limit={train_limit}",
                           f"hydra.run.dir={run_dir}"], cwd=cwd, capture_output=True, text=True, timeout=180)


def read_table(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """results.md -> its header and one {column: cell} per row."""
    lines = path.read_text().split("\n\n")[0].splitlines()  # the first table
    split = lambda line: [cell.strip() for cell in line.strip().strip("|").split("|")]
    header = split(lines[0])
    return header, [dict(zip(header, split(line))) for line in lines[2:]]


def log_of(job: Path) -> str:
    return (job / "run.log").read_text()


def copy_sweep(sweep: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(sweep, tmp_path / "sweep"))  # copy2 keeps the modification times


@pytest.fixture(scope="module")
def grid_sweep(tmp_path_factory) -> Path:
    """bn, gn x none, l2 for one epoch: a finished sweep that tests copy before changing it."""
    root = tmp_path_factory.mktemp("grid")
    proc = run_sweep(root / "sweep", *GRID, cwd=root)
    assert proc.returncode == 0, proc.stderr
    return root / "sweep"


def test_multirun_leaves_one_folder_per_job_with_its_resolved_config(grid_sweep):
    assert {p.name for p in grid_sweep.iterdir() if p.is_dir()} == set(GRID_JOBS)
    for name, (norm, reg) in GRID_JOBS.items():
        job = grid_sweep / name
        assert {"config.yaml", "hydra.yaml", "overrides.yaml"} <= {p.name for p in (job / ".hydra").iterdir()}
        assert "${" not in (job / files.CONFIG).read_text()  # resolved: no interpolation left
        config = yaml.safe_load((job / files.CONFIG).read_text())
        assert (config["norm"]["name"], config["reg"]["name"], config["seed"], config["epochs"]) == (norm, reg, 1, 1)
        assert config["reg"]["l2"] == (0.001 if reg == "l2" else 0.0)
        assert config["data"]["name"] == "fake" and config["data"]["train_limit"] == 256
        assert Path(config["data"]["root"]).is_absolute()


def test_each_job_leaves_metrics_checkpoint_grid_and_a_summary_that_agrees(grid_sweep):
    git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    commit = git.stdout.strip() if git.returncode == 0 else None
    for name, (norm, reg) in GRID_JOBS.items():
        job = grid_sweep / name
        metrics = read_jsonl(job / files.METRICS)
        assert [set(row) for row in metrics] == [METRIC_KEYS] and metrics[0]["epoch"] == 1
        assert (job / files.CHECKPOINT).stat().st_size > 0
        assert (job / files.MISCLASSIFIED_PNG).read_bytes().startswith(PNG_MAGIC)
        summary = read_json(job / files.SUMMARY)
        assert summary["status"] == files.STATUS_COMPLETED and summary["error"] is None
        assert summary["epochs_done"] == len(metrics) == 1
        assert {key: summary[key] for key in files.summarize(metrics)} == files.summarize(metrics)
        assert summary["seconds"] == pytest.approx(sum(row["train_seconds"] + row["test_seconds"] for row in metrics))
        assert (summary["params"], summary["device"]) == (7704, "cpu")
        assert summary["python"] == platform.python_version()
        assert summary["torch"].split("+")[0] == importlib.metadata.version("torch").split("+")[0]
        assert summary["git_commit"] == commit
        assert isinstance(summary["git_dirty"], bool) if commit else summary["git_dirty"] is None
        command = summary["command"].split()  # the command that reruns this one job into this folder
        assert "-m" in command and f"norm={norm}" in command and f"reg={reg}" in command
        assert f"hydra.sweep.dir={grid_sweep}" in command


def test_the_table_shows_each_jobs_summary(grid_sweep):
    header, rows = read_table(grid_sweep / files.RESULTS_MD)
    assert header == COLUMNS and len(rows) == 4
    by_label = {row["Regularization"]: row for row in rows}
    with open(grid_sweep / files.RESULTS_CSV, newline="") as f:
        csv_rows = {row["label"]: row for row in csv.DictReader(f)}
    assert set(csv_rows) == set(by_label) == set(LABELS.values())
    assert (grid_sweep / files.CURVES_PNG).read_bytes().startswith(PNG_MAGIC)
    for name, (norm, reg) in GRID_JOBS.items():
        summary = read_json(grid_sweep / name / files.SUMMARY)
        # One seed per row: the table shows the summary's numbers, with no spread (one seed has none to show).
        row = by_label[LABELS[norm, reg]]
        assert row["Best Train Accuracy"] == f"{summary['best_train_acc']:.2f}"
        assert row["Best Test Accuracy"] == f"{summary['best_test_acc']:.2f}"
        assert row["Best Test Loss"] == f"{summary['best_test_loss']:.4f}"
        assert row["Final Test Accuracy"] == f"{summary['final_test_acc']:.2f}"
        assert (row["Batch Size"], row["L1 Factor"], row["L2 Factor"]) == ("64", "0", "0.001" if reg == "l2" else "0")
        assert (row["Seeds"], row["Epochs"], row["Status"]) == ("1", "1", "completed")
        assert float(csv_rows[row["Regularization"]]["best_test_acc_mean"]) == pytest.approx(summary["best_test_acc"])


def test_rerun_skips_completed_jobs_and_refuses_to_replace_another_configs(grid_sweep, tmp_path):
    sweep = copy_sweep(grid_sweep, tmp_path)
    for name in (files.RESULTS_MD, files.RESULTS_CSV, files.CURVES_PNG):
        (sweep / name).unlink()
    # A job folder that holds another config's results (a default changed since it ran, or a config of the user's
    # own run into this folder): never replaced. The sweep stops with one line before any job trains.
    changed = sweep / "gn-l2-bs64-s1-data.test_limit=100-data.train_limit=256-data=fake-epochs=1"
    old_config = yaml.safe_load((changed / files.CONFIG).read_text())
    (changed / files.CONFIG).write_text(yaml.safe_dump({**old_config, "dropout": 0.25}, sort_keys=False))
    # And one whose summary got cut off (a full disk, a partial copy): not known to be done, so it is resumed.
    damaged = sweep / "bn-l2-bs64-s1-data.test_limit=100-data.train_limit=256-data=fake-epochs=1"
    (damaged / files.SUMMARY).write_text("")
    damaged_metrics = read_jsonl(damaged / files.METRICS)
    everything = {job: snapshot(job) for job in map(sweep.joinpath, GRID_JOBS) if job != damaged}

    proc = run_sweep(sweep, *GRID, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "dropout=0.25 there, 0.03 here" in proc.stderr
    assert all(snapshot(job) == before for job, before in everything.items())
    assert (damaged / files.SUMMARY).read_text() == ""  # nothing trained

    # Moved aside, as the line says: the rerun trains that job anew, resumes the damaged one and skips the others.
    changed.rename(tmp_path / "old-dropout-0.25")
    unchanged = [job for job in everything if job != changed]
    # From another working directory than the first run (data.root becomes another absolute path): same jobs.
    proc = run_sweep(sweep, *GRID, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for job in unchanged:
        assert snapshot(job) == everything[job], job.name  # skipped: nothing rewritten
    assert read_json(changed / files.SUMMARY)["epochs_done"] == 1
    assert read_jsonl(damaged / files.METRICS) == damaged_metrics  # resumed after its last epoch: not retrained
    assert read_json(damaged / files.SUMMARY)["status"] == files.STATUS_COMPLETED
    assert yaml.safe_load((tmp_path / "old-dropout-0.25" / files.CONFIG).read_text())["dropout"] == 0.25
    # The table is written again, and the retrained job reproduced its numbers exactly.
    assert (sweep / files.RESULTS_MD).read_text() == (grid_sweep / files.RESULTS_MD).read_text()
    assert (sweep / files.CURVES_PNG).exists() and (sweep / files.RESULTS_CSV).exists()


def test_diverging_job_is_recorded_and_the_sweep_goes_on(tmp_path):
    proc = run_sweep(tmp_path / "sweep", "optim.max_lr=1e9,0.015", "epochs=1", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    jobs = {yaml.safe_load((job / files.CONFIG).read_text())["optim"]["max_lr"]: job
            for job in (tmp_path / "sweep").iterdir() if job.is_dir()}
    assert set(jobs) == {1e9, 0.015}
    diverged = read_json(jobs[1e9] / files.SUMMARY)
    assert diverged["status"] == files.STATUS_DIVERGED
    assert "loss" in diverged["error"]
    assert diverged["epochs_done"] == len(read_jsonl(jobs[1e9] / files.METRICS)) == 0
    assert diverged["best_test_acc"] is None
    assert read_json(jobs[0.015] / files.SUMMARY)["status"] == files.STATUS_COMPLETED
    _, rows = read_table(tmp_path / "sweep" / files.RESULTS_MD)
    best_test_acc = {row["Status"]: row["Best Test Accuracy"] for row in rows}
    assert set(best_test_acc) == {"1 diverged", "completed"}
    assert best_test_acc["1 diverged"] == "n/a" and float(best_test_acc["completed"]) > 0


def test_failed_job_is_recorded_and_fail_fast_stops_the_sweep(grid_sweep, tmp_path):
    sweep = copy_sweep(grid_sweep, tmp_path)
    bn_none, bn_l2, gn_none, gn_l2 = (sweep / name for name in GRID_JOBS)
    # bn-l2 was interrupted and its checkpoint is damaged (a full disk, a partial copy): resuming it raises.
    (bn_l2 / files.SUMMARY).unlink()
    checkpoint = (bn_l2 / files.CHECKPOINT).read_bytes()
    (bn_l2 / files.CHECKPOINT).write_bytes(checkpoint[: len(checkpoint) // 2])
    shutil.rmtree(gn_none)  # the jobs after it have not run yet
    shutil.rmtree(gn_l2)

    proc = run_sweep(sweep, *GRID, "fail_fast=true", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert bn_l2.name in proc.stderr
    failed = read_json(bn_l2 / files.SUMMARY)
    assert failed["status"] == files.STATUS_FAILED
    assert failed["error"].startswith(f"{bn_l2 / files.CHECKPOINT}: unreadable") and failed["error"] in log_of(bn_l2)
    assert "Traceback (most recent call last)" not in log_of(bn_l2)  # the one line says it all
    assert failed["epochs_done"] == len(read_jsonl(bn_l2 / files.METRICS))
    assert read_json(bn_none / files.SUMMARY)["status"] == files.STATUS_COMPLETED
    assert not gn_none.exists() and not gn_l2.exists()  # stopped at the first failure


def test_killed_job_resumes_exactly_where_it_stopped(tmp_path):
    overrides = ("seed=1,2", "epochs=2")
    first, second = (tmp_path / "sweep" / f"bn-none-bs64-s{seed}-data.test_limit=100-data.train_limit=1000-data=fake"
                     "-epochs=2" for seed in (1, 2))
    proc = subprocess.Popen(sweep_command(tmp_path / "sweep", *overrides, train_limit=1000), cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        # The checkpoint is written right after an epoch's metrics: kill -9 as soon as epoch 1 is saved.
        while not (second / files.CHECKPOINT).exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        proc.kill()
        proc.wait()
    assert len(read_jsonl(second / files.METRICS)) == 1 and not (second / files.SUMMARY).exists(), \
        "the job was not killed after its first epoch"
    assert read_json(first / files.SUMMARY)["status"] == files.STATUS_COMPLETED
    # As if killed between logging epoch 2 and saving its checkpoint: that epoch must be run again, and listed once.
    logged = read_jsonl(second / files.METRICS)
    files.write_jsonl(second / files.METRICS, logged + [{**logged[0], "epoch": 2, "test_acc": -1.0}])
    before = snapshot(first)

    uninterrupted = tmp_path / "reference"  # the same job as a plain single run
    reference = run_single(uninterrupted, "seed=2", "epochs=2", cwd=tmp_path, train_limit=1000)
    assert reference.returncode == 0, reference.stderr
    proc = run_sweep(tmp_path / "sweep", *overrides, cwd=tmp_path, train_limit=1000)
    assert proc.returncode == 0, proc.stderr

    assert snapshot(first) == before  # skipped
    resumed = read_jsonl(second / files.METRICS)
    assert [row["epoch"] for row in resumed] == [1, 2]
    assert resumed[0] == logged[0]  # epoch 1 kept as it was
    assert without_timings(resumed) == without_timings(read_jsonl(uninterrupted / files.METRICS))
    summary, expected = read_json(second / files.SUMMARY), read_json(uninterrupted / files.SUMMARY)
    assert summary["status"] == files.STATUS_COMPLETED and summary["epochs_done"] == 2
    for key in ("best_train_acc", "best_test_acc", "best_test_loss", "final_test_acc"):
        assert summary[key] == expected[key], key


def test_single_run_writes_a_finished_run_folder(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_single(run_dir, "epochs=1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    summary = read_json(run_dir / files.SUMMARY)
    assert summary["status"] == files.STATUS_COMPLETED and summary["epochs_done"] == 1
    assert [row["epoch"] for row in read_jsonl(run_dir / files.METRICS)] == [1]
    assert (run_dir / files.CHECKPOINT).exists() and (run_dir / ".hydra" / "config.yaml").exists()


def test_collector_cli_reproduces_the_sweep_table(grid_sweep, tmp_path):
    sweep = copy_sweep(grid_sweep, tmp_path)
    (sweep / files.RESULTS_MD).unlink()
    proc = subprocess.run([sys.executable, "-m", "normsweep.collect", str(sweep)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    table = (grid_sweep / files.RESULTS_MD).read_text()
    assert (sweep / files.RESULTS_MD).read_text() == table
    assert table in proc.stdout
