"""`rs front`: sweep soup weights and score the front (`rs front select` / `report`: front_run.py).

    rs front --config configs/front/quadratic.yaml [--front.grid.points 21 ...] [--overwrite]
    rs front select --preference 0.3 0.7 RUN_DIR [--split val|test] [--write-soup OUT]
    rs front report RUN_DIR

The sweep itself is `rs_lightning.front.sweep.run_sweep`; this module parses, checks, builds and reports.
Everything the config alone decides is checked before the model is built or a point runs (see
`run_from_config`), the run folder is locked for the whole run (one writer: a second `rs front` on it stops
at once with "run folder ... is in use by pid N"), and every failure is one line on stderr: exit 2 for the
user's input, 1 when the machine failed a write (disk full: the finished rows are kept, re-run to resume).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rs_lightning.commands.messages import fail, name_config, one_line, os_error

PROG = "rs front"


def main(argv: list[str] | None = None) -> int:
    """Dispatch `rs front [select|report] ...`; return the exit code (0 ok, 2 bad input, 1 failed write)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("select", "report"):
        from rs_lightning.commands import front_run

        return (front_run.select_main if argv[0] == "select" else front_run.report_main)(argv[1:])
    return sweep_main(argv)


def sweep_main(argv: list[str]) -> int:
    """Parse a front config, run the sweep (resuming), write summary.json and the plots."""
    from rs_lightning.front.config import build_parser

    parser = build_parser()
    try:
        cfg = parser.parse_args(argv)
    except SystemExit as exit_:  # --help
        return int(exit_.code or 0)
    except (argparse.ArgumentError, ValueError, TypeError) as err:
        return fail(PROG, f"{name_config(one_line(str(err)), argv)} (see `rs front --help`)")
    from rs_lightning.soup import SoupError

    try:
        summary, out_dir = run_from_config(parser, cfg)
    except SoupError as err:  # FrontError, OutputInUse included
        return fail(PROG, err)
    except OSError as err:
        text, code = os_error(err)
        if code == 1:
            text += " (the rows finished before it are kept in front.jsonl: free space and re-run to resume)"
        return fail(PROG, text, code)
    print(describe(summary, out_dir))
    return 0


def run_from_config(parser, cfg):
    """Check the config, lock the run folder, build the task, run the sweep and write the outputs.

    Returns (summary, out_dir). Every check that needs no model comes first: the checkpoints' paths, the
    summary settings, the MORL preferences, the grid, the run folder; then the lock (before the model is
    built, so a second process stops at once); then the model, data and trainer.
    """
    from rs_lightning.front.config import config_hash, to_checkpoint
    from rs_lightning.front.errors import FrontError
    from rs_lightning.front.grids import build_grid
    from rs_lightning.front.runs import check_run_folder
    from rs_lightning.front.soup_method import resolve_soup_method
    from rs_lightning.front.sweep import check_morl_mu
    from rs_lightning.soup import SoupError
    from rs_lightning.soup.lock import output_lock
    from rs_lightning.soup.sources import check_input_path

    front = cfg.front
    if not front.experts:
        raise FrontError("front.experts is empty: list the expert checkpoints, in weight order")
    experts = [to_checkpoint(e) for e in front.experts]
    init = to_checkpoint(front.init) if front.init else None
    morl = [to_checkpoint(m) for m in front.morl]
    named = [(f"front.experts[{i}]", e) for i, e in enumerate(experts)] + [("front.init", init)] * bool(init)
    for key, ckpt in named + [(f"front.morl[{i}]", m) for i, m in enumerate(morl)]:
        try:
            if ckpt.path:
                check_input_path(Path(ckpt.path))
        except SoupError as err:
            raise FrontError(f"{key}: {err}") from err
    from rs_lightning.soup.lora import is_peft_adapter_dir

    adapters = any(e.path and is_peft_adapter_dir(e.path) for e in experts)
    method = resolve_soup_method(getattr(front, "method", None), init, len(experts), adapters)
    extra_named = [("front.method.base", method.base)] * (method.base is not None and method.base is not init)
    extra_named += [(f"front.method.fisher[{i}]", f) for i, f in enumerate(method.fisher)]
    for key, ckpt in extra_named:
        try:
            check_input_path(Path(ckpt.path))
        except SoupError as err:
            raise FrontError(f"{key}: {err}") from err
    settings = _settings(front)
    check_morl_mu(morl, settings.rewards)
    grid = build_grid(front.grid, len(experts), allow_extrapolation=front.allow_extrapolation)
    out_dir = check_run_folder(front.out_dir, "front.out_dir")
    chash = config_hash(cfg, front, experts, init, morl, method)
    with _lock(output_lock, out_dir):
        return _run(parser, cfg, settings, experts, init, morl, grid, out_dir, chash, method)


def _settings(front):
    """The checked summary settings of the config (messages say front.summary.<key>)."""
    from rs_lightning.front.config import plain
    from rs_lightning.front.errors import FrontError
    from rs_lightning.front.summary import SummarySettings

    settings = front.summary
    if not isinstance(settings, SummarySettings):
        settings = SummarySettings(**plain(settings))
    try:
        settings.check()
    except ValueError as err:
        raise FrontError(_front_key(err)) from err
    if not front.validate and settings.select_on == "val":
        raise FrontError("front.validate is false, so the sweep has no validation rows, but lam* is selected on them "
                         "(front.summary.select_on: val, the default): set front.validate: true, or ask for "
                         "selection on the test rows explicitly with front.summary.select_on: test (optimistic)")
    return settings


