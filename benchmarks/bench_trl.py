"""Side by side: TRL's `RLOOTrainer` against our `TextPPOModule(advantage="rloo")`, same model, same work.

Each side runs in its OWN subprocess (`python -m benchmarks.bench_trl side ours|trl --policy ... --out x.json`),
so the peak RSS the parent reads with `os.wait4` is that side's alone, and neither pays for the other's imports.
Both get the same environment and the same torch threads (RS_BENCH_TRL_THREADS, default 1, also OMP/MKL).

What is matched, per iteration:
- the model (the same local folder: a random tiny Llama written to tmp, or the converted SmolLM2-135M-Instruct
  of our cache; there is no hub, so TRL gets that folder's path), fp32 weights, no autocast (or, with
  RS_BENCH_TRL_PRECISION=bf16, bf16 autocast on both sides: ours "bf16-mixed", TRL's `bf16=True`), no gradient
  checkpointing (TRL turns it on by default: switched off, as ours has none);
- the LoRA: r, alpha, dropout 0, targets q/k/v/o_proj;
- the prompts: the first (warm-up + measured) x PROMPTS training prompts of the same `PromptDataModule`, in the
  same order on both sides (TRL: `shuffle_dataset=False`; ours: a plain unshuffled DataLoader over those items);
  TRL gets each query's text and tokenizes it again (the `prompt_ids_match` it reports says whether that gave
  the very same ids);
- K samples per prompt (our `ppo.rloo_k` = TRL's `num_generations`), so B = PROMPTS x K responses per iteration;
- exactly LENGTH new tokens per response: ours `rollout.ignore_eos=True`, `response_length=(L, L)`; TRL
  `max_completion_length=L` plus `min_new_tokens=L`, which forbids EOS until L tokens exist (each side logs the
  response lengths it produced; TRL's are read from the token ids its reward function receives);
- sampling: temperature 1, top_k 0, top_p 1;
- the reward: one, the same object type on both sides, scoring the continuation alone: VADER for SmolLM2, a
  keyword count for the tiny model (VADER scores its random text 0 throughout, i.e. zero gradients);
- KL: both compute a reference pass with the LoRA disabled (ours `kl.reference="base"`, TRL's PEFT path), with
  the same fixed beta (TRL skips the reference pass when beta is 0, hence not 0); sequence-level KL in the reward;
- one optimisation pass (ours `ppo.epochs=1`, TRL `num_iterations=1`) over mini-batches of MINI_BATCH responses
  (TRL: `per_device_train_batch_size=MINI_BATCH`, `steps_per_generation=B / MINI_BATCH`, no accumulation):
  B / MINI_BATCH optimizer steps, clipping ratio 0.2, gradient norm clipped at 1.0, the same learning rate.

What differs and stays (the two implementations, not the settings):
- old log-probs: ours keeps the sampling pass's own log-probs; TRL runs one more no-grad forward of the batch;
- loss: ours is token-level PPO-clip (ratio per token, masked mean); TRL's RLOO clips the SEQUENCE ratio
  (summed token log-probs) and averages per sequence; both compute the entropy of every mini-batch;
- TRL computes log-probs through its fused, chunked LM head; ours through full logits + log_softmax;
- EOS: ours samples through EOS (it may appear inside a response), TRL never samples it (min_new_tokens):
  same token counts, a slightly different sampling distribution;
- optimiser: ours Adam; TRL AdamW with weight decay 0 and a constant schedule (the same update);
- bookkeeping: TRL's metrics gathering and logging (one log per iteration here) vs Lightning's `self.log`
  with no logger.

Timing: per-iteration wall time between iteration ends (TRL: a TrainerCallback, an iteration ends every
steps_per_generation optimizer steps; ours: a Lightning Callback at each training batch end); the first
RS_BENCH_TRL_WARMUP (default 1) iterations are dropped, RS_BENCH_TRL_ITERS (default 4) are measured.
samples/s = responses per iteration / median measured seconds per iteration. The issue's target is ours >= 1.5x
TRL's samples/s: recorded in `benchmark.extra_info["ratio_ours_over_trl"]`, never asserted (machine-dependent).

    policies: "tiny" (random 2-layer Llama: does the harness work, framework overhead) and "smollm2"
    (SmolLM2-135M-Instruct on the drug-review chat prompts; only when its converted copy is already cached).

Run: `pytest benchmarks/bench_trl.py -k tiny -s`; skipped when trl is not importable (it is not a dependency).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

ITERS = int(os.environ.get("RS_BENCH_TRL_ITERS", "4"))
WARMUP = int(os.environ.get("RS_BENCH_TRL_WARMUP", "1"))
THREADS = int(os.environ.get("RS_BENCH_TRL_THREADS", "1"))
# "fp32" (default) or "bf16": fp32 master weights with bf16 autocast on both sides (ours Lightning's
# "bf16-mixed", TRL's `bf16=True`).
PRECISION = os.environ.get("RS_BENCH_TRL_PRECISION", "fp32")
if PRECISION not in ("fp32", "bf16"):
    raise ValueError(f"RS_BENCH_TRL_PRECISION must be fp32 or bf16, got {PRECISION!r}")
PROMPTS = 4  # prompts per iteration
K = 4  # samples per prompt: rloo_k = num_generations
MINI_BATCH = 4  # responses per optimizer step
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
LORA_R, LORA_ALPHA = 8, 16
BETA = 0.05  # TRL's default beta; ours a fixed KL coefficient of the same value
SEED = 0
# Per policy: new tokens per response and learning rate (bench_ppo's values).
POLICIES: dict[str, dict[str, Any]] = {"tiny": {"length": 16, "lr": 1e-3}, "smollm2": {"length": 24, "lr": 5e-4}}
REPO = Path(__file__).resolve().parents[1]


# -- shared setup (runs in each side's process, identically) ----------------------------------------------------

def _set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _smollm2_path() -> Path | None:
    from rs_lightning.tasks.text.model_loading import OFFLINE_DEFAULT_MODEL, _is_converted, default_cache_dir

    folder = default_cache_dir() / OFFLINE_DEFAULT_MODEL
    return folder if _is_converted(folder) else None


def prepare_tiny(workdir: Path) -> None:
    """The tiny model folder and prompt file both sides read (written once, by the parent)."""
    from rs_lightning.tasks.text.model_loading import tiny_random_causal_lm

    workdir.mkdir(parents=True, exist_ok=True)
    if not (workdir / "model" / "config.json").is_file():
        tiny_random_causal_lm(save_dir=workdir / "model")
    rows = [{"id": str(i), "instruction": f"Write about item {i}.", "reference": "x"} for i in range(200)]
    (workdir / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _model_path(policy: str, workdir: Path) -> str:
    if policy == "tiny":
        return str(workdir / "model")
    path = _smollm2_path()
    if path is None:
        raise FileNotFoundError("SmolLM2 is not converted in the cache (run any review config once)")
    return str(path)


def _prompt_items(policy: str, model_path: str, workdir: Path, n: int) -> list[dict]:
    """The first `n` training items (tokenized queries + texts) of the policy's data module, in order."""
    from rs_lightning.tasks.text.data import PromptDataModule

    if policy == "tiny":
        data = PromptDataModule(source=str(workdir / "prompts.jsonl"), tokenizer=model_path, num_val=0, num_test=8,
                                num_train=n, batch_size=PROMPTS, prefix_tokens=(0, 0), seed=SEED)
    else:
        data = PromptDataModule(source="drug_reviews", tokenizer=model_path, template="chat", prefix_tokens=(3, 6),
                                num_val=0, num_test=8, num_train=n, batch_size=PROMPTS, seed=SEED)
    data.setup("fit")
    items = list(data.train_set.items[:n])
    if len(items) < n:
        raise RuntimeError(f"{policy}: only {len(items)} prompts, {n} needed")
    return items


