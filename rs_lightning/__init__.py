"""rs_lightning: rewarded soups (Rame et al., NeurIPS 2023) on PyTorch Lightning."""

__version__ = "0.1.0"
