"""Per-point cost of a front sweep: the in-place soup swap against the evaluation and a save/reload round trip.

One model of realistic CPU size (a transformers Llama scaled to ~60M fp32 parameters, random weights;
two "experts" are small random perturbations of it), measured in one run:

    (a) swap        rs_lightning.soup.interpolate(experts, w, out=module.state_dict()), in place (what
                    `rs front` does per point)
    (b) evaluate    trainer.test on the souped module (a reused quiet Trainer; 8 prompts x 32 tokens,
                    reward = mean logit of a fixed token, a torchmetrics MeanMetric)
    (c) sweep point a whole `run_sweep` point: swap + trainer.test + the fsynced row (5-point sweep / 5)
    (d) save+load   interpolate into new tensors, safetensors save_file, load_file, load_state_dict
                    (the minimal round trip of codebases that evaluate a soup from disk)
    (e) HF round    interpolate, save_pretrained, LlamaForCausalLM.from_pretrained (the usual HF flow)
    (f) hypervolume exact HV (moocore) of a 286-point 4-reward front and a 2000-point 2-reward set, and the
                    speed-up over the hand-written slicing it replaced (benchmarks/hv_slicing.py)

`extra_info` carries the parameter count and, for (a), (d), (e), the ratio to the evaluation time of (b)
measured in the same session. Run: `.venv/bin/python -m pytest benchmarks/bench_front.py`.
Sizes: RS_BENCH_FRONT_HIDDEN (default 512), RS_BENCH_FRONT_LAYERS (8), RS_BENCH_FRONT_TOKENS (32).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

import numpy as np
import pytest
import torch

HIDDEN = int(os.environ.get("RS_BENCH_FRONT_HIDDEN", "512"))
LAYERS = int(os.environ.get("RS_BENCH_FRONT_LAYERS", "8"))
TOKENS = int(os.environ.get("RS_BENCH_FRONT_TOKENS", "32"))
VOCAB = 32000
ROUNDS = int(os.environ.get("RS_BENCH_FRONT_ROUNDS", "7"))
_TIMES: dict[str, float] = {}


def _llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=3 * HIDDEN, num_hidden_layers=LAYERS,
                       num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=256,
                       tie_word_embeddings=False)


def _task_classes():
    import lightning.pytorch as pl
    import torchmetrics
    from torch.utils.data import DataLoader
    from transformers import LlamaForCausalLM

    class LlamaReward(pl.LightningModule):
        """Reward = mean logit of token 0 at the last position: a stand-in for a reward model score."""

        def __init__(self):
            super().__init__()
            self.model = LlamaForCausalLM(_llama_config()).eval()
            self.reward = torchmetrics.MeanMetric()

        def test_step(self, batch, batch_idx):
            logits = self.model(input_ids=batch).logits[:, -1, 0]
            self.reward.update(logits.float())
            self.log("test/reward/logit", self.reward)

    class Prompts(pl.LightningDataModule):
        def test_dataloader(self):
            g = torch.Generator().manual_seed(0)
            return DataLoader(torch.randint(0, VOCAB, (8, TOKENS), generator=g), batch_size=4)

    return LlamaReward, Prompts


@pytest.fixture(scope="module")
def setup():
    from rs_lightning.front.sweep import quiet_trainer

    torch.manual_seed(0)
    LlamaReward, Prompts = _task_classes()
    module, data = LlamaReward(), Prompts()
    base = {k: v.detach().clone() for k, v in module.model.state_dict().items()}
    experts = [{k: v + 0.01 * torch.randn_like(v) for k, v in base.items()} for _ in range(2)]
    n_params = sum(v.numel() for v in base.values())
    trainer = quiet_trainer(accelerator="cpu")
    tmp = tempfile.mkdtemp(prefix="bench_front_", dir=os.environ.get("RS_BENCH_TMP"))
    yield {"module": module, "data": data, "experts": experts, "trainer": trainer, "n_params": n_params, "tmp": tmp}
    shutil.rmtree(tmp, ignore_errors=True)


def _ratio(benchmark, name: str, n_params: int) -> None:
    # Ratios use the minimum: on a shared 2-core machine the median carries other processes' noise.
    _TIMES[name] = benchmark.stats.stats.min
    benchmark.extra_info["params_M"] = round(n_params / 1e6, 1)
    if "evaluate" in _TIMES and name != "evaluate":
        benchmark.extra_info["ratio_to_evaluate"] = round(_TIMES[name] / _TIMES["evaluate"], 3)


def test_a_swap_in_place(benchmark, setup):
    from rs_lightning.soup import interpolate

    target = {k[len("model."):]: v for k, v in setup["module"].state_dict().items() if k.startswith("model.")}
    benchmark.pedantic(lambda: interpolate(setup["experts"], [0.3, 0.7], out=target), rounds=ROUNDS,
                       warmup_rounds=1)
    _ratio(benchmark, "swap", setup["n_params"])


def test_b_evaluate(benchmark, setup):
    from rs_lightning.front.evaluate import quiet_lightning

    def run():
        with quiet_lightning():
            setup["trainer"].test(setup["module"], datamodule=setup["data"], verbose=False)

    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=1)
    _ratio(benchmark, "evaluate", setup["n_params"])
    # (a) ran before (b): fill in its ratio now that the evaluation time is known.
    benchmark.extra_info["swap_over_evaluate"] = round(_TIMES.get("swap", float("nan")) / _TIMES["evaluate"], 3)


def test_c_sweep_point(benchmark, setup):
    from rs_lightning.front import Checkpoint, run_sweep

    experts = [Checkpoint(name=f"e{i}", state_dict=sd) for i, sd in enumerate(setup["experts"])]
    grid = [[0.75, 0.25], [0.5, 0.5], [0.25, 0.75]]
    trainer = setup["trainer"]
    counter = iter(range(10_000))
    rounds: list[tuple[float, float]] = []  # (sweep seconds, of which inside trainer.test)
    test = trainer.test

    def timed_test(*args, **kwargs):
        start = time.perf_counter()
        try:
            return test(*args, **kwargs)
        finally:
            rounds[-1][1].append(time.perf_counter() - start)

    def sweep():
        out = os.path.join(setup["tmp"], f"sweep_{next(counter)}")
        rounds.append((time.perf_counter(), []))
        run_sweep(setup["module"], setup["data"], experts, grid, out, trainer=trainer, target_prefix="model.",
                  progress=False, config_hash="bench", validate=False)  # the breakdown times trainer.test only
        rounds[-1] = (time.perf_counter() - rounds[-1][0], rounds[-1][1])

    trainer.test = timed_test  # the breakdown is measured inside the same sweeps, immune to cross-test noise
    try:
        benchmark.pedantic(sweep, rounds=ROUNDS, warmup_rounds=1)
    finally:
        del trainer.test
    n = 5  # 2 experts + 3 soups
    overhead = [(total - sum(tests)) / n for total, tests in rounds]
    evals = [sum(tests) / n for _, tests in rounds]
    benchmark.extra_info.update(
        points_per_sweep=n,
        eval_per_point_s_median=round(float(np.median(evals)), 4),
        overhead_per_point_s_median=round(float(np.median(overhead)), 4),
        overhead_per_point_s_min=round(float(np.min(overhead)), 4),
        overhead_fraction_median=round(float(np.median([o / (o + e) for o, e in zip(overhead, evals)])), 3),
    )


def test_d_save_and_reload(benchmark, setup):
    from safetensors.torch import load_file, save_file

    from rs_lightning.soup import interpolate

    path = os.path.join(setup["tmp"], "soup.safetensors")

    def run():
        soup = interpolate(setup["experts"], [0.3, 0.7])
        save_file(soup, path)
        setup["module"].model.load_state_dict(load_file(path))

    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=1)
    _ratio(benchmark, "save_reload", setup["n_params"])
    if "swap" in _TIMES:
        benchmark.extra_info["over_swap"] = round(_TIMES["save_reload"] / _TIMES["swap"], 1)


def test_e_hf_round_trip(benchmark, setup):
    from transformers import LlamaForCausalLM

    from rs_lightning.soup import interpolate

    folder = os.path.join(setup["tmp"], "hf_soup")

    def run():
        interpolate(setup["experts"], [0.3, 0.7], out=setup["module"].model)
        setup["module"].model.save_pretrained(folder)
        setup["module"].model = LlamaForCausalLM.from_pretrained(folder).eval()

    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=1)
    _ratio(benchmark, "hf_round_trip", setup["n_params"])
    if "swap" in _TIMES:
        benchmark.extra_info["over_swap"] = round(_TIMES["hf_round_trip"] / _TIMES["swap"], 1)


@pytest.mark.parametrize("case", ["4d_286_points", "2d_2000_points"])
def test_f_hypervolume(benchmark, case):
    """Exact hypervolume through moocore, and its speed-up over the hand-written slicing it replaced (one timed
    call of that, in the same run)."""
    import sys

    from rs_lightning.front import hypervolume, lattice_grid

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from hv_slicing import hypervolume_by_slicing

    rng = np.random.default_rng(0)
    if case == "4d_286_points":
        # A concave 4-reward front over the m = 10 lattice of 4 experts: 286 points, all non-dominated.
        w = np.asarray(lattice_grid(4, 10))
        pts = np.sqrt(np.clip(w + 0.01 * rng.random(w.shape), 0, None))
    else:
        pts = np.abs(rng.normal(size=(2000, 2)))
        pts /= np.linalg.norm(pts, axis=1, keepdims=True)
    ref = np.zeros(pts.shape[1])
    value = benchmark(hypervolume, pts, ref)
    start = time.perf_counter()
    old = hypervolume_by_slicing(pts, ref)
    old_seconds = time.perf_counter() - start
    assert abs(old - value) <= 1e-12 * max(1.0, abs(value))
    benchmark.extra_info.update(points=len(pts), hv=value, slicing_seconds=old_seconds,
                                speedup=round(old_seconds / benchmark.stats.stats.median, 1))


def test_g_bootstrap_summary_13_points_200_examples(benchmark):
    """summary.json with its paired bootstrap (1000 draws) for a demo-sized sweep: 13 points x 200 examples."""
    from rs_lightning.front.summary import SummarySettings, build_summary

    rng = np.random.default_rng(0)
    rows = []
    for i, lam in enumerate([0.0, 1.0, *[j / 10 for j in range(1, 10)]]):
        per = {"r1": (1 - lam + 0.3 * rng.random(200)).tolist(), "r2": (lam + 0.3 * rng.random(200)).tolist()}
        kind = "expert" if lam in (0.0, 1.0) else "soup"
        rows.append({"kind": kind, "name": f"p{i}", "weights": [1 - lam, lam], "mu": None,
                     "rewards": {k: float(np.mean(v)) for k, v in per.items()}, "per_example": per, "valid": True})
    for kind in ("init", "morl"):
        per = {"r1": (0.4 + 0.3 * rng.random(200)).tolist(), "r2": (0.4 + 0.3 * rng.random(200)).tolist()}
        rows.append({"kind": kind, "name": kind, "weights": None, "mu": [0.5, 0.5] if kind == "morl" else None,
                     "rewards": {k: float(np.mean(v)) for k, v in per.items()}, "per_example": per, "valid": True})
    settings = SummarySettings(n_boot=1000, select_on="test")
    summary = benchmark(build_summary, rows, settings)
    benchmark.extra_info["points"] = len(rows)
    benchmark.extra_info["n_boot"] = summary["uncertainty"]["n_boot"]
