"""Compare the text module's advantage estimators (gae, sequence, rloo) on the offline review task, replicated.

    python scripts/compare_estimators.py --seeds 0 1 2 --iterations 4 --jobs 2 --kl-prompts 16 --wall-minutes 25 \\
        --out runs/compare_estimators/replicated.json      # ~25 CPU minutes: 2 worker processes, 1 thread each
    python scripts/compare_estimators.py --quick          # tiny random model, 2 iterations: a smoke run in seconds

One run = one estimator x one seed: a fresh run of configs/text/review.yaml (SmolLM2-135M-Instruct, VADER
reward, LoRA r 8, 1 PPO epoch of mini-batches of 4, fixed KL coefficient 0.1: every estimator shares the KL
settings) for `--iterations` PPO iterations. Every run generates the same number of responses per iteration:
gae and sequence one for each of `--samples` prompts, rloo one for each of `--rloo-k` repeats of
`--samples / --rloo-k` prompts (so rloo sees fewer distinct prompts, by design).

The seed sets the training prompts' order (the data module's `seed`) and the sampling RNG (seed_everything, called
after the start evaluation, so the training stream does not depend on it). The LoRA init is the config's
`lora.init_seed` for every run (a fresh LoRA is the base model), so runs of one seed differ only by their estimator:
the differences between estimators are paired by seed (gae and sequence even sample the same first batch; rloo's
batches are the first `samples / k` prompts of the same order).

Held-out evaluation, at the start and at the end of every run, on one FIXED set of prompts for all runs: the first
`--eval-prompts` prompts of the data module's test split (the source's evaluation split, disjoint from the
training prompts, built with data seed `--eval-seed` whatever the run's seed):
- reward: greedy decoding as the module's own validation (`trainer.validate`, `val/reward/<name>`; the training
  reward's component is the score, `val/reward_total` for a mixed mu);
- KL to the reference: one response sampled per prompt (fixed sampling seed, the training sampling settings, the
  longest training length; the first `--kl-prompts` held-out prompts, default all), scored by the policy (the
  logits `generate` computed while sampling) and the reference (one forward); `kl` is the exact per-token KL
  sum_t KL(pi(.|y<t) || ref(.|y<t)) summed over the response (an unbiased, low-variance estimate of the sequence
  KL that training penalises), `kl_sampled` the plain sum of log-ratios on the sampled tokens (train/kl's
  estimator). Both are means over the prompts.
The start policy is the same in every run (same adapter weights, checked by a hash of them), so its evaluation is
computed once and reused (through a file shared by the workers) by the runs whose start weights and evaluation
settings hash the same (`--start-eval each` recomputes it in every run); `start_eval_consistent` in the JSON says
whether the start evaluations computed by different processes agreed.

CPU time: time.process_time of the run's process from the start to the end of `trainer.fit` (training only:
model loading, data preparation and evaluation are not counted); one torch thread per process (--threads 1), so
a process's CPU seconds are one core's.

Per estimator (mean over seeds, 95 % Student-t interval across seeds): held-out gain per CPU minute
(reward_end - reward_start) / training CPU minutes, the gain, the CPU minutes, and the end KL. Per pair of
estimators: the paired differences (same seed) of the gain per CPU minute and of the end KL, with t intervals;
"X gains more per CPU minute" only when the interval of the difference excludes 0 (else "indistinguishable at
95 %"), and the same test on the end KLs: a gain bought with a distinguishably larger KL is not a win at equal KL.

`--jobs N` runs the runs in N worker subprocesses (OMP_NUM_THREADS=--threads), dealt round-robin in seed-major order;
`--jobs 1` runs them in this process. `--wall-minutes` bounds the whole comparison without making runs unequal:
every run trains all its iterations, except that a run stops after an iteration when the next one would not end
before the bound (less a reserve for its end evaluation), and a worker skips the runs its slowest finished run
says cannot end before the bound. Cut runs are flagged `complete: false` and skipped ones listed in `skipped`;
both stay out of the summaries, which compare complete runs only (pairs: the seeds both estimators completed).
Past the bound plus GRACE_S the parent stops its workers and writes what finished. The per-seed train-reward
summaries of the first version (gain over the train batches, gain at the common train KL) are kept in the JSON
(`train_summary`); the verdicts use the held-out numbers only.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import importlib
import itertools
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CONFIG = ROOT / "configs" / "text" / "review.yaml"
# Earlier names of a config with the same settings: a --reuse file that names one compares equal.
RENAMED_CONFIGS = {"review_vader.yaml": "review.yaml"}
ESTIMATORS = ("gae", "sequence", "rloo")
WINDOW = 3  # iterations averaged for the end reward and the smoothed trajectory (train summaries)
KL_SAMPLING_SEED = 12345  # the held-out KL's responses: the same draws in every evaluation


def instantiate(spec: dict):
    """An object from a LightningCLI-style {class_path, init_args} dict."""
    module, _, name = spec["class_path"].rpartition(".")
    return getattr(importlib.import_module(module), name)(**spec.get("init_args", {}))


def settings(config: Path, quick: bool) -> tuple[dict, dict]:
    """(model init_args, data init_args) of the config; --quick swaps in the tiny random model and short runs."""
    import yaml

    cfg = yaml.safe_load(config.read_text())
    model, data = dict(cfg["model"]["init_args"]), dict(cfg["data"]["init_args"])
    if quick:
        vader = [r for r in model["rewards"] if r["class_path"].endswith("VaderReward")]
        model.update(model="tiny-random", rewards=vader, reward_weights=[1.0])
        model["rollout"] = {**model.get("rollout", {}), "response_length": [4, 4], "eval_max_new_tokens": 4}
        model["lora"] = {**model.get("lora", {}), "r": 4, "alpha": 8}
        data.update(tokenizer="tiny-random", num_train=64, num_val=0, num_test=0)
    return model, data


class Trace:
    """Lightning callback (built lazily so `--help` imports nothing heavy): one row per PPO iteration."""

    @staticmethod
    def make(deadline: float | None = None):
        import lightning as L

        class _Trace(L.Callback):
            def __init__(self, deadline: float | None):
                self.rows: list[dict] = []
                self.start = 0.0
                self.cpu_s = 0.0  # process CPU seconds of the whole fit (set at on_train_end)
                self.deadline = deadline  # time.time() value the next iteration must end before
                self._wall = 0.0

            def on_train_start(self, trainer, pl_module):
                self.start, self._wall = time.process_time(), time.time()

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                metrics = trainer.callback_metrics
                now = time.time()
                self.rows.append({"iteration": len(self.rows) + 1,
                                  "reward": float(metrics["train/reward/total"]),
                                  "kl": float(metrics["train/kl"]),
                                  "cpu_s": time.process_time() - self.start,
                                  "wall_s": now - self._wall,
                                  "samples": len(pl_module.last_iteration["texts"]),
                                  "prompts": len(batch["prompts"])})
                last = self.rows[-1]["wall_s"] - (self.rows[-2]["wall_s"] if len(self.rows) > 1 else 0.0)
                if self.deadline is not None and now + last > self.deadline:
                    trainer.should_stop = True  # the next iteration would not end in time

            def on_train_end(self, trainer, pl_module):
                self.cpu_s = time.process_time() - self.start

        return _Trace(deadline)


# -- held-out evaluation ------------------------------------------------------------------------------------------

def _response_logits(model, ro):
    """Float logits [B, Tr, V] that predict the response tokens (the forward of rollout.response_forward)."""
    import torch

    ids = torch.cat([ro.query_ids, ro.response_ids], dim=1)
    mask = torch.cat([ro.query_mask, ro.response_mask], dim=1)
    position_ids = (mask.cumsum(1) - 1).clamp_min(0)
    t_resp = ro.response_ids.shape[1]
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False,
                logits_to_keep=t_resp + 1)
    return out.logits[:, -t_resp - 1: -1].float()


def heldout_kl(module, batch: dict) -> dict:
    """KL of the policy to its reference on `batch`'s prompts: one response per prompt sampled with a fixed seed
    (the training sampling settings, the longest training length); the exact per-token KL summed over the
    response (`kl`) and the sampled log-ratio sum (`kl_sampled`, train/kl's estimator), means over prompts.
    The policy's distributions are the logits `generate` computed while sampling (no second policy forward);
    the reference's come from one forward over the sampled responses."""
    import torch

    from rs_lightning import rl
    from rs_lightning.tasks.text import policy as pol
    from rs_lightning.tasks.text.rollout import Rollout, generation_config

    sampling, tok, policy = module.settings.rollout, module.tokenizer, module.policy
    n, length = len(batch["prompts"]), max(sampling.response_length)
    config = generation_config(tok, length, greedy=False, top_k=sampling.top_k, top_p=sampling.top_p,
                               temperature=sampling.temperature, ignore_eos=sampling.ignore_eos)
    config.return_dict_in_generate, config.output_logits = True, True
    was_training = policy.training
    policy.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(KL_SAMPLING_SEED)
            out = policy.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                  generation_config=config)
            response = out.sequences[:, batch["input_ids"].shape[1]:]
            logp = torch.log_softmax(torch.stack(out.logits, 1).float(), -1)
            mask = torch.ones_like(response, dtype=torch.bool)
            # The first EOS ends a response (rollout.generate).
            if not sampling.ignore_eos and tok.eos_token_id is not None:
                is_eos = response == tok.eos_token_id
                mask &= ~((is_eos.long().cumsum(1) - is_eos.long()) > 0)
            mask = mask.long()
            ro = Rollout(batch["input_ids"], batch["attention_mask"], response.masked_fill(mask == 0, tok.pad_token_id),
                         mask, [])
            with pol.reference_policy(policy, module.settings.kl.reference):
                logq = torch.log_softmax(_response_logits(policy, ro), -1)
    finally:
        policy.train(was_training)
    weights = mask.to(logp.dtype)
    exact = ((logp.exp() * (logp - logq)).sum(-1) * weights).sum(-1)
    ids = response.unsqueeze(-1)
    sampled = rl.sequence_kl(logp.gather(-1, ids).squeeze(-1), logq.gather(-1, ids).squeeze(-1), mask)
    return {"kl": float(exact.mean()), "kl_sampled": float(sampled.mean()), "kl_prompts": n,
            "kl_per_prompt": [round(float(v), 5) for v in exact], "kl_response_tokens": float(weights.sum(-1).mean())}


