"""Speed benchmark: the reference pipeline (torchvision MNIST + PIL transforms + DataLoader workers) against
normsweep's trainer on the same real MNIST images, in one run; and a sweep mode timing run.py end to end.

    python benchmarks/speed.py --data-root data                      # one epoch each, images/s and ratio
    python benchmarks/speed.py --data-root data --images 12800       # fewer images
    python benchmarks/speed.py --data-root data --sweep --epochs 2   # 6-run sweep at 1 and 2 epochs, extrapolated
    python benchmarks/speed.py --data-root data --device cuda        # reference, eager and CUDA-graph step on a GPU
    python benchmarks/speed.py --data-root data --sweep hydra/launcher=gpu device=cuda   # the sweep on one GPU
    python benchmarks/speed.py --data-root data --sweep --epochs 1 --compare data.train_limit=12000
        # the 6-run sweep under each launcher in one run (basic, joblib, gpu fused and unfused), ratios to basic
    python benchmarks/speed.py --data-root data --device cuda --sweep --compare   # 6- and 18-job sweeps, fused or not

The reference pipeline lives here only, never in the product's code path.
"""
from __future__ import annotations

import argparse
import json
import gzip
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from normsweep.config import Config
from normsweep.data import load_data, obtain_mnist
from normsweep.model import build_model
from normsweep.runtime import keep_freed_memory
from normsweep.step import Lane, Step, make_optimizer, momentum_buffers
from normsweep.train import DeviceData, drain, steps_per_epoch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class ReferenceNet(nn.Module):
    """The course project's model as written there: nn.Dropout and the norm layer in plain nn.Sequential blocks."""

    def __init__(self, dropout: float = 0.03):
        super().__init__()

        def block(c_in, c_out, k):
            return nn.Sequential(nn.Conv2d(c_in, c_out, k, bias=False), nn.ReLU(), nn.BatchNorm2d(c_out), nn.Dropout(dropout))

        self.net = nn.Sequential(block(1, 8, 3), block(8, 16, 3), nn.MaxPool2d(2), nn.Conv2d(16, 8, 1, bias=False),
                                 block(8, 16, 3), block(16, 16, 3), block(16, 16, 3), nn.AvgPool2d(6), block(16, 16, 1),
                                 nn.Conv2d(16, 10, 1, bias=False))

    def forward(self, x):
        return F.log_softmax(self.net(x).view(-1, 10), dim=-1)


def reference_images_per_s(raw_dir: Path, images: int, batch_size: int, workers: int, device: torch.device) -> float:
    """torchvision datasets.MNIST with per-sample PIL transforms, DataLoader(shuffle, workers), SGD + OneCycleLR."""
    from torchvision import datasets, transforms

    with tempfile.TemporaryDirectory() as tmp:
        # torchvision's MNIST reads uncompressed files from <root>/MNIST/raw
        target = Path(tmp) / "MNIST" / "raw"
        target.mkdir(parents=True)
        for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
            src = raw_dir / name
            if src.exists():
                shutil.copy(src, target / name)
            else:
                with gzip.open(raw_dir / f"{name}.gz") as f_in, open(target / name, "wb") as f_out:
                    shutil.copyfileobj(f_in, f_out)
        transform = transforms.Compose([
            transforms.RandomRotation((-6.0, 6.0), fill=(0,)),
            transforms.RandomAffine(degrees=7, shear=7, translate=(0.1, 0.1), scale=(0.8, 1.2)),
            transforms.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1),
            transforms.ToTensor(),
            transforms.Normalize((0.1307,), (0.3081,)),
        ])
        train = datasets.MNIST(tmp, train=True, download=False, transform=transform)
        train = torch.utils.data.Subset(train, range(min(images, len(train))))
        loader = torch.utils.data.DataLoader(train, batch_size=batch_size, shuffle=True, num_workers=workers,
                                             pin_memory=device.type == "cuda")
        model = ReferenceNet().to(device)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.015, momentum=0.7)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.015, epochs=1, steps_per_epoch=len(loader))
        model.train()
        started = time.perf_counter()
        seen = 0
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            optimizer.zero_grad()
            loss = F.nll_loss(model(x), y)
            loss.backward()
            optimizer.step()
            scheduler.step()
            seen += len(y)
        sync(device)
        return seen / (time.perf_counter() - started)


