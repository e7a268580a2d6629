"""`rs front select` and `rs front report`: read a finished (or partial) run folder back.

    rs front select --preference 0.3 0.7 RUN_DIR [--split val|test] [--write-soup OUT [--overwrite]]
    rs front report RUN_DIR

Both read the run through `rs_lightning.front.runs.load_run` (every row and run.json checked, messages naming
the file and line; the rows of this run's points only, so report and the sweep's summary.json count the
same rows). `report` rewrites summary.json and the plots under the run folder's lock (one writer at a
time); `select` checks the preference and the --write-soup location before it prints or writes anything.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rs_lightning.commands.messages import OneLineParser, fail, os_error

SELECT_DESCRIPTION = """\
Pick the soup weights lam* that maximise sum_k mu_k R_k over the points of a finished sweep (the paper's
a-posteriori selection), on the validation rows (--split val, the default; the sweep ran with front.validate).
--split test selects on the test rows instead, and says so: lam* picked and scored on the same examples is
optimistic.

MU is one number per reward, in the order of summary.json's `rewards` (normalised to sum 1). lam* is
printed aligned with the run's experts (theta = sum_i lam_i theta_i; two experts: lam = the weight of the
SECOND). --write-soup OUT writes that soup with `rs soup`."""


def report_main(argv: list[str]) -> int:
    """`rs front report RUN_DIR`: recompute summary.json and the plots from front.jsonl."""
    prog = "rs front report"
    p = OneLineParser(prog=prog, description=report_main.__doc__)
    p.add_argument("run_dir", type=Path)
    try:
        args = p.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    from rs_lightning.commands.front import describe
    from rs_lightning.front.runs import check_writable, load_run
    from rs_lightning.front.summary import write_outputs
    from rs_lightning.soup import SoupError
    from rs_lightning.soup.lock import output_lock

    try:
        run = load_run(args.run_dir)
        check_writable(run.folder, "RUN_DIR")
        with output_lock(run.folder, what="run folder"):
            summary = write_outputs(run.folder, run.rows, run.settings)
    except SoupError as err:  # FrontError and OutputInUse included
        return fail(prog, err)
    except OSError as err:
        text, code = os_error(err)
        return fail(prog, text + (" (the previous summary.json is kept)" if code == 1 else ""), code)
    print(describe(summary, run.folder))
    return 0


def select_main(argv: list[str]) -> int:
    """`rs front select --preference MU... RUN_DIR [--write-soup OUT]`."""
    prog = "rs front select"
    p = OneLineParser(prog=prog, description=SELECT_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    from rs_lightning.front.runs import load_run
    from rs_lightning.soup import SoupError

    try:
        run = load_run(args.run_dir)
        result = select_from_rows(run.rows, run.info, args.preference, args.split, settings=run.settings)
        if args.write_soup is not None:
            _check_soup_output(run.info, args.write_soup, args.overwrite)
    except SoupError as err:  # FrontError included
        return fail(prog, err)
    if result["split"] == "test":
        print(f"{prog}: {result['note']}", file=sys.stderr)
    print(json.dumps(result, indent=2))
    if args.write_soup is None:
        return 0
    return write_soup(run.info, result["lambda_star"], args.write_soup, overwrite=args.overwrite)


def _split_numbers(values: list[str]) -> tuple[list[float], list[str]]:
    numbers, rest = [], []
    for v in values:
        try:
            numbers.append(float(v))
        except ValueError:
            rest.append(v)
    return numbers, rest


def select_from_rows(rows, info: dict, mu, split: str = "val", *, settings=None) -> dict:
    """lam* for one preference over a run's soup and expert rows, with lam = mu and MORL for comparison."""
    import math

    import numpy as np

    from rs_lightning.front.errors import FrontError
    from rs_lightning.front.rows import reward_matrix, reward_names
    from rs_lightning.front.runs import settings_of
    from rs_lightning.front.select import TEST_NOTE, VAL_NOTE, preference_report, split_field

    settings = settings if settings is not None else settings_of(info, Path("run.json"))
    names = settings.rewards or reward_names(rows)
    if len(mu) != len(names):
        raise FrontError(f"--preference has {len(mu)} values for {len(names)} rewards {names}: give one per reward")
    if not all(math.isfinite(m) and m >= 0 for m in mu) or not any(m > 0 for m in mu):
        raise FrontError(f"--preference {list(mu)}: a preference must be finite, >= 0 and not all zero")
    cands = [r for r in rows if r["kind"] in ("soup", "expert")]
    if not cands:
        raise FrontError("the run has no soup or expert row yet: nothing to select from")
    field = split_field(cands, split, how_to_test="--split test")
    w = [r["weights"] for r in cands]
    r = reward_matrix(cands, names, field)
    if not np.all(np.isfinite(r), axis=1).any():
        raise FrontError(f"no soup or expert row has valid {field} for {', '.join(names)}: nothing to select from")
    morl = [(m["mu"], reward_matrix([m], names, field)[0]) for m in rows if m["kind"] == "morl" and m.get("mu")]
    entry = preference_report(w, r, [mu], morl=morl)[0]
    best = cands[int(np.argmin(np.abs(np.asarray(w) - np.asarray(entry["lambda_star"])).sum(axis=1)))]
    return {"rewards": names, "split": split, "note": VAL_NOTE if split == "val" else TEST_NOTE, **entry,
            "name": best["name"], "rewards_at_lambda_star": best[field], "test_rewards_at_lambda_star": best["rewards"],
            "experts": [e.get("path") for e in info.get("experts", [])]}


def _check_soup_output(info: dict, out: Path, overwrite: bool) -> None:
    """Refuse a soup that cannot be written, before anything is printed (no half-done select)."""
    from rs_lightning.front.errors import FrontError
    from rs_lightning.soup.paths import check_output

    experts = info.get("experts") or []
    if not experts or any(not e.get("path") for e in experts):
        raise FrontError("run.json does not list the experts' paths: cannot write the soup")
    prefixes = {e.get("prefix") for e in experts}
    if len(prefixes) > 1:
        raise FrontError(f"the experts use different key prefixes {sorted(map(str, prefixes))}; `rs soup` takes one")
    try:
        check_output(out, inputs=[e["path"] for e in experts], overwrite=overwrite, flag="--write-soup")
    except FileExistsError as err:
        raise FrontError(f"--write-soup {out} exists: pass --overwrite to replace it") from err


def write_soup(info: dict, weights, out: Path, *, overwrite: bool = False) -> int:
    """Write the soup `weights` of the run's experts through `rs soup` (same weight convention)."""
    from rs_lightning.commands import soup

    experts = info["experts"]
    argv = [*(e["path"] for e in experts), "--weights", *(repr(float(w)) for w in weights), "--out", str(out)]
    prefix = experts[0].get("prefix")
    if prefix:
        argv += ["--prefix", prefix]
    if any(w < 0 for w in weights):
        argv.append("--allow-extrapolation")
    if overwrite:
        argv.append("--overwrite")
    return int(soup.main(argv) or 0)
