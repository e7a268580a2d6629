#!/usr/bin/env bash
# GPU check, run on a lent GPU machine in one call (its own python3 with torch, triton, lightning, peft,
# transformers; nothing can be installed there, so open_clip travels as wheels in .whl/ when present):
#   1. the compiled Triton kernel against a float64 reference and the torch path (tests/test_gpu.py and the
#      soup tests, no interpreter), plus a few bf16-mixed PPO and SCST steps on the GPU;
#   2. the merge benchmark at P = 128M and 1e9 (bf16 and fp32, K = 2, 3, 4, 8) against copy_, the naive
#      loop and stack-and-sum, and the LoRA-shaped merge, printed as the table in benchmarks/RESULTS.md.
# Usage: bash scripts/gpu_check.sh [LOG]      (about 3-5 minutes on an H100)
set -uo pipefail
cd "$(dirname "$0")/.."
LOG=${1:-/dev/null}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TRITON_INTERPRET=0 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/rs_site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/rs_site"
fi
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.memory --format=csv,noheader || true
  $PY -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__, '|', torch.cuda.get_device_name(0))"
  echo "== 1. parity and GPU steps (compiled Triton, no interpreter) =="
  timeout 300 $PY -m pytest -q -p no:cacheprovider -o addopts="" -rs --durations=5 tests/test_gpu.py \
    tests/test_triton_impl.py tests/test_interpolate.py tests/test_weights.py tests/test_lora_soup.py
  echo "pytest exit: $?"
  echo "== 2. merge throughput =="
  timeout 240 $PY scripts/merge_table.py --sizes 128M,1G --dtypes bf16,fp32 --k 2,3,4,8 \
    --methods naive,stack,torch,triton --repeats 5
  echo "merge table exit: $?"
  echo "== 3. host time of a LoRA-shaped merge (256 tensors): launch-bound or host-bound? =="
  $PY - <<'PY'
import time, torch
from benchmarks.bench_merge import LORA_SHAPES
from rs_lightning.soup import interpolate
for k in (2, 3):
    g = torch.Generator(device="cuda").manual_seed(0)
    srcs = [{f"a{i}": torch.randn(s, generator=g, device="cuda").bfloat16() for i, s in enumerate(LORA_SHAPES)}
            for _ in range(k)]
    out = {n: torch.empty_like(v) for n, v in srcs[0].items()}
    w = [1.0 / k] * (k - 1) + [1.0 - (k - 1) / k]
    for impl in ("torch", "triton"):
        interpolate(srcs, w, out=out, impl=impl)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(20):
            interpolate(srcs, w, out=out, impl=impl)
        host = (time.perf_counter() - t) / 20
        torch.cuda.synchronize()
        total = (time.perf_counter() - t) / 20
        print(f"K={k} {impl}: host {host * 1e3:.2f} ms per call, host + GPU {total * 1e3:.2f} ms per call")
PY
} 2>&1 | tee "$LOG"
