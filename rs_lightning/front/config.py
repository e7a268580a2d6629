"""The `rs front` config: a LightningCLI-style YAML (model, data, trainer) plus a `front:` section.

    model:   {class_path: ..., init_args: {...}}     # the task's LightningModule
    data:    {class_path: ..., init_args: {...}}     # its LightningDataModule
    trainer: {accelerator: auto, devices: 1, ...}    # Lightning Trainer arguments
    seed_everything: 0                               # seeded before every point (common random numbers)
    front:
      experts: [path_a, {path: path_b, name: b, prefix: "model."}]   # aligned with the weights
      init: path_0                                   # optional, evaluated once
      morl: [{path: m.ckpt, mu: [0.5, 0.5]}]         # optional, one per MORL preference
      grid: {kind: auto, points: 11, low: 0.0, high: 1.0, m: 10}
      allow_extrapolation: false
      allow_nonfinite: false                         # checkpoints holding NaN/inf are refused unless true
      out_dir: runs/front/NAME
      method: {name: linear, options: {}, base: null, fisher: []}   # or ties / dare_ties / slerp / fisher ...
      ensemble: false                                # true: also the experts' prediction mixture at each lam
      validate: true                                 # default: also trainer.validate, the rows lam* is picked on
      summary: {rewards: [r1, r2], ideal: [...], nadir: [...], preferences: [[0.5, 0.5]],
                nadir_from: config, select_on: val, n_boot: 1000, level: 0.95, boot_seed: 0}

Anything can be overridden on the command line (`--front.grid.points 21`, `--model.init_args.lr 0.1`).
The same file can therefore reuse a training config of the task. The sweep forces the Trainer quiet
(no logger, checkpointing, progress bar or model summary): one tqdm bar over the points replaces them.

The config hash (stored in every row) covers what the rows' values depend on: model, data, trainer,
seed, checkpoints (path, prefix, size on disk, mu), target_prefix, validate, and a merge method other than
linear (its name, options, theta_0 and Fisher files). It does not cover the
grid or the summary settings, so widening the grid or changing the normalisation reuses the rows.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from rs_lightning.front.checkpoints import Checkpoint, fingerprint
from rs_lightning.front.grids import GridSpec
from rs_lightning.front.rows import stable_hash
from rs_lightning.front.settings import SummarySettings

# Trainer arguments that change nothing in a row's values: left out of the config hash.
COSMETIC_TRAINER_KEYS = ("callbacks", "logger", "enable_progress_bar", "enable_model_summary",
                         "enable_checkpointing", "default_root_dir", "log_every_n_steps", "profiler")
QUIET_TRAINER = {"logger": False, "enable_progress_bar": False, "enable_model_summary": False,
                 "enable_checkpointing": False}

DESCRIPTION = """\
Sweep soup weights over N experts, score every reward with trainer.test, and write the front.

