"""Merge methods beyond the linear soup, one module each, behind one protocol (`base.MergeMethod`).

- `linear` (linear.py): the rewarded soup, sent to `interpolate` (the fast core).
- `task_arithmetic`, `ties`, `dare_linear`, `dare_ties` (task_arithmetic.py): task vectors on theta_0.
- `slerp` (slerp.py): two sources, spherical per tensor.
- `fisher` (fisher.py): Fisher-weighted averaging with Fisher tensors from `rs fisher`.

`merge` (merge.py) applies any of them to state dicts; `rs soup --method` and `front.method` use the same path.
"""

from rs_lightning.soup.methods.base import MergeMethod
from rs_lightning.soup.methods.merge import merge
from rs_lightning.soup.methods.registry import METHODS, get_method

__all__ = ["METHODS", "MergeMethod", "get_method", "merge"]
