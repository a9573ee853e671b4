"""The collector turns hand-made run folders into exactly the expected table, csv and plots."""
from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy import stats as scipy_stats

from conftest import PNG_MAGIC, REPO
from normsweep import files
from normsweep.collect import collect, main
from normsweep.runs import read_job
from normsweep.plots import plot_curves
from normsweep.files import run_label

BASE_CONFIG = {
    "norm": {"name": "bn", "groups": 4}, "reg": {"name": "none", "l1": 0.0, "l2": 0.0},
    "batch_size": 64, "epochs": 2, "seed": 1, "dropout": 0.0,
    "optim": {"lr": 0.01, "momentum": 0.9, "max_lr": 0.1}, "device": "cpu",
    "data": {"name": "fake", "root": "/data", "train_limit": None, "test_limit": None, "augment": False},
    "fail_fast": False,
}


def make_job(sweep: Path, name: str, history: list[tuple], status: str | None = "completed",
             write_metrics: bool = True, **overrides: object) -> Path:
    """A run folder as the trainer leaves it. history: (train_loss, train_acc, test_loss, test_acc) per epoch;
    status None leaves out summary.json (a killed job); overrides are dotted keys, e.g. reg__l1=0.001."""
    config = copy.deepcopy(BASE_CONFIG)
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split("__")
        node = config
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    job = sweep / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / files.CONFIG).write_text(yaml.safe_dump({"hydra": {"job": {"name": "x"}}}))
    (job / files.CONFIG).write_text(yaml.safe_dump(config, sort_keys=False))  # config order, as OmegaConf writes it
    rows = [{"epoch": i, "train_loss": a, "train_acc": b, "test_loss": c, "test_acc": d, "lr": 0.01,
             "train_seconds": 1.0, "test_seconds": 0.1} for i, (a, b, c, d) in enumerate(history, start=1)]
    if write_metrics:
        files.write_jsonl(job / files.METRICS, rows)
    if status is not None:
        best = lambda key, pick: pick(r[key] for r in rows) if rows else None
        files.write_json(job / files.SUMMARY, {
            "status": status, "error": None if status == "completed" else "boom",
            "best_train_acc": best("train_acc", max), "best_test_acc": best("test_acc", max),
            "best_test_loss": best("test_loss", min), "final_test_acc": rows[-1]["test_acc"] if rows else None,
            "epochs_done": len(rows), "params": 1234, "seconds": 5.0, "git_commit": "abc"})
    return job


def make_two_configs(sweep: Path) -> None:
    """BatchNorm x 3 seeds and GroupNorm with L1 x 2 seeds; the expected numbers are worked out by hand below."""
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    make_job(sweep, "a", [(0.3, 97.0, 0.020, 99.4), (0.1, 98.0, 0.025, 99.2)], seed=1)
    make_job(sweep, "b", [(0.3, 97.5, 0.022, 99.3), (0.1, 98.5, 0.021, 99.5)], seed=2)
    make_job(sweep, "c", [(0.3, 98.0, 0.023, 99.6), (0.1, 99.0, 0.022, 99.5)], seed=3)
    make_job(sweep, "d", [(0.4, 96.0, 0.040, 98.8), (0.2, 97.0, 0.030, 99.0)], seed=1, norm__name="gn",
             reg__name="l1", reg__l1=0.001)
    make_job(sweep, "e", [(0.4, 97.0, 0.035, 99.1), (0.2, 98.0, 0.032, 99.2)], seed=2, norm__name="gn",
             reg__name="l1", reg__l1=0.001)


