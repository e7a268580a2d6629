"""Latency of `rs serve`: a slider move to new outputs (HTTP POST /api/soup: in-place soup + decoding + rewards).

The target (README, `rs serve`): at most 1 s on 2 CPU cores for the demo's captioner with 8 examples. Measured
through a real uvicorn server with an HTTP client, as the page does, over slider positions lam = 0.05 .. 0.95
(every request a different soup), after one warm-up request.

The run served: `RS_BENCH_SERVE_RUN` if set, else `runs/demo/captioning/rep0/front` (what `make demo` writes),
else a front of two perturbed coca-tiny experts built here (the demo's architecture and decoding length,
random weights). Run as a script for the table of RESULTS.md:

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_serve.py
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEMO_RUN = ROOT / "runs" / "demo" / "captioning" / "rep0" / "front"
EXAMPLES = 8
POSITIONS = [round(0.05 * i, 2) for i in range(1, 20)]


def _run_dir(tmp: Path) -> Path:
    if os.environ.get("RS_BENCH_SERVE_RUN"):
        return Path(os.environ["RS_BENCH_SERVE_RUN"])
    if (DEMO_RUN / "config.yaml").is_file():
        return DEMO_RUN
    sys.path.insert(0, str(ROOT / "tests"))
    from serve_cases import random_experts_front

    return random_experts_front(tmp / "random", points=3)


def measure(run_dir: Path) -> dict:
    """Seconds per slider move (client round trip, and the server's merge / decode split), one per position."""
    import httpx

    from rs_lightning.serve import SoupSession
    from rs_lightning.serve.app import create_app

    sys.path.insert(0, str(ROOT / "tests"))
    from serve_cases import running_server

    start = time.perf_counter()
    session = SoupSession.open(run_dir, examples=EXAMPLES)
    opened = time.perf_counter() - start
    total, merge, decode = [], [], []
    with running_server(create_app(session)) as url, httpx.Client(timeout=120) as client:
        client.post(f"{url}/api/soup", json={"weights": [0.5, 0.5]})  # warm-up
        for lam in POSITIONS:
            t0 = time.perf_counter()
            body = client.post(f"{url}/api/soup", json={"weights": [1 - lam, lam]}).json()
            total.append(time.perf_counter() - t0)
            merge.append(body["seconds"]["merge"])
            decode.append(body["seconds"]["decode"])
    params = sum(t.numel() for t in session.experts[0].values())
    return {"run": str(run_dir), "open_s": opened, "params": params, "total": total, "merge": merge,
            "decode": decode}


def _row(name: str, xs: list[float]) -> str:
    q = statistics.quantiles(xs, n=10)
    return (f"| {name} | {statistics.median(xs) * 1e3:.0f} | {q[-1] * 1e3:.0f} | {min(xs) * 1e3:.0f} | "
            f"{max(xs) * 1e3:.0f} |")


def table(result: dict) -> str:
    lines = [f"run: {result['run']} ({result['params'] / 1e6:.1f}M parameters per expert), {EXAMPLES} examples, "
             f"{len(result['total'])} slider positions; session open {result['open_s']:.1f} s",
             "| part | median ms | p90 ms | min ms | max ms |", "|---|---|---|---|---|",
             _row("slider move (HTTP round trip)", result["total"]), _row("in-place soup", result["merge"]),
             _row("decode + rewards", result["decode"])]
    return "\n".join(lines)


@pytest.mark.benchmark(group="serve")
def test_slider_move_latency(benchmark, machine, tmp_path):
    pytest.importorskip("fastapi")
    pytest.importorskip("open_clip")
    result = benchmark.pedantic(measure, args=(_run_dir(tmp_path),), rounds=1, iterations=1)
    benchmark.extra_info.update(machine=machine, run=result["run"], examples=EXAMPLES,
                                median_s=statistics.median(result["total"]), max_s=max(result["total"]),
                                merge_median_s=statistics.median(result["merge"]),
                                decode_median_s=statistics.median(result["decode"]))
    print("\n" + table(result))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    from benchmarks.conftest import machine_description

    with tempfile.TemporaryDirectory() as tmp:
        print(f"machine: {machine_description()}")
        print(table(measure(_run_dir(Path(tmp)))))
