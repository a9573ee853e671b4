"""Prints the GPU sweep's rows next to the CPU reference sweep's rows of the same config (same norm, factors and
batch size), with Welch's t-test on the seeds' means and standard deviations (scipy's ttest_ind_from_stats).
Run: python docs/results/gpu/compare.py"""
from pathlib import Path

import pandas as pd
from scipy import stats

HERE = Path(__file__).parent
KEYS = ["label", "batch_size", "reg.l1", "reg.l2"]
METRICS = [("best_train_acc", 2), ("best_test_acc", 2), ("best_test_loss", 4)]


def main() -> None:
    gpu = pd.read_csv(HERE / "results.csv")
    cpu = pd.read_csv(HERE.parent / "reference" / "results.csv")
    both = gpu.merge(cpu, on=KEYS, suffixes=("_gpu", "_cpu"))
    print("| Row | Batch | " + " | ".join(f"{m}: GPU / CPU (p)" for m, _ in METRICS) + " |")
    print("|---|---|" + "---|" * len(METRICS))
    for _, r in both.iterrows():
        cells = []
        for metric, digits in METRICS:
            g, c = (r[f"{metric}_mean_{side}"] for side in ("gpu", "cpu"))
            test = stats.ttest_ind_from_stats(g, r[f"{metric}_std_gpu"], r[f"{metric}_n_gpu"],
                                              c, r[f"{metric}_std_cpu"], r[f"{metric}_n_cpu"], equal_var=False)
            cells.append(f"{g:.{digits}f} / {c:.{digits}f} ({test.pvalue:.2f})")
        print(f"| {r['label']} | {r['batch_size']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
