"""LoRA soups: interpolate PEFT LoRA experts fine-tuned from one shared init, two ways.

A LoRA module adds dW = s B A to a frozen weight W0 (A: [r, in], B: [out, r], s = alpha / r, or
alpha / sqrt(r) with rsLoRA). With weights w on N experts there are two different "soups":

- "factors" (default; what the paper does): A = sum_i w_i A_i and B = sum_i w_i B_i, separately. The
  result is a LoRA of the same shape, but dW = s (sum_i w_i B_i)(sum_j w_j A_j) contains cross terms
  w_i w_j B_i A_j, so it is NOT the interpolation of the experts' weights. Needs identical structure
  (ranks, alphas, target modules, base model, keys).
- "delta": the exact weight interpolation W0 + sum_i w_i s_i B_i A_i, written as ONE LoRA of rank
  sum_i r_i: A = [A_1; ...; A_N] (stacked along the rank dim), B = [w_1 s_1 B_1, ..., w_N s_N B_N], and
  r = lora_alpha = sum_i r_i with use_rslora off so the soup's own scaling is exactly 1; then
  B A = sum_i w_i s_i B_i A_i. Ranks and alphas may differ. Tensors that are not LoRA factors
  (modules_to_save copies, saved embedding base layers) enter the weights affinely, so averaging them
  linearly is exact too. DoRA (a nonlinear weight norm) and lora_bias are rejected.

`merge_lora_into_base` folds the delta soup into a base state dict (Conv1D / fan_in_fan_out aware).
Key sets must match exactly in both modes: a silently dropped key would make every soup one expert.
Adapter I/O (`LoraAdapter`, `load_adapter`, `save_adapter`, `live_adapter_state`) lives in `lora_io.py` and
is re-exported here.
"""

from __future__ import annotations

import copy
import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from rs_lightning.soup.errors import SoupError
from rs_lightning.soup.interpolate import interpolate
from rs_lightning.soup.lora_io import (  # noqa: F401 - the adapter I/O is part of this module's surface
    BIN_NAME,
    CONFIG_NAME,
    PREFIX,
    SAFETENSORS_NAME,
    SOUP_JSON_NAME,
    LoraAdapter,
    is_peft_adapter_dir,
    live_adapter_state,
    load_adapter,
    save_adapter,
)
from rs_lightning.soup.values import check_dtype, check_finite, check_finite_result
from rs_lightning.soup.weights import validate_weights

MODES = ("factors", "delta")

# Config fields that change which modules an adapter touches or how: they must agree in every soup.
_STRUCTURE_FIELDS = (
    "peft_type", "base_model_name_or_path", "revision", "target_modules", "exclude_modules",
    "layers_to_transform", "layers_pattern", "modules_to_save", "fan_in_fan_out", "bias", "use_dora",
    "lora_bias", "trainable_token_indices", "target_parameters", "layer_replication",
)  # fmt: skip
# Fields that set the LoRA scaling: "factors" needs them equal, "delta" folds each adapter's into B.
_SCALING_FIELDS = ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern")
# "<module>.lora_A.weight" (Linear, Conv1D, conv) or "<module>.lora_embedding_A" (Embedding), same for B.
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?:lora_(?P<lin>[AB])\.weight|lora_embedding_(?P<emb>[AB]))$")


def _name(i: int, adapter: LoraAdapter) -> str:
    return f"adapter {i} ({adapter.path or 'in memory'})"


def _norm(value):
    # Lists that PEFT saves from sets come in any order; empty containers and null mean "not used".
    if isinstance(value, (list, tuple, set)):
        return sorted(value, key=str) if value else None
    return (value or None) if isinstance(value, dict) else value


def _check_same(adapters: Sequence[LoraAdapter], fields: Sequence[str], mode: str) -> None:
    ref = adapters[0]
    for i, a in enumerate(adapters[1:], start=1):
        for f in fields:
            if _norm(a.config.get(f)) != _norm(ref.config.get(f)):
                raise SoupError(
                    f"{_name(i, a)} has {f}={a.config.get(f)!r} but {_name(0, ref)} has "
                    f"{ref.config.get(f)!r}: mode '{mode}' needs them equal"
                )
        for x, y, xi, yi in ((ref, a, 0, i), (a, ref, i, 0)):
            missing = next((k for k in x.state_dict if k not in y.state_dict), None)
            if missing is not None:
                raise SoupError(f"key '{missing}' of {_name(xi, x)} is missing from {_name(yi, y)}")


