"""The text family of `rs demo`: SmolLM2-135M-Instruct + LoRA, VADER positivity vs MiniLM relevance.

Stages of each replicate r (the offline review task of configs/text/review.yaml; seed = first seed + r):
  init        the replicate's theta_0: SmolLM2 with a fresh LoRA (lora.init_seed = seed), exported untrained
  expert x2   PPO on one reward each (mu one-hot)
  morl        PPO on 0.5 vader + 0.5 relevance, the baseline one training per preference buys (3 rewards: MORL at
              uniform mu and at 0.6 on each reward, 4 trainings)
  front       the soups of the two experts + init + MORL, in place, every reward, summary and front.png
The "quick" profile swaps in the tiny random model and a few iterations: the same pipeline in a minute.
`python -m rs_lightning.demo.text export-init TARGET --config CONFIG` is the init stage's command.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import yaml

from rs_lightning.demo.pipeline import (
    CONFIG_ROOT,
    PROGRESS_BAR,
    NotASection,
    Stage,
    default_preferences,
    front_section,
    replicate_stages,
    set_nested,
    set_precision,
)

BASE_CONFIG = CONFIG_ROOT / "text" / "review.yaml"
# bf16 autocast with each weight cast once (tasks/autocast_cache.py): 1.6x faster per PPO iteration than fp32 on a
# CPU with AMX (benchmarks/RESULTS.md); `rs demo --precision 32-true` elsewhere.
PRECISION = "bf16-mixed"
# lambda in steps of 0.2 (plus the uniform soup): on 2 cores a text sweep point (32 validation + 32 test prompts)
# takes ~15 s, and 11 points would add 4 soups to each replicate's sweep, about 3 stage-minutes in all, to a
# replicated run measured at 11.3 min against a budget of 15 (`rs demo --points 11` for the paper's grid).
POINTS = 6
REWARDS = ["vader", "relevance"]
# `rs demo --task text --rewards` takes 2 or 3 of these. "concise" pulls against the other two: LengthReward with
# target 8 words scores -|n - 8| / 8, so the fuller, review-like answers that positivity and relevance favour lose.
TEXT_METRICS = ("vader", "relevance", "concise")
EXTRA_REWARDS = {"concise": {"class_path": "rs_lightning.rewards.rules.LengthReward",
                             "init_args": {"target": 8, "unit": "words", "name": "concise"}}}
# Fixed per-task normalisation for hypervolume: VADER compound in [-1, 1], cosine relevance in [0, 1], conciseness
# in [-2, 0] (24 new tokens are at most about 24 words: -(24 - 8) / 8).
RANGES = {"vader": (-1.0, 1.0), "relevance": (0.0, 1.0), "concise": (-2.0, 0.0)}

# Overrides per profile: "<section>.<key>[.<field>...]" is the path under the section's init_args (the module's
# settings groups are nested: "model.rollout.response_length"); "iterations" is trainer.limit_train_batches.
PROFILES = {
    # The demo's budget recipe on configs/text/review.yaml: 10 PPO iterations at twice the config's learning rate
    # (15 at 5e-4 there), so that 3 replicates fit in 15 minutes on 2 cores (benchmarks/RESULTS.md).
    "default": {"model.ppo.lr": 1.0e-3, "iterations": 10},
    "quick": {
        "model.model": "tiny-random", "data.tokenizer": "tiny-random", "model.rollout.response_length": [8, 8],
        "model.rollout.eval_max_new_tokens": 8, "data.num_train": 16, "data.num_val": 4, "data.num_test": 4,
        "data.batch_size": 4, "data.eval_batch_size": 4, "iterations": 2,
    },
}


def base_config(profile: str, iterations: int | None, rewards: list[str] = REWARDS) -> dict:
    config = yaml.safe_load(BASE_CONFIG.read_text())
    shipped = {spec["init_args"]["name"]: spec for spec in config["model"]["init_args"]["rewards"]}
    config["model"]["init_args"]["rewards"] = [shipped.get(r) or copy.deepcopy(EXTRA_REWARDS[r]) for r in rewards]
    # One weight per reward (each training sets its own mu; the sweep's module only needs a valid one).
    config["model"]["init_args"]["reward_weights"] = [1.0] + [0.0] * (len(rewards) - 1)
    settings = dict(PROFILES[profile])
    its = iterations or settings.pop("iterations", None)
    settings.pop("iterations", None)
    for dotted, value in settings.items():
        set_path(config, dotted, value)
    if its is not None:
        config["trainer"]["limit_train_batches"] = its
    return config


def set_path(config: dict, dotted: str, value) -> None:
    """Set `value` at "<section>.<key>[.<field>...]" under config[section]["init_args"], making the groups on the
    way (a group the base config leaves out keeps its defaults for the fields not set)."""
    section, *path = dotted.split(".")
    if section not in ("model", "data") or not path:
        raise ValueError(f"profile override {dotted!r}: expected model.<key>[.<field>...] or data.<key>")
    try:
        set_nested(config[section]["init_args"], path, value)
    except NotASection as err:
        raise ValueError(f"profile override {dotted!r}: {err.keys[-1]!r} is not a group of settings") from None


def training_config(base: dict, run_dir: Path, seed: int, mu: list[float]) -> dict:
    config = copy.deepcopy(base)
    config["seed_everything"] = seed
    config["model"]["init_args"].setdefault("lora", {})["init_seed"] = seed
    config["model"]["init_args"]["reward_weights"] = mu
    trainer = config["trainer"]
    trainer["default_root_dir"] = str(run_dir)
    trainer["logger"] = {"class_path": "lightning.pytorch.loggers.CSVLogger",
                         "init_args": {"save_dir": str(run_dir), "name": "logs"}}
    trainer["callbacks"] = [{"class_path": "rs_lightning.tasks.text.export.ExportExpert",
                             "init_args": {"dirpath": str(run_dir / "expert")}},
                            PROGRESS_BAR]
    trainer["enable_progress_bar"] = True
    trainer["enable_model_summary"] = False
    return config


def front_config(base: dict, out_dir: Path, experts: list[Path], init: Path | None,
                 morl: list[tuple[list[float], Path]], points: int, rewards: list[str] = REWARDS) -> dict:
    front = front_section(list(rewards), experts, out_dir, init=init, morl=morl, points=points,
                          ideal=[RANGES[r][1] for r in rewards], nadir=[RANGES[r][0] for r in rewards],
                          preferences=default_preferences(len(rewards)))
    return {"seed_everything": 0, "model": copy.deepcopy(base["model"]), "data": copy.deepcopy(base["data"]),
            "trainer": {"accelerator": "cpu", "devices": 1}, "front": front}


def export_init(config_path: Path, target: Path) -> None:
    """Build the module exactly as a training run would (same LoRA seed) and export it untrained."""
    from lightning.pytorch.cli import LightningCLI

    from rs_lightning.tasks.text.export import export_expert

    cli = LightningCLI(subclass_mode_model=True, subclass_mode_data=True, run=False, save_config_callback=None,
                       args=["--config", str(config_path)])
    export_expert(cli.model, target)


def plan(out: Path, *, replicates: int = 3, seed: int = 0, profile: str = "default", iterations: int | None = None,
         points: int = POINTS, rewards: list[str] = REWARDS, precision: str = PRECISION) -> list[Stage]:
    """The stages of the text demo under `out`; replicate r in out/rep<r>. `rewards`: 2 or 3 of TEXT_METRICS;
    `precision`: Lightning's, of every training and sweep."""
    rewards = list(rewards)
    base = base_config(profile, iterations, rewards)
    first = [1.0] + [0.0] * (len(rewards) - 1)
    stages = []
    for r in range(replicates):
        rep, s = out / f"rep{r}", seed + r
        init_dir = rep / "init" / "expert"
        init = Stage(f"r{r}-init", "init", init_dir, training_config(base, rep / "init", s, first),
                     seed=s, replicate=r, trains=False,
                     command=[sys.executable, "-m", "rs_lightning.demo.text", "export-init", str(init_dir)])

        def train(run_dir: Path, seed: int, mu: list[float]) -> tuple[dict, Path]:
            return training_config(base, run_dir, seed, mu), run_dir / "expert"

        def front(out_dir, experts, init_path, morl, n):
            return front_config(base, out_dir, experts, init_path, morl, n, rewards)

        # Three rewards: MORL at every preference lam* is selected for (the uniform one and 0.6 on each reward),
        # so the soups' front meets a MORL front, not one point; two rewards: MORL at mu = 0.5 only.
        morl = default_preferences(len(rewards)) if len(rewards) >= 3 else None
        stages += replicate_stages(rep, r, s, rewards, init, train, front, points, morl_preferences=morl)
    set_precision(stages, precision)
    return stages


if __name__ == "__main__":
    if len(sys.argv) != 5 or sys.argv[1] != "export-init" or sys.argv[3] != "--config":
        sys.exit("usage: python -m rs_lightning.demo.text export-init TARGET --config CONFIG")
    export_init(Path(sys.argv[4]), Path(sys.argv[2]))
