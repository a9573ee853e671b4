"""The table's statistics, from each row's mean, sample standard deviation and number of seeds: 95 % t confidence
intervals, and every row's difference against a baseline row with Welch's t-test (scipy.stats); and the markdown of
the tables, escaped. No torch."""
from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd
from scipy import stats

CONFIDENCE = 0.95
MIN_SEEDS = 3  # fewer seeds on either side: the difference is shown, its p-value is not (it would mean nothing)
COMPARED = (("best_test_acc", "best test acc", 2), ("best_test_loss", "best test loss", 4))  # (metric, title, decimals)


class BaselineError(ValueError):
    """The baseline names no row; one line listing the rows."""


def ci_half_width(std: float, n: int) -> float:
    """Half-width of the 95 % t confidence interval of the mean of n values with sample std (nan below 2 values)."""
    if n < 2 or not np.isfinite(std):
        return math.nan
    return float(stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1) * std / math.sqrt(n))


def welch(mean: float, std: float, n: int, base_mean: float, base_std: float, base_n: int) -> tuple[float, float, float]:
    """-> (mean - base_mean, half-width of its 95 % confidence interval, two-sided p-value), by Welch's t-test
    (unequal variances, Welch-Satterthwaite degrees of freedom). nan where n < 2 or both spreads are zero."""
    diff = mean - base_mean
    if min(n, base_n) < 2:
        return diff, math.nan, math.nan
    var, base_var = std**2 / n, base_std**2 / base_n
    if var + base_var == 0:
        return diff, math.nan, math.nan
    df = (var + base_var) ** 2 / (var**2 / (n - 1) + base_var**2 / (base_n - 1))
    half = float(stats.t.ppf(0.5 + CONFIDENCE / 2, df) * math.sqrt(var + base_var))
    p = float(stats.ttest_ind_from_stats(mean, std, n, base_mean, base_std, base_n, equal_var=False).pvalue)
    return diff, half, p


def add_intervals(rows: pd.DataFrame, metrics: tuple[str, ...]) -> pd.DataFrame:
    """rows with `<metric>_ci95` (and `<metric>_n`, the seeds with a value, where absent: the row's seeds) placed
    right after each metric's std column."""
    rows = rows.copy()
    for metric in metrics:
        if f"{metric}_n" not in rows:
            rows.insert(rows.columns.get_loc(f"{metric}_std") + 1, f"{metric}_n", rows["seeds"])
        ci = [ci_half_width(std, int(n)) for std, n in zip(rows[f"{metric}_std"], rows[f"{metric}_n"])]
        if f"{metric}_ci95" in rows:
            rows[f"{metric}_ci95"] = ci
        else:
            rows.insert(rows.columns.get_loc(f"{metric}_std") + 1, f"{metric}_ci95", ci)
    return rows


def markdown_cell(value: object) -> str:
    """A table cell that cannot break its table: line breaks become spaces, `|` becomes `\\|` (a backslash before it
    doubled, or it would escape the escape). Labels and extra keys come from config values, which may hold either."""
    text = " ".join(str(value).splitlines())
    return re.sub(r"(\\*)\|", lambda match: match.group(1) * 2 + "\\|", text)


def markdown_table(cells: list[dict[str, str]]) -> str:
    """A markdown table of one dict per row (keys: the headings), every cell escaped."""
    escaped = [{markdown_cell(k): markdown_cell(v) for k, v in row.items()} for row in cells]
    # disable_numparse: cells are already formatted; tabulate must not turn '0.00001' into '1e-05'
    return pd.DataFrame(escaped).to_markdown(index=False, disable_numparse=True) + "\n"


def baseline_index(names: list[str], baseline: str | None) -> int:
    if baseline is None:
        return 0
    if baseline not in names:
        raise BaselineError(f"baseline {baseline!r} matches no row; the rows are: {'; '.join(names)}")
    return names.index(baseline)


def _signed(value: float, decimals: int) -> str:
    return f"{value:+.{decimals}f}".replace("-", "−")


def _p(p: float) -> str:
    return "n/a" if not np.isfinite(p) else ("< 0.001" if p < 0.001 else f"{p:.3f}")


def differences_markdown(rows: pd.DataFrame, names: list[str], baseline: str | None) -> str:
    """The second table of results.md: each row against the baseline row."""
    base = baseline_index(names, baseline)
    b = rows.iloc[base]
    cells = []
    for name, (_, row) in zip(names, rows.iterrows()):
        cell = {"Row": name}
        for metric, title, decimals in COMPARED:
            n, base_n = int(row[f"{metric}_n"]), int(b[f"{metric}_n"])
            cell["n"] = f"{n} / {base_n}"
            if row.name == b.name:
                cell[f"Δ {title} (95 % CI)"], cell[f"p ({title})"] = "baseline", ""
                continue
            diff, half, p = welch(row[f"{metric}_mean"], row[f"{metric}_std"], n,
                                  b[f"{metric}_mean"], b[f"{metric}_std"], base_n)
            if not np.isfinite(diff):
                shown = "n/a"
            elif np.isfinite(half):
                shown = f"{_signed(diff, decimals)} [{_signed(diff - half, decimals)}, {_signed(diff + half, decimals)}]"
            else:
                shown = _signed(diff, decimals)
            cell[f"Δ {title} (95 % CI)"] = shown
            cell[f"p ({title})"] = f"n < {MIN_SEEDS} †" if min(n, base_n) < MIN_SEEDS else _p(p)
        cells.append(cell)
    title = (f"\n## Differences against the baseline: {markdown_cell(names[base])}\n\n"
             "Row minus baseline, mean over seeds; 95 % confidence interval and two-sided p-value of Welch's t-test "
             f"(unequal variances) over the seeds, n = seeds of the row / of the baseline. † fewer than {MIN_SEEDS} "
             "seeds on a side: no p-value.\n\n")
    return title + markdown_table(cells)
