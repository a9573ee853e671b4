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


SELECTED = {"test_acc_at_best_val": "test acc at best val", "final_test_acc": "final test acc"}  # --select
ALPHA = 0.05


class SelectionError(ValueError):
    """The differences cannot be tested as asked (another validation split per row, a margin <= 0); one line."""


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjustment over the finite p-values (statsmodels; nan stays nan)."""
    from statsmodels.stats.multitest import multipletests  # here: statsmodels is slow to load, and only this needs it

    finite = [i for i, p in enumerate(pvalues) if np.isfinite(p)]
    adjusted = [math.nan] * len(pvalues)
    if finite:
        for i, q in zip(finite, multipletests([pvalues[i] for i in finite], alpha=ALPHA, method="holm")[1]):
            adjusted[i] = float(q)
    return adjusted


def hedges_g(mean: float, std: float, n: int, base_mean: float, base_std: float, base_n: int) -> tuple[float, float]:
    """-> (Hedges' g of the row against the baseline, half-width of its approximate 95 % interval); nan below two
    seeds a side or without spread."""
    if min(n, base_n) < 2:
        return math.nan, math.nan
    pooled = math.sqrt(((n - 1) * std**2 + (base_n - 1) * base_std**2) / (n + base_n - 2))
    if pooled == 0:
        return math.nan, math.nan
    g = (1 - 3 / (4 * (n + base_n) - 9)) * (mean - base_mean) / pooled
    se = math.sqrt((n + base_n) / (n * base_n) + g**2 / (2 * (n + base_n)))
    return g, float(stats.norm.ppf(0.5 + CONFIDENCE / 2)) * se


def tost(mean: float, std: float, n: int, base_mean: float, base_std: float, base_n: int, margin: float) -> float:
    """p-value of Welch's two one-sided tests that the difference lies within ±margin (equivalence); nan below two
    seeds a side."""
    if min(n, base_n) < 2:
        return math.nan
    var, base_var = std**2 / n, base_std**2 / base_n
    if var + base_var == 0:
        return 0.0 if abs(mean - base_mean) < margin else 1.0
    se = math.sqrt(var + base_var)
    df = (var + base_var) ** 2 / (var**2 / (n - 1) + base_var**2 / (base_n - 1))
    diff = mean - base_mean
    return float(max(stats.t.sf((diff + margin) / se, df), stats.t.cdf((diff - margin) / se, df)))


def seeds_for(std: float, base_std: float, n: int, base_n: int, margin: float) -> float:
    """Seeds per row that Welch's test needs to detect a difference of `margin` at 80 % power (two-sided, 5 %), from
    the pooled spread of the two rows; nan without a spread."""
    from statsmodels.stats.power import TTestIndPower

    if min(n, base_n) < 2:
        return math.nan
    pooled = math.sqrt(((n - 1) * std**2 + (base_n - 1) * base_std**2) / (n + base_n - 2))
    power = TTestIndPower()
    if pooled == 0 or power.power(margin / pooled, nobs1=2, alpha=ALPHA) >= 0.8:  # two seeds resolve it already
        return 2.0
    return float(math.ceil(power.solve_power(effect_size=margin / pooled, alpha=ALPHA, power=0.8)))


def mcnemar(right_only: int, base_only: int) -> float:
    """Exact two-sided McNemar p-value from the discordant images: right here only, right in the baseline only."""
    if right_only + base_only == 0:
        return 1.0
    return float(stats.binomtest(right_only, right_only + base_only, 0.5).pvalue)


def differences_markdown(rows: pd.DataFrame, names: list[str], baseline: str | None,
                         select: str = "final_test_acc", margin: float = 0.2,
                         paired: list[tuple[int, int] | None] | None = None) -> str:
    """The second table of results.md: each row against the baseline row on `select` (a test accuracy not picked on
    the test set) and on the final test loss, by Welch's test over seeds with Holm's correction across the rows;
    Hedges' g; an exact McNemar test over the test images (`paired`: per row, the images right in the row only and
    in the baseline only, summed over the seeds both have; None where unknown), Holm-corrected too; a verdict at
    ±margin points, and the seeds that would resolve the margin."""
    if not margin > 0:
        raise SelectionError(f"margin={margin} must be > 0 (accuracy points)")
    base = baseline_index(names, baseline)
    b = rows.iloc[base]
    others = [i for i in range(len(rows)) if i != base]

    def arguments(i: int, metric: str) -> tuple:
        row = rows.iloc[i]
        return (row[f"{metric}_mean"], row[f"{metric}_std"], int(row[f"{metric}_n"]),
                b[f"{metric}_mean"], b[f"{metric}_std"], int(b[f"{metric}_n"]))

    def enough(i: int, metric: str) -> bool:
        return min(int(rows.iloc[i][f"{metric}_n"]), int(b[f"{metric}_n"])) >= MIN_SEEDS

    welch_p = {m: {i: welch(*arguments(i, m))[2] if enough(i, m) else math.nan for i in others}
               for m in (select, "final_test_loss")}
    holm_p = {m: dict(zip(others, holm([welch_p[m][i] for i in others]))) for m in welch_p}
    tost_p = dict(zip(others, holm([tost(*arguments(i, select), margin) if enough(i, select) else math.nan
                                    for i in others])))
    paired = paired or [None] * len(rows)
    mcnemar_raw = {i: mcnemar(*paired[i]) if paired[i] is not None else math.nan for i in others}
    mcnemar_holm = dict(zip(others, holm([mcnemar_raw[i] for i in others])))
    title = SELECTED[select]
    cells = []
    for i, name in enumerate(names):
        row = rows.iloc[i]
        n, base_n = int(row[f"{select}_n"]), int(b[f"{select}_n"])
        cell = {"Row": name, "n": f"{n} / {base_n}"}
        if i == base:
            cells.append({**cell, f"Δ {title} (95 % CI)": "baseline"})
            continue
        diff, half, _ = welch(*arguments(i, select))
        cell[f"Δ {title} (95 % CI)"] = _difference(diff, half, 2)
        cell["p (Holm)"] = _p_pair(welch_p[select][i], holm_p[select][i], enough(i, select))
        g, g_half = hedges_g(*arguments(i, select))
        cell["Hedges' g (95 % CI)"] = "n/a" if not np.isfinite(g) else f"{_signed(g, 2)} ± {g_half:.2f}"
        cell["McNemar b / c, p (Holm)"] = "n/a" if paired[i] is None else \
            f"{paired[i][0]} / {paired[i][1]}, {_p(mcnemar_raw[i])} ({_p(mcnemar_holm[i])})"
        cell[f"Verdict (±{margin:g})"] = _verdict(diff, holm_p[select][i], tost_p[i], enough(i, select), margin)
        cell[f"Seeds for ±{margin:g}"] = _plain_count(seeds_for(row[f"{select}_std"], b[f"{select}_std"], n, base_n,
                                                                 margin))
        loss_diff, loss_half, _ = welch(*arguments(i, "final_test_loss"))
        cell["Δ final test loss (95 % CI)"] = _difference(loss_diff, loss_half, 4)
        known = min(int(row["final_test_loss_n"]), int(b["final_test_loss_n"])) > 0  # older tables lack it
        cell["p loss (Holm)"] = _p_pair(welch_p["final_test_loss"][i], holm_p["final_test_loss"][i],
                                        enough(i, "final_test_loss")) if known else "n/a"
        cells.append(cell)
    columns = list(dict.fromkeys(k for cell in cells for k in cell))
    cells = [{k: cell.get(k, "") for k in columns} for cell in cells]  # the baseline's row: empty cells
    heading = (f"\n## Differences against the baseline: {markdown_cell(names[base])}\n\n"
               f"Row minus baseline on the {title} (not selected on the test set) and the final test loss, means over "
               "seeds. p: Welch's t-test over the seeds, raw (Holm-adjusted across the rows). McNemar: exact test "
               "over the test images of the final models, b / c = images right in the row only / in the baseline "
               f"only, summed over the seeds both have. Verdict at ±{margin:g} points: better / worse when Holm's p "
               f"< {ALPHA}, equivalent when Holm-adjusted TOST passes, else inconclusive. Seeds: per row, for 80 % "
               f"power at that margin. † fewer than {MIN_SEEDS} seeds on a side: no test.\n\n")
    return heading + markdown_table(cells)


def _difference(diff: float, half: float, decimals: int) -> str:
    if not np.isfinite(diff):
        return "n/a"
    if np.isfinite(half):
        return f"{_signed(diff, decimals)} [{_signed(diff - half, decimals)}, {_signed(diff + half, decimals)}]"
    return _signed(diff, decimals)


def _p_pair(raw: float, adjusted: float, enough: bool) -> str:
    return f"n < {MIN_SEEDS} †" if not enough else f"{_p(raw)} ({_p(adjusted)})"


def _plain_count(value: float) -> str:
    return "n/a" if not np.isfinite(value) else str(int(value))


def _verdict(diff: float, holm_p: float, holm_tost: float, enough: bool, margin: float) -> str:
    if not enough:
        return f"inconclusive (n < {MIN_SEEDS})"
    if np.isfinite(holm_p) and holm_p < ALPHA:
        return "better" if diff > 0 else "worse"
    if np.isfinite(holm_tost) and holm_tost < ALPHA:
        return f"equivalent within ±{margin:g}"
    return "inconclusive"
