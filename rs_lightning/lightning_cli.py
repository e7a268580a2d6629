"""LightningCLI behind `rs fit|validate|test|predict`.

Modules and datamodules are given by class path in the YAML config (`model.class_path`), so every task
family plugs in without registration here.

A bad config is one line naming the key, exit 2, before any training: jsonargparse's own error handling
prints the whole usage (about 50 lines) and then a multi-line "Does not validate against any of the Union
subtypes" block, so the parsers here raise instead (exit_on_error=False) and the message is cut down to the
key, the reason and the value (`messages.one_line`). An error raised while building the model, data or
trainer from a parsed config (a ValueError of the class's __init__, a missing file, an unknown accelerator)
is reported the same way, naming the key.
"""

from __future__ import annotations

import logging
import sys


def run_lightning_cli(args: list[str]) -> int:
    """Run LightningCLI on `args` (e.g. `["fit", "--config", "configs/text/review.yaml"]`); return the exit code."""
    import argparse
    import warnings

    from lightning.fabric.utilities.exceptions import MisconfigurationException
    from lightning.pytorch.cli import LightningCLI

    from rs_lightning.commands.messages import build_failure, fail, name_config, one_line

    prog = f"rs {args[0]}" if args else "rs"
    errors = (ValueError, TypeError, ImportError, OSError, MisconfigurationException)
    held = _HeldLog("lightning.fabric.utilities.seed")

    class ConfigError(Exception):
        """The parsed config could not be turned into objects (the message names the key)."""

    class CLI(LightningCLI):
        def init_parser(self, **kwargs):
            return super().init_parser(**{**kwargs, "exit_on_error": False})

        def instantiate_classes(self) -> None:
            try:
                super().instantiate_classes()
            except errors as err:
                if isinstance(err, ConfigError):
                    raise
                raise ConfigError(build_failure(err, self.config.get(self.subcommand, self.config))) from err
            held.release()  # "Seed set to N" is said once the run will really start, not before an error

        def instantiate_trainer(self, **kwargs):
            try:
                return super().instantiate_trainer(**kwargs)
            except errors as err:
                raise ConfigError(f"trainer cannot be built from this config: {one_line(str(err))}") from err

    with warnings.catch_warnings(), held:
        # `rs fit ...` passes its own argv as `args` on purpose (sys.argv must stay intact: DDP relaunches the
        # command for the other ranks from it), so Lightning's "both args and command line arguments" is noise.
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        # A config that leaves the logger to Lightning (configs/text/review.yaml: its metrics follow
        # trainer.default_root_dir) gets a CSVLogger without TensorBoard; being told so on every run is noise.
        warnings.filterwarnings("ignore", message=r"Starting from v1\.9\.0, `tensorboardX` has been removed")
        try:
            CLI(subclass_mode_model=True, subclass_mode_data=True, args=args, save_config_kwargs={"overwrite": True})
        except argparse.ArgumentError as err:
            return fail(prog, f"{name_config(one_line(str(err)), args)} (see `{prog} --help`)")
        except ConfigError as err:
            return fail(prog, err)
    return 0


class _HeldLog(logging.Filter):
    """Hold back the records of one logger while active; `release` lets them through (dropped otherwise)."""

    def __init__(self, name: str):
        super().__init__()
        self.logger, self.records = logging.getLogger(name), []

    def filter(self, record) -> bool:
        self.records.append(record)
        return False

    def __enter__(self):
        self.logger.addFilter(self)
        return self

    def __exit__(self, *exc):
        self.logger.removeFilter(self)
        self.records = []

    def release(self) -> None:
        self.logger.removeFilter(self)
        for record in self.records:
            self.logger.handle(record)
        self.records = []


if __name__ == "__main__":
    sys.exit(run_lightning_cli(sys.argv[1:]))