def evaluate(module, data, root: Path, kl_prompts: int | None = None) -> dict:
    """Greedy held-out reward (`trainer.validate` on `data`'s test prompts) and the held-out KL (on the first
    `kl_prompts` of them, all when None); wall and CPU seconds."""
    import lightning as L

    wall, cpu = time.time(), time.process_time()
    loader = data.test_dataloader()
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(root))
    metrics = trainer.validate(module, dataloaders=loader, verbose=False)[0]
    out = {key.removeprefix("val/"): float(value) for key, value in metrics.items() if key.startswith("val/")}
    out["reward"] = out["reward_total"] if len(module.reward_names) > 1 else out[f"reward/{module.reward_names[0]}"]
    out["prompts"] = len(data.test_set)
    batch = next(iter(data.test_dataloader()))  # eval_batch_size = all the held-out prompts
    if kl_prompts is not None:
        batch = {k: v[:kl_prompts] for k, v in batch.items()}  # tensors and per-row lists alike
    out.update(heldout_kl(module, batch))
    out.update(wall_s=time.time() - wall, cpu_s=time.process_time() - cpu)
    return out


def adapter_hash(module) -> str:
    """Hash of the trainable adapter weights: runs with the same hash start from the same policy."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.soup_state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


_START_CACHE: dict[str, dict] = {}  # per process: start evaluation by (adapter hash, evaluation settings)


# -- one run ------------------------------------------------------------------------------------------------------

def run(estimator: str, model_args: dict, data_args: dict, *, iterations: int, samples: int, rloo_k: int,
        seed: int, root: Path, eval_prompts: int, eval_seed: int, deadline: float | None = None,
        start_eval: str = "once", cache_dir: str | None = None, kl_prompts: int | None = None) -> dict:
    """Train one estimator for `iterations` PPO iterations (fewer if `deadline`, a time.time() value, comes first),
    evaluated on the held-out prompts before and after; the run's record."""
    import lightning as L
    import torch

    from rs_lightning.tasks.text.data import PromptDataModule
    from rs_lightning.tasks.text.module import TextPPOModule

    wall0 = time.time()
    margs, dargs = copy.deepcopy(model_args), dict(data_args, batch_size=samples, seed=seed)
    ppo = margs.setdefault("ppo", {})  # the config's PPO group (a copy): the estimator is its `advantage`
    ppo["advantage"] = estimator
    if estimator == "rloo":
        if samples % rloo_k:
            raise ValueError(f"--samples {samples} must be a multiple of --rloo-k {rloo_k}")
        ppo["rloo_k"], dargs["batch_size"] = rloo_k, samples // rloo_k
    margs["rewards"] = [instantiate(r) for r in margs["rewards"]]
    module = TextPPOModule(**margs)
    eval_data = PromptDataModule(**dict(data_args, seed=eval_seed, num_train=0, num_val=0, num_test=eval_prompts,
                                        eval_batch_size=eval_prompts))
    eval_data.setup()
    load_s = time.time() - wall0

    # Everything the start evaluation depends on: the start weights, the model and reward settings (all but the
    # estimator's), the held-out prompts.
    key = json.dumps([adapter_hash(module), model_args, eval_prompts, eval_seed, kl_prompts,
                      {k: v for k, v in data_args.items() if k not in ("num_train", "num_val", "batch_size")}],
                     sort_keys=True, default=str)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    cache = None if cache_dir is None else Path(cache_dir) / f"start-{digest}.json"
    if start_eval == "once" and key not in _START_CACHE and cache is not None and cache.exists():
        _START_CACHE[key] = json.loads(cache.read_text())  # written by another run process
    if start_eval == "once" and key in _START_CACHE:
        start = dict(_START_CACHE[key], reused=True)
    else:
        start = dict(evaluate(module, eval_data, root / f"{estimator}-{seed}-start", kl_prompts), reused=False)
        _START_CACHE.setdefault(key, start)
        if cache is not None and not cache.exists():
            partial = cache.with_suffix(f".{os.getpid()}.tmp")
            partial.write_text(json.dumps(start))
            os.replace(partial, cache)

    end_reserve = start["wall_s"] * 1.5  # keep time for the end evaluation
    train_deadline = None if deadline is None else deadline - end_reserve
    L.seed_everything(seed, verbose=False)
    data, trace = PromptDataModule(**dargs), Trace.make(train_deadline)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=iterations,
                        limit_val_batches=0, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(root / f"{estimator}-{seed}"), callbacks=[trace])
    train_wall = time.time()
    trainer.fit(module, data)
    train_wall = time.time() - train_wall
    if len(trace.rows) != iterations and not trainer.should_stop:
        raise RuntimeError(f"{estimator}: {len(trace.rows)} iterations ran, {iterations} asked (too few prompts?)")
    end = evaluate(module, eval_data, root / f"{estimator}-{seed}-end", kl_prompts)
    return {"estimator": estimator, "seed": seed, "iterations": len(trace.rows), "iterations_asked": iterations,
            "complete": len(trace.rows) == iterations, "train_cpu_s": trace.cpu_s, "train_wall_s": train_wall,
            "load_wall_s": load_s, "wall_s": time.time() - wall0, "threads": torch.get_num_threads(),
            "start_key": digest, "eval_start": start, "eval_end": end, "rows": trace.rows}


