"""Front quality on the demo task: hypervolume of the RS front (2 trainings) against MORL fronts with 1, 3 and 5
preferences (as many trainings), side by side (rs_lightning/demo/front_quality.py).

Reuses the captioning demo's finished stages under $RS_BENCH_DEMO_OUT (default runs/demo, what `make demo`
writes) and trains only what is missing: from nothing, about 20 minutes on 2 CPU cores (init, 2 experts,
7 MORL runs, one sweep); after `make demo`, about 13 minutes; once trained, the sweep alone (~1 minute).
RS_BENCH_QUICK=1 runs the quick profile instead (tiny runs, about a minute: a pipeline check, not a result).
The table lands in `<out>/captioning/front_quality/front_quality.md` and in this benchmark's extra_info.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from rs_lightning.demo import front_quality


def test_front_quality_rs_vs_morl(benchmark, machine):
    quick = os.environ.get("RS_BENCH_QUICK") == "1"
    out = Path(os.environ.get("RS_BENCH_DEMO_OUT", "runs/demo")) / ("captioning-quick" if quick else "captioning")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as `rs demo`: the tiny captioner's ops are too small to split across threads
    try:
        result = benchmark.pedantic(front_quality.run, args=(out,), kwargs={"profile": "quick" if quick else "default"},
                                    rounds=1, iterations=1)
    finally:
        torch.set_num_threads(threads)
    benchmark.extra_info.update(machine=machine, out=str(out), profile="quick" if quick else "default",
                                methods=result["methods"])
    print("\n" + front_quality.format_table(result))
    names = [row["method"] for row in result["methods"]]
    assert names[0].startswith("RS") and sum(n.startswith("MORL") for n in names) == 4, names
