"""The settings of `CaptioningModule` in typed groups: `optim`, `decoding`, `scst`, `clip`.

Each group is a dataclass, so LightningCLI (jsonargparse) shows it as nested keys with the field docs of its
"Args:" section in `--help` (`--model.init_args.decoding.eval_decoding beam`, or in YAML
`decoding: {eval_decoding: beam}`: the fields not given keep their defaults). Defaults are the module's own; the
paper's values (Ramé et al. 2023, captioning) are noted where they differ. Each group checks its values in
`__post_init__`, naming the key as a config writes it (`model.decoding.eval_decoding`).

What a run varies per expert stays a top-level argument of the module (`rewards`, `reward_weights`,
`eval_metrics`, `init_checkpoint`, `init_seed`, `corpus_metrics`, ...): the demo and the plans set those per run.

Python callers may give a group as its dataclass, as a plain dict of some of its fields, or leave it out:
`coerce` turns any of them into the dataclass and refuses an unknown key, naming it and the group's fields.
`upgrade_flat_keys` rewrites the flat keys of configs written before the groups (`beam_size: 5` ->
`decoding: {beam_size: 5}`), so the `rs front` runs made then can still be served.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rs_lightning.tasks import settings_groups as groups
from rs_lightning.tasks.settings_groups import check_choice as _check_choice
from rs_lightning.tasks.settings_groups import set_field as _set

BASELINES = ("leave_one_out", "greedy")
EVAL_DECODINGS = ("beam", "greedy")


def _check_int(key: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{key} must be an integer >= {low}, got {value!r}")


@dataclass(frozen=True)
class OptimSettings:
    """The optimiser, its learning-rate schedule and the XE loss (config key `model.optim`).

    Args:
        lr: RAdam learning rate (paper SCST 1e-5).
        betas: RAdam betas (paper (0.9, 0.98)).
        eps: RAdam epsilon (paper 1e-9).
        weight_decay: RAdam weight decay (paper 0).
        warmup_steps: linear warm-up length in optimizer steps (1: none, the paper's setting).
        anneal: learning-rate factor per epoch (paper 0.8).
        anneal_every: optimizer steps between two anneals; None: one epoch (the training batches per epoch
            divided by the gradient accumulation).
        min_lr: floor of the learning rate (paper 5e-7).
        label_smoothing: label smoothing of the cross-entropy of stage "xe" (SCST ignores it).
    """

    lr: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-9
    weight_decay: float = 0.0
    warmup_steps: int = 1
    anneal: float = 0.8
    anneal_every: int | None = None
    min_lr: float = 5e-7
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.betas, str) or len(self.betas) != 2:
            raise ValueError(f"model.optim.betas must be [beta1, beta2], got {self.betas!r}")
        _set(self, "betas", (float(self.betas[0]), float(self.betas[1])))
        if not self.lr > 0:
            raise ValueError(f"model.optim.lr must be > 0, got {self.lr!r}")
        _check_int("model.optim.warmup_steps", self.warmup_steps, 1)
        if self.anneal_every is not None:
            _check_int("model.optim.anneal_every", self.anneal_every, 1)
        if not 0 < self.anneal <= 1:
            raise ValueError(f"model.optim.anneal must be in (0, 1] (a factor per epoch), got {self.anneal!r}")
        if self.min_lr < 0:
            raise ValueError(f"model.optim.min_lr must be >= 0, got {self.min_lr!r}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"model.optim.label_smoothing must be in [0, 1), got {self.label_smoothing!r}")


@dataclass(frozen=True)
class DecodingSettings:
    """How captions are generated (config key `model.decoding`).

    Args:
        max_length: most generated tokens per caption, EOT included (paper 20): SCST samples, evaluation
            captions and `rs fisher`'s samples.
        eval_decoding: decoding at validation/test/predict and in `rs serve`: "beam" (the paper) or "greedy".
        beam_size: beams per image with "beam" (paper 5; 1 is greedy decoding).
        length_penalty: the best beam maximises its log-probability / length ** length_penalty (0: raw log-prob).
    """

    max_length: int = 20
    eval_decoding: str = "beam"
    beam_size: int = 5
    length_penalty: float = 1.0

    def __post_init__(self) -> None:
        _check_choice("model.decoding.eval_decoding", self.eval_decoding, EVAL_DECODINGS)
        _check_int("model.decoding.max_length", self.max_length, 1)
        _check_int("model.decoding.beam_size", self.beam_size, 1)


@dataclass(frozen=True)
class SCSTSettings:
    """Self-critical sequence training, stage "scst" (config key `model.scst`).

    Args:
        num_samples: captions sampled per image (paper 5).
        baseline: "leave_one_out" (the paper: the mean reward of the image's other samples) or "greedy" (the
            reward of the image's greedy caption).
        sample_seed: seeds the SCST samples (per training batch and rank, so a resumed run draws the same
            captions) and the captions `rs fisher` samples.
    """

    num_samples: int = 5
    baseline: str = "leave_one_out"
    sample_seed: int = 0

    def __post_init__(self) -> None:
        _check_choice("model.scst.baseline", self.baseline, BASELINES)
        _check_int("model.scst.num_samples", self.num_samples, 1)
        if self.baseline == "leave_one_out" and self.num_samples < 2:
            raise ValueError(f"model.scst.num_samples must be >= 2 with baseline 'leave_one_out' (the baseline of a "
                             f"sample is the mean reward of the OTHER samples of its image), got {self.num_samples}")


@dataclass(frozen=True)
class CLIPSettings:
    """The CLIP behind the "clipscore" reward and metric (CLIPScore, Hessel et al. 2021), built only when
    `model.rewards` or `model.eval_metrics` name "clipscore" (config key `model.clip`).

    Args:
        model: open_clip CLIP config ("ViT-B-32", ... or "clip-tiny", the offline random CLIP of the tests).
        pretrained: open_clip tag (needs the hub) or a local checkpoint; None: random weights (tests only).
    """

    model: str = "clip-tiny"
    pretrained: str | None = None


GROUPS: dict[str, type] = {"optim": OptimSettings, "decoding": DecodingSettings, "scst": SCSTSettings,
                           "clip": CLIPSettings}


@dataclass(frozen=True)
class CaptioningSettings:
    """Every group of one `CaptioningModule`, as it reads them (`module.settings.decoding.beam_size`)."""

    optim: OptimSettings
    decoding: DecodingSettings
    scst: SCSTSettings
    clip: CLIPSettings


def coerce(group: str, value: Any) -> Any:
    """The dataclass of `group` from an instance of it, a dict of some of its fields, or None (settings_groups.py)."""
    return groups.coerce(GROUPS, group, value)


as_dict = groups.as_dict


# The flat init args of CaptioningModule before the groups, and where each one lives now.
FLAT_KEYS: dict[str, tuple[str, str]] = {
    **{name: ("optim", name) for name in ("lr", "betas", "eps", "weight_decay", "warmup_steps", "anneal",
                                          "anneal_every", "min_lr", "label_smoothing")},
    **{name: ("decoding", name) for name in ("max_length", "eval_decoding", "beam_size", "length_penalty")},
    **{name: ("scst", name) for name in ("num_samples", "baseline", "sample_seed")},
    "clip_model": ("clip", "model"), "clip_pretrained": ("clip", "pretrained"),
}


def upgrade_flat_keys(init_args: dict[str, Any]) -> dict[str, Any]:
    """CaptioningModule init args with the flat keys of before the groups moved into them (settings_groups.py)."""
    return groups.upgrade_flat_keys(FLAT_KEYS, init_args)
