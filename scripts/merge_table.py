"""Print the merge-throughput table without pytest-benchmark (the GPU box has no extra packages).

    python scripts/merge_table.py --sizes 1G --dtypes bf16 --k 2,3,4 [--methods torch,triton,copy]

Uses the cases of benchmarks/bench_merge.py; times are the best of --repeats after one warm-up.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from benchmarks import bench_merge as bm  # noqa: E402
from benchmarks.conftest import machine_description  # noqa: E402


def _runs_here(method: str) -> bool:
    """triton is a CUDA path, native* (the fused CPU kernel) a CPU one; the rest run anywhere."""
    if method == "triton":
        return bm.DEVICE == "cuda"
    if method.startswith("native"):
        return bm.DEVICE == "cpu"
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="16M,128M")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--k", default="2,3,4")
    parser.add_argument("--methods", default="naive,stack,torch,native,native_nocheck,triton")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    methods = [m for m in args.methods.split(",") if _runs_here(m)]
    print(f"device: {bm.DEVICE} | {machine_description()}")
    print("| P | dtype | K | method | ms | GB/s | % of copy_ GB/s |")
    print("|---|---|---|---|---|---|---|")
    for size in args.sizes.split(","):
        p = bm._parse_size(size)
        for dtype_name in args.dtypes.split(","):
            dtype = bm.DTYPES[dtype_name]
            ref = bm.copy_gbs(p, dtype)
            print(f"| {size} | {dtype_name} | - | copy_ | {2 * p * dtype.itemsize / ref / 1e6:.2f} | {ref:.1f} | 100 |")
            for k in [int(x) for x in args.k.split(",")]:
                sources = bm.make_sources(p, k, dtype)
                out = {key: torch.empty_like(v) for key, v in sources[0].items()}
                weights = bm.weights_for(k)
                for method in methods:
                    best = bm.best_time(method, sources, out, weights, args.repeats)
                    gbs = (k + 1) * p * dtype.itemsize / best / 1e9
                    row = [size, dtype_name, k, method, f"{best * 1e3:.2f}", f"{gbs:.1f}", f"{100 * gbs / ref:.0f}"]
                    print("| " + " | ".join(map(str, row)) + " |")
                del out
    # LoRA-shaped merge: launch-bound, reported in microseconds.
    dtype = torch.bfloat16 if bm.DEVICE == "cuda" else torch.float32
    for k in (2, 3):
        g = torch.Generator(device=bm.DEVICE).manual_seed(0)
        sources = [
            {f"a{i}": torch.randn(s, generator=g, device=bm.DEVICE).to(dtype) for i, s in enumerate(bm.LORA_SHAPES)}
            for _ in range(k)
        ]
        out = {key: torch.empty_like(v) for key, v in sources[0].items()}
        for method in [m for m in methods if m in ("naive", "torch", "native", "triton")]:
            best = bm.best_time(method, sources, out, bm.weights_for(k), 20)
            print(f"| LoRA 256 tensors 16.8M | {str(dtype)[6:]} | {k} | {method} | {best * 1e3:.3f} | - | - |")


if __name__ == "__main__":
    main()
