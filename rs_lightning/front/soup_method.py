"""The merge method of a sweep's soups (`front.method`): resolved and checked once, applied at every point.

Linear (the default) is the rewarded soup and keeps the sweep exactly as it was: one-hot grid weights ARE the
experts and are not evaluated twice. Any other method (rs_lightning.soup.methods) changes what a weight vector
means: TIES at one-hot weights is theta_0 plus the expert's trimmed task vector, not the expert. So the experts
are still evaluated as themselves (kind "expert"), and every grid point, one-hot included, is a soup of the
method (kind "soup", its row records `method` and `method_options`). The summary's "rs" group is then the
experts and the method's soups: every policy N trainings and this method give.

theta_0 for the task-vector methods is `front.method.base`, or else `front.init` (the shared initialisation).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from torch import Tensor

from rs_lightning.front.checkpoints import Checkpoint, fingerprint
from rs_lightning.front.config import to_checkpoint
from rs_lightning.front.errors import FrontError
from rs_lightning.soup import SoupError
from rs_lightning.soup.methods import get_method, merge


@dataclass
class SoupMethod:
    """A resolved `front.method`: the method's name, its options (defaults filled in), theta_0, Fisher files."""

    name: str = "linear"
    options: dict = field(default_factory=dict)
    base: Checkpoint | None = None
    fisher: list[Checkpoint] = field(default_factory=list)

    @property
    def linear(self) -> bool:
        return self.name == "linear"

    def describe(self) -> dict:
        """What a soup row records."""
        return {"method": self.name, "method_options": dict(self.options)}

    def identity(self) -> dict:
        """What the config hash covers: the method, its options and its extra checkpoints' fingerprints."""
        return {**self.describe(), "base": fingerprint(self.base) if self.base else None,
                "fisher": [fingerprint(f) for f in self.fisher]}

    def apply(self, sources: Sequence[Mapping[str, Tensor]], weights: Sequence[float], target, *,
              base_sd: Mapping[str, Tensor] | None, fisher_sds: Sequence[Mapping[str, Tensor]] | None,
              allow_extrapolation: bool) -> None:
        """Write the method's soup of `sources` at `weights` into `target` (the live module's tensors)."""
        merge(sources, weights, self.name, base=base_sd, fisher=fisher_sds, out=target,
              allow_extrapolation=allow_extrapolation, allow_nonfinite=True, **self.options)


def resolve_soup_method(spec, init: Checkpoint | None, n_experts: int, adapters: bool = False) -> SoupMethod:
    """`front.method` (a MethodSpec or dict) checked and resolved; every problem is a FrontError naming the key.

    Args:
        spec: the config's method section (None: linear).
        init: front.init, theta_0's default for the task-vector methods.
        n_experts: the number of experts (slerp needs 2; fisher needs one file per expert).
        adapters: the experts are PEFT adapter folders (only methods with LoRA modes apply).
    """
    if spec is None:
        return SoupMethod()
    get = spec.get if isinstance(spec, dict) else lambda k, d=None: getattr(spec, k, d)
    name = get("name") or "linear"
    try:
        method = get_method(name)
        options = method.resolve_options(get("options") or {})
    except SoupError as err:
        raise FrontError(f"front.method: {err}") from err
    if adapters and not method.lora_modes:
        raise FrontError(f"front.method.name: {name} merges full weights; the experts are LoRA adapter folders, "
                         "which take the linear soup only (a LoRA task vector is B A, not A and B)")
    if method.n_sources is not None and n_experts != method.n_sources:
        raise FrontError(f"front.method.name: {name} merges exactly {method.n_sources} experts, "
                         f"front.experts has {n_experts}")
    base = get("base")
    if base and not method.needs_base:
        raise FrontError(f"front.method.base: method {name} does not use theta_0 (only task_arithmetic, ties, "
                         "dare_linear, dare_ties do)")
    base_ckpt = to_checkpoint(base) if base else (init if method.needs_base else None)
    if method.needs_base and base_ckpt is None:
        raise FrontError(f"front.method: {name} needs theta_0, the shared initialisation: set front.method.base "
                         "or front.init")
    fisher = list(get("fisher") or [])
    if fisher and not method.needs_fisher:
        raise FrontError(f"front.method.fisher: method {name} does not use Fisher files")
    if method.needs_fisher and len(fisher) != n_experts:
        raise FrontError(f"front.method.fisher: method fisher needs one Fisher file per expert ({n_experts}), "
                         f"got {len(fisher)} (write them with `rs fisher`)")
    return SoupMethod(method.name, options, base_ckpt, [Checkpoint(path=str(f)) for f in fisher])
