#!/usr/bin/env bash
# Every check of the CUDA path in one go, for a session that is lent a GPU machine (see README, "On a GPU"):
# the CUDA tests, then the speed benchmark (reference, eager, graphs; one 20-epoch run), then the 6-run sweep
# with hydra/launcher=gpu. Usage, in the project root there: bash benchmarks/gpu_check.sh [data root]
set -uo pipefail
data="${1:-.gpu-data}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py 2>&1 | tail -25
python benchmarks/speed.py --data-root "$data" --device cuda --run-epochs 20
python benchmarks/speed.py --data-root "$data" --sweep hydra/launcher=gpu device=cuda
