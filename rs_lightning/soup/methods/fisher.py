"""`fisher`: Fisher-weighted averaging, theta = sum_i w_i F_i theta_i / sum_i w_i F_i, elementwise.

Matena & Raffel (2022), "Merging models with Fisher-weighted averaging", Eq. 3 with a diagonal Fisher F_i per
source; the rewarded-soups paper names it as the fix to try when its Lemma 3's condition fails (Ramé et al.
2023, Sec. 3.3). F_i is floored at `epsilon` (Matena & Raffel's `fisher_floor`), so entries where every
Fisher is ~0 fall back to the linear soup instead of 0/0. The Fisher tensors come from `rs fisher`
(`rs_lightning.fisher`): one safetensors file per source with the same keys.
"""

from __future__ import annotations

from torch import Tensor

from rs_lightning.soup.errors import SoupError
from rs_lightning.soup.methods.base import MergeMethod, TensorContext


def fisher_tensor(xs: list[Tensor], weights: list[float], base: Tensor | None, options: dict,
                  context: TensorContext) -> Tensor:
    if context.fisher is None:
        raise SoupError(f"method 'fisher' needs one Fisher tensor per source for key '{context.key}'")
    eps = options["epsilon"]
    num, den = None, None
    for x, w, f in zip(xs, weights, context.fisher):
        wf = f.clamp_min(eps) * w
        num = wf * x if num is None else num + wf * x
        den = wf if den is None else den + wf
    return num / den


FISHER = MergeMethod("fisher", "sum_i w_i F_i theta_i / sum_i w_i F_i (diagonal Fisher per source)",
                     fisher_tensor, needs_fisher=True, options={"epsilon": 1e-6})
