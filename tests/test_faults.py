"""What a careful user does to a sweep, as real processes: two sweeps into one folder, kills, bad files and bad
input. Each ends with a complete table (exit 0), or one line and a non-zero exit, and no result lost or mixed."""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, jobs_in, metrics, run, run_py
from normsweep import files

pytestmark = pytest.mark.slow  # every test here runs run.py in subprocesses

def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.strip()]


def test_two_sweeps_into_one_folder_train_each_job_once(tmp_path):
    grid = ("norm=bn,gn,ln", "reg=none", "epochs=2", "data.train_limit=1500")
    alone = tmp_path / "alone"
    assert run(*grid, f"hydra.sweep.dir={alone}", cwd=tmp_path).returncode == 0

    shared = tmp_path / "shared"
    first = subprocess.Popen(run_py(*grid, f"hydra.sweep.dir={shared}"), cwd=tmp_path, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    time.sleep(2)
    second = subprocess.run(run_py(*grid, f"hydra.sweep.dir={shared}"), cwd=tmp_path, capture_output=True,
                            text=True, timeout=240)
    first_out, first_err = first.communicate(timeout=240)
    assert {first.returncode, second.returncode} <= {0, 1}, first_err + second.stderr
    for job in jobs_in(shared):
        log = (job / "run.log").read_text()
        assert log.count("model: ") == 1, job.name  # trained by one of the two processes only
    assert "is running in pid" in first_err + second.stderr + first_out + second.stdout  # the one skip line
    # the process that ended last wrote the table: the same as one sweep alone
    assert (shared / files.RESULTS_CSV).read_text() == (alone / files.RESULTS_CSV).read_text()
    for job_alone, job_shared in zip(jobs_in(alone), jobs_in(shared)):
        assert metrics(job_alone) == metrics(job_shared)


def test_rerun_cleans_what_a_kill_left_and_matches_an_uninterrupted_run(tmp_path):
    sweep = tmp_path / "sweep"
    grid = ("norm=bn,gn", "reg=none", "epochs=2", "data.train_limit=400", f"hydra.sweep.dir={sweep}")
    proc = subprocess.Popen(run_py(*grid), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 120
    while not list(sweep.glob("*/" + files.CHECKPOINT)) and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # kill -9 mid-sweep: after some checkpoint, before the end
    proc.wait()
    job = jobs_in(sweep)[0]
    (job / ".metrics.jsonl.x1y2.tmp").write_text("half a line")  # as a kill inside write_atomic leaves them
    (sweep / ".results.md.x1y2.tmp").write_text("half a table")
    (sweep / "multirun.yaml").write_text("")
    (job / ".hydra" / "hydra.yaml").write_text("")

    assert run(*grid, cwd=tmp_path).returncode == 0
    assert not list(sweep.rglob("*.tmp"))
    assert (sweep / "multirun.yaml").stat().st_size > 0 and (job / ".hydra" / "hydra.yaml").stat().st_size > 0
    whole = tmp_path / "whole"
    assert run(*grid[:-1], f"hydra.sweep.dir={whole}", cwd=tmp_path).returncode == 0
    for resumed, uninterrupted in zip(jobs_in(sweep), jobs_in(whole)):
        assert metrics(resumed) == metrics(uninterrupted)
    assert (sweep / files.RESULTS_CSV).read_text() == (whole / files.RESULTS_CSV).read_text()


@pytest.mark.parametrize("overrides, message", [
    (("+foo=1",), "unknown key foo"),
    (("+epoch=1",), "unknown key epoch; did you mean epochs?"),
    (("batch_size=1",), "norm=bn needs at least 2 samples in every training batch"),
    (("data.train_limit=1",), "norm=bn needs at least 2 training images"),
])
def test_bad_input_is_one_line_and_leaves_no_folder(tmp_path, overrides, message):
    proc = run(*overrides, "epochs=1", f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)
    assert proc.returncode == 2
    assert error_lines(proc) == [f"error: {error_lines(proc)[0][7:]}"] and message in proc.stderr
    assert not (tmp_path / "sweep").exists()


def test_data_root_that_cannot_hold_data_is_one_line(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    for root, message in ((a_file, "is a file, not a folder"), ("/proc/normsweep-data", "cannot be written")):
        proc = run("data=mnist", f"data.root={root}", "epochs=1", f"hydra.run.dir={tmp_path / 'run'}",
                   cwd=tmp_path, multirun=False)
        assert proc.returncode == 2 and len(error_lines(proc)) == 1 and message in proc.stderr, proc.stderr
        assert not (tmp_path / "run").exists()
    raw = tmp_path / "data" / "MNIST" / "raw"
    (raw / "train-images-idx3-ubyte").mkdir(parents=True)
    proc = run("data=mnist", f"data.root={tmp_path / 'data'}", "epochs=1", f"hydra.run.dir={tmp_path / 'run'}",
               cwd=tmp_path, multirun=False)
    assert proc.returncode == 2 and len(error_lines(proc)) == 1
    assert f"{raw / 'train-images-idx3-ubyte'} is a folder" in proc.stderr


def test_threads_beyond_the_cores_are_capped(tmp_path):
    proc = run("epochs=1", "data.train_limit=64", "threads=999", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path,
               multirun=False)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "run" / files.SUMMARY).read_text())
    assert summary["threads"] == len(os.sched_getaffinity(0))


def test_damaged_job_files_are_one_line_each(tmp_path):
    run_dir = tmp_path / "run"
    base = ("epochs=2", "data.train_limit=128", f"hydra.run.dir={run_dir}")
    assert run(*base, cwd=tmp_path, multirun=False).returncode == 0
    (run_dir / files.SUMMARY).unlink()  # as if killed before the summary: the rerun resumes from the checkpoint

    torch.save({"something": 1}, run_dir / files.CHECKPOINT)  # loadable, but not a checkpoint of this job
    proc = run(*base, cwd=tmp_path, multirun=False)
    assert proc.returncode == 1
    summary = json.loads((run_dir / files.SUMMARY).read_text())
    assert summary["status"] == files.STATUS_FAILED
    assert f"{run_dir / files.CHECKPOINT}: not a checkpoint of this job" in summary["error"]
    assert "delete it" in summary["error"] and "Traceback" not in (run_dir / "run.log").read_text()

    (run_dir / files.SUMMARY).unlink()
    (run_dir / files.CHECKPOINT).write_bytes(b"PK\x03\x04 not a zip")  # unloadable
    proc = run(*base, cwd=tmp_path, multirun=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "unreadable" in json.loads((run_dir / files.SUMMARY).read_text())["error"]

    (run_dir / files.METRICS).unlink()
    (run_dir / files.METRICS).mkdir()
    proc = run(*base, cwd=tmp_path, multirun=False)
    assert proc.returncode == 2 and error_lines(proc) == [
        f"error: {run_dir / files.METRICS} is a folder where normsweep writes a file: move it away and rerun"]


def test_a_job_folder_reproduces_itself_both_ways(tmp_path):
    sweep = tmp_path / "sweep"
    assert run("norm=gn", "reg=l2", "epochs=2", "data.train_limit=256", f"hydra.sweep.dir={sweep}",
               cwd=tmp_path).returncode == 0
    (job,) = jobs_in(sweep)
    expected = metrics(job)
    summary = json.loads((job / files.SUMMARY).read_text())

    # 1. the recorded command, which names this job's own folder: moved away first, so it trains anew there
    sweep.rename(tmp_path / "original")
    recorded = shlex.split(summary["command"])
    assert "norm=gn" in recorded and "reg=l2" in recorded and "-m" in recorded
    proc = subprocess.run([sys.executable, *recorded], cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    assert metrics(jobs_in(sweep)[0]) == expected

    # 2. Hydra's idiom: compose from the job's snapshot, with the schema applied, into a new folder
    snapshot = tmp_path / "original" / job.name / ".hydra"
    proc = subprocess.run([sys.executable, str(REPO / "run.py"), "--config-path", str(snapshot), "--config-name",
                           "config", f"hydra.run.dir={tmp_path / 'again'}"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    assert metrics(tmp_path / "again") == expected
