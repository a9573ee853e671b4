"""Turn run folders (as runs.py reads them) into results.md, results.csv and plots (plots.py), and the CLI. Reads
files only: never imports torch, the model or the trainer, so it runs anywhere the run folders are."""
from __future__ import annotations

import argparse
import logging
import numbers
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from normsweep import files, runs, stats

log = logging.getLogger(__name__)

ROW_KEYS = ("norm.name", "reg.name", "batch_size", "reg.l1", "reg.l2")  # always define a row, own columns
DEFAULT_MARGIN = 0.2  # accuracy points: the equivalence margin of the verdicts (--margin)
SELECT = {"val": "test_acc_at_best_val", "final": "final_test_acc"}
STATUS_ORDER = (files.STATUS_COMPLETED, files.STATUS_FAILED, files.STATUS_DIVERGED, files.STATUS_RUNNING,
                runs.STATUS_UNFINISHED)  # the order of the counts in a Status cell; unreadable ones come last


class NoRunsError(Exception):
    """No readable run folder under the given directories."""


@dataclass
class Report:
    rows: pd.DataFrame  # one row per table row, numeric columns: what results.csv holds
    markdown: str  # what results.md holds
    out_dir: Path  # where results.md, results.csv and the plots went
    unfinished_jobs: int  # jobs not completed: failed, diverged, unfinished or unreadable
    problems: list[str] = field(default_factory=list)  # one message per unreadable file
    running_jobs: int = 0  # of the unfinished: those another process is running now


