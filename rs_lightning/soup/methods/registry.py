"""Merge methods by name: `METHODS`, `get_method`. A new method is a module with a `MergeMethod`, added here."""

from __future__ import annotations

from rs_lightning.soup.errors import SoupError
from rs_lightning.soup.methods.base import MergeMethod
from rs_lightning.soup.methods.fisher import FISHER
from rs_lightning.soup.methods.linear import LINEAR
from rs_lightning.soup.methods.slerp import SLERP
from rs_lightning.soup.methods.task_arithmetic import DARE_LINEAR, DARE_TIES, TASK_ARITHMETIC, TIES

METHODS: dict[str, MergeMethod] = {m.name: m for m in (LINEAR, TASK_ARITHMETIC, TIES, DARE_LINEAR, DARE_TIES,
                                                       SLERP, FISHER)}


def get_method(name: str | MergeMethod) -> MergeMethod:
    """The method called `name` (a `MergeMethod` is returned as is); an unknown name lists the known ones."""
    if isinstance(name, MergeMethod):
        return name
    if not isinstance(name, str) or name not in METHODS:
        raise SoupError(f"unknown merge method {name!r}: use one of {', '.join(METHODS)}")
    return METHODS[name]
