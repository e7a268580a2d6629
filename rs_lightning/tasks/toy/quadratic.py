"""The paper's quadratic-reward toy (Lemma 2/3): rewards are closed-form functions of a weight vector theta.

R_i(theta) = peak_i - sum_j h_ij (theta_j - theta*_ij)^2, with h_ij = eta_i (isotropic Hessians, Lemma 2)
or any positive diagonal (Lemma 3). Expert i is the optimum theta*_i of R_i, so everything a front sweep
measures has a closed form:

- soup rewards: R_k(sum_i lam_i theta*_i);
- LMC gap: R_k(theta(lam)) - sum_i lam_i R_k(theta*_i) = sum_j h_kj Var_lam(theta*_{.j}) >= 0 on the simplex;
- MORL optimum of sum_k mu_k R_k: theta_j = sum_k mu_k h_kj theta*_kj / sum_k mu_k h_kj;
- isotropic case: that optimum is the soup with lam_i proportional to mu_i eta_i (Lemma 2).

`QuadraticRewards` logs each reward as a torchmetrics MeanMetric (`test/reward/<name>`, `val/reward/<name>`),
returns the per-example scores from its evaluation steps (all equal: the rewards do not depend on the data)
and trains on -sum_k mu_k R_k, so `rs fit` can make real experts/MORL runs; `python -m
rs_lightning.tasks.toy.quadratic --config configs/front/quadratic.yaml` writes the closed-form init, expert
and MORL checkpoints a front config names (seconds, no training).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import lightning.pytorch as pl
import torch
import torchmetrics
from torch import Tensor, nn
from torch.utils.data import DataLoader


class QuadraticRewards(pl.LightningModule):
    """A single weight vector `theta` whose rewards are quadratic bowls around per-reward optima.

    Args:
        optima: (K, d) theta*_i, the optimum of each reward (the experts).
        etas: (K,) isotropic curvatures eta_i (used when `hessians` is None; default all 1).
        hessians: (K, d) positive diagonal curvatures h_ij (Lemma 3 setting).
        peaks: (K,) R_i(theta*_i) (default all 1).
        names: (K,) reward names (default r1..rK).
        init: (d,) the starting theta (default zeros).
        mu: (K,) training preference: `fit` maximises sum_k mu_k R_k (default uniform).
        lr: SGD learning rate for `fit`.
    """

    def __init__(
        self,
        optima: list[list[float]],
        etas: list[float] | None = None,
        hessians: list[list[float]] | None = None,
        peaks: list[float] | None = None,
        names: list[str] | None = None,
        init: list[float] | None = None,
        mu: list[float] | None = None,
        lr: float = 0.1,
    ):
        super().__init__()
        self.save_hyperparameters()
        opt = torch.tensor(optima, dtype=torch.float64)
        k, d = opt.shape
        if hessians is not None:
            h = torch.tensor(hessians, dtype=torch.float64)
        else:
            eta = torch.tensor(etas if etas is not None else [1.0] * k, dtype=torch.float64)
            h = eta[:, None].expand(k, d).clone()
        if h.shape != (k, d) or bool((h <= 0).any()):
            raise ValueError(f"curvatures must be a positive ({k}, {d}) array, got shape {tuple(h.shape)}")
        self.names = list(names) if names is not None else [f"r{i + 1}" for i in range(k)]
        if len(self.names) != k:
            raise ValueError(f"{len(self.names)} names for {k} rewards")
        self.register_buffer("optima", opt.float(), persistent=False)
        self.register_buffer("curvature", h.float(), persistent=False)
        self.register_buffer("peaks", torch.tensor(peaks or [1.0] * k, dtype=torch.float32), persistent=False)
        self.register_buffer("mu", torch.tensor(mu or [1.0 / k] * k, dtype=torch.float32), persistent=False)
        self.theta = nn.Parameter(torch.tensor(init or [0.0] * d, dtype=torch.float32))
        # nan_strategy="disable": a NaN score must make the mean NaN (the sweep then flags the point);
        # MeanMetric's default drops NaN samples with a warning, which would bias the mean silently.
        self.test_metrics = nn.ModuleDict({n: torchmetrics.MeanMetric(nan_strategy="disable") for n in self.names})
        self.val_metrics = nn.ModuleDict({n: torchmetrics.MeanMetric(nan_strategy="disable") for n in self.names})

    def rewards(self, theta: Tensor | None = None) -> Tensor:
        """(K,) rewards at `theta` (default: the module's own)."""
        theta = self.theta if theta is None else theta
        return self.peaks - (self.curvature * (theta[None, :] - self.optima) ** 2).sum(dim=1)

    def _log_rewards(self, batch: Tensor, metrics: nn.ModuleDict, stage: str) -> dict[str, dict[str, Tensor]]:
        r = self.rewards()
        scores = {}
        for i, name in enumerate(self.names):
            # One score per sample, as a real reward would give; the metric syncs the mean across devices.
            scores[name] = r[i].expand(batch.shape[0]).detach()
            metrics[name].update(scores[name])
            self.log(f"{stage}/reward/{name}", metrics[name], on_step=False, on_epoch=True)
        # The per-example scores the front's bootstrap reads (rs_lightning.front.per_example); all equal here.
        return {"rewards": scores}

    def test_step(self, batch: Tensor, batch_idx: int) -> dict[str, dict[str, Tensor]]:
        return self._log_rewards(batch, self.test_metrics, "test")

    def validation_step(self, batch: Tensor, batch_idx: int) -> dict[str, dict[str, Tensor]]:
        return self._log_rewards(batch, self.val_metrics, "val")

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        loss = -(self.mu * self.rewards()).sum()
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    # Closed forms (float64) for tests and for writing checkpoints.

    def _h(self) -> Tensor:
        return self.curvature.double().cpu()

    def _opt(self) -> Tensor:
        return self.optima.double().cpu()

    def closed_form_rewards(self, theta: Sequence[float]) -> list[float]:
        t = torch.as_tensor(theta, dtype=torch.float64)
        return (self.peaks.double().cpu() - (self._h() * (t[None, :] - self._opt()) ** 2).sum(1)).tolist()

    def soup_theta(self, weights: Sequence[float]) -> Tensor:
        return torch.as_tensor(weights, dtype=torch.float64) @ self._opt()

    def lmc_gap(self, weights: Sequence[float]) -> list[float]:
        """R_k(theta(lam)) - sum_i lam_i R_k(theta*_i) = sum_j h_kj Var_lam(theta*_.j), per reward k."""
        w = torch.as_tensor(weights, dtype=torch.float64)
        opt = self._opt()
        var = w @ opt**2 - (w @ opt) ** 2
        return (self._h() @ var).tolist()

    def morl_optimum(self, mu: Sequence[float]) -> Tensor:
        """argmax_theta sum_k mu_k R_k(theta), coordinate-wise."""
        m = torch.as_tensor(mu, dtype=torch.float64)[:, None]
        h = self._h()
        return (m * h * self._opt()).sum(0) / (m * h).sum(0)

    def lemma2_lambda(self, mu: Sequence[float]) -> list[float]:
        """Isotropic Hessians: the soup weights that maximise sum_k mu_k R_k, lam_i ∝ mu_i eta_i (Lemma 2)."""
        eta = self._h()[:, 0]
        w = torch.as_tensor(mu, dtype=torch.float64) * eta
        return (w / w.sum()).tolist()


class QuadraticData(pl.LightningDataModule):
    """`n_samples` dummy prompts (their index): the rewards do not depend on them, only their count does."""

    def __init__(self, n_samples: int = 8, batch_size: int = 4):
        super().__init__()
        self.save_hyperparameters()

    def _loader(self) -> DataLoader:
        return DataLoader(torch.arange(self.hparams.n_samples, dtype=torch.float32), batch_size=self.hparams.batch_size)

    def train_dataloader(self) -> DataLoader:
        return self._loader()

    def val_dataloader(self) -> DataLoader:
        return self._loader()

    def test_dataloader(self) -> DataLoader:
        return self._loader()


def save_theta(theta: Sequence[float] | Tensor, path: str | Path) -> None:
    """Write a checkpoint {"theta": ...} (.safetensors) as the module's state dict would hold it."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"theta": torch.as_tensor(theta, dtype=torch.float32).contiguous()}, str(path))


def write_fisher(module: QuadraticRewards, expert: int, path: str | Path) -> None:
    """The exact diagonal Fisher of expert `expert` (0-based), for `method: fisher` on the toy: read as the
    log-likelihood of a Gaussian with mean theta, its reward is R_i = 1 - sum_j h_ij (theta_j - theta*_ij)^2, whose
    curvature -d^2 R_i / d theta_j^2 = 2 h_ij is the Fisher (the setting where Fisher averaging is exact)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"theta": (2.0 * module._h()[expert]).float().contiguous()}, str(path))


