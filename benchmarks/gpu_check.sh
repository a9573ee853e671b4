#!/usr/bin/env bash
# Every check of the CUDA path in one go, for a session that is lent a GPU machine (see README, "On a GPU"):
# the CUDA tests, the speed benchmark (reference, eager, graphs; one 20-epoch run), the 6-run and 18-job 20-epoch
# sweeps fused and unfused (benchmarks/speed.py --compare), then the 18-job sweep fused on real MNIST, collected
# (its rows' means against the unfused run's spread: the accuracy check). Each step has a time limit, so one hang cannot spend the loan.
# Usage, in the project root there: bash benchmarks/gpu_check.sh [data root]
# Logs, the sweep's tables and the sweep folder (sweep.tgz) land in $OUT when the device tool sets it, else gpu-check/.
set -uo pipefail
data="${1:-.gpu-data}"
out="${OUT:-gpu-check}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__)"

echo "== CUDA tests"
timeout 150 python3 -m pytest -p no:cacheprovider -m cuda -rfEs tests/test_cuda.py >"$out/cuda-tests.log" 2>&1
echo "exit $?"; tail -30 "$out/cuda-tests.log"

echo "== speed: reference, eager, CUDA graphs, one 20-epoch run"
timeout 120 python3 benchmarks/speed.py --data-root "$data" --device cuda --run-epochs 20 2>&1 | tee "$out/speed.log"

echo "== the 6-run and the 18-job sweeps, 20 epochs, hydra/launcher=gpu fused and unfused"
timeout 330 python3 benchmarks/speed.py --data-root "$data" --device cuda --sweep --compare 2>&1 | tee "$out/sweeps.log"

echo "== the 18-job sweep, 20 epochs, hydra/launcher=gpu (fused), kept and collected"
sweep=/tmp/gpu-sweep
rm -rf "$sweep"
started=$(date +%s.%N)
timeout 120 python3 run.py -m norm=bn,gn,ln reg=l1,l2 seed=1,2,3 device=cuda hydra/launcher=gpu data.root="$data" \
    hydra.sweep.dir="$sweep" >"$out/sweep.log" 2>&1
status=$?
echo "exit $status after $(awk -v a="$started" -v b="$(date +%s.%N)" 'BEGIN {printf "%.1f", b - a}') s wall clock"
tail -15 "$out/sweep.log"
cp "$sweep"/results.md "$sweep"/results.csv "$out"/ 2>/dev/null && cat "$out/results.md"
tar czf "$out/sweep.tgz" -C "$(dirname "$sweep")" "$(basename "$sweep")" 2>/dev/null
exit "$status"
