"""Every command the README and docs/ show runs as shown: each page's `python run.py`, `python -m normsweep.collect`
and `python docs/...py` lines, in the page's order in one folder (a collect after the sweep it collects), with tiny
synthetic data (data=fake, one epoch) instead of MNIST. Left out, each with its reason: SLURM (tests/test_slurm.py
runs it on a real cluster), make (the commands of the Makefile: `make test` is what runs this), benchmarks (real
MNIST, minutes), and other programs (jq, tensorboard, mlflow ui, pip)."""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
# what a documented command is run with instead of its own data, device, length and trials
CHEAP = ("data=fake", "data.train_limit=256", "data.test_limit=100", "epochs=1", "device=cpu", "threads=1")
CHEAP_SEARCH = ("hydra.sweeper.n_trials=2",)
SKIPPED = {"hydra/launcher=slurm": "SLURM: tests/test_slurm.py runs it on a real one-node cluster"}


def commands(page: Path) -> list[str]:
    """The page's shell commands for this project's programs, from its fenced code blocks, continuations joined and
    comments dropped, in the page's order."""
    found = []
    for block in re.findall(r"```(?:bash|sh|console)?\n(.*?)```", page.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip().removeprefix("$ ")
            if re.match(r"python (run\.py|-m normsweep\.collect|docs/)", line):
                found.append(shlex.split(line, comments=True))
    return [shlex.join(words) for words in found]


def cheap(words: list[str], tmp_path: Path) -> list[str]:
    """A documented command made cheap: its run.py overrides of the data, device, epochs and trials replaced by CHEAP
    (a rerun from a job's snapshot, which holds them, keeps its own); absolute /tmp/ folders and <date> placeholders
    mapped into tmp_path (the sweep an earlier command of the page made)."""
    swept = sorted((tmp_path / "outputs" / "sweeps").glob("*"))
    words = [re.sub(r"^([\w.]+=)?/tmp/", lambda m: f"{m.group(1) or ''}{tmp_path}/", w).replace("$PWD", str(tmp_path))
             .replace("<date>", swept[0].name if swept else "<date>") for w in words]
    program = words[1]
    if program == "run.py":
        if "--config-path" in words:  # a job's snapshot: its folder's name carries the CHEAP overrides too
            at = words.index("--config-path") + 1
            words[at] = str(next(Path(words[at]).parent.parent.glob(f"{Path(words[at]).parent.name}-*/.hydra")))
            return [sys.executable, str(REPO / "run.py"), *words[2:]]
        search = any(w == "hydra/sweeper=search" for w in words)
        replaced = tuple(key.split("=")[0] + "=" for key in (*CHEAP, *(CHEAP_SEARCH if search else ())))
        kept = [w for w in words[2:] if not w.startswith(replaced)]
        return [sys.executable, str(REPO / "run.py"), *kept, *CHEAP, *(CHEAP_SEARCH if search else ())]
    if program == "-m":
        return [sys.executable, *words[1:]]
    return [sys.executable, str(REPO / program), *words[2:]]  # python docs/...py: the checkout's script


def runnable(command: str) -> bool:
    return not any(word.startswith(skipped) for word in shlex.split(command) for skipped in SKIPPED)


def page_id(page: Path) -> str:
    return str(page.relative_to(REPO))


@pytest.mark.slow
@pytest.mark.parametrize("page", [p for p in PAGES if any(map(runnable, commands(p)))], ids=page_id)
def test_every_command_of_a_page_runs(tmp_path, page):
    for command in filter(runnable, commands(page)):
        args = cheap(shlex.split(command), tmp_path)
        proc = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{page_id(page)}: {command}\nran as {shlex.join(args)}\n{proc.stderr[-3000:]}"


def test_the_pages_show_commands_this_test_runs():
    """The extraction itself: the README's commands are found, with their continuations and without comments."""
    readme = commands(REPO / "README.md")
    assert "python run.py -m norm=bn,gn,ln reg=l1,l2" in readme
    assert "python run.py data=fake epochs=1" in readme
    assert any("hydra/launcher=slurm_packed" in c and "hydra.sweep.dir=outputs/sweeps/packed" in c
               for c in commands(REPO / "docs" / "slurm.md"))