def _plain(value: object) -> str:
    """A config value as a table cell: 0.001, 0, 64, '' for missing."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        return np.format_float_positional(float(value), trim="-")
    return str(value)


def _sort_key(key: tuple) -> tuple:
    def known_first(value: object, known: dict) -> tuple:
        return (list(known).index(value), "") if value in known else (len(known), str(value))

    norm, reg, *rest = key
    return (known_first(norm, files.NORM_NAMES), known_first(reg, files.REG_SUFFIXES),
            *((0, v) if isinstance(v, numbers.Real) else (1, _plain(v)) for v in rest))


def _status_text(jobs: list[runs.Job]) -> str:
    """"completed", or the count of each status; then a note when the row's epochs ran under different CPU thread
    counts (a job resumed under another, or seeds run under different ones): oneDNN's sums depend on the count, so
    such a row is not what one thread count would give. The note is text only: the counts stay as they are."""
    counts = Counter(job.status for job in jobs)
    if set(counts) == {files.STATUS_COMPLETED}:
        text = files.STATUS_COMPLETED
    else:
        order = [s for s in STATUS_ORDER if s in counts] + sorted(set(counts) - set(STATUS_ORDER))
        text = ", ".join(f"{counts[s]} {s}" for s in order)
    threads = sorted({count for job in jobs for count in job.threads})
    return f"{text}; threads differ: {', '.join(map(str, threads))}" if len(threads) > 1 else text


def _row(key: tuple, keys: list[str], jobs: list[runs.Job]) -> dict:
    row = {"label": files.run_label(key[0], key[1]), **dict(zip(keys, key)), "seeds": len(jobs)}
    for name in runs.VALUE_NAMES:
        values = pd.Series([job.values[name] for job in jobs], dtype=float)
        row[f"{name}_mean"] = values.mean()
        # Seeds without this value (killed before an epoch) are left out; one seed has no spread: std nan, not 0.
        row[f"{name}_std"] = values.std(ddof=1) if values.count() > 1 else np.nan
        row[f"{name}_n"] = int(values.count())  # the seeds that have this value
    row["epochs_min"], row["epochs_max"] = min(j.epochs_done for j in jobs), max(j.epochs_done for j in jobs)
    row["status"] = _status_text(jobs)
    return row


def _markdown(rows: pd.DataFrame, extra_keys: list[str]) -> str:
    def mean_std(row: dict, name: str, decimals: int) -> str:
        mean, std, n = row[f"{name}_mean"], row[f"{name}_std"], row[f"{name}_n"]
        if np.isnan(mean):
            return "n/a"
        # one seed has no spread to show: its value alone, not "± 0.00"
        return f"{mean:.{decimals}f}" if n < 2 or np.isnan(std) else f"{mean:.{decimals}f} ± {std:.{decimals}f}"

    # a study with a validation split: the test accuracy at the epoch its validation accuracy picks
    validated = "test_acc_at_best_val_n" in rows and bool((rows["test_acc_at_best_val_n"] > 0).any())
    cells = [{
        "Regularization": row["label"],
        "Best Train Accuracy": mean_std(row, "best_train_acc", 2),
        "Best Test Accuracy": mean_std(row, "best_test_acc", 2),
        "Best Test Loss": mean_std(row, "best_test_loss", 4),
        "Batch Size": _plain(row["batch_size"]),
        "L1 Factor": _plain(row["reg.l1"]),
        "L2 Factor": _plain(row["reg.l2"]),
        "Final Test Accuracy": mean_std(row, "final_test_acc", 2),
        **({"Test Accuracy at Best Validation": mean_std(row, "test_acc_at_best_val", 2)} if validated else {}),
        "Seeds": str(row["seeds"]),
        "Epochs": str(row["epochs_min"]) if row["epochs_min"] == row["epochs_max"]
        else f"{row['epochs_min']}–{row['epochs_max']}",
        "Status": row["status"],
        **{key: _plain(row[key]) for key in extra_keys},
    } for row in rows.to_dict("records")]
    return stats.markdown_table(cells)


def _names(rows: pd.DataFrame, keys: list[str]) -> list[str]:
    """Row labels, plus 'key=value' for each key that tells apart rows sharing a label."""
    telling = [k for k in keys if (rows.groupby("label")[k].agg(lambda s: s.map(_plain).nunique()) > 1).any()]
    return [" ".join([row["label"], *(f"{k}={_plain(row[k])}" for k in telling)]) for row in rows.to_dict("records")]


def _follows_batch_size(rows: pd.DataFrame, key: str) -> bool:
    """True when the key has one value per batch size, e.g. a learning rate scaled with the batch size."""
    return bool((rows.groupby("batch_size")[key].agg(lambda s: s.map(_plain).nunique()) <= 1).all())


def collect(dirs: list[Path], baseline: str | None = None, plots: bool = True, select: str = "auto",
            margin: float = DEFAULT_MARGIN) -> Report:
    """Read every run folder under dirs; write results.md, results.csv and (unless plots is False) the plots into
    dirs[0]. The differences in results.md are against the row named `baseline` (default: the first row).

    Raises NoRunsError or stats.BaselineError (and writes nothing) when there is no run folder with a readable
    config, or no row of that name, and stats.SelectionError when the rows hold out different validation splits
    or `select` names a number some row lacks. select: the accuracy the differences are tested on, "val" (test
    accuracy at the best validation epoch), "final" (the last epoch's) or "auto" (val when every row has it). Once
    results.md is written nothing raises: a plot that fails is a problem."""
    dirs, problems = [Path(d) for d in dirs], []
    job_dirs = runs.find_job_dirs(dirs)
    jobs = [job for job in (runs.read_job(d, problems) for d in job_dirs) if job is not None]
    if not jobs:
        raise NoRunsError(f"no runs (folders with {files.CONFIG}) found under {', '.join(map(str, dirs))}")
    left_out = len(job_dirs) - len(jobs)  # no readable config: not completed, and in no row
    jobs = runs.drop_duplicates(jobs, problems)
    lock = files.FolderLock(dirs[0], files.COLLECT_LOCK)
    lock.acquire(wait=True)  # one collector at a time writes into the folder (two sweeps may end together)
    try:
        return _write(dirs[0], left_out, jobs, problems, baseline, plots, select, margin)
    finally:
        lock.release()


def _write(out_dir: Path, left_out: int, jobs: list[runs.Job], problems: list[str], baseline: str | None,
           plots: bool, select: str, margin: float) -> Report:
    all_keys = dict.fromkeys(k for job in jobs for k in job.config)  # config order, first seen first
    extra_keys = [k for k in all_keys if k not in ROW_KEYS and k != "seed" and not files.is_runtime_key(k)
                  and len({job.config.get(k) for job in jobs}) > 1]
    keys = [*ROW_KEYS, *extra_keys]
    groups: dict[tuple, list[runs.Job]] = {}
    for job in jobs:
        groups.setdefault(tuple(job.config.get(k) for k in keys), []).append(job)
    ordered = sorted(groups.items(), key=lambda item: _sort_key(item[0]))
    rows = stats.add_intervals(pd.DataFrame([_row(key, keys, group) for key, group in ordered]), runs.VALUE_NAMES)
    _check_one_split(jobs)
    selected = _selected(rows, select)
    paired = [_paired(group, ordered[stats.baseline_index(_names(rows, keys[2:]), baseline)][1])
              for _, group in ordered]
    markdown = _markdown(rows, extra_keys) + stats.differences_markdown(rows, _names(rows, keys[2:]), baseline,
                                                                        selected, margin, paired)
    not_ours = _not_ours(out_dir)  # told before the tables are written: an older plot is ours beside our table
    _write_tables(out_dir, rows, markdown)
    if plots:
        _plot(out_dir, rows, keys, ordered, jobs, problems, not_ours)
    if any((job.path / files.MLFLOW_RUN).exists() for job in jobs):  # logger=mlflow: the table and plots go there too
        try:
            from normsweep import tracking

            tracking.log_collected(out_dir, [job.path for job in jobs])
        except Exception as error:  # the table stands; say why MLflow did not get it
            runs.warn(problems, f"MLflow: results not logged ({type(error).__name__}: {error})")
    unfinished = left_out + sum(job.status != files.STATUS_COMPLETED for job in jobs)
    running = sum(job.status == files.STATUS_RUNNING for job in jobs)
    return Report(rows, markdown, out_dir, unfinished, problems, running)


def _selected(rows: pd.DataFrame, select: str) -> str:
    """The metric the differences are tested on: never a number picked on the test set."""
    has_val = bool((rows["test_acc_at_best_val_n"] > 0).all())
    if select == "auto":
        return SELECT["val"] if has_val else SELECT["final"]
    if select == "val" and not has_val:
        raise stats.SelectionError("--select val: some rows have no validation split (data.val_size=0): use "
                                   "--select final")
    return SELECT[select]


def _check_one_split(jobs: list[runs.Job]) -> None:
    splits = {(job.config.get("data.val_size") or 0, job.config.get("data.split_seed") or 0) for job in jobs}
    if len(splits) > 1:
        shown = "; ".join(f"val_size={v} split_seed={s}" for v, s in sorted(splits))
        raise stats.SelectionError(f"the runs hold out different validation splits ({shown}): their rows trained on "
                                   "different images, so no differences table is made; collect each split apart")


def _paired(group: list[runs.Job], base: list[runs.Job]) -> tuple[int, int] | None:
    """(test images right in the row only, right in the baseline only), summed over the seeds both rows have with a
    test_correct.json of the same test set; None when no seed pairs up."""
    base_by_seed = {job.config.get("seed"): job.correct for job in base if job.correct is not None}
    right_only = base_only = pairs = 0
    for job in group:
        other = base_by_seed.get(job.config.get("seed"))
        if job.correct is not None and other is not None and len(other) == len(job.correct):
            right_only += int((job.correct & ~other).sum())
            base_only += int((other & ~job.correct).sum())
            pairs += 1
    return (right_only, base_only) if pairs else None


def _not_ours(out_dir: Path) -> dict[Path, Exception]:
    """The files of the collector's names in out_dir that it did not write, with why: they are never replaced."""
    refused = {}
    for name in files.SWEEP_FILES:
        try:
            files.check_collectors_file(out_dir / name)
        except (OSError, ValueError) as error:
            refused[out_dir / name] = error
    return refused


def _plot(out_dir: Path, rows: pd.DataFrame, keys: list[str], ordered: list[tuple[tuple, list[runs.Job]]],
          jobs: list[runs.Job], problems: list[str], not_ours: dict[Path, Exception]) -> None:
    # imported here: matplotlib is slow to load, and --no-plots and --from-csv never draw
    from normsweep import plots

    def draw(path: Path, plot: Callable[[], object]) -> None:
        try:
            if path in not_ours:  # someone else's curves.png stays
                raise not_ours[path]
            files.check_own_file(path)  # a job's misclassified.png: the job folder is the job's
            plot()
        except Exception as error:  # results.md is written; the other plots are drawn all the same
            runs.warn(problems, f"{path}: not drawn ({type(error).__name__}: {error})")

    path = out_dir / files.CURVES_PNG
    draw(path, lambda: plots.plot_curves(_names(rows, keys[2:]), [group for _, group in ordered], path))
    if rows["batch_size"].nunique() > 1:
        # one line per setting other than the batch size and what follows it (a learning rate scaled with it)
        line_keys = [k for k in keys[2:] if k != "batch_size" and not _follows_batch_size(rows, k)]
        draw(out_dir / files.BATCH_SIZE_PNG,
             lambda: plots.plot_batch_size(rows, _names(rows, line_keys), out_dir / files.BATCH_SIZE_PNG))
    # a factor's plot needs a few values of it on its log axis: the default sweep's one L1 value would be one point
    factors = [k for k in ("reg.l1", "reg.l2")
               if pd.to_numeric(rows[k], errors="coerce").loc[lambda s: s > 0].nunique() >= plots.FACTOR_PLOT_MIN]
    if factors:
        draw(out_dir / files.FACTORS_PNG, lambda: plots.plot_factors(rows, factors, out_dir / files.FACTORS_PNG))
    for job in jobs:  # drawn once per job: a sweep's later collections (a rerun, a resume) skip what is drawn
        if job.misclassified is not None and not runs.grid_is_drawn(job):
            path = job.path / files.MISCLASSIFIED_PNG
            draw(path, lambda: plots.plot_misclassified(job, path))


def _write_tables(out_dir: Path, rows: pd.DataFrame, markdown: str) -> None:
    for name in (files.RESULTS_MD, files.RESULTS_CSV):  # a user's own results.md is never replaced
        files.check_collectors_file(out_dir / name)
    files.remove_stale_temp_files(out_dir, files.SWEEP_FILES)
    # results.md goes first and comes back last: whenever it exists, results.csv beside it is its data
    (out_dir / files.RESULTS_MD).unlink(missing_ok=True)
    files.write_atomic(out_dir / files.RESULTS_CSV, rows.to_csv(index=False))
    files.write_atomic(out_dir / files.RESULTS_MD, markdown)


def _checked_csv(rows: pd.DataFrame) -> pd.DataFrame:
    """A results.csv read back, with its intervals; ValueError naming the first cell no table of this collector
    holds. One seed's std is left empty (older tables wrote 0)."""
    if rows.empty:
        raise ValueError("no rows below the header")
    if rows["label"].isna().any():
        raise ValueError("a row without a label")
    for name in runs.VALUE_NAMES:  # a table from before a value was collected: that value unknown in every row
        if f"{name}_mean" not in rows:
            at = rows.columns.get_loc("status")
            for offset, (suffix, fill) in enumerate((("mean", np.nan), ("std", np.nan), ("n", 0))):
                rows.insert(at + offset, f"{name}_{suffix}", fill)
    after_seeds = list(rows.columns[rows.columns.get_loc("seeds"):])
    for column in ["batch_size", "reg.l1", "reg.l2", *after_seeds]:
        if column != "status" and not pd.api.types.is_numeric_dtype(rows[column]):
            bad = rows[column][pd.to_numeric(rows[column], errors="coerce").isna() & rows[column].notna()]
            raise ValueError(f"{column} of row {bad.index[0] + 1} is {bad.iloc[0]!r}, not a number")
    if not (rows["seeds"] >= 1).all() or not (rows["seeds"] % 1 == 0).all():
        raise ValueError("seeds is not a whole number from 1 in every row")
    rows = stats.add_intervals(rows, runs.VALUE_NAMES)
    for name in runs.VALUE_NAMES:
        rows.loc[rows[f"{name}_mean"].isna(), f"{name}_n"] = 0  # no seed has the value (an older table's)
        std, n = rows[f"{name}_std"], rows[f"{name}_n"]
        if not ((n >= 0) & (n % 1 == 0)).all():
            raise ValueError(f"{name}_n is not a whole number from 0 in every row")
        if (std < 0).any():
            raise ValueError(f"{name}_std of row {int(np.flatnonzero(std < 0)[0]) + 1} is negative")
        if (std.isna() & (n >= 2)).any():
            raise ValueError(f"{name}_std is empty in a row of several seeds")
        rows[f"{name}_std"] = std.astype(float).where(n >= 2)
    return rows


def rebuild_from_csv(csv_path: Path, baseline: str | None = None, select: str = "auto",
                     margin: float = DEFAULT_MARGIN) -> str:
    """results.md (and results.csv, with confidence intervals added) beside a results.csv, from its means, stds and
    seed counts alone: for tables whose job folders are gone. -> the markdown."""
    beside = csv_path.parent / files.RESULTS_CSV
    if csv_path.name != files.RESULTS_CSV and beside.exists():  # never replace a folder's table with another's
        raise stats.SelectionError(f"it would replace {beside} with a table rebuilt from {csv_path.name}: put "
                                   f"{csv_path.name} in a folder of its own as {files.RESULTS_CSV}")
    rows = pd.read_csv(csv_path, dtype={"label": str, "status": str})  # a label "1" stays text
    keys = list(rows.columns[1:rows.columns.get_loc("seeds")])  # the row keys, then the extra keys, as written
    rows = _checked_csv(rows)
    names = _names(rows, keys[2:])
    markdown = _markdown(rows, keys[len(ROW_KEYS):]) + stats.differences_markdown(rows, names, baseline,
                                                                                   _selected(rows, select), margin)
    lock = files.FolderLock(csv_path.parent, files.COLLECT_LOCK)
    lock.acquire(wait=True)
    try:
        _write_tables(csv_path.parent, rows, markdown)
    finally:
        lock.release()
    return markdown


def main(argv: list[str] | None = None) -> int:
    """CLI: exit 0 when every job completed, 1 when some did not, 2 when there is nothing to collect, 3 when the
    table could not be written (the message says why; results.md is then absent or older than the jobs). A plot
    that could not be drawn is a warning: the exit code is about the table."""
    parser = argparse.ArgumentParser(prog="normsweep-collect", description=__doc__)
    parser.add_argument("dirs", nargs="*", type=Path, metavar="SWEEP_DIR",
                        help="sweep or run folders, searched recursively; results go into the first")
    parser.add_argument("--baseline", metavar="ROW", help="the row the differences table compares every row with, "
                        "by its name in the table (default: the first row)")
    parser.add_argument("--no-plots", action="store_true", help="write the tables only (much faster on a large "
                        "sweep); plots of an earlier collection stay as they were")
    parser.add_argument("--select", choices=("auto", "val", "final"), default="auto", help="the test accuracy the "
                        "differences are tested on: at the best validation epoch (val), the last epoch's (final), or "
                        "val when every row has a validation split (auto, the default)")
    parser.add_argument("--margin", type=float, default=DEFAULT_MARGIN, help="equivalence margin of the verdicts, "
                        f"in accuracy points (default {DEFAULT_MARGIN})")
    parser.add_argument("--from-csv", type=Path, metavar="RESULTS_CSV", help="rebuild results.md beside this "
                        "results.csv from its means, stds and seed counts (no job folders needed)")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # usage error (2) or --help (0): return it, as the signature promises
        return int(exit_.code or 0)
    handler = logging.StreamHandler(sys.stderr)  # the CLI shows its warnings; under Hydra, Hydra's handlers do
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    loggers = (log, runs.log)  # not the package's: run as `-m normsweep.collect`, this module logs as __main__
    for logger in loggers:
        logger.addHandler(handler)
    try:
        if args.from_csv is not None:
            try:
                print(rebuild_from_csv(args.from_csv, args.baseline, args.select, args.margin), end="")
            except (stats.BaselineError, stats.SelectionError) as error:
                log.error("%s", error)
                return 2
            except Exception as error:  # any CSV this collector did not write: one line, no traceback
                log.error("%s: not a results.csv of this collector (%s: %s)", args.from_csv, type(error).__name__,
                          " ".join(str(error).split()))
                return 2
            return 0
        if not args.dirs:
            parser.print_usage(sys.stderr)
            return 2
        missing = [d for d in args.dirs if not d.is_dir()]
        if missing:
            log.error("not a directory: %s", ", ".join(map(str, missing)))
            return 2
        try:
            report = collect(args.dirs, args.baseline, not args.no_plots, args.select, args.margin)
        except (NoRunsError, stats.BaselineError, stats.SelectionError) as error:
            log.error("%s", error)
            return 2
        except Exception as error:  # e.g. the folder cannot be written: one line, not a traceback
            log.error("no table written: %s: %s", type(error).__name__, " ".join(str(error).split()))
            return 3
        print(report.markdown, end="")
        print(f"\nwrote {report.out_dir / files.RESULTS_MD} and {files.RESULTS_CSV}")
        if report.unfinished_jobs:
            elsewhere = f", {report.running_jobs} of them running in another process" if report.running_jobs else ""
            log.warning("%d job(s) did not complete%s: see the Status column", report.unfinished_jobs, elsewhere)
        return 1 if report.unfinished_jobs else 0
    finally:
        for logger in loggers:
            logger.removeHandler(handler)


if __name__ == "__main__":
    sys.exit(main())
