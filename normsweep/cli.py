"""run.py's entry point around Hydra's main, and what a user sees of it: Hydra's own errors as one line with exit code
2, an interrupt as the command that resumes (exit code 130), values quoted for Hydra's override grammar."""
from __future__ import annotations

import os
import re
import shlex
import signal
import sys
from pathlib import Path
from typing import Callable

from hydra.errors import HydraException, MissingConfigException


def hydra_quote(value: str) -> str:
    """value as one token of Hydra's override grammar: quoted when it holds anything the grammar treats specially
    (`,` makes a sweep, `=` `'` `$` `[` ...), with the escapes Hydra's parser undoes (backslashes before a quote or
    at the end, the quote itself, `${` that would interpolate)."""
    if re.fullmatch(r"[\w/.+\-~@%]*", value):
        return value
    escaped = re.sub(r"(\\*)('|$)", lambda m: m.group(1) * 2 + ("\\'" if m.group(2) else ""), value)
    return "'" + escaped.replace("${", "\\${") + "'"


def cli(main: Callable[[], object]) -> None:
    """run.py's entry point around Hydra's main: Hydra's own composition errors become one line with exit code 2, as
    the project's are, and an interrupt (Ctrl-C, SIGTERM) ends with the command that resumes, exit code 130."""
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra then raises its errors here instead of printing them on many lines
    signal.signal(signal.SIGTERM, _interrupt)  # kill's default: the same way out as Ctrl-C
    try:
        main()
    except HydraException as e:
        print(f"error: {composition_error(e)}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print(f"interrupted: rerun {resume_command()} to resume", file=sys.stderr)
        raise SystemExit(130) from None
    except OSError as e:  # Hydra making or writing a folder that cannot be written (a job's own are recorded)
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}; choose a folder you can write (hydra.run.dir / hydra.sweep.dir)",
              file=sys.stderr)
        raise SystemExit(2) from None
    except Exception as e:
        # submitit (hydra/launcher=slurm, slurm_packed) is optional and imported by its launchers only: its errors
        # are told by their module. Its FailedJobError carries what sbatch said (a partition that does not exist)
        if not type(e).__module__.startswith("submitit."):
            raise
        print(f"error: {submission_error(e)}", file=sys.stderr)
        raise SystemExit(2) from None


def submission_error(error: Exception) -> str:
    """submitit's error as one line: sbatch's own complaints (`sbatch: error: invalid partition specified: gpu`),
    without their prefix, or submitit's first line."""
    said = [line.strip().removeprefix("sbatch: error:").strip() for line in str(error).splitlines()
            if line.strip().startswith("sbatch: error:")]
    what = "; ".join(dict.fromkeys(said)) or (str(error).splitlines() or [type(error).__name__])[0]
    return f"SLURM did not take the jobs: {what}"


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def composition_error(error: HydraException) -> str:
    """Hydra's message as one line: an unknown choice lists the valid ones, a bad value names the key and the type."""
    if isinstance(error, MissingConfigException) and error.missing_cfg_file and error.options is not None:
        group, _, value = str(error.missing_cfg_file).rpartition("/")
        return f"{group}={value} is not a choice; choose one of {', '.join(error.options)}"
    message = str(error).split("\n")[0]
    if error.__cause__ is not None:  # OmegaConf's reason: "Value 'abc' of type 'str' could not be converted to Integer"
        message += ": " + str(error.__cause__).split("\n")[0]
    return " ".join(message.split())


def resume_command() -> str:
    """This process's command line with the folder it writes into made explicit (a timestamped default would start
    a new folder), so that running it again resumes: completed jobs are skipped, interrupted ones resume."""
    args = sys.argv[1:]
    if WRITING_INTO:  # else interrupted before the checks: the same command starts afresh anyway
        key, folder = WRITING_INTO
        args = [a for a in args if not a.startswith(f"{key}=")] + [f"{key}={hydra_quote(folder)}"]
    return shlex.join([sys.executable, sys.argv[0], *args])


# The one folder this process writes into, as (its Hydra key, its absolute path), noted by check() and check_sweep()
# before Hydra makes it, for the line an interrupt prints. Set once per process (Hydra's own record of it is gone by
# the time the interrupt reaches cli()), read only by resume_command().
WRITING_INTO: list[str] = []


def note_folder(key: str, folder: Path) -> None:
    WRITING_INTO[:] = [key, str(folder)]
