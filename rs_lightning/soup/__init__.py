"""The soup engine: weight interpolation of N checkpoints, theta = sum_i w_i theta_i.

Depends on torch (and optionally triton, safetensors) only, never on Lightning. Weights are aligned with
the list of sources; for two experts `lam` is the weight of the second: theta(lam) = (1-lam) th1 + lam th2.
"""

from rs_lightning.soup.errors import SoupError
from rs_lightning.soup.interpolate import check_compatible, interpolate
from rs_lightning.soup.weights import lambda_sweep, simplex_lattice, validate_weights

__all__ = ["SoupError", "check_compatible", "interpolate", "lambda_sweep", "simplex_lattice", "validate_weights"]
