"""`rs demo`: run the whole rewarded-soups method on the embedded offline default, replicated, with a report.

    rs demo                      # captioning: tiny CoCa on the synthetic caption set, BLEU-1 vs ROUGE-L
    rs demo --replicates 3       # three independent replicates (own init, experts, MORL and sweep each)
    rs demo --task text          # SmolLM2 + LoRA, VADER positivity vs MiniLM relevance
    rs demo --quick              # the same pipeline on tiny models, in about a minute
    rs demo --rewards bleu1 bleu4 rouge_l meteor cider_d   # captioning over the paper's five metrics (a spider plot)
Stages run concurrently in processes of their own (--workers); a second run reuses the finished stages.

Every argument and the output folder are checked before anything is planned or trained; the demo folder is
locked for the whole run (a second `rs demo` on it stops at once: "demo folder ... is in use by pid N").
Errors are one line: exit 2 for arguments and locations, 1 for a failed stage or write.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from rs_lightning.commands.messages import OneLineParser, fail, os_error
from rs_lightning.demo.pipeline import PRECISIONS
from rs_lightning.soup.atomic import atomic_file

FAMILIES = ("text", "captioning")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="rs demo", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run the complete method offline, R times independently: per replicate the shared init, one "
                    "expert per reward, MORL at mu = 0.5, and the front sweep over the lambda grid (lambda = weight "
                    "of the SECOND expert) on validation and test images; then a report whose every figure has a "
                    "95 % interval (bootstrap over test examples within a replicate, Student t across replicates).",
        epilog="Outputs: <out>/<task>/rep<r>/front/{front.jsonl,summary.json,front.png}, "
               "<out>/<task>/report.{json,md}; each stage's config is in <out>/<task>/configs/ (re-run one "
               "with rs fit --config ...) and its log in <out>/<task>/logs/. Exit status: 0 done; 2 bad "
               "arguments, an --out that cannot be written or a demo folder another rs demo is writing "
               "(nothing started); 1 a stage or a write failed.",
    )
    p.add_argument("--task", choices=FAMILIES, default="captioning",
                   help="task family (default: captioning; each family's replicated run fits in 15 minutes on 2 cores)")
    p.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument("--replicates", type=int, default=3,
                   help="independent replicates, each with its own init, seeds, experts, MORL and sweep (default: 3, "
                        "the fewest whose Student-t interval across replicates is informative: t = 4.3 at 2 degrees "
                        "of freedom, 12.7 at 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of replicate 0; replicate r uses seed + r (default: 0)")
    p.add_argument("--iterations", type=int, default=None,
                   help="training iterations per run (default: the family's recipe: text 10 PPO iterations, "
                        "captioning its SCST epochs)")
    p.add_argument("--points", type=int, default=None,
                   help="lambda values in the sweep, >= 2 (default: the family's: captioning 11, text 6, i.e. steps "
                        "of 0.2, which keeps the replicated text run well within 15 minutes on 2 cores)")
    p.add_argument("--threads", type=int, default=1, help="threads per stage process (default: 1)")
    p.add_argument("--workers", type=int, default=None,
                   help="stages run at once (default: CPU cores // threads)")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="Lightning precision of every training and of the sweep (default: the family's: text "
                        "bf16-mixed, measured 1.6x faster per PPO iteration than fp32 on a CPU with AMX; captioning "
                        "32-true). On a CPU without native bf16 (AVX512-BF16 or AMX) pass 32-true")
    p.add_argument("--quick", action="store_true", help="tiny models and a few iterations: checks the pipeline")
    p.add_argument("--rewards", nargs="+", default=None, metavar="METRIC",
                   help="one expert each: captioning 2 to 5 of bleu1 bleu4 rouge_l meteor cider_d (default bleu1 "
                        "rouge_l); text 2 or 3 of vader relevance concise (default vader relevance). With 3 or more "
                        "the sweep takes each expert, each pair's midpoint and the uniform soup, and the report a "
                        "spider plot; outputs go to <out>/<task>-<rewards>")
    p.add_argument("--force", action="store_true", help="retrain and re-evaluate every stage")
    return p


def check_args(p: argparse.ArgumentParser, args) -> Path:
    """Every argument is checked here, before any training starts; returns the demo folder.

    Raises:
        SystemExit: a bad number (one line printed). SoupError: a demo folder that cannot be written.
    """
    from rs_lightning.front.runs import check_run_folder

    for name, low in (("replicates", 1), ("points", 2), ("threads", 1), ("workers", 1), ("iterations", 1)):
        value = getattr(args, name)
        if value is not None and value < low:
            p.error(f"--{name} must be >= {low}, got {value}")
    folder = args.task
    if args.rewards is not None:
        from rs_lightning.demo import captioning, text

        known, default = ((captioning.PAPER_METRICS, captioning.REWARDS) if args.task == "captioning" else
                          (text.TEXT_METRICS, text.REWARDS))
        unknown = [r for r in args.rewards if r not in known]
        if unknown:
            p.error(f"--rewards: unknown {args.task} reward {unknown[0]!r} (choose from {' '.join(known)})")
        if len(set(args.rewards)) != len(args.rewards) or not 2 <= len(args.rewards) <= len(known):
            p.error(f"--rewards needs 2 to {len(known)} distinct {args.task} rewards, got {' '.join(args.rewards)}")
        if args.rewards != default:
            folder = f"{args.task}-" + "-".join(args.rewards)
    return check_run_folder(Path(args.out) / (f"{folder}-quick" if args.quick else folder), "--out")


def main(argv: list[str]) -> int:
    p = build_parser()
    try:
        args = p.parse_args(argv)
    except SystemExit as exit_:  # --help, or one line "rs demo: error: ..." already printed
        return int(exit_.code or 0)
    from rs_lightning.soup import SoupError
    from rs_lightning.soup.lock import output_lock

    try:
        try:
            out = check_args(p, args)
        except SystemExit as exit_:
            return int(exit_.code or 0)
        with output_lock(out, what="demo folder"):
            return _run(args, out)
    except SoupError as err:  # a demo folder that cannot be written, or OutputInUse
        return fail("rs demo", err)
    except OSError as err:
        return fail("rs demo", *os_error(err))


def planned_stages(args, out: Path) -> tuple[list, dict]:
    """The stages of this `rs demo` (nothing run), and the settings they were planned with: the family's defaults
    (points, precision) where the arguments leave them out."""
    if args.task == "text":
        from rs_lightning.demo import text as family
    else:
        from rs_lightning.demo import captioning as family
    profile = "quick" if args.quick else "default"
    settings = {"task": args.task, "profile": profile, "replicates": args.replicates, "seed": args.seed,
                "points": args.points or family.POINTS, "rewards": list(args.rewards or family.REWARDS),
                "precision": args.precision or family.PRECISION}
    stages = family.plan(out, replicates=args.replicates, seed=args.seed, profile=profile,
                         iterations=args.iterations, points=settings["points"], rewards=settings["rewards"],
                         precision=settings["precision"])
    return stages, settings


def _native_bf16_cpu() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX); elsewhere bf16 matmuls are converted in
    software and may be slower than fp32 (not measured here)."""
    import torch

    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def _run(args, out: Path) -> int:
    from rs_lightning.demo.report import build_report, format_markdown, format_report
    from rs_lightning.demo.runner import StageConfigChanged, StageFailed, default_workers, run_stages

    stages, settings = planned_stages(args, out)
    rewards, precision = settings["rewards"], settings["precision"]
    if precision == "bf16-mixed" and not _native_bf16_cpu():
        print("rs demo: this CPU has no native bf16 (AVX512-BF16 or AMX), so bf16-mixed may run slower than fp32 here; "
              "--precision 32-true is likely faster (its numbers differ from a bf16 run's)", flush=True)
    if args.force:
        for s in stages:
            if s.kind == "front":
                shutil.rmtree(s.output.parent, ignore_errors=True)
    workers = args.workers or default_workers(args.threads)
    print(f"rs demo: {args.task} family, {args.replicates} replicate(s), {len(stages)} stages, {workers} at once "
          f"x {args.threads} thread(s) ({os.cpu_count()} cores), precision {precision}; outputs under {out}",
          flush=True)
    start = time.perf_counter()
    try:
        run_stages(stages, out, force=args.force, workers=workers, threads=args.threads,
                   log=lambda line: print(line, flush=True))
    except StageConfigChanged as err:  # before anything ran: an output folder holding another recipe's stages
        print(f"rs demo: {err}", file=sys.stderr)
        return 2
    except StageFailed as err:
        print(f"rs demo: {err}", file=sys.stderr)
        return 1
    report = build_report(out, rewards, args.replicates)
    report["wall_minutes_this_run"] = round((time.perf_counter() - start) / 60, 2)
    report["settings"] = {**settings, "workers": workers, "threads": args.threads}
    with atomic_file(out / "report.json") as f:
        json.dump(report, f, indent=2)
    with atomic_file(out / "report.md") as f:
        f.write(format_markdown(report))
    print(format_report(report))
    print(f"this run took {report['wall_minutes_this_run']:.1f} min; report: {out / 'report.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
