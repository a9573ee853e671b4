"""A sweep's progress, as a newcomer reads it: a line when each job starts and ends, `job k/N`, with the sweep's
share done and the time left, under every launcher that runs here."""
from __future__ import annotations

import re

import pytest

from conftest import run
from normsweep.progress import duration


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["basic", "gpu", "joblib"])
def test_a_sweep_says_job_k_of_n_with_the_time_left(tmp_path, launcher):
    proc = run("norm=bn,gn,ln", "epochs=2", "data.train_limit=128", f"hydra/launcher={launcher}",
               f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout + proc.stderr
    for k, norm in enumerate(("bn", "gn", "ln"), start=1):
        assert re.search(rf"job {k}/3 {norm}-none-bs64-s1\S*: started; sweep \d+ % after \w+", out), out
        assert re.search(rf"job {k}/3 {norm}-none-bs64-s1\S*: completed in \w+; sweep \d+ % after \w+", out), out
    assert re.search(r"job \d/3 \S+: completed in \w+; sweep (33|67) % after \w+, about \w+ left", out), out
    assert re.search(r"job \d/3 \S+: completed in \w+; sweep 100 % after \w+$", out, re.MULTILINE), out
    rerun = run("norm=bn,gn,ln", "epochs=2", "data.train_limit=128", f"hydra/launcher={launcher}",
                f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)
    assert len(re.findall(r"job \d/3 \S+: skipped, completed already; sweep 100 %", rerun.stdout + rerun.stderr)) == 3


def test_durations_read_as_a_clock():
    assert [duration(s) for s in (0.4, 45, 192, 3720)] == ["0s", "45s", "3m12s", "1h02m"]


@pytest.mark.slow  # a sweep in a subprocess
def test_every_line_of_a_jobs_log_names_the_job(tmp_path):
    """Under joblib two jobs share one console: each line, Hydra's format included, carries the job's folder."""
    sweep = tmp_path / "sweep"
    proc = run("norm=bn,gn", "epochs=1", "data.train_limit=64", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
               f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for job in (p for p in sweep.iterdir() if p.is_dir()):
        lines = [line for line in (job / "run.log").read_text().splitlines() if line.startswith("[")]
        assert lines and all(f"][{job.name}][" in line for line in lines)


def _stderr_on_a_terminal(args: list[str], cwd) -> tuple[int, str]:
    """Runs args with stderr on a pseudo-terminal (stdout a pipe); -> (exit code, what reached the terminal)."""
    import fcntl
    import os
    import pty
    import struct
    import subprocess
    import termios

    master, slave = pty.openpty()
    # a terminal of 24 x 100: tqdm draws nothing on a terminal of no size, as a fresh pseudo-terminal is
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    proc = subprocess.Popen(args, cwd=cwd, stdout=subprocess.DEVNULL, stderr=slave, stdin=subprocess.DEVNULL)
    os.close(slave)
    seen = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the process closed its end
            break
        if not chunk:
            break
        seen += chunk
    os.close(master)
    return proc.wait(timeout=240), seen.decode(errors="replace")


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["basic", "joblib"])
def test_a_terminal_shows_one_bar_for_the_sweep_and_none_per_epoch(tmp_path, launcher):
    from conftest import run_py

    code, terminal = _stderr_on_a_terminal(
        run_py("norm=bn,gn", "epochs=2", "data.train_limit=128", f"hydra/launcher={launcher}",
               f"hydra.sweep.dir={tmp_path / 'sweep'}"), tmp_path)
    assert code == 0, terminal
    assert re.search(r"sweep of 2 jobs: +\d+%\|.*\| *\d+/4 \[", terminal), terminal
    assert ": epoch 1" not in terminal, terminal  # the per-epoch bar of a single run


@pytest.mark.slow
def test_a_single_run_keeps_its_bar_per_epoch(tmp_path):
    from conftest import run_py

    code, terminal = _stderr_on_a_terminal(
        run_py("epochs=1", "data.train_limit=256", f"hydra.run.dir={tmp_path / 'run'}", multirun=False), tmp_path)
    assert code == 0, terminal
    assert re.search(r"run: epoch 1: +\d+%", terminal), terminal
    assert "sweep of" not in terminal
