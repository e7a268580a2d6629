"""LightningCLI behind `rs fit|validate|test|predict`.

Modules and datamodules are given by class path in the YAML config (`model.class_path`), so every task
family plugs in without registration here.
"""

from __future__ import annotations


def run_lightning_cli(args: list[str]) -> None:
    """Run LightningCLI on `args` (e.g. `["fit", "--config", "configs/text/review.yaml"]`)."""
    from lightning.pytorch.cli import LightningCLI

    LightningCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        save_config_kwargs={"overwrite": True},
    )
