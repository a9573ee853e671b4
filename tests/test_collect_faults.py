"""The collector against damaged, hostile or duplicated run folders: each problem marks its own row, the rest of
the table and the plots stand, and the exit code says what was written."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import PNG_MAGIC, REPO
from normsweep import collect as collector
from normsweep import files, runs, stats
from normsweep.collect import main
from normsweep.runs import read_bounded
from test_collect import BASE_CONFIG, make_job, table_column

EPOCH = (0.3, 97.0, 0.03, 98.0)
IMAGE = [[(row * 9 + col) % 256 for col in range(28)] for row in range(28)]  # (28, 28)


def write_grid(job: Path, **item_changes: object) -> dict:
    """A misclassified.json as the trainer writes it (10 classes, 10 items); item_changes go into the first item."""
    items = [{"index": i, "actual": i % 10, "predicted": (i + 1) % 10, "image": IMAGE} for i in range(10)]
    items[0].update(item_changes)
    data = {"class_names": [str(i) for i in range(10)], "items": items}
    (job / files.MISCLASSIFIED).write_text(json.dumps(data))
    return data


def errors(capsys) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.splitlines()


def two_row_sweep(sweep: Path) -> None:
    make_job(sweep, "bn", [EPOCH, EPOCH])
    make_job(sweep, "gn", [EPOCH, (0.2, 98.0, 0.02, 99.31)], norm__name="gn")


# --- 1. duplicates -------------------------------------------------------------------------------------------------

def test_copies_of_a_sweep_are_counted_once(tmp_path, capsys):
    sweep = tmp_path / "A"
    two_row_sweep(sweep)
    shutil.copytree(sweep, tmp_path / "B")
    shutil.copytree(sweep, tmp_path / "C")
    assert main([str(sweep), str(tmp_path / "B"), str(tmp_path / "C"), "--no-plots"]) == 0
    csv = pd.read_csv(sweep / files.RESULTS_CSV)
    assert csv["seeds"].tolist() == [1, 1] and csv["best_test_acc_n"].tolist() == [1, 1]
    markdown = (sweep / files.RESULTS_MD).read_text()
    assert table_column(markdown, "Seeds") == ["1", "1"]
    assert "| GroupNorm | 1 / 1 | +1.31" in markdown and "n < 3 †" in markdown  # a difference, no test
    duplicates = [line for line in errors(capsys) if "duplicate runs counted once" in line]
    assert duplicates == [f"WARNING: duplicate runs counted once: {sweep / 'bn'} = {tmp_path / 'B' / 'bn'}, "
                          f"{tmp_path / 'C' / 'bn'}; {sweep / 'gn'} = {tmp_path / 'B' / 'gn'}, {tmp_path / 'C' / 'gn'}"]


def test_of_copies_differing_in_status_the_completed_one_counts(tmp_path, capsys):
    make_job(tmp_path / "A", "bn", [EPOCH], status="failed")
    make_job(tmp_path / "B", "bn", [EPOCH, EPOCH], status=None)  # killed after 2 epochs
    make_job(tmp_path / "C", "bn", [EPOCH, EPOCH], device="cuda", data__root="/elsewhere")  # runtime keys only
    make_job(tmp_path / "C", "bn-s2", [EPOCH], seed=2)  # another seed: another run
    assert main([str(tmp_path / d) for d in "ABC"] + ["--no-plots"]) == 0
    markdown = (tmp_path / "A" / files.RESULTS_MD).read_text()
    assert table_column(markdown, "Status") == ["completed"] and table_column(markdown, "Seeds") == ["2"]
    assert table_column(markdown, "Epochs") == ["1–2"]
    (line,) = [line for line in errors(capsys) if "duplicate" in line]
    assert line.endswith(f"{tmp_path / 'C' / 'bn'} = {tmp_path / 'A' / 'bn'}, {tmp_path / 'B' / 'bn'}")


# --- 2. symlinks, FIFOs, sizes, aliases ----------------------------------------------------------------------------

SECRET = "secret-outside-the-sweep"


def outside_copy(tmp_path: Path, job: Path, name: str, content: str | None = None) -> Path:
    """The job's file moved outside the sweep (with the secret in it) and a symlink left in its place."""
    target = tmp_path / "outside" / name.replace("/", "_")
    target.parent.mkdir(exist_ok=True)
    if content is None:
        shutil.move(job / name, target)
    else:
        target.write_text(content)
        (job / name).unlink()
    (job / name).symlink_to(target)
    return target


