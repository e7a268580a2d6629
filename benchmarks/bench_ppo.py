"""PPO iteration throughput of `TextPPOModule`: samples/s and generated tokens/s, split by phase.

One PPO iteration = generate (sample the responses), score (every reward), reference (old log-probs, values and
the KL reference in two no-grad forwards, then GAE), optimise (`ppo.epochs` x mini-batches of forward + backward +
Adam). The module times these phases itself (`module.last_iteration["timings"]`, also logged as `time/<phase>`);
this benchmark runs a short fit, drops the warm-up iterations and records the per-phase medians in
`benchmark.extra_info`. The benchmark's own time is the whole fit (setup included), the per-iteration numbers are
in extra_info.

    policies: "tiny" (random 2-layer Llama, a rule reward: the framework's overhead) and "smollm2"
    (SmolLM2-135M-Instruct with the review rewards VADER + MiniLM relevance, as configs/text/review.yaml;
    only when its converted copy is already in the cache: the benchmark never converts the GGUF).

Run: `pytest benchmarks/bench_ppo.py --benchmark-json=out.json`; RS_BENCH_PPO_ITERS (default 4) measured
iterations after RS_BENCH_PPO_WARMUP (default 1); RS_BENCH_PPO_PRECISION a Lightning precision (default
"32-true"; "bf16-mixed" autocasts to bf16), RS_BENCH_PPO_DTYPE the policy's weights dtype ("float32" or
"bfloat16") for SmolLM2.
"""

from __future__ import annotations

import json
import os
import statistics

import lightning as L
import pytest
import torch

from rs_lightning.tasks.text.data import PromptDataModule
from rs_lightning.tasks.text.model_loading import OFFLINE_DEFAULT_MODEL, _is_converted, default_cache_dir
from rs_lightning.tasks.text.module import TextPPOModule

ITERS = int(os.environ.get("RS_BENCH_PPO_ITERS", "4"))
WARMUP = int(os.environ.get("RS_BENCH_PPO_WARMUP", "1"))
BATCH = 16


class PhaseTimes(L.Callback):
    def __init__(self):
        self.rows: list[dict[str, float]] = []
        self.tokens: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.rows.append(dict(pl_module.last_iteration["timings"]))
        self.tokens.append(int(trainer.callback_metrics["train/response_length"] * BATCH))


def _tiny(tmp_path):
    from rs_lightning.rewards.rules import KeywordReward
    from rs_lightning.tasks.text.model_loading import tiny_random_causal_lm

    tiny_random_causal_lm(save_dir=tmp_path / "model")
    rows = [{"id": str(i), "instruction": f"Write about item {i}.", "reference": "x"} for i in range(200)]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = str(tmp_path / "model")
    module = TextPPOModule(model=model, rewards=[KeywordReward(["e"], mode="count", whole_word=False, name="e")],
                           lora={"r": 8, "alpha": 16, "dropout": 0.0}, rollout={"response_length": (16, 16)},
                           ppo={"epochs": 4, "mini_batch_size": 4, "lr": 1e-3})
    data = PromptDataModule(source=str(tmp_path / "p.jsonl"), tokenizer=model, num_val=0, num_test=8,
                            batch_size=BATCH, prefix_tokens=(0, 0))
    return module, data


def _smollm2(tmp_path):
    from rs_lightning.rewards.relevance import RelevanceReward
    from rs_lightning.rewards.vader import VaderReward

    # The settings of configs/text/review.yaml (expert R1).
    module = TextPPOModule(model=OFFLINE_DEFAULT_MODEL, rewards=[VaderReward(name="vader"),
                                                                 RelevanceReward(name="relevance")],
                           reward_weights=[1.0, 0.0], lora={"r": 8, "alpha": 16, "dropout": 0.0},
                           ppo={"lr": 5e-4, "epochs": 1, "mini_batch_size": 4, "max_grad_norm": 1.0,
                                "advantage": os.environ.get("RS_BENCH_PPO_ADVANTAGE", "sequence")},
                           kl={"init_coef": 0.1, "adaptive": False},
                           rollout={"response_length": (24, 24), "ignore_eos": False},
                           scoring={"includes_prefix": False}, dtype=os.environ.get("RS_BENCH_PPO_DTYPE", "float32"))
    data = PromptDataModule(source="drug_reviews", tokenizer=OFFLINE_DEFAULT_MODEL, template="chat",
                            prefix_tokens=(3, 6), num_val=0, num_test=8, batch_size=BATCH)
    return module, data


POLICIES = {"tiny": _tiny, "smollm2": _smollm2}


@pytest.mark.parametrize("policy", list(POLICIES))
def test_ppo_iteration_throughput(benchmark, machine, policy, tmp_path):
    if policy == "smollm2" and not _is_converted(default_cache_dir() / OFFLINE_DEFAULT_MODEL):
        pytest.skip("SmolLM2 is not converted in the cache yet (run any review config once)")
    L.seed_everything(0)
    module, data = POLICIES[policy](tmp_path)
    timer = PhaseTimes()
    trainer = L.Trainer(accelerator="auto", devices=1, max_epochs=1, limit_train_batches=WARMUP + ITERS,
                        precision=os.environ.get("RS_BENCH_PPO_PRECISION", "32-true"),
                        limit_val_batches=0, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                        callbacks=[timer])
    benchmark.pedantic(trainer.fit, args=(module, data), rounds=1, iterations=1)

    rows, tokens = timer.rows[WARMUP:], timer.tokens[WARMUP:]
    phases = {name: statistics.median(r[name] for r in rows) for name in rows[0]}
    per_iteration = statistics.median(sum(r.values()) for r in rows)
    mean_tokens = statistics.mean(tokens)
    benchmark.extra_info.update({
        "machine": machine,
        "policy": policy,
        "torch_threads": torch.get_num_threads(),
        "precision": trainer.precision,
        "dtype": str(next(module.policy.parameters()).dtype),
        "batch": BATCH,
        "measured_iterations": len(rows),
        "seconds_per_iteration": per_iteration,
        "phase_seconds": phases,
        # every measured iteration, so a table can give the range beside the median
        "iteration_seconds": [sum(r.values()) for r in rows],
        "phase_seconds_per_iteration": {name: [r[name] for r in rows] for name in rows[0]},
        "phase_share": {k: v / per_iteration for k, v in phases.items()},
        "samples_per_s": BATCH / per_iteration,
        "generated_tokens_per_s_generation": mean_tokens / phases["generate"],
        "generated_tokens_per_s_iteration": mean_tokens / per_iteration,
    })
    print(json.dumps(benchmark.extra_info, indent=1))
