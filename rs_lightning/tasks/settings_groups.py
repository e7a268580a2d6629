"""What the typed settings groups of every task module share (tasks/text/settings.py, tasks/captioning/settings.py).

A task module's settings are frozen dataclasses, one per group, that LightningCLI shows as nested keys. Each task
binds these helpers to its own table of groups (`GROUPS`: name -> dataclass) and of pre-group flat keys
(`FLAT_KEYS`: old key -> (group, field)).
"""

from __future__ import annotations

import dataclasses
from typing import Any


def check_choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{key} must be one of {choices}, got {value!r}")


def set_field(obj: Any, name: str, value: Any) -> None:
    object.__setattr__(obj, name, value)  # the groups are frozen: normalise a field in __post_init__


def coerce(groups: dict[str, type], group: str, value: Any) -> Any:
    """The dataclass of `group` from an instance of it, a dict of some of its fields (the others keep their
    defaults), or None (all defaults). An unknown key or a wrong type is a ValueError naming it."""
    cls = groups[group]
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise ValueError(f"model.{group} must be a {cls.__name__} or a dict of its fields, got "
                         f"{type(value).__name__} {value!r}")
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in value if k not in names]
    if unknown:
        raise ValueError(f"model.{group} has no key {', '.join(map(repr, unknown))}: its keys are {', '.join(names)}")
    return cls(**value)


def as_dict(settings: Any) -> dict[str, Any]:
    """A group as plain data (lists for tuples): what hyperparameters, checkpoints and hparams.yaml hold."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(settings).items()}


def upgrade_flat_keys(flat_keys: dict[str, tuple[str, str]], init_args: dict[str, Any]) -> dict[str, Any]:
    """Init args with the flat keys of before the groups moved into them (a new dict; the groups already there
    keep their fields, a flat key does not override one)."""
    out = {k: v for k, v in init_args.items() if k not in flat_keys}
    for key, value in init_args.items():
        if key in flat_keys:
            group, name = flat_keys[key]
            out[group] = dict(out.get(group) or {})
            out[group].setdefault(name, value)
    return out