# BatchNorm: best train 98.0, 98.5, 99.0 -> 98.50 ± 0.50; best test 99.4, 99.5, 99.6 -> 99.50 ± 0.10;
#   best loss .020, .021, .022 -> 0.0210 ± 0.0010; final 99.2, 99.5, 99.5 -> 99.40 ± sqrt(0.06 / 2) = 0.17.
# GroupNorm with L1: best train 97, 98 -> 97.50 ± 0.71 (sqrt(0.5)); best test 99.0, 99.2 -> 99.10 ± 0.14;
#   best loss .030, .032 -> 0.0310 ± 0.0014; final 99.0, 99.2 -> 99.10 ± 0.14.
EXPECTED_TABLE = """\
| Regularization    | Best Train Accuracy   | Best Test Accuracy   | Best Test Loss   | Batch Size   | L1 Factor   | L2 Factor   | Final Test Accuracy   | Seeds   | Epochs   | Status    |
|:------------------|:----------------------|:---------------------|:-----------------|:-------------|:------------|:------------|:----------------------|:--------|:---------|:----------|
| BatchNorm         | 98.50 ± 0.50          | 99.50 ± 0.10         | 0.0210 ± 0.0010  | 64           | 0           | 0           | 99.40 ± 0.17          | 3       | 2        | completed |
| GroupNorm with L1 | 97.50 ± 0.71          | 99.10 ± 0.14         | 0.0310 ± 0.0014  | 64           | 0.001       | 0           | 99.10 ± 0.14          | 2       | 2        | completed |
"""


# GroupNorm with L1 against BatchNorm, on the final test accuracy (no validation split here; the best test accuracy
#   is selected on the test set, so it is never tested), Welch: -0.30, se = sqrt(0.02/2 + 0.03/3) = 0.1414 with
#   df = 0.02^2 / (0.01^2/1 + 0.01^2/2) = 2.667, t_0.975(2.667) = 3.42 -> [-0.78, +0.18]; Hedges' g: -0.30 over
#   the pooled sd sqrt((0.02 + 2 * 0.03) / 3) = 0.1633 is d = -1.837, times 1 - 3/11 -> -1.34, se
#   sqrt(5/6 + 1.34^2/10) = 1.006 -> ± 1.97; seeds for ±0.2 at 80 % power: 11.5 -> 12. Final loss: .031 - .02267 =
#   +0.0083 [+0.0033, +0.0134]. Two seeds: no test, no verdict.
EXPECTED_DIFFERENCES = """| Row               | n     | Δ final test acc (95 % CI)   | p (Holm)   | Hedges' g (95 % CI)   | McNemar b / c, p (Holm)   | Verdict (±0.2)       | Seeds for ±0.2   | Δ final test loss (95 % CI)   | p loss (Holm)   |
|:------------------|:------|:-----------------------------|:-----------|:----------------------|:--------------------------|:---------------------|:-----------------|:------------------------------|:----------------|
| BatchNorm         | 3 / 3 | baseline                     |            |                       |                           |                      |                  |                               |                 |
| GroupNorm with L1 | 2 / 3 | −0.30 [−0.78, +0.18]         | n < 3 †    | −1.34 ± 1.97          | n/a                       | inconclusive (n < 3) | 12               | +0.0083 [+0.0033, +0.0134]    | n < 3 †         |
"""


def table_column(markdown: str, heading: str) -> list[str]:
    """One column of the first table in markdown."""
    lines = markdown.split("\n\n")[0].splitlines()
    headings = [cell.strip() for cell in lines[0].strip("|").split("|")]
    return [line.strip("|").split("|")[headings.index(heading)].strip() for line in lines[2:]]


def test_seeds_merge_into_rows_with_mean_and_std(tmp_path, capsys):
    make_two_configs(tmp_path)
    assert main([str(tmp_path), "--no-plots"]) == 0
    assert not list(tmp_path.rglob("*.png"))
    markdown = (tmp_path / files.RESULTS_MD).read_text()
    assert markdown.startswith(EXPECTED_TABLE) and EXPECTED_DIFFERENCES in markdown
    assert EXPECTED_TABLE in capsys.readouterr().out
    csv = pd.read_csv(tmp_path / files.RESULTS_CSV)
    assert list(csv["label"]) == ["BatchNorm", "GroupNorm with L1"]
    assert list(csv["seeds"]) == [3, 2]
    assert csv["best_test_acc_mean"].tolist() == pytest.approx([99.5, 99.1])
    assert csv["best_test_acc_std"].tolist() == pytest.approx([0.1, 0.02 ** 0.5])
    assert csv["best_test_loss_mean"].tolist() == pytest.approx([0.021, 0.031])
    assert csv["reg.l1"].tolist() == pytest.approx([0.0, 0.001])


