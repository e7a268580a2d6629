"""Build rewards from short config specs: ``{"type": "vader"}``, ``{"type": "classifier", "model": ...}``.

The primary API is the typed classes themselves (LightningCLI/jsonargparse ``class_path``/``init_args``);
this is a convenience for front sweeps and scripts. Other reward families register with :func:`register_reward`.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from rs_lightning.rewards.base import RewardMetric

__all__ = ["REWARD_TYPES", "build_reward", "register_reward"]

#: type name -> "module:Class"; imported on demand so that building a VADER reward does not import transformers.
REWARD_TYPES: dict[str, str] = {
    "classifier": "rs_lightning.rewards.text_classifier:TextClassifierReward",
    "vader": "rs_lightning.rewards.vader:VaderReward",
    "relevance": "rs_lightning.rewards.relevance:RelevanceReward",
    "length": "rs_lightning.rewards.rules:LengthReward",
    "keyword": "rs_lightning.rewards.rules:KeywordReward",
    "mixture": "rs_lightning.rewards.mixture:MixtureReward",
}


def register_reward(type_name: str, target: str | type[RewardMetric]) -> None:
    """Add a reward type: ``target`` is a ``RewardMetric`` subclass or its ``"module:Class"`` path."""
    if isinstance(target, type):
        target = f"{target.__module__}:{target.__qualname__}"
    REWARD_TYPES[type_name] = target


def _import(path: str) -> type[RewardMetric]:
    module, _, attr = path.partition(":") if ":" in path else path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"cannot import reward class {path!r}: {err}") from err
    if not (isinstance(cls, type) and issubclass(cls, RewardMetric)):
        raise TypeError(f"{path!r} is not a RewardMetric subclass")
    return cls


def build_reward(spec: str | Mapping[str, Any] | RewardMetric) -> RewardMetric:
    """Build a reward from a spec.

    Accepted forms:

    - a ``RewardMetric`` (returned as is);
    - a type name (``"vader"``) or a paper reward-model id (``"CogComp/bart-faithful-summary-detector"``,
      built with its paper settings, see ``PAPER_REWARD_MODELS``);
    - ``{"type": name, **init_args}``; a ``"mixture"`` spec's ``components`` may be specs themselves
      (a dict ``{name: spec}`` or a list of specs);
    - ``{"class_path": "pkg.module.Class", "init_args": {...}}`` (jsonargparse style).

    Raises:
        ValueError: unknown type (the message lists the known ones) or a malformed spec.
    """
    if isinstance(spec, RewardMetric):
        return spec
    if isinstance(spec, str):
        from rs_lightning.rewards.text_classifier import PAPER_REWARD_MODELS, TextClassifierReward

        if spec in PAPER_REWARD_MODELS:
            return TextClassifierReward.from_paper(spec)
        spec = {"type": spec}
    if not isinstance(spec, Mapping):
        raise ValueError(f"a reward spec is a str or a dict, got {type(spec).__name__}")
    spec = dict(spec)
    if "class_path" in spec:
        cls = _import(spec.pop("class_path"))
        args = dict(spec.pop("init_args", {}) or {})
        if spec:
            raise ValueError(f"unexpected keys beside class_path/init_args: {sorted(spec)}")
    else:
        type_name = spec.pop("type", None)
        if type_name not in REWARD_TYPES:
            raise ValueError(f"unknown reward type {type_name!r}; known types: {sorted(REWARD_TYPES)}")
        cls, args = _import(REWARD_TYPES[type_name]), spec
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
