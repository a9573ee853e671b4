"""Prints the README's batch-size table: best test accuracy (mean ± std over seeds) per norm and batch size, read
from the collector's results.csv beside this file. Run: python docs/results/batch_size/pivot.py"""
from pathlib import Path

import pandas as pd

rows = pd.read_csv(Path(__file__).with_name("results.csv"))
rows["cell"] = [f"{m:.2f} ± {s:.2f}" for m, s in zip(rows["best_test_acc_mean"], rows["best_test_acc_std"])]
table = rows.pivot(index="label", columns="batch_size", values="cell").reindex(["BatchNorm", "GroupNorm", "LayerNorm"])
table.columns = [f"batch {b}" for b in table.columns]
print(table.rename_axis("best test acc (%)").to_markdown())
