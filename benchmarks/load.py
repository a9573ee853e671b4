"""Training beside CPU-bound hog processes (a laptop with other work open, a node that gives fewer cores than it
reports): images/s of normsweep's trainer for each OpenMP wait policy and thread count, with no hogs and with some,
each measured in a fresh process (the policy is read when OpenMP starts), all in one invocation.

    python benchmarks/load.py --data-root data                   # 6400 MNIST images, 0 and 4 hogs
    python benchmarks/load.py --data-root data --hogs 0 2 4 --images 3200

OpenMP's wait policy (torch's CPU threads are libgomp's): by default an idle thread spins for a while between parallel
regions (fast on idle cores, starved when a hog holds the core that the thread it waits for needs); OMP_WAIT_POLICY=
PASSIVE makes it sleep at once; GOMP_SPINCOUNT=10000 spins briefly, then sleeps.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

TRAIN = """
import json, sys, time, torch
sys.path.insert(0, {root!r})
from benchmarks.speed import normsweep_images_per_s
torch.set_num_threads({threads})
print(json.dumps(normsweep_images_per_s({data_root!r}, {images}, 64, "fp32", torch.device("cpu"), False)))
"""


POLICIES = {"default": {}, "PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"}, "spin10k": {"GOMP_SPINCOUNT": "10000"}}


def images_per_s(data_root: Path, images: int, threads: int, policy: str) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(POLICIES[policy])
    code = TRAIN.format(root=str(ROOT), threads=threads, data_root=str(data_root), images=images)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                         timeout=1800)
    return float(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", type=Path, default=ROOT / "data")
    parser.add_argument("--images", type=int, default=6400)
    parser.add_argument("--hogs", type=int, nargs="+", default=[0, 4])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, os.cpu_count() or 1])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    print(f"{os.cpu_count()} cores; {args.images} MNIST images per measurement, batch 64, BatchNorm, fp32")
    print(f"{'hogs':>4} {'threads':>7} {'policy':>8} {'images/s':>9}  vs 1 thread, same hogs")
    for hogs in args.hogs:
        hog_procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(hogs)]
        try:
            time.sleep(0.5 if hogs else 0)
            one_thread = None
            for threads in args.threads:
                for policy in POLICIES:
                    # the best of `repeats`: noise from elsewhere only ever slows a measurement down
                    speed = max(images_per_s(args.data_root, args.images, threads, policy) for _ in range(args.repeats))
                    if threads == 1 and policy == "default":
                        one_thread = speed
                    print(f"{hogs:>4} {threads:>7} {policy:>8} {speed:>9.0f}  {speed / one_thread:.2f}x", flush=True)
        finally:
            for proc in hog_procs:
                proc.kill()
                proc.wait()


if __name__ == "__main__":
    main()