def write_checkpoints(module: QuadraticRewards, experts: Sequence[str], init: str | None = None,
                      morl: Sequence[tuple[str, Sequence[float]]] = ()) -> list[str]:
    """Closed-form checkpoints: expert i = theta*_i, init = the module's init, MORL(mu) = its exact optimum."""
    written = []
    for i, path in enumerate(experts):
        save_theta(module.optima[i], path)
        written.append(str(path))
    if init:
        save_theta(module.theta.detach(), init)
        written.append(str(init))
    for path, mu in morl:
        save_theta(module.morl_optimum(mu), path)
        written.append(str(path))
    return written


def _path_of(entry) -> str:
    return entry if isinstance(entry, str) else entry["path"]


def main(argv: list[str] | None = None) -> int:
    """Write the checkpoints a front config names, in closed form, for its quadratic model."""
    import yaml

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--config", required=True, help="a front config whose model is QuadraticRewards")
    args = parser.parse_args(argv)
    cfg = yaml.safe_load(Path(args.config).read_text())
    module = QuadraticRewards(**(cfg["model"].get("init_args") or {}))
    front = cfg.get("front") or {}
    init = front.get("init")
    written = write_checkpoints(
        module,
        [_path_of(e) for e in front.get("experts", [])],
        _path_of(init) if init else None,
        [(_path_of(m), m["mu"]) for m in front.get("morl", [])],
    )
    print("\n".join(written))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