def normsweep_images_per_s(data_root: Path, images: int, batch_size: int, precision: str, device: torch.device,
                           graphs: bool) -> float:
    """The trainer as training() sets it up (allocator setting, model layout), for batch norm: its one step run
    eagerly, or (graphs) replayed as CUDA graphs, timed over one epoch after its capture."""
    keep_freed_memory()  # process-wide: main() runs the reference pipeline first, so it keeps glibc's defaults
    cfg = Config(batch_size=batch_size, epochs=1, precision=precision)
    data = DeviceData.from_dataset(load_data("mnist", data_root, train_limit=images, test_limit=1000), device)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.norm, cfg.dropout, device, torch.get_num_threads())
    optimizer = make_optimizer(model.parameters(), cfg)
    generator = torch.Generator(device).manual_seed(cfg.seed)
    step = Step(model, [Lane(cfg, generator, 0, momentum_buffers(optimizer))], data,
                steps_per_epoch(len(data.train_labels), batch_size), capture=graphs)
    sync(device)
    started = time.perf_counter()
    drain(step.epoch())
    sync(device)
    return len(data.train_labels) / (time.perf_counter() - started)


def time_run(data_root: Path, epochs: int, device: str) -> tuple[float, dict[str, float]]:
    """One whole `python run.py norm=bn device=<device>` (start-up, data, training, files): -> its wall clock and its
    parts, from the job's run.log timestamps and metrics.jsonl: imports and Hydra (to the first log line), data (to
    the model line), capture (to the line after it), training and testing (the epochs' own seconds), the rest."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, str(ROOT / "run.py"), "norm=bn", f"device={device}", f"epochs={epochs}",
               f"data.root={data_root}", f"hydra.run.dir={tmp}/run"]
        print("$", " ".join(cmd), flush=True)
        started, wall_started = time.perf_counter(), time.time()
        subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        seconds = time.perf_counter() - started
        stamps = []  # (seconds since the start, message) of every line of the job's log
        for line in (Path(tmp) / "run" / "run.log").read_text().splitlines():
            if line.startswith("[") and "]" in line:
                when = time.mktime(time.strptime(line[1:20], "%Y-%m-%d %H:%M:%S")) + int(line[21:24]) / 1000
                stamps.append((when - wall_started, line))
        rows = [json.loads(r) for r in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    model_at = next(t for t, line in stamps if "model: " in line)
    first_epoch_at = next(t for t, line in stamps if ": epoch 1/" in line)
    train, test = sum(r["train_seconds"] for r in rows), sum(r["test_seconds"] for r in rows)
    # the first epoch's line comes after its training and testing: before them, after the model line, the step is
    # built (its schedule tables) and, on CUDA, captured
    capture = max(0.0, first_epoch_at - rows[0]["train_seconds"] - rows[0]["test_seconds"] - model_at)
    parts = {"imports and Hydra": stamps[0][0], "data": model_at - stamps[0][0], "step set-up and capture": capture,
             "training": train, "testing": test}
    parts["files and the rest"] = seconds - sum(parts.values())
    return seconds, parts


COMPARED = {  # --compare: the launchers timed on the same sweep, in this order
    "basic": ["hydra/launcher=basic"],
    "joblib": ["hydra/launcher=joblib"],  # n_jobs: Hydra's default, one job per core
    "gpu fused": ["hydra/launcher=gpu"],
    "gpu unfused": ["hydra/launcher=gpu", "hydra.launcher.fuse=false"],
}


def compare_launchers(data_root: Path, epochs: int, extra: list[str], device: str, seeds: list[str]) -> None:
    """The same sweep under each launcher (on CUDA the gpu launcher only, fused and unfused), for each seed list
    (1: the 6-run sweep; 1,2,3: 18 jobs), with ratios."""
    names = [n for n in COMPARED if device != "cuda" or n.startswith("gpu")]
    for seed in seeds:
        jobs = 6 * len(seed.split(","))
        seconds = {name: time_sweep(data_root, epochs, [*COMPARED[name], f"device={device}", f"seed={seed}", *extra])
                   for name in names}
        base = seconds[names[0]]
        for name in names:
            print(f"{jobs} jobs, {name:12s} {seconds[name]:7.1f} s   {base / seconds[name]:.2f}x {names[0]}",
                  flush=True)


def time_sweep(data_root: Path, epochs: int, extra: list[str]) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, str(ROOT / "run.py"), "-m", "norm=bn,gn,ln", "reg=l1,l2", f"epochs={epochs}",
               f"data.root={data_root}", f"hydra.sweep.dir={tmp}/sweep", *extra]
        print("$", " ".join(cmd), flush=True)
        started = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", type=Path, default=ROOT / "data", help="folder holding MNIST/raw")
    parser.add_argument("--images", type=int, default=60000, help="training images per pipeline (default one epoch)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores)")
    parser.add_argument("--workers", type=int, default=2, help="the reference DataLoader's workers")
    parser.add_argument("--precision", default="fp32", help="normsweep's precision (fp32 | bf16)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda: where every pipeline trains; on cuda the "
                        "CUDA-graph step is measured too")
    parser.add_argument("--run-epochs", type=int, default=0, help="also time one whole `python run.py norm=bn` of "
                        "this many epochs on --device (its default path: CUDA graphs on cuda)")
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument("--sweep", action="store_true", help="time run.py -m norm=bn,gn,ln reg=l1,l2 instead")
    parser.add_argument("--epochs", type=int, default=20, help="sweep mode: epochs per run (< 20 extrapolates; "
                        "from 2 on with a second 1-epoch sweep that separates startup from per-epoch time)")
    parser.add_argument("--compare", action="store_true", help="sweep mode: time the sweep under each launcher")
    parser.add_argument("--seeds", default="1", help="sweep mode: seeds of every run, e.g. 1,2,3 (18 jobs); with "
                        "--compare several lists, split by ';' (default on cuda: '1;1,2,3', the 6- and 18-job sweeps)")
    parser.add_argument("overrides", nargs="*", help="sweep mode: extra run.py overrides, e.g. hydra/launcher=joblib")
    args = parser.parse_args()

    obtain_mnist(args.data_root)
    raw_dir = args.data_root / "MNIST" / "raw"
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size}", flush=True)
    if args.sweep and args.compare:
        seeds = "1;1,2,3" if args.device == "cuda" and args.seeds == "1" else args.seeds
        compare_launchers(args.data_root.resolve(), args.epochs, args.overrides, args.device, seeds.split(";"))
        return
    if args.sweep:
        seconds = time_sweep(args.data_root.resolve(), args.epochs, [f"seed={args.seeds}", *args.overrides])
        if args.epochs >= 20:
            print(f"sweep: 6 runs x {args.epochs} epochs: {seconds / 60:.1f} min (measured)")
            return
        print(f"measured: {seconds:.0f} s for {args.epochs} epochs", flush=True)
        if args.epochs == 1:  # startup (imports, data, Hydra) is then scaled too: an overestimate
            print(f"sweep: 6 runs x 20 epochs: {seconds * 20 / 60:.1f} min (extrapolated: 20 x the 1-epoch time)")
            return
        # a second sweep of 1 epoch separates the per-epoch time from the fixed startup cost
        one = time_sweep(args.data_root.resolve(), 1, args.overrides)
        per_epoch = (seconds - one) / (args.epochs - 1)
        print(f"measured: {one:.0f} s for 1 epoch; per epoch {per_epoch:.0f} s, fixed {one - per_epoch:.0f} s")
        print(f"sweep: 6 runs x 20 epochs: {(one + 19 * per_epoch) / 60:.1f} min (extrapolated from the two sweeps)")
        return
    device = torch.device(args.device)
    if device.type == "cuda":
        print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}", flush=True)
    ref = None
    if not args.skip_reference:
        ref = reference_images_per_s(raw_dir, args.images, args.batch_size, args.workers, device)
        print(f"reference:              {ref:8.0f} train images/s", flush=True)
    paths = [("eager", False)] + ([("CUDA graphs", True)] if device.type == "cuda" else [])
    for name, graphs in paths:
        ours = normsweep_images_per_s(args.data_root, args.images, args.batch_size, args.precision, device, graphs)
        ratio = f"   {ours / ref:.2f}x the reference" if ref else ""
        print(f"normsweep {name} ({args.precision}): {ours:8.0f} train images/s{ratio}", flush=True)
    if args.run_epochs:
        seconds, parts = time_run(args.data_root.resolve(), args.run_epochs, args.device)
        print(f"one BN run, {args.run_epochs} epochs, python run.py: {seconds:.1f} s wall clock: "
              + ", ".join(f"{name} {part:.1f} s" for name, part in parts.items()), flush=True)

if __name__ == "__main__":
    main()