def test_mixed_statuses_keep_their_row(tmp_path):
    make_job(tmp_path, "done", [(0.3, 97.0, 0.03, 98.0)] * 4, seed=1)
    make_job(tmp_path, "failed", [(0.3, 96.0, 0.03, 97.0)] * 3, status="failed", seed=2)
    make_job(tmp_path, "killed", [(0.3, 95.0, 0.03, 99.0), (0.3, 95.0, 0.02, 96.0)], status=None, seed=3)
    make_job(tmp_path, "crashed", [], status="diverged", write_metrics=False, norm__name="ln")
    report = collect([tmp_path], plots=False)
    assert table_column(report.markdown, "Status") == ["1 completed, 1 failed, 1 unfinished", "1 diverged"]
    assert table_column(report.markdown, "Epochs") == ["2–4", "0"]
    # The killed job's values come from its metrics: best test 99.0, final 96.0, best loss 0.02.
    assert table_column(report.markdown, "Best Test Accuracy") == ["98.00 ± 1.00", "n/a"]
    assert table_column(report.markdown, "Final Test Accuracy") == ["97.00 ± 1.00", "n/a"]
    assert table_column(report.markdown, "Best Test Loss")[0] == "0.0267 ± 0.0058"
    assert report.unfinished_jobs == 3
    assert main([str(tmp_path), "--no-plots"]) == 1


def test_summary_without_metrics_still_gives_its_row(tmp_path):
    job = make_job(tmp_path, "a", [(0.3, 97.0, 0.03, 98.0)], write_metrics=False)
    assert not (job / files.METRICS).exists()
    report = collect([tmp_path], plots=False)
    assert table_column(report.markdown, "Best Test Accuracy") == ["98.00"]  # one seed: no ± 0.00
    assert table_column(report.markdown, "Status") == ["completed"]
    assert report.unfinished_jobs == 0


def test_varying_extra_keys_get_columns_and_separate_rows(tmp_path):
    epoch = (0.3, 97.0, 0.03, 98.0)
    make_job(tmp_path, "a", [epoch], epochs=1, seed=1, data__root="/elsewhere", device="cuda")
    make_job(tmp_path, "b", [epoch, epoch], epochs=2, seed=2)
    make_job(tmp_path, "c", [epoch, epoch], epochs=2, seed=3, dropout=0.25)
    report = collect([tmp_path], plots=False)
    header = [cell.strip() for cell in report.markdown.splitlines()[0].strip("|").split("|")]
    assert header[-3:] == ["Status", "epochs", "dropout"]  # not seed, data.root or device
    assert table_column(report.markdown, "epochs") == ["1", "2", "2"]
    assert table_column(report.markdown, "dropout") == ["0", "0", "0.25"]
    assert table_column(report.markdown, "Seeds") == ["1", "1", "1"]


def test_rows_are_ordered_by_norm_then_reg_then_batch_size(tmp_path):
    epoch = (0.3, 97.0, 0.03, 98.0)
    combos = [(n, r, 64) for n in ("ln", "gn", "bn") for r in ("l1l2", "none", "l2", "l1")] + [("bn", "none", 128)]
    for i, (norm, reg, batch_size) in enumerate(combos):
        make_job(tmp_path, f"job{i}", [epoch], norm__name=norm, reg__name=reg, batch_size=batch_size)
    report = collect([tmp_path])
    labels = [run_label(n, r) for n in ("bn", "gn", "ln") for r in ("none", "l1", "l2", "l1l2")]
    assert table_column(report.markdown, "Regularization") == labels[:1] + labels
    assert table_column(report.markdown, "Batch Size")[:2] == ["64", "128"]
    assert labels[3] == "BatchNorm with L1 and L2" and labels[6] == "GroupNorm with L2"
    assert (tmp_path / files.BATCH_SIZE_PNG).read_bytes().startswith(PNG_MAGIC)