# -- statistics ---------------------------------------------------------------------------------------------------

def t_quantile(df: int, q: float = 0.975) -> float:
    from scipy import stats

    return float(stats.t.ppf(q, df))


def mean_ci(values: list[float], level: float = 0.95) -> dict:
    """Mean, sample sd and the Student-t interval of the mean (None with fewer than 2 values)."""
    n = len(values)
    if n == 0:
        return {"n": 0, "mean": None, "sd": None, "low": None, "high": None, "values": []}
    mean = sum(values) / n
    if n < 2:
        return {"n": 1, "mean": mean, "sd": None, "low": None, "high": None, "values": list(values)}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile(n - 1, 0.5 + level / 2) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "sd": sd, "low": mean - half, "high": mean + half, "values": list(values)}


def excludes_zero(ci: dict) -> bool:
    return ci["low"] is not None and (ci["low"] > 0 or ci["high"] < 0)


def run_metrics(record: dict) -> dict:
    """The per-run numbers the summaries average: held-out gain, CPU minutes, gain per CPU minute, end KL."""
    gain = record["eval_end"]["reward"] - record["eval_start"]["reward"]
    cpu_min = record["train_cpu_s"] / 60
    kls = [r["kl"] for r in record["rows"][-WINDOW:]]
    return {"gain": gain, "cpu_minutes": cpu_min, "gain_per_cpu_minute": gain / cpu_min if cpu_min > 0 else None,
            "reward_start": record["eval_start"]["reward"], "reward_end": record["eval_end"]["reward"],
            "kl_end": record["eval_end"]["kl"], "kl_end_sampled": record["eval_end"]["kl_sampled"],
            "train_kl_last": sum(kls) / len(kls) if kls else None, "iterations": record["iterations"]}


