"""`rs fisher`: the diagonal Fisher of one expert, for `rs soup --method fisher` and `front.method: fisher`.

    rs fisher --config configs/captioning/scst_bleu1.yaml --ckpt runs/.../bleu1/model.safetensors --out F1.safetensors

The task is built from its training config (model, data; trainer arguments are taken too, e.g. the
accelerator), the expert's weights are loaded where a soup writes them (the `soup_state_dict` protocol of
rs_lightning/front/checkpoints.py), and F = mean over `--samples` training examples of the squared gradient of
the log-likelihood of one output sampled from the expert (rs_lightning/fisher/estimate.py). The output is one
safetensors file with the soup's keys (fp32), written atomically, its metadata naming the expert and N.
Supported tasks: those whose LightningModule defines `fisher_log_likelihood(batch)`: captioning (every weight of
the CoCa) and text (the LoRA adapter's weights). The `fisher` merge method takes full-weight experts only for now,
so a text Fisher (adapter keys) waits for Fisher-weighted adapter soups.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

PROG = "rs fisher"


def build_parser():
    from jsonargparse import ActionConfigFile, ArgumentParser
    from lightning.pytorch import LightningDataModule, LightningModule, Trainer

    p = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0], exit_on_error=False, default_env=False)
    p.add_argument("--config", action=ActionConfigFile, help="the expert's training config (model, data, trainer)")
    p.add_subclass_arguments(LightningModule, "model", required=True, help="the task's LightningModule")
    p.add_subclass_arguments(LightningDataModule, "data", required=True, help="the task's LightningDataModule")
    p.add_class_arguments(Trainer, "trainer", instantiate=False)
    p.add_argument("--seed_everything", type=int | None, default=0, help="seed before estimating")
    p.add_argument("--ckpt", type=str, required=True, help="the expert (any format rs soup reads)")
    p.add_argument("--prefix", type=str | None, default=None, help="keep the checkpoint's keys under PREFIX, stripped")
    p.add_argument("--target_prefix", type=str | None, default=None,
                   help="the module's state_dict keys under this prefix receive the expert (as in rs front)")
    p.add_argument("--out", type=str, required=True, help="output .safetensors file (written atomically)")
    p.add_argument("--samples", type=int, default=64, help="training examples averaged over (default 64)")
    p.add_argument("--overwrite", type=bool, default=False, help="replace an existing output")
    p.add_argument("--progress", type=bool, default=True, help="a progress bar over the examples")
    return p


def main(argv: list[str] | None = None) -> int:
    from rs_lightning.commands.messages import fail, one_line

    parser = build_parser()
    try:
        cfg = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    except (argparse.ArgumentError, ValueError, TypeError) as err:
        return fail(PROG, f"{one_line(str(err))} (see `rs fisher --help`)")
    from rs_lightning.soup import SoupError

    try:
        out, n = run(parser, cfg)
    except (SoupError, ValueError, FileExistsError) as err:
        return fail(PROG, err)
    except OSError as err:
        return fail(PROG, err, 1)
    print(f"wrote {out}: diagonal Fisher of {cfg.ckpt} over {n} examples")
    return 0


def run(parser, cfg) -> tuple[Path, int]:
    """Check the arguments, build the task, load the expert, estimate, write; returns (output, examples)."""
    import lightning.pytorch as pl

    from rs_lightning.fisher.estimate import diagonal_fisher
    from rs_lightning.front.checkpoints import Checkpoint, check_fit, load_checkpoint, soup_target
    from rs_lightning.front.config import QUIET_TRAINER
    from rs_lightning.soup import SoupError, interpolate
    from rs_lightning.soup.sources import check_input_path

    if cfg.samples < 1:
        raise SoupError(f"--samples must be >= 1, got {cfg.samples}")
    out = Path(cfg.out)
    if out.suffix != ".safetensors":
        raise SoupError(f"--out {out}: give a .safetensors file name")
    if out.exists() and not cfg.overwrite:
        raise SoupError(f"--out {out} exists: pass --overwrite true to replace it")
    if not out.parent.is_dir():
        raise SoupError(f"--out {out}: its folder {out.parent} does not exist")
    check_input_path(Path(cfg.ckpt))
    objs = parser.instantiate_classes(cfg)
    module, datamodule = objs.model, objs.data
    if not callable(getattr(module, "fisher_log_likelihood", None)):
        raise SoupError(f"{type(module).__name__} has no fisher_log_likelihood(batch): rs fisher supports the "
                        "captioning and text tasks")
    expert = Checkpoint(path=cfg.ckpt, prefix=cfg.prefix)
    state = load_checkpoint(expert)
    result: dict = {}

    class Estimate(pl.Callback):
        """Runs inside trainer.validate: the module is set up (vocabulary, device) with its datamodule attached."""

        def on_validation_start(self, trainer, pl_module):
            target = soup_target(pl_module, cfg.target_prefix)
            check_fit(target, [(expert, state)])
            interpolate([state], [1.0], out=target)
            datamodule.setup("fit")
            if cfg.seed_everything is not None:
                pl.seed_everything(cfg.seed_everything, verbose=False)
            batches = (trainer.strategy.batch_to_device(b) for b in datamodule.train_dataloader())
            counts: dict = {}
            result["fisher"] = diagonal_fisher(pl_module, batches, cfg.samples, progress=cfg.progress,
                                               targets=soup_target(pl_module, cfg.target_prefix), counts=counts)
            result["n"] = counts["examples"]

    trainer_args = {k: v for k, v in vars(cfg.trainer).items() if k not in ("callbacks", "logger")}
    trainer_args.update(QUIET_TRAINER, callbacks=[Estimate()], limit_val_batches=1, num_sanity_val_steps=0,
                        inference_mode=False, max_epochs=1)
    trainer = pl.Trainer(**trainer_args)
    trainer.validate(module, datamodule=datamodule, verbose=False)
    _write(result["fisher"], out, {"expert": str(cfg.ckpt), "examples": str(result["n"]),
                                   "estimator": "mean of squared per-example gradients of sampled log-likelihoods"})
    return out, result["n"]


def _write(fisher: dict, out: Path, metadata: dict) -> None:
    from safetensors.torch import save

    from rs_lightning.soup.atomic import atomic_file

    data = save({k: v.contiguous() for k, v in fisher.items()}, metadata=metadata)
    with atomic_file(out, "wb") as f:
        f.write(data)


if __name__ == "__main__":
    sys.exit(main())
