"""`rs run PLAN`: run an experiment plan (configs/plans/*.yaml) here, on SLURM (submitit) or on Ray.

    rs run quick --dry-run                      # the stage graph and what each stage would run; nothing starts
    rs run configs/plans/news_summary.yaml --launcher slurm
    rs run quick --status                       # every stage: pending, running, done, failed (with its log)

Finished stages are reused (their outputs are atomic), so a killed `rs run` resumes where it stopped; a failed
stage is retried `retries` times (the plan's, or --retries). Exit status: 0 done; 1 a stage failed; 2 a bad plan
or arguments (nothing started).
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

from rs_lightning.plan.launchers import LAUNCHERS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rs run", description=__doc__.split("\n\n")[0].split(": ", 1)[1],
        epilog="Plans: `rs list plans`. Launchers: local (a process pool of this machine), slurm (each stage a job "
               "through submitit, resources from the plan), ray (each stage a Ray task).")
    parser.add_argument("plan", help="a plan file, or the name of a shipped plan (e.g. quick)")
    parser.add_argument("--launcher", choices=LAUNCHERS, default="local", help="where stages run (default: local)")
    parser.add_argument("--workers", type=int, default=None,
                        help="stages at once (local default: cores // threads; cluster default: all that are ready)")
    parser.add_argument("--threads", type=int, default=1, help="threads per stage process, local launcher (default 1)")
    parser.add_argument("--retries", type=int, default=None, help="retries of a failed stage (default: the plan's)")
    parser.add_argument("--out", type=Path, default=None, help="run folder (default: the plan's `out`)")
    parser.add_argument("--dry-run", action="store_true", help="print the stage graph and commands; run nothing")
    parser.add_argument("--status", action="store_true", help="print every stage's state and exit")
    parser.add_argument("--force", action="store_true", help="rerun stages whose output exists")
    parser.add_argument("--slurm-cluster", default=None, choices=("slurm", "local"),
                        help="submitit's executor: slurm (default where sbatch exists) or local (same submission "
                             "code, local processes: for trying a plan without a cluster)")
    return parser


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from rs_lightning.plan.spec import PlanError, load_plan

    for name in ("workers", "threads", "retries"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "retries" else 1):
            parser.error(f"--{name} must be >= {0 if name == 'retries' else 1}, got {value}")
    try:
        plan = load_plan(args.plan, out=args.out)
        stages = plan.stages()
    except PlanError as err:
        print(f"rs run: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(plan.describe())
        return 0
    from rs_lightning.plan.state import format_status, stage_status

    if args.status:
        print(format_status(stage_status(stages, plan.out), plan.out))
        return 0
    from rs_lightning.demo.runner import StageConfigChanged, StageFailed, run_stages
    from rs_lightning.plan.launchers import make_launcher

    try:
        plan.out.mkdir(parents=True, exist_ok=True)
        launcher = make_launcher(args.launcher, plan.out, slurm=plan.slurm, ray=plan.ray, cluster=args.slurm_cluster)
    except (OSError, RuntimeError, ValueError) as err:
        print(f"rs run: {err}", file=sys.stderr)
        return 2
    retries = plan.retries if args.retries is None else args.retries
    print(f"rs run: {plan.path.name}, {len(stages)} stages, launcher {args.launcher}, retries {retries}; "
          f"outputs under {plan.out}", flush=True)
    start = time.perf_counter()
    # SIGTERM (a scheduler's or a user's kill) unwinds like Ctrl-C, so the runner cancels the stages in flight.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        run_stages(stages, plan.out, force=args.force, workers=args.workers, threads=args.threads,
                   launcher=launcher, retries=retries, log=lambda line: print(line, flush=True))
    except StageConfigChanged as err:  # before anything ran
        print(f"rs run: {err}", file=sys.stderr)
        return 2
    except StageFailed as err:
        print(f"rs run: {err}\n(`rs run {args.plan} --status` lists every stage)", file=sys.stderr)
        return 1
    finally:
        launcher.close()
    sweeps = [s.output.parent for s in stages if s.kind == "front"]
    print(f"rs run: done in {(time.perf_counter() - start) / 60:.1f} min; fronts: " +
          ", ".join(str(p / "front.png") for p in sweeps))
    return 0