def _reward(policy: str):
    from rs_lightning.rewards.rules import KeywordReward
    from rs_lightning.rewards.vader import VaderReward

    if policy == "tiny":
        return KeywordReward(["e"], mode="count", whole_word=False, name="e")
    return VaderReward(name="vader")


def _iteration_summary(seconds: list[float], samples_per_iteration: int) -> dict[str, Any]:
    measured = seconds[WARMUP:]
    per_iteration = statistics.median(measured)
    return {"iteration_seconds": seconds, "measured_iterations": len(measured),
            "seconds_per_iteration": per_iteration, "samples_per_iteration": samples_per_iteration,
            "samples_per_s": samples_per_iteration / per_iteration}


def _memory_info() -> dict[str, Any]:
    import resource

    import torch

    info: dict[str, Any] = {"rss_self_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        info["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return info


# -- our side -----------------------------------------------------------------------------------------------------

def run_ours(policy: str, workdir: Path) -> dict[str, Any]:
    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    from rs_lightning.tasks.text.data import LeftPadCollator, PromptDataset
    from rs_lightning.tasks.text.module import TextPPOModule

    cfg = POLICIES[policy]
    iterations = WARMUP + ITERS
    model_path = _model_path(policy, workdir)
    items = _prompt_items(policy, model_path, workdir, PROMPTS * iterations)
    L.seed_everything(SEED)
    module = TextPPOModule(
        model=model_path, rewards=[_reward(policy)], dtype="float32",
        lora={"r": LORA_R, "alpha": LORA_ALPHA, "dropout": 0.0, "target_modules": TARGETS},
        ppo={"lr": cfg["lr"], "epochs": 1, "mini_batch_size": MINI_BATCH, "max_grad_norm": 1.0, "cliprange": 0.2,
             "advantage": "rloo", "rloo_k": K},
        kl={"init_coef": BETA, "adaptive": False, "reference": "base"},
        rollout={"response_length": (cfg["length"], cfg["length"]), "ignore_eos": True, "top_k": 0, "top_p": 1.0,
                 "temperature": 1.0},
        scoring={"includes_prefix": False},
    )
    loader = DataLoader(PromptDataset(items), batch_size=PROMPTS, shuffle=False,
                        collate_fn=LeftPadCollator(module.tokenizer.pad_token_id))

    class IterationTimer(L.Callback):
        def __init__(self):
            self.marks: list[float] = []
            self.responses: list[int] = []
            self.lengths: list[float] = []
            self.phases: list[dict[str, float]] = []

        def on_train_epoch_start(self, trainer, pl_module):
            self.marks.append(time.perf_counter())

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.marks.append(time.perf_counter())
            self.responses.append(len(pl_module.last_iteration["texts"]))
            self.lengths.append(float(trainer.callback_metrics["train/response_length"]))
            self.phases.append(dict(pl_module.last_iteration["timings"]))

    timer = IterationTimer()
    trainer = L.Trainer(accelerator="auto", devices=1, max_epochs=1, limit_train_batches=iterations,
                        precision="bf16-mixed" if PRECISION == "bf16" else "32-true", limit_val_batches=0,
                        num_sanity_val_steps=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(workdir / "ours"), callbacks=[timer])
    trainer.fit(module, train_dataloaders=loader)

    seconds = [b - a for a, b in zip(timer.marks, timer.marks[1:])]
    measured_phases = timer.phases[WARMUP:]
    return {
        **_iteration_summary(seconds, PROMPTS * K),
        "responses_per_iteration": timer.responses,
        "response_length_mean_per_iteration": timer.lengths,
        "phase_seconds_median": {k: statistics.median(p[k] for p in measured_phases) for k in measured_phases[0]},
        "prompt_tokens": [len(item["input_ids"]) for item in items],
        "torch_threads": torch.get_num_threads(),
        **_memory_info(),
    }


# -- TRL's side ---------------------------------------------------------------------------------------------------

def run_trl(policy: str, workdir: Path) -> dict[str, Any]:
    import torch
    import trl
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import RLOOConfig, RLOOTrainer

    from rs_lightning.tasks.text.model_loading import load_tokenizer

    cfg = POLICIES[policy]
    iterations = WARMUP + ITERS
    steps_per_iteration = PROMPTS * K // MINI_BATCH
    model_path = _model_path(policy, workdir)
    items = _prompt_items(policy, model_path, workdir, PROMPTS * iterations)
    tokenizer = load_tokenizer(model_path)  # left padded, pad token set: what ours uses
    # The query text exactly as ours built it (template + reference prefix); TRL tokenizes it again.
    prompts = [item["prompt"] for item in items]
    retokenized = tokenizer(text=prompts)["input_ids"]
    ids_match = sum(list(a) == list(item["input_ids"]) for a, item in zip(retokenized, items)) / len(items)

    scorer = _reward(policy)
    calls: list[dict[str, Any]] = []

    def reward(prompts, completions, completion_ids, **kwargs):
        counts: dict[str, int] = {}
        for p in prompts:
            counts[p] = counts.get(p, 0) + 1
        lengths = [len(ids) for ids in completion_ids]
        calls.append({"completions": len(completions), "distinct_prompts": len(counts),
                      "samples_per_prompt": sorted(set(counts.values())), "length_min": min(lengths),
                      "length_max": max(lengths), "length_mean": sum(lengths) / len(lengths)})
        return scorer.score(list(prompts), list(completions)).tolist()

    class IterationTimer(TrainerCallback):
        def __init__(self):
            self.start = 0.0
            self.step_ends: list[float] = []
            self.logs: list[dict[str, Any]] = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.step_ends.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logs.append(dict(logs or {}))

    config = RLOOConfig(
        output_dir=str(workdir / "trl"), seed=SEED, report_to="none", save_strategy="no", disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(), bf16=PRECISION == "bf16", fp16=False, gradient_checkpointing=False,
        model_init_kwargs={"dtype": torch.float32},
        per_device_train_batch_size=MINI_BATCH, gradient_accumulation_steps=1, steps_per_generation=steps_per_iteration,
        num_generations=K, num_iterations=1, max_steps=iterations * steps_per_iteration,
        logging_steps=steps_per_iteration, shuffle_dataset=False, dataloader_num_workers=0,
        max_completion_length=cfg["length"], generation_kwargs={"min_new_tokens": cfg["length"]},
        temperature=1.0, top_k=0, top_p=1.0,
        beta=BETA, epsilon=0.2, learning_rate=cfg["lr"], lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=1.0, log_completions=False,
    )
    lora = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=TARGETS, bias="none",
                      task_type="CAUSAL_LM")
    timer = IterationTimer()
    trainer = RLOOTrainer(model=model_path, reward_funcs=[reward], args=config,
                          train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=tokenizer,
                          callbacks=[timer], peft_config=lora)
    trainer.train()

    marks = [timer.start] + timer.step_ends[steps_per_iteration - 1::steps_per_iteration]
    seconds = [b - a for a, b in zip(marks, marks[1:])]
    return {
        **_iteration_summary(seconds, PROMPTS * K),
        "trl_version": trl.__version__,
        "optimizer_steps_per_iteration": steps_per_iteration,
        "reward_calls": calls,
        "responses_per_iteration": [c["completions"] for c in calls],
        "response_length_mean_per_iteration": [c["length_mean"] for c in calls],
        "prompt_ids_match": ids_match,
        "prompt_tokens": [len(ids) for ids in retokenized],
        "trl_logged_completion_lengths": [{k: v for k, v in log.items() if k.startswith("completions/")}
                                          for log in timer.logs if any(k.startswith("completions/") for k in log)],
        "torch_threads": torch.get_num_threads(),
        **_memory_info(),
    }


