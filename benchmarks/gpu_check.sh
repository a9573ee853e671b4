#!/usr/bin/env bash
# Every check of the CUDA path in one go, for a session that is lent a GPU machine (see README, "On a GPU"):
# the CUDA tests, then the speed benchmark (reference, eager, graphs; one 20-epoch run), then the 6-run sweep
# with hydra/launcher=gpu. Usage, in the project root there: bash benchmarks/gpu_check.sh [data root]
# The lent machine has no scipy (the collector's statistics need it) and no network: before the run, add its wheel
# to the wheels that ../shared/device/prepare.sh collects, here:
#   python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl scipy
set -uo pipefail
data="${1:-.gpu-data}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py 2>&1 | tail -25
python benchmarks/speed.py --data-root "$data" --device cuda --run-epochs 20
python benchmarks/speed.py --data-root "$data" --sweep hydra/launcher=gpu device=cuda
