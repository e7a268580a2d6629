"""What a soup refuses to average: dtypes it cannot interpolate faithfully, and non-finite values.

- Complex tensors: averaging them is well defined, but no supported model keeps complex weights and the
  engine used to copy source 0 silently; refused so nothing is ever passed through unaveraged.
- float8 / float4 / other exotic floating dtypes: torch cannot do arithmetic on them, and quantized
  checkpoints keep per-tensor scales next to them, so averaging the raw values is not averaging the models
  (dequantize the experts first). Supported: float16, bfloat16, float32, float64; non-floating tensors
  (step counters, integer buffers) are copied, as documented in `interpolate`.
- NaN / inf in a source: a soup of them is NaN or inf too, and used to be written without a word. Refused
  by default, naming the key and the source; `allow_nonfinite=True` / `--allow-nonfinite` lets them through
  (e.g. a -inf attention-mask buffer that every expert shares).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from rs_lightning.soup import cpu_kernel
from rs_lightning.soup.errors import SoupError

SOUPABLE_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
NONFINITE_HINT = "pass allow_nonfinite=True / --allow-nonfinite to soup it anyway"


def check_dtype(dtype: torch.dtype, key: str, where: str) -> None:
    """Refuse a dtype the soup cannot interpolate (see the module docstring)."""
    name = str(dtype).removeprefix("torch.")
    if dtype.is_complex:
        raise SoupError(f"key '{key}' of {where} is {name}: complex tensors cannot be souped")
    if dtype.is_floating_point and dtype not in SOUPABLE_FLOATS:
        raise SoupError(
            f"key '{key}' of {where} is {name}: only float16/bfloat16/float32/float64 weights can be souped "
            "(quantized weights carry scales the average would ignore: dequantize the experts first)"
        )


def count_nonfinite(t: Tensor) -> tuple[int, int]:
    """(number of NaN, number of +-inf) in a floating tensor."""
    return int(torch.isnan(t).sum()), int(torch.isinf(t).sum())


# Elements per slice of the exact check: torch.isfinite allocates temporaries ~1.8x the input (measured:
# 454 MiB for a 256 MiB fp32 tensor), which would show up as peak RSS in the streaming merge.
_CHUNK = 1 << 20
# From this many elements a CPU tensor is checked by the compiled kernel of `cpu_kernel` when it is
# available (an exact test of the exponent bits, one read, no temporary); below, torch's sum is as fast.
_NATIVE_MIN = 1 << 14


def is_finite(t: Tensor) -> bool:
    """True if floating `t` holds no NaN/inf (always True for other dtypes), without a tensor-sized temporary.

    The sum, accumulated in fp32 (fp64 for fp64), is finite iff every element is, unless finite values
    overflow it (|sum| > 3e38: not weights); only then are the elements checked, slice by slice.
    """
    if not t.is_floating_point() or t.numel() == 0:
        return True
    if t.numel() >= _NATIVE_MIN and cpu_kernel.can_check(t):
        return not cpu_kernel.any_nonfinite([t])[0]
    acc = torch.float64 if t.dtype == torch.float64 else torch.float32
    if bool(torch.isfinite(t.sum(dtype=acc))):
        return True
    flat = t.reshape(-1)
    return all(bool(torch.isfinite(flat[i : i + _CHUNK]).all()) for i in range(0, flat.numel(), _CHUNK))


def nonfinite_error(t: Tensor, key: str, where: str) -> SoupError:
    nan, inf = count_nonfinite(t)
    what = " and ".join(s for s in (f"{nan} NaN" if nan else "", f"{inf} inf" if inf else "") if s)
    return SoupError(
        f"key '{key}' of {where} holds non-finite values ({what} of {t.numel()}): the soup would too; "
        + NONFINITE_HINT
    )


def check_finite(t: Tensor, key: str, where: str) -> None:
    """Raise naming `key` and `where` if floating `t` holds NaN or inf."""
    if not is_finite(t):
        raise nonfinite_error(t, key, where)


def check_finite_sources(
    sources: Sequence[Mapping[str, Tensor]], keys: Sequence[str], names: Sequence[str], live: Sequence[int]
) -> None:
    """Check the floating tensors of the sources that enter the soup (`live`: non-zero weight)."""
    # Large CPU tensors are checked in one threaded call of the fused kernel (a read of each source at
    # memory speed; the fp32 `sum` below converts bf16 first and ran at ~35 % of copy_ on 2 threads).
    # Errors are raised in the same order as one check per (key, source).
    batch = [
        (key, i)
        for key in keys
        for i in live
        if sources[i][key].numel() >= _NATIVE_MIN and cpu_kernel.can_check(sources[i][key])
    ]
    flags = dict(zip(batch, cpu_kernel.any_nonfinite([sources[i][key] for key, i in batch]))) if batch else {}
    for key in keys:
        for i in live:
            t = sources[i][key]
            if flags.get((key, i), False) or ((key, i) not in flags and not is_finite(t)):
                raise nonfinite_error(t, key, names[i])


def check_finite_result(t: Tensor, key: str, dtype_note: str = "") -> None:
    """Raise if a soup tensor overflowed (its sources were finite): extrapolation or a narrowing cast."""
    if not is_finite(t):
        nan, inf = count_nonfinite(t)
        raise SoupError(
            f"key '{key}': the soup overflows {str(t.dtype).removeprefix('torch.')}{dtype_note} ({inf} inf, "
            f"{nan} NaN of {t.numel()} values) although every source is finite; " + NONFINITE_HINT
        )
