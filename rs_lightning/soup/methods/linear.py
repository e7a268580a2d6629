"""`linear`: theta = sum_i w_i theta_i, the rewarded soup (Ramé et al. 2023, Eq. 1).

The per-tensor function below is the reference the registry's other paths are tested against; `merge` and
`rs soup` send `linear` to `interpolate`, the fast core (chunked fp32 accumulation on CPU, the Triton kernel on
CUDA, the LoRA `factors`/`delta` soups for adapters).
"""

from __future__ import annotations

from torch import Tensor

from rs_lightning.soup.methods.base import MergeMethod, TensorContext


def linear_tensor(xs: list[Tensor], weights: list[float], base: Tensor | None, options: dict,
                  context: TensorContext) -> Tensor:
    out = xs[0] * weights[0]
    for x, w in zip(xs[1:], weights[1:]):
        out = out + x * w
    return out


LINEAR = MergeMethod("linear", "sum_i w_i theta_i (weights on the simplex): the rewarded soup", linear_tensor,
                     lora_modes=("factors", "delta"))
