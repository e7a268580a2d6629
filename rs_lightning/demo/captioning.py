"""The captioning family of `rs demo`: a tiny CoCa on the synthetic caption set, BLEU-1 vs ROUGE-L.

Stages of each replicate r (configs/captioning/*.yaml, sized for a 2-core CPU; seed = first seed + r):
  init        cross-entropy (XE) training of the captioner, its own model seed and data order: the shared
              theta_0 of the replicate's SCST runs
  expert x2   SCST on BLEU-1 and on ROUGE-L (mu one-hot; both logged)
  morl        SCST on 0.5 BLEU-1 + 0.5 ROUGE-L
  front       the soups of the two experts over the lambda grid, + init + MORL; greedy evaluation of every
              metric on the test and validation images, per-example rewards kept for the bootstrap

Why greedy and not the paper's beam 5 (measured, replicate 0, 600 test images, see benchmarks/RESULTS.md): beam
search lifts the XE init by +0.030 BLEU-1 / +0.057 ROUGE-L over its greedy captions, but not the SCST experts,
whose policies are nearly deterministic after SCST (beam-5 and greedy scores agree within 0.004). At beam 5 the
ROUGE-L expert then scores below the init on ROUGE-L (-0.028 [-0.045, -0.014]) although SCST raised its greedy
ROUGE-L by +0.029 [+0.009, +0.048] (SCST optimises the reward of sampled captions; the greedy caption is the mode
of that policy). The demo reports the policies SCST trained, greedily decoded;
`--model.init_args.decoding.eval_decoding beam` in the sweep config gives beam 5.
"""

from __future__ import annotations

import copy
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

# The captioning demo's recorded numbers are fp32; its replicated run already fits its budget.
PRECISION = "32-true"
POINTS = 11  # lambda values in the sweep (rs demo --points)
REWARDS = ["bleu1", "rouge_l"]
# The paper's five captioning rewards (Ramé et al. 2023, Fig. 5): `rs demo --rewards` takes any 2 to 5 of them.
PAPER_METRICS = ("bleu1", "bleu4", "rouge_l", "meteor", "cider_d")
# Normalisation range per metric: BLEU, ROUGE-L and METEOR live in [0, 1], CIDEr-D in [0, 10] (its x10 scale).
METRIC_RANGE = {"cider_d": (0.0, 10.0)}
# The sweep scores more images than the trainings validate on: the bootstrap interval of a margin shrinks as
# 1/sqrt(images), and at 200 test images one replicate's ROUGE-L expert gain over its init (+0.033) was within
# its interval [-0.003, +0.068] (the previous recipe: 2 SCST epochs). Greedy decoding of 600 + 150 images costs
# seconds per point.
SWEEP_IMAGES = {"default": {"num_test": 600, "num_val": 150}, "quick": {}}
# Overrides per profile: "<section>.<key>[.<field>...]" is the path under the section's init_args (the module's
# settings groups are nested: "model.decoding.max_length"); "xe_epochs"/"scst_epochs" are trainer.max_epochs.
PROFILES = {
    "default": {},
    "quick": {"data.num_train": 64, "data.num_test": 16, "data.num_val": 8, "data.eval_batch_size": 16,
              "xe_epochs": 1, "scst_epochs": 1},
}


def _load(name: str) -> dict:
    return yaml.safe_load((CONFIG_ROOT / "captioning" / name).read_text())


def _apply(config: dict, settings: dict) -> dict:
    """`config` with the profile's "<section>.<key>[.<field>...]" overrides set (the other profile keys are not
    config keys). A model key is set only where the config has it (the XE config has no `scst` group, say); a
    group the config leaves out is made, and keeps its defaults for the fields not set."""
    for dotted, value in settings.items():
        section, *path = dotted.split(".")
        if section not in ("model", "data") or not path:
            continue
        node = config[section]["init_args"]
        if section == "model" and path[0] not in node:
            continue
        try:
            set_nested(node, path, value)
        except NotASection as err:
            raise ValueError(f"profile override {dotted!r}: {err.keys[-1]!r} is not a group of settings") from None
    return config


def _run(config: dict, run_dir: Path, output: Path, seed: int, epochs: int | None,
         rewards: list[str] = REWARDS) -> dict:
    config = copy.deepcopy(config)
    config["seed_everything"] = seed
    if config["model"]["init_args"].get("stage") == "scst":
        # The SCST samples follow the run's seed; the data seed stays: it defines the dataset.
        config["model"]["init_args"].setdefault("scst", {})["sample_seed"] = seed
    trainer = config["trainer"]
    trainer["default_root_dir"] = str(run_dir)
    trainer["logger"] = {"class_path": "lightning.pytorch.loggers.CSVLogger",
                         "init_args": {"save_dir": str(run_dir), "name": "logs"}}
    trainer["callbacks"] = [{"class_path": "rs_lightning.tasks.captioning.export.ExportCaptioner",
                             "init_args": {"path": str(output)}},
                            PROGRESS_BAR]
    trainer["enable_progress_bar"] = True
    trainer["enable_model_summary"] = False
    # Validation during training logs the demo's two rewards only: METEOR's default Java process took half a core
    # beside every training (measured: two JVMs at 25 % each next to two trainings on 2 cores).
    config["model"]["init_args"]["eval_metrics"] = list(rewards)
    if epochs is not None:
        trainer["max_epochs"] = epochs
    return config


