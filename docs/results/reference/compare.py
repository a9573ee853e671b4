"""Prints the README's comparison: this project's reference sweep (results.csv beside this file, written by the
collector) next to the numbers the course project published. Run: python docs/results/reference/compare.py"""
import math
from pathlib import Path

import pandas as pd

# The course project's published table (best train acc / best test acc / best test loss / batch), quoted as printed.
PUBLISHED = {
    "BatchNorm": (98.59, 99.50, 0.0024, 64),
    "BatchNorm with L1": (98.35, 99.47, 0.2068, 128),
    "BatchNorm with L2": (98.73, 99.61, 0.0313, 64),
    "BatchNorm with L1 and L2": (98.22, 99.43, 0.2148, 128),
}


def cell(mean: float, std: float, digits: int) -> str:
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def main() -> None:
    rows = pd.read_csv(Path(__file__).with_name("results.csv"))
    print("| Row | Batch | Best train acc: ours / published | Best test acc: ours / published "
          "| Best test loss: ours / published | Loss floor at the published accuracy |")
    print("|---|---|---|---|---|---|")
    for _, r in rows.iterrows():
        published = PUBLISHED.get(r["label"])
        train = cell(r["best_train_acc_mean"], r["best_train_acc_std"], 2)
        test = cell(r["best_test_acc_mean"], r["best_test_acc_std"], 2)
        loss = cell(r["best_test_loss_mean"], r["best_test_loss_std"], 4)
        if published:
            p_train, p_test, p_loss, _ = published
            floor = (1 - p_test / 100) * math.log(2)  # each error costs >= ln 2 of NLL
            print(f"| {r['label']} | {r['batch_size']} | {train} / {p_train:.2f} | {test} / {p_test:.2f} "
                  f"| {loss} / {p_loss:.4f} | ≥ {math.floor(floor * 1e4) / 1e4:.4f} |")  # a bound: rounded down
        else:
            print(f"| {r['label']} | {r['batch_size']} | {train} / — | {test} / — | {loss} / — | |")


if __name__ == "__main__":
    main()