@pytest.mark.parametrize("name", [files.CONFIG, files.SUMMARY, files.METRICS, files.MISCLASSIFIED])
def test_a_symlinked_job_file_is_never_followed(tmp_path, capsys, name):
    sweep = tmp_path / "sweep"
    make_job(sweep, "good", [EPOCH])
    job = make_job(sweep, "linked", [EPOCH], norm__name="gn")
    write_grid(job)
    (job / ".hydra" / files.CONFIG).write_text((job / files.CONFIG).read_text())  # the row survives a bad config
    content = {  # what the row would show if the link were followed
        files.CONFIG: yaml.safe_dump({**BASE_CONFIG, "norm": {"name": SECRET}, "reg": {"name": "none"}}),
        files.SUMMARY: json.dumps({"status": SECRET}),
        files.METRICS: json.dumps({"epoch": 1, "test_acc": 12.5, "note": SECRET}) + "\n",
        files.MISCLASSIFIED: json.dumps({"label": SECRET, "items": []}),
    }[name]
    outside_copy(tmp_path, job, name, content)
    assert main([str(sweep)]) == 1
    lines = errors(capsys)
    markdown = (sweep / files.RESULTS_MD).read_text()
    assert table_column(markdown, "Status") == ["completed", f"1 unreadable: {name}"]
    assert SECRET not in markdown + "\n".join(lines) + (sweep / files.RESULTS_CSV).read_text()
    assert any(f"{job / name}: unreadable" in line and "symbolic link" in line for line in lines)
    if name == files.MISCLASSIFIED:
        assert not (job / files.MISCLASSIFIED_PNG).exists()  # no grid drawn from a file outside the sweep


