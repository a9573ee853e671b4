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
