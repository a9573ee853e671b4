"""Is the reference's "test loss" of 0.2068 / 0.2148 the L1 penalty plus the NLL? Prints, for each L1 job of a
sweep, the penalty l1 * sum|w| of its final weights next to its best test NLL.
Run: python docs/results/reference/l1_penalty.py outputs/reference"""
import sys
from pathlib import Path

import torch
import yaml

for job in sorted(Path(sys.argv[1]).iterdir()):
    config_path, checkpoint = job / "config.yaml", job / "checkpoint.pt"
    if not (config_path.exists() and checkpoint.exists()):
        continue
    config = yaml.safe_load(config_path.read_text())
    if not config["reg"]["l1"]:
        continue
    state = torch.load(checkpoint, weights_only=True)
    abs_sum = sum(p.abs().sum().item() for name, p in state["model"].items()
                  if p.is_floating_point() and "running_" not in name)  # the parameters, not BatchNorm's buffers
    penalty = config["reg"]["l1"] * abs_sum
    best_nll = min(row["test_loss"] for row in state["history"])
    print(f"{job.name}: l1 * sum|w| = {penalty:.4f}, best test NLL = {best_nll:.4f}, sum = {penalty + best_nll:.4f}")