SIDES = {"ours": run_ours, "trl": run_trl}


def side_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_trl", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    side = sub.add_parser("side", help="run one side and write its JSON")
    side.add_argument("name", choices=list(SIDES))
    side.add_argument("--policy", choices=list(POLICIES), default="tiny")
    side.add_argument("--workdir", type=Path, required=True, help="tiny: holds the model folder and prompt file")
    side.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    _set_threads(THREADS)
    if args.policy == "tiny":
        prepare_tiny(args.workdir)  # keeps a model the parent already wrote: both sides load the same weights
    result = {"side": args.name, "policy": args.policy, **SIDES[args.name](args.policy, args.workdir)}
    args.out.write_text(json.dumps(result, indent=1))


# -- the pytest benchmark -------------------------------------------------------------------------------------------

def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    threads = str(THREADS)
    env.update({"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads,
                "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO),
                                                                                       env.get("PYTHONPATH")]))})
    return env


def _run_side(name: str, policy: str, workdir: Path) -> dict[str, Any]:
    out, log = workdir / f"{name}.json", workdir / f"{name}.log"
    cmd = [sys.executable, "-m", "benchmarks.bench_trl", "side", name, "--policy", policy, "--workdir", str(workdir),
           "--out", str(out)]
    with open(log, "wb") as sink:
        proc = subprocess.Popen(cmd, cwd=REPO, env=_child_env(), stdout=sink, stderr=subprocess.STDOUT)
        # wait4 rather than proc.wait(): it also returns the child's own resource usage (its peak RSS).
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-4000:]
        raise RuntimeError(f"side {name!r} failed with exit code {proc.returncode}:\n{tail}")
    result = json.loads(out.read_text())
    result["peak_rss_mb"] = usage.ru_maxrss / 1024  # Linux reports KiB
    return result


