"""The diagonal Fisher estimator: per-example gradients of sampled log-likelihoods, squared and averaged.

    F_k = 1/N sum_n (d/d theta_k log p_theta(y_n | x_n))^2,   y_n ~ p_theta(. | x_n)

Sampling y from the model gives the Fisher information itself (an expectation over the model's outputs), not
the "empirical Fisher" of the training labels; Matena & Raffel (2022, Sec. 2.2) use the former. Each example
needs its own gradient, so each costs one backward pass: N is the cost knob (`rs fisher --samples`, default 64).

The Fisher has the keys of what a soup merges: the module's `soup_state_dict()` when it defines one (LoRA tasks:
the adapter tensors under PEFT's saved names), else its `state_dict()`. Floating tensors that are not trainable
parameters (buffers, a frozen base) get a Fisher of 0, which the `fisher` method floors to its epsilon: they are
averaged linearly.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn


def fisher_keys(module: nn.Module) -> Mapping[str, Tensor]:
    """Key -> live tensor of what a soup of this module merges (soup_state_dict if defined, else state_dict)."""
    hook = getattr(module, "soup_state_dict", None)
    return hook() if callable(hook) else module.state_dict()


def _param_index(module: nn.Module, targets: Mapping[str, Tensor]) -> list[tuple[nn.Parameter, list[str]]]:
    """(trainable parameter, the soup keys sharing its storage), for every parameter a soup key points into."""
    by_storage: dict[tuple, list[str]] = {}
    for key, t in targets.items():
        if t.is_floating_point() and t.numel():
            by_storage.setdefault((t.data_ptr(), tuple(t.shape)), []).append(key)
    out = []
    for p in module.parameters():
        keys = by_storage.get((p.data_ptr(), tuple(p.shape)))
        if p.requires_grad and keys:
            out.append((p, keys))
    return out


def diagonal_fisher(module: nn.Module, batches: Iterable[Any], n_samples: int, *,
                    log_likelihood=None, progress: bool = False,
                    targets: Mapping[str, Tensor] | None = None, counts: dict | None = None) -> dict[str, Tensor]:
    """The diagonal Fisher of `module` over the first `n_samples` examples of `batches`.

    Args:
        module: the expert (its weights loaded); `module.fisher_log_likelihood(batch)` must return `[B]`
            sampled-output log-likelihoods (or pass `log_likelihood`).
        batches: an iterable of batches (e.g. the training loader: the expert's own prompts/images).
        n_samples: examples to average over (>= 1).
        log_likelihood: `batch -> Tensor[B]`, default `module.fisher_log_likelihood`.
        progress: a tqdm bar over the examples.
        targets: key -> live tensor of what the soup merges (default `fisher_keys(module)`; `rs fisher` passes
            the module's tensors under `--target_prefix`, the keys the experts' checkpoints have).
        counts: if given, receives {"examples": N actually averaged over} (fewer than asked when the data ends).

    Returns:
        key -> fp32 Fisher tensor for every floating soup key (0 where no trainable parameter backs the key).

    Raises:
        ValueError: `n_samples` < 1, no batch, a module without the hook, or no trainable parameter in the keys.
    """
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    fn = log_likelihood or getattr(module, "fisher_log_likelihood", None)
    if fn is None:
        raise ValueError(f"{type(module).__name__} has no fisher_log_likelihood(batch): this task cannot estimate "
                         "a Fisher yet")
    targets = fisher_keys(module) if targets is None else targets
    index = _param_index(module, targets)
    if not index:
        raise ValueError("no trainable parameter backs the soup's keys: nothing to estimate")
    params = [p for p, _ in index]
    sums = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    seen = 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_samples, desc="fisher", unit="example")
    with torch.inference_mode(False), torch.enable_grad():
        for batch in batches:
            lls = fn(batch)
            if lls.dim() != 1:
                raise ValueError(f"fisher_log_likelihood must return one value per example ([B]), got shape "
                                 f"{tuple(lls.shape)}")
            for i in range(lls.shape[0]):
                if seen == n_samples:
                    break
                grads = torch.autograd.grad(lls[i], params, retain_graph=i + 1 < lls.shape[0], allow_unused=True)
                for acc, g in zip(sums, grads):
                    if g is not None:
                        acc.add_(g.detach().float().square())
                seen += 1
                if bar is not None:
                    bar.update(1)
            if seen == n_samples:
                break
    if bar is not None:
        bar.close()
    if seen == 0:
        raise ValueError("no example to estimate the Fisher on (the data loader is empty)")
    if counts is not None:
        counts["examples"] = seen
    fisher = {k: torch.zeros(t.shape, dtype=torch.float32) for k, t in targets.items() if t.is_floating_point()}
    for acc, (_, keys) in zip(sums, index):
        for key in keys:
            fisher[key] = (acc / seen).cpu()
    return fisher
