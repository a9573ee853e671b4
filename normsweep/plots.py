"""The collector's figures: curves of all rows, best test accuracy against batch size and against the
regularization factors, and each job's misclassified grid, from what the collector read. matplotlib without pyplot;
never torch, and no file reading (runs.py reads and checks the run folders)."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure  # no pyplot: no global figure registry, no backend to pick, headless
from matplotlib.ticker import MaxNLocator

from normsweep import files
from normsweep.runs import Job


def _save(fig: Figure, path: Path) -> None:
    buffer = io.BytesIO()
    # the mark files.check_collectors_file looks for: a curves.png without it is someone else's and stays
    fig.savefig(buffer, format="png", dpi=100, metadata={"Software": files.COLLECTOR_PNG_MARK.decode()})
    files.write_atomic(path, buffer.getvalue())


def _zoom(ax, lows: list[float], highs: list[float], first_epoch: int, last_epoch: int) -> None:
    """Limits for a zoomed panel: the last epochs, the y range the curves and bands take there."""
    if lows and highs:
        low, high = min(lows), max(highs)
        pad = max((high - low) * 0.1, 0.01)
        ax.set_ylim(low - pad, high + pad)
    ax.set_xlim(first_epoch - 0.3, last_epoch + 0.3)


def plot_curves(names: list[str], groups: list[list[Job]], path: Path) -> Figure:
    """curves.png: the four per-epoch metrics, one line per table row (named by names): the mean over its seeds,
    with a band of ±1 std where it has several; each accuracy also zoomed on the last epochs, where the rows differ
    by tenths of a point."""
    # fixed margins rather than a layout engine: constrained layout tripled the time to draw this figure
    fig = Figure(figsize=(15, 8))
    fig.subplots_adjust(left=0.05, right=0.85, bottom=0.07, top=0.91, wspace=0.28, hspace=0.35)
    grid = fig.subplots(2, 3)
    axes = {"train_loss": grid[0, 0], "train_acc": grid[0, 1], "test_loss": grid[1, 0], "test_acc": grid[1, 1]}
    zoomed = {"train_acc": grid[0, 2], "test_acc": grid[1, 2]}
    last_epoch = max((int(job.metrics["epoch"].max()) for jobs in groups for job in jobs if len(job.metrics)),
                     default=1)
    first_zoomed = max(1, last_epoch - max(3, last_epoch // 4) + 1)  # the last quarter, at least 3 epochs
    zoom_range: dict[str, tuple[list[float], list[float]]] = {column: ([], []) for column in zoomed}
    for name, jobs in zip(names, groups):
        frames = [job.metrics for job in jobs if len(job.metrics)]
        if not frames:
            continue
        # epoch by epoch over seeds; a seed that stopped early leaves the later epochs to the rest
        by_epoch = pd.concat(frames).groupby("epoch")
        mean, std = by_epoch.mean(numeric_only=True), by_epoch.std(numeric_only=True)
        for column, ax in axes.items():
            if column not in mean:
                continue
            targets = [ax] + ([zoomed[column]] if column in zoomed else [])
            for target in targets:
                line, = target.plot(mean.index, mean[column], marker="o", markersize=3, label=name)
                if len(frames) > 1:
                    target.fill_between(mean.index, mean[column] - std[column].fillna(0),
                                        mean[column] + std[column].fillna(0), color=line.get_color(), alpha=0.15)
            if column in zoomed:
                tail = mean.index >= first_zoomed
                spread = std[column].fillna(0)[tail] if len(frames) > 1 else 0
                zoom_range[column][0].extend((mean[column][tail] - spread).dropna())
                zoom_range[column][1].extend((mean[column][tail] + spread).dropna())
    titles = {"train_loss": ("Train loss", "loss"), "train_acc": ("Train accuracy", "accuracy (%)"),
              "test_loss": ("Test loss", "loss"), "test_acc": ("Test accuracy", "accuracy (%)")}
    for column, ax in [*axes.items(), *zoomed.items()]:
        title, ylabel = titles[column]
        if ax in zoomed.values():
            title = f"{title}, epochs {first_zoomed}–{last_epoch}"
            _zoom(ax, *zoom_range[column], first_zoomed, last_epoch)
        ax.set(title=title, xlabel="epoch", ylabel=ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    legend = {label: handle for ax in axes.values() for handle, label in zip(*ax.get_legend_handles_labels())}
    if legend:
        fig.legend(legend.values(), legend.keys(), loc="upper right", fontsize="small")
    fig.suptitle("Training curves: mean over seeds, band ±1 std")
    _save(fig, path)
    return fig


def plot_batch_size(rows: pd.DataFrame, line_names: list[str], path: Path) -> None:
    """batch_size.png: one line per norm (strictly: per row name without the batch size) across batch sizes."""
    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.subplots()
    for name, line in rows.assign(line=line_names).groupby("line", sort=False):
        line = line.sort_values("batch_size")
        ax.errorbar(line["batch_size"], line["best_test_acc_mean"], yerr=line["best_test_acc_std"],
                    marker="o", capsize=3, label=name)
    batch_sizes = sorted(rows["batch_size"].dropna().unique())
    ax.set_xscale("log", base=2)
    ax.set_xticks(batch_sizes, [str(int(b)) for b in batch_sizes])
    ax.minorticks_off()
    ax.set(xlabel="batch size", ylabel="best test accuracy (%)")
    fig.suptitle("Best test accuracy against batch size (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    fig.legend(loc="outside right upper", fontsize="small")
    _save(fig, path)


FACTOR_PLOT_MIN = 3  # distinct positive values of a factor (a search, a grid over it) before it gets its plot


def plot_factors(rows: pd.DataFrame, factors: list[str], path: Path) -> None:
    """factors.png: best test accuracy against each regularization factor that takes several values (an Optuna search
    or a grid over it), log axis, one line per norm; with both factors searched, each panel ignores the other."""
    fig = Figure(figsize=(6 * len(factors), 4.5), layout="constrained")
    for ax, factor in zip(np.atleast_1d(fig.subplots(1, len(factors))), factors):
        for norm, line in rows[rows[factor] > 0].groupby("norm.name", sort=False):
            line = line.sort_values(factor)
            ax.errorbar(line[factor], line["best_test_acc_mean"], yerr=line["best_test_acc_std"], marker="o",
                        capsize=3, label=files.NORM_NAMES.get(norm, str(norm)))
        ax.set_xscale("log")
        ax.set(xlabel=f"{factor} (log scale)", ylabel="best test accuracy (%)", title=f"Against {factor}")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize="small")
    fig.suptitle("Best test accuracy against the regularization factors (mean ± std over seeds)")
    _save(fig, path)


def plot_misclassified(job: Job, path: Path) -> None:
    """misclassified.png: the test images the job's final model got wrong (job.misclassified, read and checked by
    runs.read_misclassified), 2 rows of 5."""
    grid = job.misclassified
    fig = Figure(figsize=(10, 5.2), layout="constrained")
    for ax, (actual, predicted, image) in zip(fig.subplots(2, -(-files.MISCLASSIFIED_SHOWN // 2)).ravel(), grid.panels):
        ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=255)
        # two lines: one line overlaps the next panel's title for long class names ("Ankle boot")
        ax.set_title(f"actual {actual}\npredicted {predicted}", fontsize=9)
    for ax in fig.axes:
        ax.axis("off")
    fig.suptitle(grid.label or files.run_label(job.config["norm.name"], job.config["reg.name"]))
    _save(fig, path)
