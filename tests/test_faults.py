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
from normsweep.cli import hydra_quote

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
    (job / f".metrics.jsonl.x1y2z3w4{files.TEMP_SUFFIX}").write_text("half a line")  # as a kill inside write_atomic leaves them
    (sweep / f".results.md.x1y2z3w4{files.TEMP_SUFFIX}").write_text("half a table")
    (sweep / "multirun.yaml").write_text("")
    (job / ".hydra" / "hydra.yaml").write_text("")

    assert run(*grid, cwd=tmp_path).returncode == 0
    assert not list(sweep.rglob("*" + files.TEMP_SUFFIX))
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


# Nothing the user has is ever deleted or silently replaced (each case as a user would meet it).

def tree(folder) -> dict[str, bytes]:
    """Every file under folder with its content, hidden ones included: equal trees mean nothing was touched."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("multirun, overrides", [
    (False, ("epochs=0", "hydra.run.dir=.")),  # Hydra's idiom for "here": the user's working directory
    (False, ("+epoch=1", "hydra.run.dir=.")),
    (False, ("seed=-1", "hydra.run.dir=.")),
    (False, ("optim.max_lr=inf", "hydra.run.dir=.")),
    (False, ("experiment=no_such_preset", "hydra.run.dir=.")),
    (True, ("epochs=1,0", "hydra.sweep.dir=.")),  # the bad combination comes second: none trains
    (True, ("epochs=0", "hydra.sweep.dir=.", "hydra.sweep.subdir=.")),
    (True, ("epochs=1", "batch_size=64,1", "hydra.sweep.dir=sweep")),  # a folder of the user's beside its notes
    (True, ("epochs=1", "hydra.sweep.dir=/proc/normsweep-sweep")),  # a folder that cannot be made
    (False, ("epochs=1", "hydra.run.dir=/proc/normsweep-run")),
    (False, ("dropout=${nope}", "hydra.run.dir=.")),  # OmegaConf's error: three lines of its own
    (False, ("logger=mlflow", "logger.tracking_uri=garbage://x", "hydra.run.dir=.")),
])
def test_refused_input_leaves_the_users_folder_exactly_as_it_was(tmp_path, multirun, overrides):
    (tmp_path / "notes.txt").write_text("my notes")
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "draft.md").write_text("a draft")
    before = tree(tmp_path)
    proc = run(*overrides, "data.train_limit=64", cwd=tmp_path, multirun=multirun)
    assert proc.returncode == 2, proc.stderr
    assert len(error_lines(proc)) == 1 and error_lines(proc)[0].startswith("error: "), proc.stderr
    assert tree(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "sweep"]


def test_refused_after_hydra_made_the_folder_removes_only_hydras_files(tmp_path):
    """A data root found unusable only when the job starts (it cannot be written to fetch MNIST into): Hydra made
    the job's folder and .hydra/ by then. Into a new folder: all of it goes. Into the user's folder: only what the
    run wrote could go, so nothing of theirs does."""
    bad_root = ("data=mnist", "data.root=/proc/normsweep-data")
    proc = run(*bad_root, f"hydra.run.dir={tmp_path / 'new'}", cwd=tmp_path, multirun=False)
    assert proc.returncode == 2 and len(error_lines(proc)) == 1, proc.stderr
    assert not (tmp_path / "new").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("my notes")
    proc = run(*bad_root, f"hydra.run.dir={tmp_path / 'mine'}", cwd=tmp_path, multirun=False)
    assert proc.returncode == 2 and len(error_lines(proc)) == 1, proc.stderr
    assert (tmp_path / "mine" / "notes.txt").read_text() == "my notes"


def test_a_folder_holding_another_configs_results_is_never_replaced(tmp_path):
    run_dir = tmp_path / "run"
    assert run("epochs=1", "data.train_limit=64", f"hydra.run.dir={run_dir}", cwd=tmp_path,
               multirun=False).returncode == 0
    before = tree(run_dir)
    proc = run("epochs=1", "data.train_limit=64", "dropout=0.2", f"hydra.run.dir={run_dir}", cwd=tmp_path,
               multirun=False)
    assert proc.returncode == 2 and len(error_lines(proc)) == 1, proc.stderr
    assert "dropout=0.03 there, 0.2 here" in proc.stderr and "move that folder aside" in proc.stderr
    assert tree(run_dir) == before


PRESETS = {"a": "dropout: 0.2", "b": "dropout: 0.1"}


def user_config_dir(tmp_path):
    """A config folder of the user's own: two presets that differ only in dropout, and a primary config `fast`."""
    (tmp_path / "mine" / "experiment").mkdir(parents=True)
    for name, line in PRESETS.items():
        (tmp_path / "mine" / "experiment" / f"{name}.yaml").write_text(f"# @package _global_\n{line}\n")
    (tmp_path / "mine" / "fast.yaml").write_text("defaults:\n  - config\n  - _self_\n\ndropout: 0.25\n")
    return tmp_path / "mine"