def test_no_runs_is_an_error_and_writes_nothing(tmp_path, capsys):
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / files.CONFIG).write_text("a: 1\n")  # Hydra's own config is not a job
    assert main([str(tmp_path)]) == 2
    assert "no runs" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [tmp_path / ".hydra"]
    assert main([]) == 2  # usage error


@pytest.mark.parametrize("corrupt", [files.SUMMARY, files.METRICS])
def test_corrupt_file_marks_job_unreadable_and_keeps_the_table(tmp_path, capsys, corrupt):
    make_job(tmp_path, "good", [(0.3, 97.0, 0.03, 98.0)])
    bad = make_job(tmp_path, "bad", [(0.3, 97.0, 0.03, 98.0)], norm__name="gn")
    (bad / corrupt).write_text((bad / corrupt).read_text()[:25])  # truncated JSON
    nolabel = make_job(tmp_path, "nolabel", [(0.3, 97.0, 0.03, 98.0)], norm__name="ln")
    (nolabel / files.CONFIG).write_text("norm: {name: [")
    assert main([str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert str(bad / corrupt) in err and str(nolabel / files.CONFIG) in err
    markdown = (tmp_path / files.RESULTS_MD).read_text()
    assert table_column(markdown, "Regularization") == ["BatchNorm", "GroupNorm"]  # no row for a config-less job
    assert table_column(markdown, "Status") == ["completed", f"1 unreadable: {corrupt}"]
    assert collect([tmp_path]).unfinished_jobs == 2


def test_collector_survives_any_one_bad_file(tmp_path, capsys):
    """Undecodable bytes, wrong JSON types, folders where files belong: each marks its own row, the rest stands."""
    make_job(tmp_path, "good", [(0.3, 97.0, 0.03, 98.0)])
    binary = make_job(tmp_path, "binary", [(0.3, 97.0, 0.03, 98.0)], norm__name="gn")
    (binary / ".hydra" / files.CONFIG).write_text((binary / files.CONFIG).read_text())  # Hydra's snapshot
    (binary / files.CONFIG).write_bytes(b"\xff\xfe\x00\x81 binary")
    typed = make_job(tmp_path, "typed", [(0.3, 97.0, 0.03, 98.0)], norm__name="ln")
    (typed / files.SUMMARY).write_text("[1, 2, 3]\n")  # valid JSON, wrong type
    folder = make_job(tmp_path, "folder", [(0.3, 97.0, 0.03, 98.0)], reg__name="l2", reg__l2=0.001)
    (folder / files.MISCLASSIFIED).write_text(json.dumps({"items": []}))
    (folder / files.MISCLASSIFIED_PNG).mkdir()
    assert main([str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert all(line.startswith(("WARNING", "ERROR")) for line in err.splitlines())  # one line per problem
    markdown = (tmp_path / files.RESULTS_MD).read_text()
    assert table_column(markdown, "Regularization") == ["BatchNorm", "BatchNorm with L2", "GroupNorm", "LayerNorm"]
    assert table_column(markdown, "Status") == ["completed", "completed", "1 unreadable: config.yaml",
                                                "1 unreadable: summary.json"]
    assert (tmp_path / files.RESULTS_CSV).read_text().count("\n") == 5  # header and the same four rows


def test_a_job_another_process_holds_shows_as_running(tmp_path):
    make_job(tmp_path, "done", [(0.3, 97.0, 0.03, 98.0)])
    busy = make_job(tmp_path, "busy", [(0.3, 97.0, 0.03, 98.0)], status=None, norm__name="gn")
    lock = files.FolderLock(busy)
    assert lock.acquire()
    try:
        report = collect([tmp_path], plots=False)
    finally:
        lock.release()
    assert table_column(report.markdown, "Status") == ["completed", "1 running"]
    assert report.running_jobs == 1
    assert table_column(collect([tmp_path], plots=False).markdown, "Status") == ["completed", "1 unfinished"]


def test_plots_are_written(tmp_path):
    make_two_configs(tmp_path)
    job = tmp_path / "a"
    image = [[(row * 9 + col) % 256 for col in range(28)] for row in range(28)]
    items = [{"index": i, "actual": i % 10, "predicted": (i + 1) % 10, "image": image} for i in range(10)]
    (job / files.MISCLASSIFIED).write_text(json.dumps(
        {"label": "BatchNorm", "class_names": [str(i) for i in range(10)], "items": items}))
    collect([tmp_path])
    assert (tmp_path / files.CURVES_PNG).read_bytes().startswith(PNG_MAGIC)
    assert not (tmp_path / files.BATCH_SIZE_PNG).exists()  # one batch size: nothing to plot against
    assert (job / files.MISCLASSIFIED_PNG).read_bytes().startswith(PNG_MAGIC)
    assert not (tmp_path / "b" / files.MISCLASSIFIED_PNG).exists()  # no json, no plot
    fig = plot_curves(["BatchNorm"], [[read_job(tmp_path / name, []) for name in "abc"]], tmp_path / "c.png")
    titles = {ax.get_title(): ax for ax in fig.axes}
    assert set(titles) == {"Train loss", "Train accuracy", "Train accuracy, epochs 1–2", "Test loss",
                           "Test accuracy", "Test accuracy, epochs 1–2"}
    assert [text.get_text() for text in fig.legends[0].get_texts()] == ["BatchNorm"]
    for title in ("Test accuracy", "Test accuracy, epochs 1–2"):
        test_acc = titles[title].get_lines()[0]  # mean over the three seeds: (99.4 + 99.3 + 99.6) / 3, then 99.4
        assert list(test_acc.get_xdata()) == [1, 2]
        assert list(test_acc.get_ydata()) == pytest.approx([99.4333333, 99.4])
        # ±1 std: epoch 1 std of (99.4, 99.3, 99.6) = 0.1528, epoch 2 of (99.2, 99.5, 99.5) = 0.1732
        (band,) = titles[title].collections
        low, high = band.get_paths()[0].vertices[:, 1].min(), band.get_paths()[0].vertices[:, 1].max()
        assert (low, high) == pytest.approx((99.4 - 0.1732051, 99.4333333 + 0.1527525))
    zoom = titles["Test accuracy, epochs 1–2"].get_ylim()
    assert zoom[0] > 99 and zoom[1] < 100  # the zoom follows the curves, not 0-100


def test_results_go_into_the_first_of_several_dirs(tmp_path):
    make_job(tmp_path / "sweep1", "a", [(0.3, 97.0, 0.03, 98.0)], seed=1)
    make_job(tmp_path / "sweep2", "a", [(0.3, 97.0, 0.03, 96.0)], seed=2)
    report = collect([tmp_path / "sweep1", tmp_path / "sweep2"], plots=False)
    assert report.out_dir == tmp_path / "sweep1" and (tmp_path / "sweep1" / files.RESULTS_MD).exists()
    assert table_column(report.markdown, "Best Test Accuracy") == ["97.00 ± 1.41"]


def test_collector_does_not_import_torch():
    code = "import sys, normsweep.collect; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_batch_size_plot_lines_ignore_a_learning_rate_that_follows_the_batch_size():
    from normsweep.collect import _follows_batch_size

    rows = pd.DataFrame({"batch_size": [2, 2, 64, 64], "optim.max_lr": [0.0005, 0.0005, 0.015, 0.015],
                         "dropout": [0.0, 0.1, 0.0, 0.1]})
    assert _follows_batch_size(rows, "optim.max_lr")
    assert not _follows_batch_size(rows, "dropout")


def test_intervals_and_tests_agree_with_an_independent_computation(tmp_path):
    """Three seeds a side, the values read back from the job folders and fed to scipy's own sample-based routines:
    the table's 95 % half-widths, differences, intervals and Welch p-values must be theirs."""
    base = {"a": 99.41, "b": 99.52, "c": 99.47}
    other = {"d": 99.20, "e": 99.33, "f": 99.26}
    for seed, (name, acc) in enumerate(base.items(), start=1):
        make_job(tmp_path, name, [(0.3, 97.0, 0.02 + acc / 1e4, acc)], seed=seed)
    for seed, (name, acc) in enumerate(other.items(), start=1):
        make_job(tmp_path, name, [(0.3, 97.0, 0.03 + acc / 1e4, acc)], seed=seed, norm__name="ln")
    report = collect([tmp_path], baseline="BatchNorm", plots=False)
    values = {label: [json.loads((tmp_path / n / files.SUMMARY).read_text())["best_test_acc"] for n in names]
              for label, names in (("BatchNorm", base), ("LayerNorm", other))}
    for label, sample in values.items():
        sem = scipy_stats.sem(sample)
        low, high = scipy_stats.t.interval(0.95, len(sample) - 1, loc=np.mean(sample), scale=sem)
        row = report.rows.set_index("label").loc[label]
        assert row["best_test_acc_ci95"] == pytest.approx((high - low) / 2)
    welch = scipy_stats.ttest_ind(values["LayerNorm"], values["BatchNorm"], equal_var=False)
    low, high = welch.confidence_interval(0.95)
    diff = np.mean(values["LayerNorm"]) - np.mean(values["BatchNorm"])
    line = [line for line in report.markdown.splitlines() if line.startswith("| LayerNorm")][-1]  # 2nd table
    cells = [cell.strip() for cell in line.strip("|").split("|")]
    assert cells[2] == f"{diff:+.2f} [{low:+.2f}, {high:+.2f}]".replace("-", "−")  # one epoch: final = best
    assert cells[3] == f"{welch.pvalue:.3f} ({welch.pvalue:.3f})"  # one row against the baseline: Holm = raw


def test_baseline_is_chosen_by_name_and_a_wrong_one_lists_the_rows(tmp_path, capsys):
    make_two_configs(tmp_path)
    assert main([str(tmp_path), "--baseline", "GroupNorm with L1", "--no-plots"]) == 0
    markdown = (tmp_path / files.RESULTS_MD).read_text()
    assert "## Differences against the baseline: GroupNorm with L1" in markdown
    assert "| BatchNorm         | 3 / 2 | +0.30 [−0.18, +0.78]" in markdown
    before = markdown
    capsys.readouterr()
    assert main([str(tmp_path), "--baseline", "Batchnorm"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["ERROR: baseline 'Batchnorm' matches no row; the rows are: BatchNorm; GroupNorm with L1"]
    assert (tmp_path / files.RESULTS_MD).read_text() == before  # nothing written


def test_tables_rebuild_from_a_results_csv_alone(tmp_path):
    make_two_configs(tmp_path)
    assert main([str(tmp_path), "--no-plots"]) == 0
    from_folders = (tmp_path / files.RESULTS_MD).read_text()
    csv_columns = list(pd.read_csv(tmp_path / files.RESULTS_CSV).columns)
    assert csv_columns[csv_columns.index("best_test_acc_std") + 1] == "best_test_acc_ci95"
    old_style = pd.read_csv(tmp_path / files.RESULTS_CSV).drop(
        columns=[c for c in csv_columns if c.endswith(("_ci95", "_n"))])  # as committed before intervals existed
    folder = tmp_path / "published"
    folder.mkdir()
    old_style.to_csv(folder / files.RESULTS_CSV, index=False)
    assert main(["--from-csv", str(folder / files.RESULTS_CSV)]) == 0
    assert (folder / files.RESULTS_MD).read_text() == from_folders
    assert "best_test_acc_ci95" in pd.read_csv(folder / files.RESULTS_CSV)
