"""Diagonal Fisher information of an expert, for Fisher-weighted soups (`rs fisher`, soup method `fisher`).

- `estimate.diagonal_fisher`: F = mean over N examples of (d log p(y_n | x_n) / d theta)^2, y_n sampled from
  the expert itself (the model's Fisher, as Matena & Raffel 2022 estimate it), one backward pass per example.
- A task supports it by defining `fisher_log_likelihood(batch) -> Tensor[B]` on its LightningModule: per example,
  the log-probability of one output sampled from the module, differentiable in its parameters.
"""

from rs_lightning.fisher.estimate import diagonal_fisher, fisher_keys

__all__ = ["diagonal_fisher", "fisher_keys"]
