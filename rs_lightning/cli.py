"""The `rs` command: one entry point for the whole method.

`rs fit|validate|test|predict` are LightningCLI subcommands (train experts and MORL baselines from YAML);
`rs soup`, `rs front`, `rs demo`, `rs run`, `rs fisher`, `rs serve` and `rs list` are ours. Each of ours lives in
`rs_lightning.commands.<name>` as a `main(argv) -> int` and is imported only when called, so `rs soup --help` does
not pay for Lightning.
"""

from __future__ import annotations

import importlib
import signal
import sys

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")
OUR_SUBCOMMANDS = {
    "soup": "interpolate N checkpoints or LoRA adapters into one (weights aligned with the sources)",
    "front": "sweep soup weights, score every reward, Pareto set, hypervolume, plots",
    "demo": "run a whole rewarded-soups experiment on the embedded offline default",
    "run": "run an experiment plan (configs/plans/) here, on SLURM (submitit) or on Ray",
    "fisher": "diagonal Fisher of an expert, for Fisher-weighted soups (--method fisher)",
    "serve": "explore a finished front in the browser, with live soups of its experts",
    "list": "list the shipped configs",
}

USAGE = """usage: rs <command> [options]

Rewarded soups: fine-tune one expert per reward from a shared init, then interpolate their weights.

commands:
  fit | validate | test | predict   LightningCLI: rs fit --config configs/<family>/<task>.yaml
{ours}

Weight convention everywhere: weights are a vector aligned with the list of experts, theta = sum_i w_i theta_i.
For two experts, lam is the weight of the SECOND expert: theta(lam) = (1-lam) theta_1 + lam theta_2.
Run `rs <command> --help` for a command's options.
"""


def _usage() -> str:
    ours = "\n".join(f"  {name:<32}  {text}" for name, text in OUR_SUBCOMMANDS.items())
    return USAGE.format(ours=ours)


def main(argv: list[str] | None = None) -> int:
    if argv is None and hasattr(signal, "SIGPIPE"):
        # `rs list | head` should stop quietly, like any Unix tool, not with a BrokenPipeError traceback.
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command in LIGHTNING_SUBCOMMANDS:
        from rs_lightning.lightning_cli import run_lightning_cli

        return run_lightning_cli([command, *rest])
    if command in OUR_SUBCOMMANDS:
        module = importlib.import_module(f"rs_lightning.commands.{command}")
        return int(module.main(rest) or 0)
    print(f"rs: unknown command '{command}'\n\n{_usage()}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
