"""`slerp`: spherical interpolation of two sources, per tensor, t = the weight of the second (our lam).

As mergekit computes it (github.com/arcee-ai/mergekit, mergekit/merge_methods/slerp.py): each tensor is
flattened; the angle comes from the normalised copies (a norm at or below `epsilon` leaves the vector as is),
and the result combines the UNNORMALISED tensors,

    theta = sin((1 - t) Omega) / sin(Omega) * theta_1 + sin(t Omega) / sin(Omega) * theta_2,
    cos(Omega) = <theta_1 / |theta_1|, theta_2 / |theta_2|>,

falling back to the linear (1 - t) theta_1 + t theta_2 when |cos Omega| > `dot_threshold` (nearly collinear
tensors: sin(Omega) ~ 0). Shoemake (1985) introduced slerp for rotations; for weights it is a heuristic.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from rs_lightning.soup.methods.base import MergeMethod, TensorContext


def slerp_tensor(xs: list[Tensor], weights: list[float], base: Tensor | None, options: dict,
                 context: TensorContext) -> Tensor:
    a, b = xs
    t = weights[1]
    eps, threshold = options["epsilon"], options["dot_threshold"]
    na, nb = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    ua = a / na if na > eps else a
    ub = b / nb if nb > eps else b
    dot = min(1.0, max(-1.0, float((ua * ub).sum())))
    if abs(dot) > threshold:
        return (1.0 - t) * a + t * b
    omega = math.acos(dot)
    sin_omega = math.sin(omega)
    s0 = math.sin(omega - t * omega) / sin_omega
    s1 = math.sin(t * omega) / sin_omega
    return s0 * a + s1 * b


SLERP = MergeMethod("slerp", "spherical interpolation of two sources per tensor, t = the second weight",
                    slerp_tensor, n_sources=2, options={"epsilon": 1e-8, "dot_threshold": 0.9995})