METRICS = ("gain_per_cpu_minute", "gain", "cpu_minutes", "reward_start", "reward_end", "kl_end", "kl_end_sampled",
           "train_kl_last")


def pair_verdict(a: str, b: str, gain: dict, kl: dict) -> str:
    """The verdict for `a` - `b` from the t intervals of the paired differences of gain/CPU min and end KL."""
    if gain["low"] is None:
        return "n/a (fewer than 2 paired seeds)"
    kl_sep = excludes_zero(kl)
    if not excludes_zero(gain):
        kl_note = ("end KLs indistinguishable at 95 %" if not kl_sep else
                   f"{a if kl['mean'] > 0 else b} ends further from the reference (KL distinguishable at 95 %)")
        return f"indistinguishable at 95 %; {kl_note}"
    win, lose, sign = (a, b, 1) if gain["mean"] > 0 else (b, a, -1)
    if not kl_sep:
        return (f"{win} gains more per CPU minute than {lose}; end KLs indistinguishable at 95 % "
                "(equal KL not rejected)")
    if sign * kl["mean"] > 0:
        return (f"{win} gains more per CPU minute than {lose} but also drifts further (end KL higher at 95 %): "
                "not a win at equal KL")
    return f"{win} gains more per CPU minute than {lose}, with a lower end KL (at 95 %)"


