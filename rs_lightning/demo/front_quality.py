"""Front quality on the demo task: the RS front (N = 2 trainings) against MORL fronts of 1, 3 and 5 preferences.

    python -m rs_lightning.demo.front_quality [--out runs/demo] [--quick]

Reuses the captioning demo's replicate-0 stages under `<out>/captioning` (init, experts, MORL at mu = 0.5),
trains the missing MORL runs (mu = weight of ROUGE-L in 0.1, 0.2, 0.3, 0.7, 0.8, 0.9; about 2 minutes each
on 2 cores), evaluates every model in one `rs front` sweep (`<out>/captioning/front_quality/`), and scores
each method's set of points with the same fixed normalisation (both metrics in [0, 1]) and reference point:

- hypervolume (reference point (-0.1, -0.1): the nadir 0 minus 0.1, as `rs front`'s summary takes it),
- IGD+ against the non-dominated set of ALL evaluated points (lower is better),
- expected utility: mean over 11 preferences w of max over the method's points of <w, R>.

The compute column counts the trainings each method needs beyond the shared init. The table goes to
`front_quality.json` and `front_quality.md` in the sweep folder; `benchmarks/bench_front_quality.py` runs
this under `make bench`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from rs_lightning.demo import captioning
from rs_lightning.demo.pipeline import Stage
from rs_lightning.demo.runner import load_timings, run_stages
from rs_lightning.front.metrics import hypervolume, igd_plus, pareto_mask
from rs_lightning.soup.atomic import atomic_file

# MORL preference sets, as the weight of the second reward (ROUGE-L); 0.5 is the demo's own MORL run.
MORL_SETS = {1: [0.5], 3: [0.2, 0.5, 0.8], 5: [0.1, 0.3, 0.5, 0.7, 0.9]}
REF_MARGIN = 0.1
N_PREFERENCES = 11


def _mu(m: float) -> list[float]:
    return [round(1.0 - m, 10), m]


def plan(out: Path, *, profile: str = "default", points: int = 11) -> list[Stage]:
    """The demo's seed-0 trainings, every MORL run of MORL_SETS, and one sweep evaluating them all."""
    demo = [s for s in captioning.plan(out, replicates=1, profile=profile) if s.kind != "front"]
    init = next(s for s in demo if s.kind == "init")
    experts = [s.output for s in demo if s.kind == "expert"]
    mus = sorted({m for ms in MORL_SETS.values() for m in ms})
    morl = [captioning.morl_stage(out, _mu(m), profile=profile) for m in mus]
    stages = [s for s in demo if s.kind != "morl"] + morl
    sweep_dir = out / "front_quality"
    config = captioning.front_config(out, sweep_dir, experts, init.output, [(s.mu, s.output) for s in morl],
                                     points=points, profile=profile)
    stages.append(Stage("front-quality", "front", sweep_dir / "summary.json", config,
                        [s.name for s in stages], trains=False))
    return stages


def score(rows: list[dict], rewards: list[str], timings: dict | None = None) -> dict:
    """Hypervolume, IGD+ and expected utility of RS and of each MORL preference set, from `rs front` rows."""
    values = np.array([[row["rewards"][r] for r in rewards] for row in rows], dtype=np.float64)
    valid = np.all(np.isfinite(values), axis=1)
    union = values[valid][pareto_mask(values[valid], unique=True)]
    ref = np.full(len(rewards), -REF_MARGIN)  # nadir 0 and ideal 1: the metrics are their own normalisation
    prefs = np.array([[1.0 - i / (N_PREFERENCES - 1), i / (N_PREFERENCES - 1)] for i in range(N_PREFERENCES)])
    morl_rows = {round(row["mu"][1], 6): i for i, row in enumerate(rows) if row["kind"] == "morl"}
    rs = [i for i, row in enumerate(rows) if row["kind"] in ("expert", "soup")]
    methods = {"RS (11 soups of 2 experts)": (rs, 2, "r0-expert-bleu1 r0-expert-rouge_l")}
    for n, ms in MORL_SETS.items():
        missing = [m for m in ms if round(m, 6) not in morl_rows]
        if missing:
            raise ValueError(f"no MORL row for mu = {missing} in the sweep: was it trained and evaluated?")
        methods[f"MORL, {n} preference{'s' if n > 1 else ''}"] = (
            [morl_rows[round(m, 6)] for m in ms], n, " ".join(captioning.morl_stage_name(_mu(m)) for m in ms))
    all_morl = sorted(morl_rows)
    methods[f"MORL, all {len(all_morl)} preferences"] = (
        [morl_rows[m] for m in all_morl], len(all_morl), " ".join(captioning.morl_stage_name(_mu(m)) for m in all_morl))
    table = []
    for name, (idx, trainings, stage_names) in methods.items():
        pts = values[[i for i in idx if valid[i]]]
        minutes = None
        if timings:
            secs = [timings.get(s, {}).get("seconds") for s in stage_names.split()]
            minutes = round(sum(secs) / 60, 1) if all(x is not None for x in secs) else None
        table.append({
            "method": name, "trainings": trainings, "points": len(idx), "valid": int(len(pts)),
            "hypervolume": hypervolume(pts, ref),
            "igd_plus": igd_plus(pts, union),
            "expected_utility": float(np.mean(np.max(pts @ prefs.T, axis=0))),
            "training_minutes": minutes,
        })
    return {"rewards": rewards, "reference_point": ref.tolist(), "preferences": prefs.tolist(), "methods": table,
            "points": [{"kind": r["kind"], "name": r["name"], **{k: r["rewards"][k] for k in rewards}} for r in rows]}


def format_table(result: dict) -> str:
    lines = ["| method | trainings | valid points | hypervolume | IGD+ | expected utility | training minutes |",
             "|---|---|---|---|---|---|---|"]
    for row in result["methods"]:
        minutes = "-" if row["training_minutes"] is None else f"{row['training_minutes']:.1f}"
        lines.append(f"| {row['method']} | {row['trainings']} | {row['valid']} | {row['hypervolume']:.4f} | "
                     f"{row['igd_plus']:.4f} | {row['expected_utility']:.4f} | {minutes} |")
    return "\n".join(lines)


def run(out: Path, *, profile: str = "default", points: int = 11, force: bool = False, log=print) -> dict:
    """Train what is missing, sweep, score; write front_quality.{json,md} beside the sweep; return the result."""
    stages = plan(out, profile=profile, points=points)
    run_stages(stages, out, force=force, log=log)
    sweep_dir = out / "front_quality"
    rows = [json.loads(line) for line in (sweep_dir / "front.jsonl").read_text().splitlines() if line.strip()]
    result = score(rows, captioning.REWARDS, load_timings(out))
    with atomic_file(sweep_dir / "front_quality.json") as f:
        json.dump(result, f, indent=2)
    with atomic_file(sweep_dir / "front_quality.md") as f:
        f.write(format_table(result) + "\n")
    return result


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="the demo's output folder (default: runs/demo)")
    p.add_argument("--quick", action="store_true", help="the demo's quick profile (tiny runs: checks the pipeline)")
    p.add_argument("--force", action="store_true", help="retrain and re-evaluate every stage")
    args = p.parse_args(argv)
    out = Path(args.out) / ("captioning-quick" if args.quick else "captioning")
    result = run(out, profile="quick" if args.quick else "default", force=args.force)
    print(format_table(result))
    print(f"written: {out / 'front_quality' / 'front_quality.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
