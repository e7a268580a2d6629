"""`rs front`: sweep soup weights and score the front; `rs front select` picks lam* for a preference.

    rs front --config configs/front/quadratic.yaml [--front.grid.points 21 ...] [--overwrite]
    rs front select --preference 0.3 0.7 RUN_DIR [--split val|test] [--write-soup OUT]
    rs front report RUN_DIR

The sweep itself is `rs_lightning.front.sweep.run_sweep`; this module parses, builds and reports.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

SELECT_DESCRIPTION = """\
Pick the soup weights lam* that maximise sum_k mu_k R_k over the points of a finished sweep (the paper's
a-posteriori selection), on the validation rows (--split val, the default; the sweep ran with front.validate).
--split test selects on the test rows instead, and says so: lam* picked and scored on the same examples is
optimistic.

MU is one number per reward, in the order of summary.json's `rewards` (normalised to sum 1). lam* is
printed aligned with the run's experts (theta = sum_i lam_i theta_i; two experts: lam = the weight of the
SECOND). --write-soup OUT writes that soup with `rs soup`."""


def main(argv: list[str] | None = None) -> int:
    """Dispatch `rs front [select|report] ...`; return the exit code (0 ok, 2 bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "select":
        return select_main(argv[1:])
    if argv and argv[0] == "report":
        return report_main(argv[1:])
    return sweep_main(argv)


def _error(err: Exception) -> int:
    print(f"rs front: error: {err}", file=sys.stderr)
    return 2


def sweep_main(argv: list[str]) -> int:
    """Parse a front config, run the sweep (resuming), write summary.json and the plots."""
    from rs_lightning.front.config import build_parser

    parser = build_parser()
    try:
        cfg = parser.parse_args(argv)
    except SystemExit as exit_:  # --help
        return int(exit_.code or 0)
    except (argparse.ArgumentError, ValueError, TypeError) as err:
        return _error(f"{err}\n(run `rs front --help` for the options)")
    from rs_lightning.front.errors import FrontError
    from rs_lightning.soup import SoupError

    try:
        summary, out_dir = run_from_config(parser, cfg)
    except (FrontError, SoupError, FileNotFoundError) as err:
        return _error(err)
    print(describe(summary, out_dir))
    return 0


def run_from_config(parser, cfg):
    """Instantiate the task, run the sweep and write the outputs; returns (summary, out_dir)."""
    import yaml

    from rs_lightning.front.config import QUIET_TRAINER, config_hash, plain, to_checkpoint
    from rs_lightning.front.errors import FrontError
    from rs_lightning.front.grids import build_grid
    from rs_lightning.front.summary import SummarySettings, build_summary, write_outputs
    from rs_lightning.front.sweep import quiet_trainer, run_sweep
    from rs_lightning.soup.atomic import atomic_file

    front = cfg.front
    if not front.experts:
        raise FrontError("front.experts is empty: list the expert checkpoints, in weight order")
    experts = [to_checkpoint(e) for e in front.experts]
    init = to_checkpoint(front.init) if front.init else None
    morl = [to_checkpoint(m) for m in front.morl]
    grid = build_grid(front.grid, len(experts), allow_extrapolation=front.allow_extrapolation)
    chash = config_hash(cfg, front, experts, init, morl)
    objs = parser.instantiate(cfg) if hasattr(parser, "instantiate") else parser.instantiate_classes(cfg)
    trainer_kwargs = {**plain_trainer(objs.trainer), **QUIET_TRAINER}
    trainer = quiet_trainer(**trainer_kwargs)
    settings = objs.front.summary
    if not isinstance(settings, SummarySettings):
        settings = SummarySettings(**plain(settings))
    try:
        settings.check()
    except ValueError as err:
        raise FrontError(f"front.summary: {err}") from err
    if not front.validate and settings.select_on == "val":
        raise FrontError("front.validate is false, so the sweep has no validation rows, but lam* is selected on them "
                         "(front.summary.select_on: val, the default): set front.validate: true, or ask for "
                         "selection on the test rows explicitly with front.summary.select_on: test (optimistic)")
    out_dir = Path(front.out_dir)
    meta = {"summary_settings": plain(settings), "grid": grid}
    rows = run_sweep(
        objs.model, objs.data, experts, grid, out_dir, init=init, morl=morl,
        allow_extrapolation=front.allow_extrapolation, trainer=trainer, rewards=settings.rewards,
        config_hash=chash, overwrite=cfg.overwrite, validate=front.validate, seed=cfg.seed_everything,
        target_prefix=front.target_prefix, cache_checkpoints=front.cache_checkpoints, progress=cfg.progress,
        meta=meta,
    )
    if not trainer.is_global_zero:  # other DDP ranks: rank 0 writes the outputs
        return build_summary(rows, settings), out_dir
    with atomic_file(out_dir / "config.yaml") as f:
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
    elif unc.get("skipped"):
        lines.append(f"intervals: none ({unc['skipped']})")
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


def _load_run(run_dir: Path):
    from rs_lightning.front.errors import FrontError
    from rs_lightning.front.rows import FRONT_FILE, read_rows
    from rs_lightning.front.sweep import RUN_FILE

    if not (run_dir / FRONT_FILE).exists():
        raise FrontError(f"{run_dir} has no {FRONT_FILE}: not a front run folder (run `rs front --config ...`)")
    rows = read_rows(run_dir / FRONT_FILE)
    info = json.loads((run_dir / RUN_FILE).read_text()) if (run_dir / RUN_FILE).exists() else {}
    return rows, info


def _settings(info: dict):
    from rs_lightning.front.summary import SummarySettings

    return SummarySettings(**(info.get("summary_settings") or {}))


def report_main(argv: list[str]) -> int:
    """`rs front report RUN_DIR`: recompute summary.json and the plots from front.jsonl."""
    p = argparse.ArgumentParser(prog="rs front report", description=report_main.__doc__)
    p.add_argument("run_dir", type=Path)
    try:
        args = p.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    from rs_lightning.front.errors import FrontError
    from rs_lightning.front.summary import write_outputs

    try:
        rows, info = _load_run(args.run_dir)
        summary = write_outputs(args.run_dir, rows, _settings(info))
    except (FrontError, ValueError) as err:
        return _error(err)
    print(describe(summary, args.run_dir))
    return 0


def select_main(argv: list[str]) -> int:
    """`rs front select --preference MU... RUN_DIR [--write-soup OUT]`."""
    p = argparse.ArgumentParser(prog="rs front select", description=SELECT_DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", nargs="?", type=Path, metavar="RUN_DIR", help="the out_dir of a sweep")
    # Strings, not floats: `--preference 0.3 0.7 RUN_DIR` must not swallow RUN_DIR (split below).
    p.add_argument("--preference", "--mu", nargs="+", required=True, metavar="MU",
                   help="one weight per reward (order: summary.json rewards)")
    p.add_argument("--split", choices=("val", "test"), default="val",
                   help="rows to select on: val (default) or test (asked for explicitly: optimistic)")
    p.add_argument("--write-soup", type=Path, metavar="OUT", help="write the soup lam* with `rs soup` to OUT")
    p.add_argument("--overwrite", action="store_true", help="with --write-soup: replace an existing OUT")
    try:
        args = p.parse_args(argv)
        args.preference, rest = _split_numbers(args.preference)
        if rest and args.run_dir is None:
            args.run_dir = Path(rest.pop(0))
        if rest or args.run_dir is None or not args.preference:
            p.error(f"give --preference MU1 MU2 ... (numbers) and one RUN_DIR (left over: {rest or 'none'})")
    except SystemExit as exit_:
        return int(exit_.code or 0)
    from rs_lightning.front.errors import FrontError

    try:
        rows, info = _load_run(args.run_dir)
        result = select_from_rows(rows, info, args.preference, args.split)
    except (FrontError, ValueError) as err:
        return _error(err)
    if result["split"] == "test":
        print(f"rs front select: {result['note']}", file=sys.stderr)
    print(json.dumps(result, indent=2))
    if args.write_soup is None:
        return 0
    return write_soup(info, result["lambda_star"], args.write_soup, overwrite=args.overwrite)


def _split_numbers(values: list[str]) -> tuple[list[float], list[str]]:
    numbers, rest = [], []
    for v in values:
        try:
            numbers.append(float(v))
        except ValueError:
            rest.append(v)
    return numbers, rest


def select_from_rows(rows, info: dict, mu, split: str = "val") -> dict:
    """lam* for one preference over a run's soup and expert rows, with lam = mu and MORL for comparison."""
    import numpy as np

    from rs_lightning.front.errors import FrontError
    from rs_lightning.front.rows import reward_matrix, reward_names
    from rs_lightning.front.select import TEST_NOTE, VAL_NOTE, preference_report, split_field

    names = _settings(info).rewards or reward_names(rows)
    if len(mu) != len(names):
        raise FrontError(f"--preference has {len(mu)} values for {len(names)} rewards {names}: give one per reward")
    cands = [r for r in rows if r["kind"] in ("soup", "expert")]
    field = split_field(cands, split, how_to_test="--split test")
    w = [r["weights"] for r in cands]
    r = reward_matrix(cands, names, field)
    morl = [(m["mu"], reward_matrix([m], names, field)[0]) for m in rows if m["kind"] == "morl" and m.get("mu")]
    entry = preference_report(w, r, [mu], morl=morl)[0]
    best = cands[int(np.argmin(np.abs(np.asarray(w) - np.asarray(entry["lambda_star"])).sum(axis=1)))]
    return {"rewards": names, "split": split, "note": VAL_NOTE if split == "val" else TEST_NOTE, **entry,
            "name": best["name"], "rewards_at_lambda_star": best[field], "test_rewards_at_lambda_star": best["rewards"],
            "experts": [e.get("path") for e in info.get("experts", [])]}


def write_soup(info: dict, weights, out: Path, *, overwrite: bool = False) -> int:
    """Write the soup `weights` of the run's experts through `rs soup` (same weight convention)."""
    experts = info.get("experts") or []
    if not experts or any(not e.get("path") for e in experts):
        return _error("run.json does not list the experts' paths: cannot write the soup")
    prefixes = {e.get("prefix") for e in experts}
    if len(prefixes) > 1:
        return _error(f"the experts use different key prefixes {sorted(map(str, prefixes))}; `rs soup` takes one")
    try:
        from rs_lightning.commands import soup
    except ImportError:
        return _error("`rs soup` is not available in this version: cannot write the soup")
    argv = [*(e["path"] for e in experts), "--weights", *(repr(float(w)) for w in weights), "--out", str(out)]
    prefix = prefixes.pop()
    if prefix:
        argv += ["--prefix", prefix]
    if any(w < 0 for w in weights):
        argv.append("--allow-extrapolation")
    if overwrite:
        argv.append("--overwrite")
    return int(soup.main(argv) or 0)