def test_symlinked_folders_are_never_entered(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    make_job(sweep, "good", [EPOCH])
    elsewhere = make_job(tmp_path / "outside", "job", [EPOCH], norm__name="ln")
    (sweep / "linked-job").symlink_to(elsewhere)
    (sweep / "loop").symlink_to(sweep)  # walking it would never end
    snapshot_target = tmp_path / "outside" / "snapshot"
    snapshot_target.mkdir()
    (snapshot_target / files.CONFIG).write_text(yaml.safe_dump({**BASE_CONFIG, "norm": {"name": SECRET}}))
    bad = make_job(sweep, "bad-config", [EPOCH], norm__name="gn")
    (bad / files.CONFIG).write_text("norm: [")
    shutil.rmtree(bad / ".hydra")
    (bad / ".hydra").symlink_to(snapshot_target)  # Hydra's snapshot, but through a link
    assert main([str(sweep)]) == 1
    assert table_column((sweep / files.RESULTS_MD).read_text(), "Regularization") == ["BatchNorm"]
    assert SECRET not in "\n".join(errors(capsys))
    assert not (elsewhere / files.MISCLASSIFIED_PNG).exists() and not (tmp_path / "outside" / files.RESULTS_MD).exists()


def test_a_fifo_for_a_job_file_does_not_block_the_collector(tmp_path):
    make_job(tmp_path, "good", [EPOCH])
    for name, norm in ((files.SUMMARY, "gn"), (files.METRICS, "ln")):
        job = make_job(tmp_path, norm, [EPOCH], norm__name=norm)
        (job / name).unlink()
        os.mkfifo(job / name)  # opened blocking, a read would wait for a writer forever
    proc = subprocess.run([sys.executable, "-m", "normsweep.collect", str(tmp_path), "--no-plots"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "not a regular file" in proc.stderr
    assert table_column((tmp_path / files.RESULTS_MD).read_text(), "Status") == [
        "completed", f"1 unreadable: {files.SUMMARY}", f"1 unreadable: {files.METRICS}"]


def test_files_over_their_limit_are_refused_unread(tmp_path, capsys):
    make_job(tmp_path, "good", [EPOCH])
    padded = make_job(tmp_path, "padded", [EPOCH], norm__name="gn")
    summary = (padded / files.SUMMARY).read_text()
    (padded / files.SUMMARY).write_text(summary + " " * (runs.SMALL_FILE_LIMIT - len(summary) + 1))  # valid JSON
    sparse = make_job(tmp_path, "sparse", [EPOCH], norm__name="ln")
    with open(sparse / files.METRICS, "r+b") as f:
        f.truncate(runs.LARGE_FILE_LIMIT + 1)  # a hole: no disk, but st_size says it all
    assert main([str(tmp_path), "--no-plots"]) == 1
    assert table_column((tmp_path / files.RESULTS_MD).read_text(), "Status") == [
        "completed", f"1 unreadable: {files.SUMMARY}", f"1 unreadable: {files.METRICS}"]
    lines = errors(capsys)
    assert any(f"over {runs.SMALL_FILE_LIMIT} bytes" in line for line in lines)
    assert any(f"over {runs.LARGE_FILE_LIMIT} bytes" in line for line in lines)


def test_read_bounded_reads_up_to_its_limit(tmp_path):
    (tmp_path / "ten").write_text("0123456789")
    assert read_bounded(tmp_path / "ten", 10) == "0123456789"
    with pytest.raises(OSError, match="over 9 bytes"):
        read_bounded(tmp_path / "ten", 9)
    with pytest.raises(OSError, match="not a regular file"):
        read_bounded(tmp_path, 10 ** 6)


@pytest.mark.parametrize("config", [
    # a small alias bomb: 4 levels of 10 here, 9 levels make a billion values
    "norm: {name: bn}\nreg: {name: none}\na: &a [x, x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a]\n"
    "c: &c [*b, *b, *b, *b, *b, *b]\nd: [*c, *c, *c, *c, *c, *c]\n",
    "norm: &n {name: bn, self: *n}\nreg: {name: none}\n",  # refers to itself: flattening it would never end
])
def test_yaml_aliases_are_refused(tmp_path, capsys, config):
    make_job(tmp_path, "good", [EPOCH], norm__name="gn")
    bombed = make_job(tmp_path, "bombed", [EPOCH])
    (bombed / files.CONFIG).write_text(config)
    assert main([str(tmp_path), "--no-plots"]) == 1
    assert table_column((tmp_path / files.RESULTS_MD).read_text(), "Regularization") == ["GroupNorm"]
    assert any(f"{bombed / files.CONFIG}: unreadable" in line and "aliases (*name) are not allowed" in line
               for line in errors(capsys))


# --- 3. bad values: the row is unreadable, the plots are drawn, the exit code is true --------------------------------

def set_summary(job: Path, **changes: object) -> None:
    files.write_json(job / files.SUMMARY, {**json.loads((job / files.SUMMARY).read_text()), **changes})


def set_first_epoch(job: Path, **changes: object) -> None:
    rows = files.read_jsonl(job / files.METRICS)
    rows[0].update(changes)
    files.write_jsonl(job / files.METRICS, rows)


def set_config(job: Path, **changes: object) -> None:
    (job / ".hydra" / files.CONFIG).write_text((job / files.CONFIG).read_text())  # the row comes from Hydra's copy
    config = yaml.safe_load((job / files.CONFIG).read_text())
    config.update(changes)
    (job / files.CONFIG).write_text(yaml.safe_dump(config))


@pytest.mark.parametrize("damage, name", [
    (lambda job: set_summary(job, best_test_acc="99.1"), files.SUMMARY),
    (lambda job: set_summary(job, status=3), files.SUMMARY),
    (lambda job: set_summary(job, epochs_done=True), files.SUMMARY),
    (lambda job: set_first_epoch(job, test_acc="high"), files.METRICS),
    (lambda job: set_first_epoch(job, epoch="1"), files.METRICS),  # once crashed the curves
    (lambda job: set_first_epoch(job, threads=0), files.METRICS),
    (lambda job: set_summary(job, threads_per_epoch="1, 2"), files.SUMMARY),
    (lambda job: write_grid(job, actual=10), files.MISCLASSIFIED),  # 10 classes: once an IndexError
    (lambda job: write_grid(job, predicted=-1), files.MISCLASSIFIED),
    (lambda job: write_grid(job, image=[[300] * 28] * 28), files.MISCLASSIFIED),
    (lambda job: write_grid(job, image=[[1, 2], [3]]), files.MISCLASSIFIED),
    (lambda job: set_config(job, batch_size="64"), files.CONFIG),
    (lambda job: set_config(job, dropout={1, 2}), files.CONFIG),
])
def test_a_bad_value_marks_its_row_and_every_plot_is_still_drawn(tmp_path, capsys, damage, name):
    good = make_job(tmp_path, "good", [EPOCH, EPOCH])
    write_grid(good)
    bad = make_job(tmp_path, "bad", [EPOCH, EPOCH], norm__name="gn")
    write_grid(bad)
    damage(bad)
    assert main([str(tmp_path)]) == 1  # some job not completed: not 3, the table is written
    assert table_column((tmp_path / files.RESULTS_MD).read_text(), "Status") == ["completed", f"1 unreadable: {name}"]
    assert (tmp_path / files.CURVES_PNG).read_bytes().startswith(PNG_MAGIC)
    assert (good / files.MISCLASSIFIED_PNG).read_bytes().startswith(PNG_MAGIC)
    assert any(f"{bad / name}: unreadable" in line for line in errors(capsys))


def test_exit_3_only_when_results_md_was_not_written(tmp_path, capsys):
    job = make_job(tmp_path, "good", [EPOCH])
    write_grid(job)
    (tmp_path / files.CURVES_PNG).mkdir()  # this plot cannot be drawn; the table and the other plots can
    assert main([str(tmp_path)]) == 0
    assert (tmp_path / files.RESULTS_MD).is_file() and (job / files.MISCLASSIFIED_PNG).exists()
    assert any(f"{tmp_path / files.CURVES_PNG}: not drawn" in line for line in errors(capsys))
    (tmp_path / files.RESULTS_MD).unlink()
    (tmp_path / files.RESULTS_MD).mkdir()  # results.md cannot be written
    assert main([str(tmp_path), "--no-plots"]) == 3
    assert not (tmp_path / files.RESULTS_MD).is_file()
    assert [line for line in errors(capsys) if line.startswith("ERROR")][0].startswith("ERROR: no table written")


# --- 4. --from-csv refuses what it cannot have written ---------------------------------------------------------------

def published_csv(tmp_path: Path, change) -> Path:
    two_row_sweep(tmp_path / "sweep")
    make_job(tmp_path / "sweep", "bn-s2", [EPOCH, (0.2, 98.0, 0.03, 98.5)], seed=2)
    assert main([str(tmp_path / "sweep"), "--no-plots"]) == 0
    rows = pd.read_csv(tmp_path / "sweep" / files.RESULTS_CSV)
    folder = tmp_path / "published"
    folder.mkdir()
    change(rows).to_csv(folder / files.RESULTS_CSV, index=False)
    return folder / files.RESULTS_CSV


def negative_std(rows: pd.DataFrame) -> pd.DataFrame:
    rows.loc[0, "best_test_acc_std"] = -0.1
    return rows


def text_in_a_number(rows: pd.DataFrame) -> pd.DataFrame:
    rows["best_test_loss_mean"] = rows["best_test_loss_mean"].astype(object)
    rows.loc[1, "best_test_loss_mean"] = "low"
    return rows


@pytest.mark.parametrize("change, message", [
    (negative_std, "best_test_acc_std of row 1 is negative"),
    (text_in_a_number, "best_test_loss_mean of row 2 is 'low', not a number"),
    (lambda rows: rows.iloc[:0], "no rows below the header"),
    (lambda rows: rows.drop(columns=["seeds"]), "KeyError"),
])
def test_from_csv_refuses_what_no_collection_writes(tmp_path, capsys, change, message):
    csv = published_csv(tmp_path, change)
    capsys.readouterr()
    assert main(["--from-csv", str(csv)]) == 2
    (line,) = errors(capsys)
    assert line.startswith(f"ERROR: {csv}: not a results.csv of this collector") and message in line
    assert list(csv.parent.iterdir()) == [csv]  # nothing written


# --- 5. markdown escaping ------------------------------------------------------------------------------------------

def split_row(line: str) -> list[str]:
    """A markdown table row's cells, split at the pipes no backslash escapes."""
    return [cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip())[1:-1]]


def test_pipes_and_newlines_in_config_values_do_not_break_the_tables(tmp_path):
    make_job(tmp_path, "a", [EPOCH], norm__name="my|norm", note="a|b")
    make_job(tmp_path, "b", [EPOCH], note="two\nlines")
    make_job(tmp_path, "c", [EPOCH], note="back\\|slash")
    markdown = collect_markdown(tmp_path)
    for table in (markdown.split("\n\n")[0], markdown.split("\n\n")[-1]):
        lines = table.strip().splitlines()
        assert len(lines) == 5 and len({len(split_row(line)) for line in lines}) == 1
    header = split_row(markdown.splitlines()[0])
    cells = [dict(zip(header, split_row(line))) for line in markdown.split("\n\n")[0].splitlines()[2:]]
    assert [(row["Regularization"], row["note"]) for row in cells] == [
        ("BatchNorm", "back\\\\\\|slash"), ("BatchNorm", "two lines"), ("my\\|norm", "a\\|b")]
    assert "| my\\|norm note=a\\|b " in markdown  # the differences table's row names too


def collect_markdown(sweep: Path) -> str:
    assert main([str(sweep), "--no-plots"]) == 0
    return (sweep / files.RESULTS_MD).read_text()


def test_markdown_cell_escapes_only_what_breaks_a_table():
    assert stats.markdown_cell("BatchNorm with L1") == "BatchNorm with L1"
    assert stats.markdown_cell("a|b\nc\r\nd") == "a\\|b c d"
    assert stats.markdown_cell("a\\|b") == "a\\\\\\|b"  # the backslash kept, the pipe escaped


# --- 6. misclassified grids: drawn once per job ----------------------------------------------------------------------

def test_misclassified_grids_are_drawn_only_for_jobs_new_since_the_last_collection(tmp_path):
    drawn, changed = make_job(tmp_path, "drawn", [EPOCH]), make_job(tmp_path, "changed", [EPOCH], norm__name="gn")
    for job in (drawn, changed):
        write_grid(job)
    collector.collect([tmp_path])
    second = 2_000_000_000 * 10 ** 9  # fixed times, in ns: no clock involved
    for job in (drawn, changed):
        (job / files.MISCLASSIFIED_PNG).write_bytes(b"drawn before")
        for name in (files.CONFIG, files.SUMMARY, files.MISCLASSIFIED, files.MISCLASSIFIED_PNG):
            os.utime(job / name, ns=(second, second))
    os.utime(drawn / files.MISCLASSIFIED_PNG, ns=(second + 10 ** 9,) * 2)  # drawn after its files
    os.utime(changed / files.MISCLASSIFIED_PNG, ns=(second + 10 ** 9,) * 2)
    os.utime(changed / files.SUMMARY, ns=(second + 2 * 10 ** 9,) * 2)  # a resume rewrote it since
    collector.collect([tmp_path])
    assert (drawn / files.MISCLASSIFIED_PNG).read_bytes() == b"drawn before"
    assert (changed / files.MISCLASSIFIED_PNG).read_bytes().startswith(PNG_MAGIC)


# --- 7. factors.png needs three values of a factor -------------------------------------------------------------------

def test_the_default_sweep_draws_no_factor_plot_three_values_do(tmp_path):
    default = tmp_path / "default"  # python run.py -m norm=bn,gn,ln reg=l1,l2: one value of each factor
    for norm in ("bn", "gn", "ln"):
        make_job(default, f"{norm}-l1", [EPOCH], norm__name=norm, reg__name="l1", reg__l1=0.001)
        make_job(default, f"{norm}-l2", [EPOCH], norm__name=norm, reg__name="l2", reg__l2=0.001)
    report = collector.collect([default])
    assert len(report.rows) == 6 and not (default / files.FACTORS_PNG).exists()
    grid = tmp_path / "grid"
    for l1 in (0.0001, 0.001, 0.01):
        make_job(grid, f"bn-{l1}", [EPOCH], reg__name="l1", reg__l1=l1)
    collector.collect([grid])
    assert (grid / files.FACTORS_PNG).read_bytes().startswith(PNG_MAGIC)


# --- 8. one seed: no ± 0.00, an empty std ----------------------------------------------------------------------------

def test_a_single_seed_row_shows_its_value_alone_and_reads_back(tmp_path):
    sweep = tmp_path / "sweep"
    two_row_sweep(sweep)
    make_job(sweep, "bn-s2", [EPOCH, (0.2, 98.0, 0.03, 98.5)], seed=2)
    assert main([str(sweep), "--no-plots"]) == 0
    markdown = (sweep / files.RESULTS_MD).read_text()
    assert table_column(markdown, "Best Test Accuracy") == ["98.25 ± 0.35", "99.31"]
    assert table_column(markdown, "Best Test Loss") == ["0.0300 ± 0.0000", "0.0200"]
    assert "| GroupNorm | 1 / 2 | +1.06" in markdown  # a difference, no interval, no test
    with open(sweep / files.RESULTS_CSV) as f:
        header, _, gn = f.read().splitlines()
    gn_cells = dict(zip(header.split(","), gn.split(",")))
    assert gn_cells["best_test_acc_std"] == "" and gn_cells["best_test_acc_ci95"] == ""
    published = tmp_path / "published"
    published.mkdir()
    shutil.copy(sweep / files.RESULTS_CSV, published)
    assert main(["--from-csv", str(published / files.RESULTS_CSV)]) == 0
    assert (published / files.RESULTS_MD).read_text() == markdown


def test_an_older_csv_with_std_0_for_one_seed_reads_as_one_seed(tmp_path):
    two_row_sweep(tmp_path)
    assert main([str(tmp_path), "--no-plots"]) == 0
    rows = pd.read_csv(tmp_path / files.RESULTS_CSV)
    std_columns = [c for c in rows if c.endswith("_std")]
    rows[std_columns] = 0.0  # as the collector wrote one seed before
    rows.drop(columns=[c for c in rows if c.endswith(("_ci95", "_n"))]).to_csv(tmp_path / files.RESULTS_CSV,
                                                                             index=False)
    assert main(["--from-csv", str(tmp_path / files.RESULTS_CSV)]) == 0
    assert "±" not in (tmp_path / files.RESULTS_MD).read_text().split("\n\n")[0]
    assert pd.read_csv(tmp_path / files.RESULTS_CSV)[std_columns].isna().all().all()


def test_intervals_and_differences_take_a_nan_std():
    rows = pd.DataFrame({"seeds": [1, 3], "final_test_acc_mean": [99.0, 98.0], "final_test_acc_std": [float("nan"), 0.1],
                         "final_test_loss_mean": [0.02, 0.03], "final_test_loss_std": [float("nan"), 0.001]})
    rows = stats.add_intervals(rows, ("final_test_acc", "final_test_loss"))
    assert rows["final_test_acc_ci95"].isna().tolist() == [True, False]
    table = stats.differences_markdown(rows, ["one seed", "three seeds"], "three seeds")
    assert "| one seed    | 1 / 3 | +1.00" in table and "n < 3 †" in table


# --- 9. thread counts: a row whose epochs ran under several says so --------------------------------------------------

def set_threads(job: Path, per_epoch: list[int], summary: bool = True) -> None:
    """Each epoch's thread count into metrics.jsonl, and (summary) their distinct counts into summary.json."""
    rows = files.read_jsonl(job / files.METRICS)
    files.write_jsonl(job / files.METRICS, [{**row, "threads": n} for row, n in zip(rows, per_epoch)])
    if summary:
        set_summary(job, threads_per_epoch=sorted(set(per_epoch)))


def test_a_job_resumed_under_another_thread_count_says_so_and_still_counts_as_completed(tmp_path):
    resumed = make_job(tmp_path, "resumed", [EPOCH, EPOCH])
    set_threads(resumed, [1, 2])
    make_job(tmp_path, "old", [EPOCH, EPOCH], norm__name="gn")  # an older folder: no counts anywhere, no note
    assert main([str(tmp_path), "--no-plots"]) == 0  # completed for the exit code
    markdown = (tmp_path / files.RESULTS_MD).read_text()
    assert table_column(markdown, "Status") == ["completed; threads differ: 1, 2", "completed"]
    assert pd.read_csv(tmp_path / files.RESULTS_CSV)["status"].tolist() == table_column(markdown, "Status")


def test_seeds_run_under_different_thread_counts_are_noted_the_same_count_is_not(tmp_path):
    for seed, threads in ((1, 1), (2, 2)):
        set_threads(make_job(tmp_path, f"bn-{seed}", [EPOCH, EPOCH], seed=seed), [threads, threads])
    for seed in (1, 2):
        set_threads(make_job(tmp_path, f"gn-{seed}", [EPOCH, EPOCH], seed=seed, norm__name="gn"), [2, 2])
    report = collector.collect([tmp_path], plots=False)
    assert report.rows["seeds"].tolist() == [2, 2] and report.unfinished_jobs == 0
    assert report.rows["status"].tolist() == ["completed; threads differ: 1, 2", "completed"]


def test_without_threads_per_epoch_the_epochs_give_the_counts(tmp_path):
    done = make_job(tmp_path, "done", [EPOCH, EPOCH])
    set_threads(done, [4, 4], summary=False)  # a summary.json without threads_per_epoch
    set_threads(make_job(tmp_path, "killed", [EPOCH, EPOCH], status=None, seed=2), [2, 4], summary=False)
    assert main([str(tmp_path), "--no-plots"]) == 1  # the killed job did not complete: the note changes nothing
    status = table_column((tmp_path / files.RESULTS_MD).read_text(), "Status")
    assert status == ["1 completed, 1 unfinished; threads differ: 2, 4"]


@pytest.mark.parametrize("name", [files.RESULTS_MD, files.RESULTS_CSV, files.CURVES_PNG])
def test_a_users_own_file_of_a_collector_name_is_never_replaced(tmp_path, capsys, name):
    """A results.md, results.csv or curves.png that the collector did not write (no table header, no mark in the
    PNG) stays byte for byte: the tables then are not written (exit 3, one line), a plot is not drawn (a warning)."""
    sweep = tmp_path / "sweep"
    two_row_sweep(sweep)
    mine = b"\x89PNG\r\n\x1a\nmy own plot, Matplotlib" if name.endswith(".png") else b"my own notes\n"
    (sweep / name).write_bytes(mine)
    code = main([str(sweep)])
    assert (sweep / name).read_bytes() == mine
    lines = [line for line in errors(capsys) if "not a file the collector wrote" in line]
    assert len(lines) == 1 and name in lines[0]
    assert code == (0 if name.endswith(".png") else 3)


def test_the_collectors_own_files_are_rewritten_a_plain_matplotlib_png_is_not(tmp_path, capsys):
    """Its own marked tables and plots are its to replace; a matplotlib PNG without the mark (a user's plot, or one
    of an older collector) beside its table stays, and the plot is not drawn."""
    sweep = tmp_path / "sweep"
    two_row_sweep(sweep)
    assert main([str(sweep)]) == 0
    assert files.COLLECTOR_PNG_MARK in (sweep / files.CURVES_PNG).read_bytes()[:4096]
    mine = b"\x89PNG\r\n\x1a\n...Software Matplotlib version3.9..."
    (sweep / files.CURVES_PNG).write_bytes(mine)
    assert main([str(sweep)]) == 0
    assert (sweep / files.CURVES_PNG).read_bytes() == mine
    assert any("not a file the collector wrote" in line for line in errors(capsys))


def test_from_csv_never_replaces_the_folders_own_table(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    two_row_sweep(sweep)
    assert main([str(sweep), "--no-plots"]) == 0
    before = {name: (sweep / name).read_bytes() for name in (files.RESULTS_CSV, files.RESULTS_MD)}
    (sweep / "mine.csv").write_text("".join((sweep / files.RESULTS_CSV).read_text().splitlines(True)[:2]))
    assert main(["--from-csv", str(sweep / "mine.csv")]) == 2
    assert "it would replace" in " ".join(errors(capsys))
    assert {name: (sweep / name).read_bytes() for name in before} == before
