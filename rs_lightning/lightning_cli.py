"""LightningCLI behind `rs fit|validate|test|predict`.

Modules and datamodules are given by class path in the YAML config (`model.class_path`), so every task
family plugs in without registration here.
"""

from __future__ import annotations


def run_lightning_cli(args: list[str]) -> None:
    """Run LightningCLI on `args` (e.g. `["fit", "--config", "configs/text/review.yaml"]`)."""
    import warnings

    from lightning.pytorch.cli import LightningCLI

    with warnings.catch_warnings():
        # `rs fit ...` passes its own argv as `args` on purpose (sys.argv must stay intact: DDP relaunches the
        # command for the other ranks from it), so Lightning's "both args and command line arguments" is noise.
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        LightningCLI(
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=args,
            save_config_kwargs={"overwrite": True},
        )