def _front(base: dict, out_dir: Path, experts: list[Path], init: Path | None, morl: list[tuple[list[float], Path]],
           points: int, sweep_images: dict, rewards: list[str] = REWARDS) -> dict:
    model = copy.deepcopy(base["model"])
    model["init_args"].pop("init_checkpoint", None)
    # The front scores exactly the demo's two rewards: the other caption metrics (METEOR runs a Java process)
    # would only cost time at every point. The training reward is unused at test time.
    model["init_args"].update(rewards=["bleu1"], reward_weights=None, corpus_metrics=False,
                              eval_metrics=list(rewards))
    nadir = [METRIC_RANGE.get(r, (0.0, 1.0))[0] for r in rewards]
    ideal = [METRIC_RANGE.get(r, (0.0, 1.0))[1] for r in rewards]
    front = front_section(list(rewards), experts, out_dir, init=init, morl=morl, points=points, ideal=ideal,
                          nadir=nadir, preferences=default_preferences(len(rewards)))
    data = copy.deepcopy(base["data"])
    data["init_args"].pop("shuffle_seed", None)  # evaluation reads no training order
    data["init_args"].update(sweep_images)
    return {"seed_everything": 0, "model": model, "data": data,
            "trainer": {"accelerator": "cpu", "devices": 1}, "front": front}


def _builders(out: Path, seed: int, profile: str, iterations: int | None, name: str = "init-xe",
              rewards: list[str] = REWARDS):
    """(init stage, train, front) for one replicate folder `out` whose runs are seeded `seed`."""
    settings = PROFILES[profile]
    xe = _apply(_load("xe_init.yaml"), settings)
    xe["model"]["init_args"]["init_seed"] = seed
    xe["data"]["init_args"]["shuffle_seed"] = seed  # same images and captions, another order
    scst = _apply(_load("scst_morl_bleu1_rouge_l.yaml"), settings)
    scst["data"]["init_args"]["shuffle_seed"] = seed
    scst["model"]["init_args"].setdefault("decoding", {})["eval_decoding"] = "greedy"  # see the module docstring
    scst["model"]["init_args"]["rewards"] = list(rewards)  # mu (reward_weights) is set per run below
    scst_epochs = iterations or settings.get("scst_epochs")
    init_path = out / "init" / "model.safetensors"
    init = Stage(name, "init", init_path, _run(xe, out / "init", init_path, seed, settings.get("xe_epochs")),
                 seed=seed)
    scst["model"]["init_args"]["init_checkpoint"] = str(init_path)

    def train(run_dir: Path, seed: int, mu: list[float]) -> tuple[dict, Path]:
        output = run_dir / "model.safetensors"
        config = _run(scst, run_dir, output, seed, scst_epochs, rewards)
        config["model"]["init_args"]["reward_weights"] = mu
        return config, output

    def front(out_dir, experts, init_path, morl, n):
        return _front(scst, out_dir, experts, init_path, morl, n, SWEEP_IMAGES[profile], rewards)

    return init, train, front


def plan(out: Path, *, replicates: int = 3, seed: int = 0, profile: str = "default", iterations: int | None = None,
         points: int = POINTS, rewards: list[str] = REWARDS, precision: str = PRECISION) -> list[Stage]:
    """The stages of the captioning demo under `out` (`iterations` = SCST epochs here); replicate r in out/rep<r>.
    `rewards`: 2 to 5 of PAPER_METRICS, one expert each (3 or more: the soups of a bounded simplex design);
    `precision`: Lightning's, of every training and sweep."""
    stages = []
    for r in range(replicates):
        rep = out / f"rep{r}"
        init, train, front = _builders(rep, seed + r, profile, iterations, name=f"r{r}-init", rewards=rewards)
        init.replicate = r
        stages += replicate_stages(rep, r, seed + r, list(rewards), init, train, front, points)
    set_precision(stages, precision)
    return stages


def morl_stage(out: Path, mu: list[float], *, replicate: int = 0, seed: int = 0, profile: str = "default",
               iterations: int | None = None) -> Stage:
    """One MORL training on mu[0] BLEU-1 + mu[1] ROUGE-L from replicate `replicate`'s init (mu = [0.5, 0.5] IS
    the demo's MORL stage, same name and output, so either run reuses the other's)."""
    rep = out / f"rep{replicate}"
    init, train, _ = _builders(rep, seed + replicate, profile, iterations, name=f"r{replicate}-init")
    run_dir = rep / ("morl" if mu == [0.5, 0.5] else f"morl_mu{mu[1]:g}")
    config, output = train(run_dir, seed + replicate, mu)
    return Stage(morl_stage_name(mu, replicate), "morl", output, config, [init.name], seed=seed + replicate, mu=mu,
                 replicate=replicate)


def morl_stage_name(mu: list[float], replicate: int = 0) -> str:
    """The stage (and timing) name of a MORL run: "r0-morl" for the demo's mu = [0.5, 0.5]."""
    return f"r{replicate}-" + ("morl" if mu == [0.5, 0.5] else f"morl-mu{mu[1]:g}")


def front_config(out: Path, out_dir: Path, experts: list[Path], init: Path, morl: list[tuple[list[float], Path]],
                 points: int = 11, profile: str = "default") -> dict:
    """An `rs front` config over replicate 0's experts, its init and several MORL models (mu, path)."""
    _, _, front = _builders(out / "rep0", 0, profile, None)
    config = front(out_dir, experts, init, None, points)
    config["front"]["morl"] = [{"path": str(p), "mu": mu, "name": f"morl mu={mu[1]:g}"} for mu, p in morl]
    return config