def replicate_summary(records: list[dict], estimators: list[str]) -> dict:
    """Per estimator: mean and t interval over seeds of each run metric; per pair: paired differences + verdicts."""
    per = {name: {r["seed"]: run_metrics(r) for r in records if r["estimator"] == name} for name in estimators}
    out: dict = {"estimators": {}, "pairs": {}}
    for name, by_seed in per.items():
        seeds = sorted(by_seed)
        out["estimators"][name] = {
            "seeds": seeds, "iterations": [by_seed[s]["iterations"] for s in seeds],
            **{m: mean_ci([by_seed[s][m] for s in seeds if by_seed[s][m] is not None]) for m in METRICS}}
    for a, b in itertools.combinations(estimators, 2):
        seeds = sorted(set(per[a]) & set(per[b]))
        diff = {m: mean_ci([per[a][s][m] - per[b][s][m] for s in seeds
                            if per[a][s][m] is not None and per[b][s][m] is not None])
                for m in ("gain_per_cpu_minute", "gain", "kl_end", "cpu_minutes")}
        out["pairs"][f"{a} - {b}"] = {"seeds": seeds, **diff,
                                      "verdict": pair_verdict(a, b, diff["gain_per_cpu_minute"], diff["kl_end"])}
    out["overall"] = overall_verdict(out, estimators)
    return out


def overall_verdict(summary: dict, estimators: list[str]) -> str:
    """The estimator that gains more per CPU minute than every other one without a distinguishably larger KL."""
    for name in estimators:
        wins = 0
        for other in estimators:
            if other == name:
                continue
            sign = 1 if f"{name} - {other}" in summary["pairs"] else -1
            pair = summary["pairs"][f"{name} - {other}" if sign > 0 else f"{other} - {name}"]
            gain, kl = pair["gain_per_cpu_minute"], pair["kl_end"]
            if excludes_zero(gain) and sign * gain["mean"] > 0 and not (excludes_zero(kl) and sign * kl["mean"] > 0):
                wins += 1
        if len(estimators) > 1 and wins == len(estimators) - 1:
            return f"{name} gains more reward per CPU minute than every other estimator, at no larger KL (95 %)"
    return "no estimator gains distinguishably more per CPU minute than all others at equal KL (95 %)"


def _trailing_mean(values: list[float], window: int) -> list[float]:
    return [sum(values[max(0, i - window + 1): i + 1]) / len(values[max(0, i - window + 1): i + 1])
            for i in range(len(values))]


def reward_at_kl(rewards: list[float], kls: list[float], level: float, window: int = WINDOW) -> float | None:
    """Smoothed reward where the run's running-max KL first reaches `level` (linear interpolation); None if never."""
    smooth = _trailing_mean(rewards, window)
    peak = [max(kls[: i + 1]) for i in range(len(kls))]
    for i, kl in enumerate(peak):
        if kl >= level:
            if i == 0 or kl == peak[i - 1]:
                return smooth[i]
            frac = (level - peak[i - 1]) / (kl - peak[i - 1])
            return smooth[i - 1] + frac * (smooth[i] - smooth[i - 1])
    return None


def summarise(runs: dict[str, list[dict]], window: int = WINDOW) -> dict:
    """Train-reward summary of one seed's runs {estimator: rows}: first/end train reward, gain, CPU minutes, gain per
    CPU minute, end train KL, gain at the common KL (the smallest of the runs' peak train KLs)."""
    peaks = [max(r["kl"] for r in rows) for rows in runs.values()]
    level = min(peaks) if peaks and min(peaks) > 0 else None
    out: dict = {"kl_level": level, "estimators": {}}
    for name, rows in runs.items():
        rewards, kls = [r["reward"] for r in rows], [r["kl"] for r in rows]
        tail = rewards[-window:]
        gain = sum(tail) / len(tail) - rewards[0]
        cpu_min = rows[-1]["cpu_s"] / 60
        at_level = reward_at_kl(rewards, kls, level, window) if level is not None else None
        out["estimators"][name] = {
            "samples_per_iteration": rows[0]["samples"], "prompts_per_iteration": rows[0]["prompts"],
            "iterations": len(rows), "cpu_minutes": cpu_min, "reward_first": rewards[0],
            "reward_end": sum(tail) / len(tail), "gain": gain,
            "gain_per_cpu_minute": gain / cpu_min if cpu_min > 0 else None,
            "kl_end": sum(kls[-window:]) / len(kls[-window:]),
            "gain_at_kl_level": None if at_level is None else at_level - rewards[0],
        }
    return out


# -- tables -------------------------------------------------------------------------------------------------------

def _ci(s: dict, digits: int = 4, signed: bool = True) -> str:
    if s["mean"] is None:
        return "n/a"
    f = f"{{:{'+' if signed else ''}.{digits}f}}"
    if s["low"] is None:
        return f.format(s["mean"])
    return f"{f.format(s['mean'])} [{f.format(s['low'])}, {f.format(s['high'])}]"


