"""The merge-method protocol: what a method declares, and the one driver that applies it tensor by tensor.

A method (one module each in this package, registered by name in `registry.py`) is a `MergeMethod`: its name,
whether it needs the shared initialisation theta_0 (`needs_base`), how many sources it takes, which LoRA soup
modes it supports, its options with their defaults, and `tensor(xs, weights, base, options, context)`, which
merges ONE tensor. Everything else is the driver's (`merge_tensors`), shared by every method so it is written
once: the compatibility check (keys, shapes, dtypes of the sources and of theta_0, shapes of Fisher tensors),
the rule for non-floating tensors, the compute dtype (fp32 for fp32/fp16/bf16 inputs, fp64 for fp64) with one
rounding to the output dtype, writing into `out` in place, and the finiteness checks.

This follows mergekit's split of a merge into per-tensor method code and a shared executor
(github.com/arcee-ai/mergekit, mergekit/merge_methods/base.py), without its task graph: our sources are
already aligned state dicts.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from rs_lightning.soup.errors import SoupError
from rs_lightning.soup.interpolate import copy_non_floating
from rs_lightning.soup.values import check_finite_result


@dataclass(frozen=True)
class TensorContext:
    """What a method may need besides the tensors: the key (DARE seeds its mask with it) and Fisher tensors."""

    key: str
    fisher: list[Tensor] | None = None


@dataclass(frozen=True)
class MergeMethod:
    """One merge method.

    Attributes:
        name: the registry name (`rs soup --method NAME`, `front.method.name`).
        summary: one line for `--help` and error messages.
        tensor: merges one tensor: `(xs, weights, base, options, context) -> Tensor`, `xs` in the compute dtype.
        needs_base: theta_0 (the shared initialisation) is required.
        n_sources: exactly this many sources (None: any number >= 1).
        options: option name -> default; anything else is refused.
        lora_modes: LoRA soup modes this method supports (empty: adapters are refused with an error).
        simplex_weights: weights must lie on the simplex (as the linear soup's); False lets a method take any
            finite weights (task vectors scaled independently, as mergekit's task arithmetic does).
        needs_fisher: one diagonal Fisher tensor per source and key.
    """

    name: str
    summary: str
    tensor: Callable[..., Tensor]
    needs_base: bool = False
    n_sources: int | None = None
    options: Mapping[str, float | int | bool] = field(default_factory=dict)
    lora_modes: tuple[str, ...] = ()
    simplex_weights: bool = True
    needs_fisher: bool = False

    def resolve_options(self, given: Mapping[str, object] | None) -> dict:
        """The method's options: defaults overridden by `given`; an unknown name or a bad value is an error."""
        given = dict(given or {})
        unknown = sorted(k for k in given if k not in self.options)
        if unknown:
            allowed = ", ".join(sorted(self.options)) or "none"
            raise SoupError(f"method '{self.name}' has no option {unknown[0]!r} (its options: {allowed})")
        resolved = dict(self.options)
        for name, value in given.items():
            if value is None:
                continue
            default = self.options[name]
            if isinstance(default, int) and not isinstance(default, bool) and isinstance(value, float) \
                    and not value.is_integer():
                raise SoupError(f"method '{self.name}': option {name} must be an integer, got {value!r}")
            try:
                value = type(default)(value) if not isinstance(default, bool) else _as_bool(value, name)
            except (TypeError, ValueError) as err:
                raise SoupError(f"method '{self.name}': option {name} must be a {type(default).__name__}, "
                                f"got {value!r}") from err
            if isinstance(value, float) and not math.isfinite(value):
                raise SoupError(f"method '{self.name}': option {name} must be finite, got {value}")
            resolved[name] = value
        check_option_ranges(self.name, resolved)
        return resolved


def _as_bool(value, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.lower() in ("true", "1", "yes")
    raise ValueError(f"{name}: not a boolean")


def check_option_ranges(method: str, options: Mapping[str, object]) -> None:
    """The ranges shared by every method's options of the same name."""
    if "density" in options and not 0.0 < float(options["density"]) <= 1.0:
        raise SoupError(f"method '{method}': density must be in (0, 1] (the fraction of each task vector kept), "
                        f"got {options['density']}")
    if "drop_rate" in options and not 0.0 <= float(options["drop_rate"]) < 1.0:
        raise SoupError(f"method '{method}': drop_rate must be in [0, 1) (the fraction of each task vector "
                        f"dropped), got {options['drop_rate']}")
    if "dot_threshold" in options and not 0.0 <= float(options["dot_threshold"]) < 1.0:
        raise SoupError(f"method '{method}': dot_threshold must be in [0, 1) (|cos| above it falls back to the "
                        f"linear merge), got {options['dot_threshold']}")
    if "epsilon" in options and not float(options["epsilon"]) > 0.0:
        raise SoupError(f"method '{method}': epsilon must be > 0, got {options['epsilon']}")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Merges compute in fp64 for fp64 tensors and in fp32 otherwise, then round once to the tensor's dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def key_generator(seed: int, key: str) -> torch.Generator:
    """A CPU generator for one tensor, seeded by (seed, key): the same mask whatever order or grouping the
    tensors are merged in (streaming reads them in groups), and on every device (masks are drawn on the CPU)."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + zlib.crc32(key.encode())) % (2**63))


def merge_one(method: MergeMethod, out: Tensor, xs: Sequence[Tensor], weights: Sequence[float],
              base: Tensor | None, options: Mapping, key: str, fisher: Sequence[Tensor] | None,
              allow_nonfinite: bool) -> None:
    """Merge one tensor with `method` into `out` (which may be one of the sources: every input is read first)."""
    if not out.is_floating_point():
        # The soup's rule (interpolate): copied when identical, else the heaviest source's (first on ties).
        copy_non_floating(out, list(xs), max(range(len(weights)), key=lambda i: (weights[i], -i)))
        return
    dtype = compute_dtype(out.dtype)
    device = out.device
    with torch.no_grad():
        cxs = [x.to(device=device, dtype=dtype) for x in xs]
        cbase = None if base is None else base.to(device=device, dtype=dtype)
        cfisher = None if fisher is None else [f.to(device=device, dtype=dtype) for f in fisher]
        result = method.tensor(cxs, list(weights), cbase, options, TensorContext(key, cfisher))
        if result.shape != out.shape:
            raise SoupError(f"method '{method.name}' returned shape {tuple(result.shape)} for key '{key}' "
                            f"of shape {tuple(out.shape)}")
        out.copy_(result)
    if not allow_nonfinite:
        check_finite_result(out, key, f" (method {method.name})")