def _pattern_value(pattern: dict | None, module: str, default):
    """PEFT's rank_pattern/alpha_pattern lookup (peft.utils.other.get_pattern_key): first key matching."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _scaling(adapter: LoraAdapter, i: int, module: str, rank: int) -> float:
    cfg = adapter.config
    expected = _pattern_value(cfg.get("rank_pattern"), module, cfg.get("r"))
    if expected != rank:
        # The tensors are the truth; a config that disagrees would give the wrong scaling.
        raise SoupError(f"{_name(i, adapter)}: '{module}' has rank {rank} but its config says r={expected}")
    alpha = _pattern_value(cfg.get("alpha_pattern"), module, cfg.get("lora_alpha"))
    return alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank


def _split_keys(state: Mapping[str, Tensor]) -> tuple[dict[str, tuple[str, str]], list[str]]:
    """Map each LoRA module to its (A key, B key); also return the other (full-tensor) keys."""
    pairs: dict[str, dict[str, str]] = {}
    others = []
    for key in state:
        m = _LORA_KEY.match(key)
        if m:
            pairs.setdefault(m["module"], {})[m["lin"] or m["emb"]] = key
        elif any(part.startswith("lora_") for part in key.split(".")):
            raise SoupError(f"key '{key}' (DoRA magnitude, LoRA bias, ...) is not exact in a delta soup")
        else:
            others.append(key)
    for module, kinds in pairs.items():
        if set(kinds) != {"A", "B"}:
            raise SoupError(f"module '{module}' has a LoRA {next(iter(kinds))} factor but not the other one")
    return {m: (k["A"], k["B"]) for m, k in pairs.items()}, others


def _soup_delta(
    adapters: Sequence[LoraAdapter], ws: list[float], allow_extrapolation: bool, keep_fp32: bool = False,
    allow_nonfinite: bool = False,
) -> LoraAdapter:  # fmt: skip
    _check_same(adapters, _STRUCTURE_FIELDS, "delta")
    for i, a in enumerate(adapters):
        bad = {f: a.config.get(f) for f in ("use_dora", "lora_bias") if a.config.get(f)}
        if a.config.get("peft_type", "LORA") != "LORA" or bad:
            raise SoupError(
                f"{_name(i, a)} is {a.config.get('peft_type')} {bad}: mode 'delta' supports plain LoRA only "
                "(DoRA and lora_bias are not sums of B A products); use mode='factors'"
            )
    pairs, others = _split_keys(adapters[0].state_dict)
    out: dict[str, Tensor] = {}
    total_rank: dict[str, int] = {}
    for module, (ka, kb) in pairs.items():
        a_parts, b_parts = [], []
        ref_a, ref_b = adapters[0].state_dict[ka], adapters[0].state_dict[kb]
        for i, (a, w) in enumerate(zip(adapters, ws)):
            A, B = a.state_dict[ka], a.state_dict[kb]
            for key, t in ((ka, A), (kb, B)):
                check_dtype(t.dtype, key, _name(i, a))
                if not allow_nonfinite and w != 0.0:
                    check_finite(t, key, _name(i, a))
            same_dims = (
                A.shape[1:] == ref_a.shape[1:]
                and B.shape[:1] + B.shape[2:] == ref_b.shape[:1] + ref_b.shape[2:]
            )
            if not same_dims or A.dtype != ref_a.dtype or B.dtype != ref_b.dtype:
                raise SoupError(
                    f"'{ka}': {_name(i, a)} has A {tuple(A.shape)} {A.dtype}, B {tuple(B.shape)}, adapter 0 "
                    f"has A {tuple(ref_a.shape)} {ref_a.dtype}, B {tuple(ref_b.shape)}: only ranks may differ"
                )
            s = _scaling(a, i, module.removeprefix(PREFIX), A.shape[0])
            a_parts.append(A)
            # Scale in fp32 and round once (or not at all for a merge), so w_i s_i B_i loses nothing more.
            scaled = B.float() * (w * s)
            b_parts.append(scaled if keep_fp32 else scaled.to(B.dtype))
        out[ka], out[kb] = torch.cat(a_parts, dim=0), torch.cat(b_parts, dim=1)
        if not allow_nonfinite:  # finite factors, but w s B may overflow a narrow dtype
            check_finite_result(out[kb], kb, " (B scaled by weight x LoRA scaling)")
        total_rank[module.removeprefix(PREFIX)] = out[ka].shape[0]
    if others:
        sources = [{k: a.state_dict[k] for k in others} for a in adapters]
        out.update(interpolate(sources, ws, allow_extrapolation=allow_extrapolation, allow_nonfinite=allow_nonfinite,
                               names=[_name(i, a) for i, a in enumerate(adapters)]))
    config = copy.deepcopy(adapters[0].config)
    ranks = Counter(total_rank.values())
    r = ranks.most_common(1)[0][0] if ranks else sum(a.config.get("r", 0) for a in adapters)
    # lora_alpha = r per module gives scaling exactly 1.0; rsLoRA off so alpha / r is the rule that applies.
    odd = {re.escape(m): rank for m, rank in total_rank.items() if rank != r}
    config.update(r=r, lora_alpha=r, use_rslora=False, rank_pattern=odd, alpha_pattern=dict(odd))
    return LoraAdapter(config=config, state_dict={k: out[k] for k in adapters[0].state_dict})


def lora_soup(
    adapters: Sequence[LoraAdapter], weights: Sequence[float], *, mode: str = "factors",
    allow_extrapolation: bool = False, allow_nonfinite: bool = False,
) -> LoraAdapter:  # fmt: skip
    """Interpolate LoRA adapters trained from the same base model.

    Args:
        adapters: N adapters on the same base model with the same target modules.
        weights: N weights aligned with `adapters` (on the simplex unless `allow_extrapolation`).
        mode: "factors" (A and B averaged separately; the paper's soup) or "delta" (the exact
            sum_i w_i s_i B_i A_i as one LoRA of rank sum_i r_i). See the module docstring.
        allow_extrapolation: allow negative weights (the sum must still be 1).
        allow_nonfinite: soup adapters holding NaN/inf (refused by default, naming the key and adapter).

    Returns:
        A new adapter (path None). "factors": adapter 0's config. "delta": adapter 0's config with
        r = lora_alpha = sum of ranks (rank_pattern/alpha_pattern where modules differ), use_rslora off.

    Raises:
        SoupError: bad weights or mode, or adapters that differ in a key, shape or config field the mode
            needs equal (the message names the field or key and the adapter).
    """
    _check_adapters(adapters)
    ws = validate_weights(weights, len(adapters), allow_extrapolation=allow_extrapolation)
    if mode == "delta":
        return _soup_delta(adapters, ws, allow_extrapolation, allow_nonfinite=allow_nonfinite)
    if mode != "factors":
        raise SoupError(f"mode must be one of {MODES}, got {mode!r}")
    _check_same(adapters, _STRUCTURE_FIELDS + _SCALING_FIELDS, "factors")
    sds = [a.state_dict for a in adapters]
    names = [_name(i, a) for i, a in enumerate(adapters)]
    for i in range(1, len(sds)):  # shapes differ: the factors soup cannot take them, the delta soup can
        bad = next((k for k in sds[0] if k in sds[i] and sds[i][k].shape != sds[0][k].shape), None)
        if bad is not None:
            raise SoupError(f"key '{bad}': {names[i]} has shape {tuple(sds[i][bad].shape)}, {names[0]} has "
                            f"{tuple(sds[0][bad].shape)}: mode 'factors' needs equal shapes (try mode='delta')")
    state = interpolate(sds, ws, allow_extrapolation=allow_extrapolation, allow_nonfinite=allow_nonfinite, names=names)
    return LoraAdapter(config=copy.deepcopy(adapters[0].config), state_dict=dict(state))


def _check_adapters(adapters) -> None:
    if not adapters:
        raise SoupError("no adapters given: a LoRA soup needs at least one")
    if isinstance(adapters, (str, bytes, LoraAdapter)) or not isinstance(adapters, Sequence):
        raise SoupError(f"adapters must be a list of LoraAdapter, got {type(adapters).__name__}")
    for i, a in enumerate(adapters):
        if not isinstance(a, LoraAdapter):
            raise SoupError(f"adapter {i} is a {type(a).__name__}, not a LoraAdapter (load folders with load_adapter)")


def _base_key(key: str) -> str:
    # PEFT saves a wrapped layer's own weight (embeddings, bias="all") under "<module>.base_layer.<name>".
    return key.removeprefix(PREFIX).replace(".base_layer.", ".")


def merge_lora_into_base(
    base_state_dict: Mapping[str, Tensor], adapters: Sequence[LoraAdapter], weights: Sequence[float], *,
    allow_extrapolation: bool = False, allow_nonfinite: bool = False,
) -> dict[str, Tensor]:  # fmt: skip
    """The delta soup merged into full weights: W = W0 + sum_i w_i s_i B_i A_i.

    Args:
        base_state_dict: the base model's own `state_dict()` (no PEFT wrapping), e.g. "model.layers.0...".
        adapters, weights, allow_extrapolation: as in `lora_soup`.

    Returns:
        The base model's keys: new tensors where the adapters change a weight (the sum done in fp32, rounded
        once to the weight's dtype), the base's own tensors (shared, not copied) elsewhere. Non-LoRA adapter
        tensors (modules_to_save) replace the base's by their weighted average.

    Raises:
        SoupError: as `lora_soup(mode="delta")`; an adapter key with no base weight of that shape; conv
            LoRA; a LoRA on a tied weight (merging would untie it; use the delta adapter with PEFT).
    """
    _check_adapters(adapters)
    if not isinstance(base_state_dict, Mapping):
        raise SoupError(f"the base state dict must be a mapping name -> tensor, got {type(base_state_dict).__name__}")
    ws = validate_weights(weights, len(adapters), allow_extrapolation=allow_extrapolation)
    soup = _soup_delta(adapters, ws, allow_extrapolation, keep_fp32=True, allow_nonfinite=allow_nonfinite)
    if not allow_nonfinite:  # the base's own tensors are part of the output too
        for k, t in base_state_dict.items():
            if isinstance(t, Tensor):
                check_finite(t, k, "the base model")
    pairs, others = _split_keys(soup.state_dict)
    out = dict(base_state_dict)
    # Writing one name of a tied pair (GPT-2's wte / lm_head) would untie them, and load_state_dict would
    # then keep whichever name it loads last: refuse rather than guess.
    storage: dict[tuple, list[str]] = {}
    for k, t in base_state_dict.items():
        if t.data_ptr():  # meta and empty tensors have no storage to share
            storage.setdefault((t.data_ptr(), t.shape), []).append(k)
    tied = {k: names for names in storage.values() if len(names) > 1 for k in names}

    def target(key: str, bkey: str, shape: torch.Size) -> Tensor:
        if bkey not in out or out[bkey].shape != shape:
            raise SoupError(f"adapter key '{key}' has no base weight '{bkey}' of shape {tuple(shape)}")
        if bkey in tied:
            raise SoupError(f"base weight '{bkey}' is tied ({tied[bkey]}): use the delta adapter with PEFT")
        return out[bkey]

    for key in others:  # full tensors first: a LoRA delta below may land on top of a saved base layer
        bkey = _base_key(key)
        out[bkey] = soup.state_dict[key].to(target(key, bkey, soup.state_dict[key].shape).dtype)
    transpose = bool(soup.config.get("fan_in_fan_out"))
    for module, (ka, kb) in pairs.items():
        A, B = soup.state_dict[ka], soup.state_dict[kb]
        if A.ndim != 2:
            raise SoupError(f"'{ka}' is {A.ndim}-d (conv LoRA): merge_lora_into_base handles 2-d only")
        delta = B.float() @ A.float()  # [out, in]; the soup's scaling is exactly 1
        # Embeddings store [num_embeddings, dim] and GPT-2's Conv1D stores [in, out]: both transposed.
        if transpose or ka.endswith("lora_embedding_A"):
            delta = delta.T
        bkey = _base_key(module) + ".weight"
        w0 = target(ka, bkey, delta.shape)
        check_dtype(w0.dtype, bkey, "the base model")
        out[bkey] = (w0.float() + delta).to(w0.dtype)
        if not allow_nonfinite:
            check_finite_result(out[bkey], bkey, " (base weight + LoRA delta)")
    return out