@pytest.mark.parametrize("launcher", ["basic", "gpu"])
def test_presets_that_differ_outside_the_folder_name_get_a_folder_and_a_row_each(tmp_path, launcher):
    sweep = tmp_path / "sweep"
    proc = run_with_config(["--config-dir", str(user_config_dir(tmp_path))], "experiment=a,b", "epochs=1",
                           "data.train_limit=64", f"hydra/launcher={launcher}", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    jobs = jobs_in(sweep)
    assert len(jobs) == 2
    assert sorted(json.loads((job / files.SUMMARY).read_text())["status"] for job in jobs) == ["completed"] * 2
    assert {yaml_value(job, "dropout") for job in jobs} == {0.2, 0.1}
    rows = [line for line in (sweep / files.RESULTS_MD).read_text().split("\n\n")[0].splitlines()[2:]]
    assert len(rows) == 2


def run_with_config(config_args: list[str], *overrides: str, cwd) -> subprocess.CompletedProcess:
    """`python run.py <config_args> -m <FAST> <overrides>`: Hydra's options go before the overrides."""
    command = run_py(*overrides)
    return subprocess.run([*command[:2], *config_args, *command[2:]], cwd=cwd, capture_output=True, text=True,
                          timeout=240)


def yaml_value(job, key):
    import yaml

    return yaml.safe_load((job / files.CONFIG).read_text())[key]


def test_the_recorded_command_reruns_exactly_that_job_from_anywhere(tmp_path):
    """A job from a config of the user's own (--config-dir, --config-name) into a sweep folder whose name holds
    characters that Hydra's grammar and the shell treat specially: its recorded command, run from another folder,
    finds the completed job and skips it, and the results stay as they were."""
    sweep = tmp_path / "odd, name=$x 'q'"
    proc = run_with_config(["--config-dir", str(user_config_dir(tmp_path)), "--config-name", "fast"], "epochs=1",
                           "data.train_limit=64", f"hydra.sweep.dir={hydra_quote(str(sweep))}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (job,) = jobs_in(sweep)
    assert yaml_value(job, "dropout") == 0.25
    before = tree(job)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    command = json.loads((job / files.SUMMARY).read_text())["command"]
    proc = subprocess.run(f"{shlex.quote(sys.executable)} {command}", shell=True, cwd=elsewhere,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    assert "already completed with the same config" in proc.stdout + proc.stderr
    assert jobs_in(sweep) == [job] and not list(elsewhere.iterdir())
    results = lambda files_: {k: v for k, v in files_.items() if k.split("/")[0] not in (".hydra", "run.log", ".lock")}
    assert results(tree(job)) == results(before)  # Hydra's snapshot, the log and the lock's holder are rewritten


@pytest.mark.parametrize("lock_name", [files.LOCK, files.COLLECT_LOCK])
def test_a_lock_planted_as_a_symlink_never_writes_its_target(tmp_path, lock_name):
    victim = tmp_path / "bashrc"
    victim.write_text("export PATH=mine\n")
    sweep = tmp_path / "sweep"
    job = sweep / "bn-none-bs64-s1-data.test_limit=100-data.train_limit=64-data=fake-epochs=1"
    job.mkdir(parents=True)
    where = job if lock_name == files.LOCK else sweep
    (where / lock_name).symlink_to(victim)
    proc = run("epochs=1", "data.train_limit=64", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert victim.read_text() == "export PATH=mine\n"
    assert proc.returncode != 0 and "symlink" in proc.stderr, proc.stderr
    if lock_name == files.LOCK:
        assert proc.returncode == 2 and len(error_lines(proc)) == 1


@pytest.mark.parametrize("overrides, message", [
    (("norm=bm",), "error: norm=bm is not a choice; choose one of bn, gn, ln"),
    (("experiment=typo",), "error: experiment=typo is not a choice; choose one of batch_size_study, reference_bn"),
    (("batch_size=abc",), "error: Error merging override batch_size=abc: Value 'abc' of type 'str' could not be "
                          "converted to Integer"),
    (("epochs=[1",), "error: no viable alternative at input '[1'"),
])
def test_hydras_own_composition_errors_are_one_line_with_exit_2(tmp_path, overrides, message):
    for multirun in (False, True):
        proc = run(*overrides, "hydra.run.dir=run", "hydra.sweep.dir=sweep", cwd=tmp_path, multirun=multirun)
        assert proc.returncode == 2 and len(error_lines(proc)) == 1 and error_lines(proc)[0].startswith(message), \
            proc.stderr
        assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("sig, sweep_dir", [
    (signal.SIGINT, None), (signal.SIGTERM, None),
    # a time to the microsecond: resolved once for the whole sweep, or the checks and the resume line would name a
    # folder of their own (so it was, whenever the default's second ticked between them)
    (signal.SIGTERM, "hydra.sweep.dir=outputs/sweeps/${now:%H-%M-%S-%f}")], ids=["SIGINT", "SIGTERM", "now-in-us"])
def test_an_interrupt_ends_with_the_command_that_resumes(tmp_path, sig, sweep_dir):
    proc = subprocess.Popen(run_py("norm=bn,gn", "epochs=2", "data.train_limit=400", *filter(None, [sweep_dir])),
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(tmp_path.glob("outputs/sweeps/*/*/" + files.METRICS)) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    lines = error_lines(subprocess.CompletedProcess([], 130, "", err))
    assert lines[-1].startswith("interrupted: rerun ") and lines[-1].endswith(" to resume") and "Traceback" not in err
    (sweep,) = tmp_path.glob("outputs/sweeps/*")
    command = lines[-1].removeprefix("interrupted: rerun ").removesuffix(" to resume")
    assert f"hydra.sweep.dir={sweep}" in command
    again = subprocess.run(command, shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert again.returncode == 0, again.stderr
    assert sorted(json.loads((job / files.SUMMARY).read_text())["status"] for job in jobs_in(sweep)) == [
        "completed"] * 2
    assert list(tmp_path.glob("outputs/sweeps/*")) == [sweep]  # resumed there, not in a new folder


def plant(folder, name: str, kind: str, victim) -> None:
    """Something not normsweep's where it (or Hydra for it) writes: a file of the user's, a symlink to their file or
    folder, a FIFO."""
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "file":
        path.write_text("my: own file\n")
    elif kind == "link":
        path.symlink_to(victim)
    elif kind == "fifo":
        os.mkfifo(path)


@pytest.mark.parametrize("name, kind", [
    ("config.yaml", "file"), ("summary.json", "file"), (".lock", "file"), (".lock", "link"),
    ("run.log", "link"), ("run.log", "fifo"), (".hydra", "link"), (".hydra/config.yaml", "link"),
    ("multirun.yaml", "link"), ("multirun.yaml", "fifo"), (".collect.lock", "file"), ("mlflow.db", "link"),
    ("results.md", "link"), ("metrics.jsonl", "fifo"), ("tensorboard", "link"),
])
def test_what_is_not_normsweeps_where_it_writes_is_refused_and_kept(tmp_path, name, kind):
    """Into the user's own folder (hydra.run.dir=., or a sweep with hydra.sweep.subdir=.): one line, exit 2, before
    Hydra writes anything, and every file there and every file a link points to exactly as it was."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "config.yaml").write_text("the victim's\n")
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("my notes")
    plant(work, name, kind, victim if name in (".hydra", "tensorboard") else victim / "config.yaml")  # folder or file
    before = tree(tmp_path)
    where = ("hydra.sweep.dir=.", "hydra.sweep.subdir=.") if name == "multirun.yaml" else ("hydra.run.dir=.",)
    proc = run("epochs=1", "data.train_limit=64", *where, cwd=work, multirun=name == "multirun.yaml", timeout=60)
    assert proc.returncode == 2 and len(error_lines(proc)) == 1, proc.stderr
    assert tree(tmp_path) == before


def test_a_users_temp_files_and_empty_folders_stay(tmp_path):
    """Only normsweep's own temp files (.<its file>.<random>.tmp) are cleaned up; a folder the user made stays even
    when the run is refused after Hydra wrote into it."""
    (tmp_path / "job").mkdir()
    (tmp_path / "job" / ".notes.tmp").write_text("mine")
    assert run("epochs=1", "data.train_limit=64", "hydra.run.dir=job", cwd=tmp_path, multirun=False).returncode == 0
    assert (tmp_path / "job" / ".notes.tmp").read_text() == "mine"
    (tmp_path / "empty").mkdir()
    proc = run("data=mnist", "data.root=/proc/normsweep-data", "hydra.run.dir=empty", cwd=tmp_path, multirun=False)
    assert proc.returncode == 2 and (tmp_path / "empty").is_dir()


def test_a_users_results_md_in_the_sweep_folder_stops_the_sweep_before_it_trains(tmp_path):
    """The end-of-sweep collection would write results.md there: a file of the user's by that name is found before
    the first job, and stays."""
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / files.RESULTS_MD).write_text("# my notes on this study\n")
    proc = run("norm=bn,gn", "epochs=1", "data.train_limit=64", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert proc.returncode == 2 and len(error_lines(proc)) == 1, proc.stderr
    assert "not a file the collector wrote" in proc.stderr
    assert sorted(p.name for p in sweep.iterdir()) == [files.RESULTS_MD]
    assert (sweep / files.RESULTS_MD).read_text() == "# my notes on this study\n"


def test_hydra_output_subdir_dot_is_refused_before_it_overwrites_the_jobs_config(tmp_path):
    """hydra.output_subdir=. would put Hydra's unresolved config.yaml over the job's resolved one."""
    job = tmp_path / "job"
    assert run("epochs=1", "data.train_limit=64", f"hydra.run.dir={job}", cwd=tmp_path, multirun=False).returncode == 0
    before = tree(job)
    proc = run("epochs=1", "data.train_limit=64", f"hydra.run.dir={job}", "hydra.output_subdir=.", cwd=tmp_path,
               multirun=False)
    assert proc.returncode == 2 and len(error_lines(proc)) == 1 and "hydra.output_subdir" in proc.stderr
    assert tree(job) == before


def test_a_users_look_alike_temp_files_hard_links_and_foreign_snapshots_stay(tmp_path):
    """Files only named like normsweep's temp files stay through a run and a skipped rerun; a hard link where Hydra
    writes its snapshot, and another app's .hydra snapshot, are refused before anything is written."""
    job = tmp_path / "job"
    job.mkdir()
    for name in (".metrics.jsonl.backup.tmp", ".summary.json.v1.tmp", ".checkpoint.pt.abcdefgh.tmp"):
        (job / name).write_text("mine")
    for _ in range(2):
        assert run("epochs=1", "data.train_limit=64", f"hydra.run.dir={job}", cwd=tmp_path,
                   multirun=False).returncode == 0
    assert all((job / name).read_text() == "mine" for name in (".metrics.jsonl.backup.tmp", ".summary.json.v1.tmp",
                                                              ".checkpoint.pt.abcdefgh.tmp"))
    outside = tmp_path / "outside.txt"
    outside.write_text("the victim's\n")
    linked = tmp_path / "linked"
    (linked / ".hydra").mkdir(parents=True)
    os.link(outside, linked / ".hydra" / "overrides.yaml")
    foreign = tmp_path / "foreign"
    (foreign / ".hydra").mkdir(parents=True)
    (foreign / ".hydra" / "config.yaml").write_text("lr: 0.1\nmodel: resnet\n")
    for folder in (linked, foreign):
        before = tree(tmp_path)
        proc = run("epochs=1", "data.train_limit=64", f"hydra.run.dir={folder}", cwd=tmp_path, multirun=False)
        assert proc.returncode == 2 and len(error_lines(proc)) == 1, proc.stderr
        assert tree(tmp_path) == before
    assert outside.read_text() == "the victim's\n"