def table(summary: dict, records: list[dict]) -> str:
    lines = ["| estimator | seeds | iters | CPU min/run | held-out R start | R end | gain | gain / CPU min (95 % CI) | "
             "end KL held-out (95 % CI) | end KL sampled | train KL last |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, s in summary["estimators"].items():
        short = {r["seed"] for r in records if r["estimator"] == name and not r["complete"]}
        iters = "/".join(str(i) for i in s["iterations"])
        iters += f" (cut short, left out: seeds {sorted(short)})" if short else ""
        lines.append(f"| {name} | {len(s['seeds'])} | {iters} | {_ci(s['cpu_minutes'], 2, False)} | "
                     f"{_ci(s['reward_start'], 4, False)} | {_ci(s['reward_end'], 4, False)} | {_ci(s['gain'])} | "
                     f"{_ci(s['gain_per_cpu_minute'])} | "
                     f"{_ci(s['kl_end'], 3, False)} | {_ci(s['kl_end_sampled'], 3, False)} | "
                     f"{_ci(s['train_kl_last'], 3, False)} |")
    lines += ["", "| pair (A - B, paired by seed) | d gain / CPU min (95 % CI) | d end KL (95 % CI) | d gain | "
                  "verdict |", "|---|---|---|---|---|"]
    for key, p in summary["pairs"].items():
        lines.append(f"| {key} | {_ci(p['gain_per_cpu_minute'])} | {_ci(p['kl_end'], 3)} | {_ci(p['gain'])} | "
                     f"{p['verdict']} |")
    lines += ["", f"overall: {summary['overall']}"]
    return "\n".join(lines)


# -- scheduling ---------------------------------------------------------------------------------------------------

def _worker_env(threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


GRACE_S = 120  # past --wall-minutes, the workers still running are stopped (their finished runs are kept)


def run_parallel(jobs: list[dict], *, slots: int, end: float | None, threads: int, work: Path,
                 log_dir: Path) -> tuple[list[dict], list[dict]]:
    """Run `jobs` (run() keyword sets) in `slots` worker subprocesses, dealt round-robin (each worker runs its
    share one after the other, so it imports torch and loads data once); (records, failures)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    workers = []
    for slot in range(min(slots, len(jobs))):
        # Results next to the logs, not in the temporary folder: a finished run survives whatever happens later.
        spec, out = work / f"worker{slot}.json", log_dir / f"worker{slot}.results"
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob("*.json"):
            stale.unlink()
        share = jobs[slot::slots]
        spec.write_text(json.dumps({"jobs": share, "end": end}))
        log = open(log_dir / f"worker{slot}.log", "w")
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", str(spec),
                                 "--worker-out", str(out), "--threads", str(threads)],
                                stdout=log, stderr=subprocess.STDOUT, env=_worker_env(threads), cwd=str(ROOT))
        workers.append((proc, log, out, share))
        print(f"worker {slot} (pid {proc.pid}): " + ", ".join(f"{j['estimator']}-{j['seed']}" for j in share)
              + f"; log {log.name}", flush=True)
    seen: set[str] = set()
    while True:
        for _, _, out, _ in workers:
            for path in sorted(out.glob("*.json")):
                if path.name not in seen:
                    seen.add(path.name)
                    record = json.loads(path.read_text())
                    if "error" not in record and "skipped" not in record:
                        _print_record(record)
                    elif "skipped" in record:
                        print(f"skipped {record['estimator']}-{record['seed']}: {record['reason']}", flush=True)
        if all(proc.poll() is not None for proc, *_ in workers):
            break
        if end is not None and time.time() > end + GRACE_S:
            for proc, *_ in workers:
                if proc.poll() is None:
                    print(f"wall budget exceeded by {GRACE_S} s: stopping worker pid {proc.pid}", flush=True)
                    proc.terminate()
            for proc, *_ in workers:
                proc.wait(timeout=30)
            break
        time.sleep(1.0)
    records, failures = [], []
    for proc, log, out, share in workers:
        log.close()
        done = {}
        for path in out.glob("*.json"):
            record = json.loads(path.read_text())
            done[(record["estimator"], record["seed"])] = record
        for job in share:
            record = done.get((job["estimator"], job["seed"]))
            if record is not None and record.get("skipped"):
                records.append(record)
            elif record is None or "error" in record:
                failures.append({"estimator": job["estimator"], "seed": job["seed"], "returncode": proc.returncode,
                                 "error": None if record is None else record["error"], "log": log.name})
            else:
                records.append(record)
    return records, failures


def _print_record(r: dict) -> None:
    s, e = r["eval_start"], r["eval_end"]
    print(f"{r['estimator']} seed {r['seed']}: {r['iterations']} it, train CPU {r['train_cpu_s']:.0f} s, "
          f"held-out R {s['reward']:.4f} -> {e['reward']:.4f}, KL {s['kl']:.3f} -> {e['kl']:.3f} "
          f"{'(start reused) ' if r['eval_start']['reused'] else ''}(train R "
          + ", ".join(f"{row['reward']:.3f}" for row in r["rows"]) + ")", flush=True)


def run_or_skip(job: dict, *, end: float | None, durations: list[float]) -> dict:
    """Run `job` with the global bound `end` (time.time()), or a "skipped" record when the slowest run done so far
    in this process (`durations`, wall seconds; appended to) says it would not end before `end`."""
    if end is not None and durations and time.time() + max(durations) > end:
        return {"estimator": job["estimator"], "seed": job["seed"], "skipped": True,
                "reason": f"{end - time.time():.0f} s left, runs took up to {max(durations):.0f} s"}
    record = run(**dict(job, deadline=end))
    durations.append(record["wall_s"])
    return record


def _worker(spec: Path, out: Path, threads: int) -> None:
    """Run a worker's jobs one after the other; one JSON file per run in `out` (an "error" record if it failed)."""
    import traceback

    import torch

    torch.set_num_threads(threads)
    spec = json.loads(spec.read_text())
    durations: list[float] = []
    for job in spec["jobs"]:
        job = dict(job, root=Path(job["root"]))
        tag = f"{job['estimator']}-{job['seed']}"
        try:
            record = run_or_skip(job, end=spec["end"], durations=durations)
        except Exception:  # noqa: BLE001 - recorded, the worker goes on with its next run
            traceback.print_exc()
            record = {"estimator": job["estimator"], "seed": job["seed"], "error": traceback.format_exc()}
        partial = out / f"{tag}.tmp"
        partial.write_text(json.dumps(record))
        os.replace(partial, out / f"{tag}.json")
        print(f"done {tag}", flush=True)


def _plain(value):
    """A settings value as JSON writes it (paths as strings, also inside lists)."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


REUSE_SETTINGS = ("config", "iterations", "samples", "rloo_k", "eval_prompts", "eval_seed", "kl_prompts", "quick",
                  "threads")


def _load_reused(args, names: list[str]) -> tuple[dict, list[dict]]:
    """Complete runs {(estimator, seed): record} of the --reuse files, and a line per file (path, command, wall)."""
    reused, invocations = {}, []
    for path in args.reuse:
        old = json.loads(path.read_text())
        now = {k: _plain(v) for k, v in vars(args).items()}
        theirs = dict(old["settings"])
        if theirs.get("config"):
            config = Path(theirs["config"])
            theirs["config"] = str(config.with_name(RENAMED_CONFIGS.get(config.name, config.name)))
        differ = {k: (theirs.get(k), now[k]) for k in REUSE_SETTINGS if theirs.get(k) != now[k]}
        if differ:
            raise ValueError(f"--reuse {path}: other settings {differ} (theirs, ours): its runs are not comparable")
        taken = [r for r in old["runs"] if r.get("complete") and r["estimator"] in names and r["seed"] in args.seeds
                 and (r["estimator"], r["seed"]) not in reused]
        reused.update({(r["estimator"], r["seed"]): r for r in taken})
        invocations.append({"path": str(path), "command": old["command"],
                            "wall_s": old.get("wall_s_total", old["wall_s"]),
                            "runs_taken": [f"{r['estimator']}-{r['seed']}" for r in taken]})
    return reused, invocations


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--estimators", default=",".join(ESTIMATORS))
    parser.add_argument("--iterations", type=int, default=6)
    parser.add_argument("--samples", type=int, default=16, help="generated responses per iteration (every run)")
    parser.add_argument("--rloo-k", type=int, default=4, help="rloo: samples per prompt (samples / k prompts)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="replicates: one run per estimator each")
    parser.add_argument("--eval-prompts", type=int, default=32, help="held-out prompts (the test split's first)")
    parser.add_argument("--kl-prompts", type=int, default=None,
                        help="held-out KL on the first N held-out prompts (default: all of them)")
    parser.add_argument("--eval-seed", type=int, default=0, help="data seed of the held-out prompts (all runs)")
    parser.add_argument("--start-eval", choices=("once", "each"), default="once",
                        help="'once': reuse a process's start evaluation for runs whose start weights hash the same")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (per run process)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once, in subprocesses (1: in this process)")
    parser.add_argument("--wall-minutes", type=float, default=None, help="wall-time bound of the whole comparison")
    parser.add_argument("--quick", action="store_true", help="tiny random model, 2 iterations of 8 samples")
    parser.add_argument("--out", type=Path, default=None, help="JSON output (default: print only)")
    parser.add_argument("--log-dir", type=Path, default=None, help="subprocess logs (default: next to --out)")
    parser.add_argument("--reuse", type=Path, action="append", default=[],
                        help="an earlier JSON of the same settings: its complete runs are taken, not run again "
                             "(e.g. after a wall bound skipped some); repeatable")
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        _worker(args.worker, args.worker_out, args.threads)
        return {}
    import torch

    torch.set_num_threads(args.threads)
    if args.quick:
        args.iterations, args.samples, args.rloo_k = min(args.iterations, 2), 8, 2
        args.eval_prompts = min(args.eval_prompts, 4)
    model_args, data_args = settings(args.config, args.quick)
    names = args.estimators.split(",")
    _START_CACHE.clear()
    t0, cpu0 = time.time(), time.process_time()
    end = None if args.wall_minutes is None else t0 + 60 * args.wall_minutes
    reused, invocations = _load_reused(args, names)
    with tempfile.TemporaryDirectory() as tmp:
        for r in reused.values():  # their start evaluations serve the new runs too (same start weights and settings)
            if not r["eval_start"]["reused"]:
                (Path(tmp) / f"start-{r['start_key']}.json").write_text(json.dumps(r["eval_start"]))
        base = dict(model_args=model_args, data_args=data_args, iterations=args.iterations, samples=args.samples,
                    rloo_k=args.rloo_k, root=tmp, eval_prompts=args.eval_prompts, eval_seed=args.eval_seed,
                    start_eval=args.start_eval, cache_dir=tmp, kl_prompts=args.kl_prompts)
        # Seed-major order: if time runs out, the seeds that did run have every estimator (paired differences).
        jobs = [dict(base, estimator=name, seed=seed) for seed in args.seeds for name in names
                if (name, seed) not in reused]
        if args.jobs > 1:
            log_dir = args.log_dir or ((args.out.parent / f"{args.out.stem}.logs") if args.out else Path(tmp) / "logs")
            records, failures = run_parallel(jobs, slots=args.jobs, end=end, threads=args.threads, work=Path(tmp),
                                             log_dir=log_dir)
        else:
            records, failures, durations = [], [], []
            for job in jobs:
                records.append(run_or_skip(dict(job, root=Path(tmp)), end=end, durations=durations))
                if records[-1].get("skipped"):
                    print(f"skipped {job['estimator']}-{job['seed']}: {records[-1]['reason']}", flush=True)
                else:
                    _print_record(records[-1])
    wall = time.time() - t0
    records += list(reused.values())
    order = {(s, n): i for i, (s, n) in enumerate(itertools.product(args.seeds, names))}
    skipped = [r for r in records if r.get("skipped")]
    records = sorted((r for r in records if not r.get("skipped")), key=lambda r: order[(r["seed"], r["estimator"])])
    summary = replicate_summary([r for r in records if r["complete"]], names)
    starts = {r["start_key"]: set() for r in records}
    for r in records:
        if not r["eval_start"]["reused"]:
            starts[r["start_key"]].add(round(r["eval_start"]["reward"], 6))
    train_summary = {}
    for seed in args.seeds:
        rows = {r["estimator"]: r["rows"] for r in records if r["seed"] == seed}
        if rows:
            common = min(len(v) for v in rows.values())
            train_summary[str(seed)] = summarise({k: v[:common] for k, v in rows.items()})
    result = {"settings": {k: _plain(v) for k, v in vars(args).items() if not k.startswith("worker")},
              "command": " ".join(sys.argv) if argv is None else " ".join(argv),
              "wall_s": wall, "wall_s_total": wall + sum(i["wall_s"] for i in invocations),
              "reused_from": invocations, "train_cpu_s_total": sum(r["train_cpu_s"] for r in records),
              "eval_cpu_s_total": sum(r["eval_end"]["cpu_s"] + (0 if r["eval_start"]["reused"] else
                                                                 r["eval_start"]["cpu_s"]) for r in records),
              "orchestrator_cpu_s": time.process_time() - cpu0,
              "start_eval_consistent": all(len(v) <= 1 for v in starts.values()),
              "failures": failures, "skipped": skipped, "runs": records, "summary": summary,
              "train_summary": train_summary}
    print(table(summary, records))
    cut = [f"{r['estimator']}-{r['seed']}" for r in records if not r["complete"]]
    print(f"wall {wall / 60:.1f} min, training CPU {result['train_cpu_s_total'] / 60:.1f} min, "
          f"evaluation CPU {result['eval_cpu_s_total'] / 60:.1f} min, {len(records)} runs ({len(cut)} cut short, "
          f"out of the summary: {cut}), {len(skipped)} skipped, {len(failures)} failed")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return result


if __name__ == "__main__":
    main()