def _front_key(err: Exception) -> str:
    text = str(err)
    return f"front.{text}" if text.startswith("summary.") else f"front.summary: {text}"


def _lock(output_lock, out_dir: Path):
    """The run folder's write lock, on global rank 0 only: under DDP the other ranks run this same command on
    the same folder, and write nothing (Lightning sets their rank in the environment before they start)."""
    import contextlib

    from lightning.fabric.utilities.rank_zero import rank_zero_only

    if getattr(rank_zero_only, "rank", 0) != 0:
        return contextlib.nullcontext(out_dir)
    return output_lock(out_dir, what="run folder")


def _run(parser, cfg, settings, experts, init, morl, grid, out_dir, chash, method):
    import yaml

    from rs_lightning.commands.messages import build_failure
    from rs_lightning.front.config import QUIET_TRAINER, plain
    from rs_lightning.front.errors import FrontError, naming_writes
    from rs_lightning.front.summary import build_summary, write_outputs
    from rs_lightning.front.sweep import quiet_trainer, run_sweep
    from rs_lightning.soup.atomic import atomic_file

    front = cfg.front
    try:
        objs = parser.instantiate(cfg) if hasattr(parser, "instantiate") else parser.instantiate_classes(cfg)
        trainer = quiet_trainer(**{**plain_trainer(objs.trainer), **QUIET_TRAINER})
    except (ValueError, TypeError, ImportError, OSError) as err:
        raise FrontError(build_failure(err, cfg)) from err

    def check_names(names):
        try:
            settings.check_names(names)
        except ValueError as err:
            raise FrontError(_front_key(err)) from err

    meta = {"summary_settings": plain(settings), "grid": grid, "method": method.identity()}
    rows = run_sweep(
        objs.model, objs.data, experts, grid, out_dir, init=init, morl=morl,
        allow_extrapolation=front.allow_extrapolation, trainer=trainer, rewards=settings.rewards,
        config_hash=chash, overwrite=cfg.overwrite, validate=front.validate, seed=cfg.seed_everything,
        target_prefix=front.target_prefix, cache_checkpoints=front.cache_checkpoints, progress=cfg.progress,
        meta=meta, allow_nonfinite=front.allow_nonfinite, check_names=check_names, method=method,
        ensemble=bool(getattr(front, "ensemble", False)),
    )
    if not trainer.is_global_zero:  # other DDP ranks: rank 0 writes the outputs
        return build_summary(rows, settings), out_dir
    with naming_writes(out_dir / "config.yaml"), atomic_file(out_dir / "config.yaml") as f:
        yaml.safe_dump(plain(cfg), f, sort_keys=False)
    return write_outputs(out_dir, rows, settings), out_dir


def plain_trainer(ns) -> dict:
    """Trainer kwargs from the parsed (callbacks already instantiated) namespace."""
    return dict(vars(ns))


def describe(summary: dict, out_dir: Path) -> str:
    """A few lines for the terminal: where things are, the hypervolumes, LMC and invalid points."""
    lines = [f"front: {summary['n_points']} points ({summary['n_valid']} valid) -> {out_dir}/front.jsonl"]
    hv = summary.get("hypervolume") or {}
    parts = [f"{g}={hv[g]:.4f}" for g in ("rs", "rs_extrapolated", "experts", "morl") if hv.get(g) is not None]
    if parts:
        lines.append(f"hypervolume (normalised, ref {summary['reference_point']['normalised']}): " + ", ".join(parts))
    lmc = (summary.get("lmc") or {}).get("per_reward")
    if lmc:
        lines.append("LMC gap min/mean: " + ", ".join(
            f"{n} {v['min']:+.4g}/{v['mean']:+.4g}" for n, v in lmc.items() if v["min"] is not None))
    unc = summary.get("uncertainty") or {}
    if unc.get("hypervolume"):
        pct = f"{unc['level'] * 100:g} %"
        lines.append(f"hypervolume {pct} intervals (paired bootstrap, {unc['n_boot']} draws, {unc['n_examples']} "
                     "test examples): " + ", ".join(f"{g} {v['value']:.4f} [{v['low']:.4f}, {v['high']:.4f}]"
                                                     for g, v in unc["hypervolume"].items()))
        verdicts = summary.get("verdicts") or {}
        if verdicts.get("rs_vs_morl"):
            lines.append(f"RS vs MORL hypervolume: {verdicts['rs_vs_morl']}")
        if verdicts.get("rs_vs_ensemble"):
            lines.append(f"RS vs prediction ensembles hypervolume: {verdicts['rs_vs_ensemble']}")
    elif unc.get("skipped"):
        lines.append(f"intervals: none ({unc['skipped']})")
    cost = summary.get("cost")
    if cost and cost.get("ensemble_seconds_per_point") and cost.get("soup_seconds_per_point"):
        lines.append(f"cost per point: soup {cost['soup_seconds_per_point']:.2f} s, ensemble "
                     f"{cost['ensemble_seconds_per_point']:.2f} s")
    selection = summary.get("selection") or {}
    if selection.get("split") == "test":
        lines.append(f"lam*: {selection['note']}")
    if summary.get("invalid_points"):
        bad = ", ".join(
            f"{p['kind']} {p['name']} ({'/'.join(p['invalid_rewards'])})" for p in summary["invalid_points"]
        )
        lines.append(f"INVALID points (non-finite or missing rewards): {bad}")
    lines.append(f"summary: {out_dir}/summary.json; plots: {', '.join(summary.get('plots') or []) or 'none'}")
    return "\n".join(lines)
