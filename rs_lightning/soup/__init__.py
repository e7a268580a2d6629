"""The soup engine: weight interpolation of N checkpoints, theta = sum_i w_i theta_i.

Depends on torch (and optionally triton, safetensors) only, never on Lightning. Weights are aligned with
the list of sources; for two experts `lam` is the weight of the second: theta(lam) = (1-lam) th1 + lam th2.

- `interpolate`: in-place N-way interpolation of state dicts (torch path, Triton kernel on CUDA).
- `merge`: any registered merge method (`METHODS`: linear, task_arithmetic, ties, dare_linear, dare_ties, slerp,
  fisher), `linear` being `interpolate`.
- `lora_soup`, `merge_lora_into_base`, `load_adapter`, `save_adapter`: LoRA soups ("factors" / "delta").
- `open_source`, `merge_files`, `save_safetensors`: checkpoint reading, streaming merges, atomic output.

Safety (issue 11): user-named torch files are unpickled only by `ckpt.safe_torch_load` (no pickled code runs);
outputs are checked before any work (`paths.check_output`: never onto, into or around an input), written
atomically with pid-tagged temporaries a later run cleans (`atomic`), one writer at a time (`lock.output_lock`);
complex/float8 tensors and NaN/inf are refused unless allowed (`values`).
"""

from rs_lightning.soup.errors import SoupError
from rs_lightning.soup.interpolate import check_compatible, interpolate
from rs_lightning.soup.io import merge_files, open_source, save_safetensors
from rs_lightning.soup.lora import LoraAdapter, load_adapter, lora_soup, merge_lora_into_base, save_adapter
from rs_lightning.soup.methods import METHODS, merge
from rs_lightning.soup.weights import lambda_sweep, simplex_lattice, validate_weights

__all__ = [
    "METHODS",
    "LoraAdapter",
    "SoupError",
    "check_compatible",
    "interpolate",
    "lambda_sweep",
    "load_adapter",
    "lora_soup",
    "merge",
    "merge_files",
    "merge_lora_into_base",
    "open_source",
    "save_adapter",
    "save_safetensors",
    "simplex_lattice",
    "validate_weights",
]