@pytest.mark.parametrize("policy", list(POLICIES))
def test_trl_side_by_side(benchmark, machine, policy, tmp_path):
    pytest.importorskip("trl", reason="trl is not installed: it is only needed for this comparison benchmark")
    if policy == "smollm2" and _smollm2_path() is None:
        pytest.skip("SmolLM2 is not converted in the cache yet (run any review config once)")
    if policy == "tiny":
        prepare_tiny(tmp_path)
    results: dict[str, dict[str, Any]] = {}

    def both():
        for name in SIDES:  # one after the other: the two never share the cores
            results[name] = _run_side(name, policy, tmp_path)

    benchmark.pedantic(both, rounds=1, iterations=1)

    ours, theirs = results["ours"], results["trl"]
    keys = ("samples_per_s", "seconds_per_iteration", "peak_rss_mb")
    benchmark.extra_info.update({
        "machine": machine,
        "policy": policy,
        "torch_threads": THREADS,
        "precision": PRECISION,
        "prompts_per_iteration": PROMPTS,
        "samples_per_prompt": K,
        "mini_batch_size": MINI_BATCH,
        "response_length": POLICIES[policy]["length"],
        "warmup_iterations": WARMUP,
        "measured_iterations": ITERS,
        "ours": ours,
        "trl": theirs,
        "ratio_ours_over_trl": {k: ours[k] / theirs[k] for k in keys},
        "target_samples_per_s_ratio": 1.5,
    })
    print(f"\n{policy}: {PROMPTS} prompts x {K} samples x {POLICIES[policy]['length']} tokens, "
          f"{THREADS} thread(s), median of {ITERS} iterations after {WARMUP} warm-up")
    print(f"{'side':<12}{'samples/s':>12}{'s/iter':>10}{'peak RSS MB':>14}")
    for name, row in (("ours", ours), ("trl", theirs)):
        print(f"{name:<12}{row['samples_per_s']:>12.2f}{row['seconds_per_iteration']:>10.3f}{row['peak_rss_mb']:>14.0f}")
    ratio = benchmark.extra_info["ratio_ours_over_trl"]
    print(f"{'ours/trl':<12}{ratio['samples_per_s']:>12.2f}{ratio['seconds_per_iteration']:>10.2f}"
          f"{ratio['peak_rss_mb']:>14.2f}")
    print(f"response lengths  ours {ours['response_length_mean_per_iteration']}  "
          f"trl {[(c['length_min'], c['length_max']) for c in theirs['reward_calls']]}")
    print(f"responses/iter    ours {ours['responses_per_iteration']}  trl {theirs['responses_per_iteration']}  "
          f"trl samples per prompt {[c['samples_per_prompt'] for c in theirs['reward_calls']]}")
    print(f"trl prompt ids == ours: {theirs['prompt_ids_match']:.0%}")
    # Sanity of the harness (not of speed): both sides did the work they were asked for.
    assert ours["responses_per_iteration"] == [PROMPTS * K] * (WARMUP + ITERS)
    assert theirs["responses_per_iteration"] == [PROMPTS * K] * (WARMUP + ITERS)
    assert all(c["samples_per_prompt"] == [K] for c in theirs["reward_calls"])
    length = POLICIES[policy]["length"]
    assert all(c["length_min"] == c["length_max"] == length for c in theirs["reward_calls"])
    assert all(v == length for v in ours["response_length_mean_per_iteration"])


if __name__ == "__main__":
    side_main()
