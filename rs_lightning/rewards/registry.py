"""`build_reward`: every reward of either family (text, captions) by name or from a short config spec.

``build_reward("vader")``, ``build_reward("cider_d")``, ``build_reward("clipscore", model="ViT-B-32")``,
``build_reward({"type": "classifier", "model": ...})``, ``build_reward({"class_path": ..., "init_args": ...})``.
The typed classes are the primary API (LightningCLI/jsonargparse ``class_path``/``init_args``); this is the one
entry point for names: the captioning module's ``rewards``/``eval_metrics``, front sweeps and scripts.
Other rewards register with :func:`register_reward`.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from rs_lightning.rewards.base import RewardMetric
from rs_lightning.rewards.caption import METRICS as CAPTION_METRICS

__all__ = ["REWARD_PRESETS", "REWARD_TYPES", "build_reward", "register_reward"]

#: type name -> "module:Class"; imported on demand so that building a VADER reward does not import transformers.
REWARD_TYPES: dict[str, str] = {
    # text rewards: score(prompts, responses, references)
    "classifier": "rs_lightning.rewards.text_classifier:TextClassifierReward",
    "vader": "rs_lightning.rewards.vader:VaderReward",
    "relevance": "rs_lightning.rewards.relevance:RelevanceReward",
    "length": "rs_lightning.rewards.rules:LengthReward",
    "keyword": "rs_lightning.rewards.rules:KeywordReward",
    "mixture": "rs_lightning.rewards.mixture:MixtureReward",
    # caption rewards: score(candidates, references, images)
    **{metric: "rs_lightning.rewards.caption_metric:CaptionMetric" for metric in CAPTION_METRICS},
    "clipscore": "rs_lightning.tasks.captioning.rewards:CLIPScore",
    "caption_mixture": "rs_lightning.tasks.captioning.rewards:CaptionMixture",
}
#: type name -> init arguments the name itself fixes (a COCO metric name is a CaptionMetric of that metric).
REWARD_PRESETS: dict[str, dict[str, Any]] = {metric: {"metric": metric} for metric in CAPTION_METRICS}


def register_reward(type_name: str, target: str | type[RewardMetric], **preset: Any) -> None:
    """Add a reward type: ``target`` is a ``RewardMetric`` subclass or its ``"module:Class"`` path, ``preset``
    init arguments that the type name fixes."""
    if isinstance(target, type):
        target = f"{target.__module__}:{target.__qualname__}"
    REWARD_TYPES[type_name] = target
    REWARD_PRESETS.pop(type_name, None)
    if preset:
        REWARD_PRESETS[type_name] = dict(preset)


def _import(path: str) -> type[RewardMetric]:
    module, _, attr = path.partition(":") if ":" in path else path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"cannot import reward class {path!r}: {err}") from err
    if not (isinstance(cls, type) and issubclass(cls, RewardMetric)):
        raise TypeError(f"{path!r} is not a RewardMetric subclass")
    return cls


def build_reward(spec: str | Mapping[str, Any] | RewardMetric, **options: Any) -> RewardMetric:
    """Build a reward from a spec, with ``options`` added to its init arguments.

    Accepted forms:

    - a ``RewardMetric`` (returned as is; ``options`` are then an error);
    - a type name from ``REWARD_TYPES`` (``"vader"``, ``"cider_d"``, ``"clipscore"``, ...) or a paper
      reward-model id (``"CogComp/bart-faithful-summary-detector"``, built with its paper settings, see
      ``PAPER_REWARD_MODELS``);
    - ``{"type": name, **init_args}``; a mixture's ``components`` (``"mixture"``, ``"caption_mixture"``) may be
      specs themselves (a dict ``{name: spec}`` or a list of specs);
    - ``{"class_path": "pkg.module.Class", "init_args": {...}}`` (jsonargparse style).

    Raises:
        ValueError: unknown type (the message lists the known ones), a malformed spec, bad init arguments.
    """
    if isinstance(spec, RewardMetric):
        if options:
            raise ValueError(f"options {sorted(options)} cannot apply to an already built {type(spec).__name__}")
        return spec
    if isinstance(spec, str):
        from rs_lightning.rewards.text_classifier import PAPER_REWARD_MODELS, TextClassifierReward

        if spec in PAPER_REWARD_MODELS:
            return TextClassifierReward.from_paper(spec, **options)
        spec = {"type": spec}
    if not isinstance(spec, Mapping):
        raise ValueError(f"a reward spec is a str or a dict, got {type(spec).__name__}")
    spec = dict(spec)
    if "class_path" in spec:
        cls = _import(spec.pop("class_path"))
        args = {**(spec.pop("init_args", {}) or {}), **options}
        if spec:
            raise ValueError(f"unexpected keys beside class_path/init_args: {sorted(spec)}")
    else:
        type_name = spec.pop("type", None)
        if type_name not in REWARD_TYPES:
            raise ValueError(f"unknown reward type {type_name!r}; known types: {sorted(REWARD_TYPES)}")
        preset, args = REWARD_PRESETS.get(type_name, {}), {**spec, **options}
        clash = sorted(k for k in preset if k in args and args[k] != preset[k])
        if clash:
            raise ValueError(f"reward type {type_name!r} fixes {clash} to {[preset[k] for k in clash]}, "
                             f"got {[args[k] for k in clash]}")
        cls, args = _import(REWARD_TYPES[type_name]), {**preset, **args}
    if "components" in args:
        comps = args["components"]
        if isinstance(comps, Mapping):
            args["components"] = {name: build_reward(c) for name, c in comps.items()}
        else:
            args["components"] = [build_reward(c) for c in comps]
    try:
        return cls(**args)
    except (TypeError, ValueError) as err:
        raise ValueError(f"bad arguments for {cls.__name__}: {err}") from err
