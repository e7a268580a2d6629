#!/usr/bin/env bash
# GPU check, run on the lent GPU machine in one call (its own python3; nothing can be installed there):
#   1. the Triton kernel against the torch path on the real GPU (no interpreter), plus the soup tests;
#   2. the merge benchmark at P = 1e9 bf16, K = 2..4, and the LoRA-shaped merge, as a short table.
# Usage: bash scripts/gpu_check.sh      (about 2-4 minutes on an H100)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_INTERPRET=0 HF_HUB_OFFLINE=1
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv,noheader || true
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(0))"
echo "== parity: Triton vs torch on the GPU =="
timeout 180 $PY -m pytest -q -p no:cacheprovider -o addopts="" tests/test_triton_impl.py tests/test_interpolate.py tests/test_weights.py 2>&1 | tail -15
echo "== merge throughput =="
timeout 240 $PY scripts/merge_table.py --sizes 1G --dtypes bf16 --k 2,3,4 --methods torch,triton --repeats 5