Weight convention: weights are aligned with front.experts, in order, and theta = sum_i w_i * theta_i.
For two experts the 1-D grid is over lam, the weight of the SECOND expert: theta(lam) = (1-lam) theta_1 +
lam theta_2 (lam = 0 is expert 1). One-hot weights reproduce an expert bit for bit. Weights off the simplex
(the paper's lam in [-0.5, 1.5] ablation) need front.allow_extrapolation: true.

Each point is souped in place into one loaded module (no save/reload) and evaluated with trainer.test;
every logged test/reward/<name> becomes a row of OUT/front.jsonl, written as each point finishes (with the
per-example rewards the task's test_step returns); trainer.validate runs too (front.validate, default true)
and lam* is selected on those validation rows. Re-running the same command resumes (points on disk are
skipped). Outputs beside it: summary.json (hypervolume of RS / experts / MORL / init with the normalisation
and reference point, IGD+, spacing, LMC gaps, lam* per preference, paired-bootstrap intervals and verdicts),
front.png (two rewards, with error bars) or radar.png and front_pairs.png (three or more: a spider plot and the
front pair by pair), run.json, config.yaml.

Other forms:
  rs front select --preference MU1 MU2 ... RUN_DIR [--split val|test] [--write-soup OUT]
                                                                        lam* for a preference (and its soup)
  rs front report RUN_DIR                                               redo summary.json and the plots

The whole config is checked before the model is built (a reward that is not logged: after the first point,
before anything is written); one process writes a run folder at a time (a second one stops at once: "run
folder ... is in use by pid N"). Exit status: 0 done; 2 bad config, checkpoints or run folder, or the folder
in use (nothing written); 1 a write failed (disk full: the finished rows are kept, re-run to resume).
"""


@dataclass
class CheckpointSpec:
    """A checkpoint in the config (see checkpoints.Checkpoint)."""

    path: str
    name: str | None = None
    prefix: str | None = None
    mu: list[float] | None = None


@dataclass
class MethodSpec:
    """`front.method`: how a grid point's weights become a model (rs_lightning.soup.methods).

    Attributes:
        name: linear (the default: the rewarded soup), task_arithmetic, ties, dare_linear, dare_ties, slerp, fisher.
        options: the method's options (e.g. {density: 0.2} for ties, {drop_rate: 0.9, seed: 0} for DARE).
        base: theta_0 for the task-vector methods; default front.init (the shared initialisation).
        fisher: one diagonal-Fisher safetensors per expert, in expert order (method fisher; from `rs fisher`).
    """

    name: str = "linear"
    options: dict = field(default_factory=dict)
    base: str | CheckpointSpec | None = None
    fisher: list[str] = field(default_factory=list)


@dataclass
class FrontSpec:
    """The `front:` section.

    Attributes:
        experts: expert checkpoints, aligned with the weights (full weights or PEFT adapter folders).
        init: the shared init, evaluated once (optional).
        morl: MORL checkpoints, each with the `mu` it was trained on (optional).
        grid: the weight grid (see grids.GridSpec).
        allow_extrapolation: accept negative weights (they must still sum to 1).
        allow_nonfinite: sweep checkpoints holding NaN/inf (refused by default, naming the key and file;
            e.g. a -inf attention-mask buffer every expert shares).
        out_dir: run folder.
        validate: also run trainer.validate per point (default); lam* is selected on the validation rows.
            With false, summary.select_on must be "test" (an explicit, optimistic choice).
        target_prefix: the module's state_dict keys under this prefix receive the soup (prefix stripped).
        cache_checkpoints: keep the checkpoints in memory for the sweep (False: re-read at each point).
        summary: how the front is scored.
        method: the merge method of the soups (default linear; see MethodSpec).
        ensemble: also evaluate, at every grid weight off the experts, the token-level mixture of the experts'
            predictions with those weights (kind "ensemble"; the module needs `set_ensemble`: captioning, text).
    """

    experts: list[str | CheckpointSpec] = field(default_factory=list)
    init: str | CheckpointSpec | None = None
    morl: list[CheckpointSpec] = field(default_factory=list)
    grid: GridSpec = field(default_factory=GridSpec)
    allow_extrapolation: bool = False
    allow_nonfinite: bool = False
    out_dir: str = "runs/front"
    validate: bool = True
    target_prefix: str | None = None
    cache_checkpoints: bool = True
    summary: SummarySettings = field(default_factory=SummarySettings)
    method: MethodSpec = field(default_factory=MethodSpec)
    ensemble: bool = False


def build_parser():
    """The jsonargparse parser of `rs front` (model/data as subclasses, Trainer arguments, `front`)."""
    import argparse

    from jsonargparse import ActionConfigFile, ActionYesNo, ArgumentParser, DefaultHelpFormatter
    from lightning.pytorch import LightningDataModule, LightningModule, Trainer

    class Formatter(DefaultHelpFormatter, argparse.RawDescriptionHelpFormatter):
        """Keeps the description's line breaks (the weight convention reads as written)."""

    p = ArgumentParser(prog="rs front", description=DESCRIPTION, exit_on_error=False, env_prefix="RS_FRONT",
                       default_env=False, formatter_class=Formatter)
    p.add_argument("--config", action=ActionConfigFile, help="YAML config (model, data, trainer, front)")
    p.add_subclass_arguments(LightningModule, "model", required=True, help="the task's LightningModule")
    p.add_subclass_arguments(LightningDataModule, "data", required=True, help="the task's LightningDataModule")
    p.add_class_arguments(Trainer, "trainer", instantiate=False)
    p.set_defaults({"trainer.devices": 1, **{f"trainer.{k}": v for k, v in QUIET_TRAINER.items()}})
    p.add_argument("--seed_everything", type=int | None, default=0, help="seed before every point (None: never)")
    p.add_argument("--front", type=FrontSpec, default=FrontSpec(), help="the sweep (see rs_lightning.front.config)")
    p.add_argument("--overwrite", action=ActionYesNo(no_prefix="no-"), default=False,
                   help="discard the rows already in out_dir instead of resuming")
    p.add_argument("--progress", action=ActionYesNo(no_prefix="no-"), default=True, help="show the bar over the points")
    return p


def to_checkpoint(spec) -> Checkpoint:
    """A config entry (a path string or a CheckpointSpec / dict) as a Checkpoint."""
    if spec is None:
        raise ValueError("empty checkpoint entry")
    if isinstance(spec, str):
        return Checkpoint(path=spec)
    get = spec.get if isinstance(spec, dict) else lambda k, d=None: getattr(spec, k, d)
    return Checkpoint(path=get("path"), name=get("name"), prefix=get("prefix"),
                      mu=list(get("mu")) if get("mu") is not None else None)


def plain(obj):
    """Namespaces / dataclasses -> JSON-able dicts (unknown objects by their str)."""
    if hasattr(obj, "as_dict"):
        obj = obj.as_dict()
    elif hasattr(obj, "__dataclass_fields__"):
        obj = asdict(obj)
    return json.loads(json.dumps(obj, default=str))


def config_hash(cfg, front: FrontSpec, experts, init, morl, method=None) -> str:
    """Hash of what the rows depend on (see the module docstring); `method` is a sweep.SoupMethod (linear: None
    or linear, left out so the hash of a linear sweep is what it was before merge methods existed)."""
    trainer = {k: v for k, v in plain(cfg.trainer).items() if k not in COSMETIC_TRAINER_KEYS}
    content = {
        "model": plain(cfg.model), "data": plain(cfg.data), "trainer": trainer, "seed": cfg.seed_everything,
        "checkpoints": [fingerprint(c) for c in [*experts, *([init] if init else []), *morl]],
        "target_prefix": front.target_prefix, "validate": front.validate,
    }
    if method is not None and not method.linear:
        content["method"] = method.identity()
    return stable_hash(content)
