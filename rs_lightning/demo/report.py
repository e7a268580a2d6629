"""The demo's closing report: rewards of every policy, hypervolumes, LMC gaps, the trade-off checks, compute.

The trade-off check is the one the method needs to be worth showing: each expert beats the other on its
own reward by more than the spread between two training seeds of that expert, and the two endpoints of
the sweep differ. A check that fails is printed as such; the demo reports what it sees.
"""

from __future__ import annotations

import json
from pathlib import Path

from rs_lightning.front.rows import read_rows


def _rows_by_name(front_dir: Path) -> dict[str, dict]:
    path = front_dir / "front.jsonl"
    return {row["name"]: row for row in read_rows(path)} if path.exists() else {}


def _fmt(value) -> str:
    return "   n/a" if value is None else f"{value:+.3f}"


def build_report(out: Path, rewards: list[str], seeds: list[int]) -> dict:
    """Collect the numbers the report prints (also written to `<out>/report.json`)."""
    summary = json.loads((out / "front" / "summary.json").read_text())
    rows = _rows_by_name(out / "front")
    policies = []
    for label, key in [("init", "init"), *[(f"expert {r} (seed {seeds[0]})", r) for r in rewards],
                       ("soup lam=0.5", "lam=0.5"), ("MORL mu=0.5", "morl")]:
        if key in rows:
            policies.append({"policy": label, "rewards": rows[key]["rewards"]})
    spread = {}
    for seed in seeds[1:]:
        other = _rows_by_name(out / f"front_seed{seed}")
        for r in rewards:
            if r in other:
                policies.append({"policy": f"expert {r} (seed {seed})", "rewards": other[r]["rewards"]})
                spread[r] = abs(other[r]["rewards"][r] - rows[r]["rewards"][r])
    checks = []
    for i, r in enumerate(rewards):
        o = rewards[1 - i] if len(rewards) == 2 else None
        if o is None or r not in rows or o not in rows:
            continue
        margin = rows[r]["rewards"][r] - rows[o]["rewards"][r]
        checks.append({"reward": r, "expert": r, "other": o, "margin": margin, "seed_spread": spread.get(r),
                       "passes": margin > spread.get(r, 0.0)})
    endpoints_differ = any(abs(rows[rewards[0]]["rewards"][k] - rows[rewards[1]]["rewards"][k]) > 1e-6
                           for k in rewards) if all(r in rows for r in rewards) else False
    stages = json.loads((out / "stages.json").read_text()) if (out / "stages.json").exists() else {}
    trainings = [s for s in stages.values() if s.get("trains")]
    return {
        "rewards": rewards, "policies": policies, "hypervolume": summary.get("hypervolume", {}),
        "lmc": summary.get("lmc", {}).get("per_reward", {}), "tradeoff_checks": checks,
        "endpoints_differ": endpoints_differ,
        "compute": {"trainings": len(trainings),
                    "training_minutes": round(sum(s.get("seconds") or 0 for s in trainings) / 60, 2),
                    "all_stage_minutes": round(sum(s.get("seconds") or 0 for s in stages.values()) / 60, 2)},
        "outputs": {"front": str(out / "front" / "front.png"), "summary": str(out / "front" / "summary.json")},
    }


def format_report(report: dict) -> str:
    rewards = report["rewards"]
    width = max(len(p["policy"]) for p in report["policies"]) + 2
    lines = ["", "policy".ljust(width) + "".join(f"{r:>12}" for r in rewards)]
    for p in report["policies"]:
        lines.append(p["policy"].ljust(width) + "".join(f"{_fmt(p['rewards'].get(r)):>12}" for r in rewards))
    hv = report["hypervolume"]
    lines.append("")
    lines.append(f"hypervolume (normalised): RS front {hv.get('rs', float('nan')):.3f} (2 trainings), "
                 f"MORL {hv.get('morl', float('nan')):.3f} (1 training, 1 preference), "
                 f"experts alone {hv.get('experts', float('nan')):.3f}")
    for r, gap in report["lmc"].items():
        low, mean = gap.get("min", float("nan")), gap.get("mean", float("nan"))
        lines.append(f"LMC gap on {r}: min {low:+.3f}, mean {mean:+.3f} (> 0: the soups lie above the chord)")
    for c in report["tradeoff_checks"]:
        spread = "n/a (one seed)" if c["seed_spread"] is None else f"{c['seed_spread']:.3f}"
        verdict = "yes" if c["passes"] else "NO"
        lines.append(f"trade-off: the {c['expert']} expert beats the {c['other']} expert on {c['reward']} by "
                     f"{c['margin']:+.3f}; seed spread {spread}; beyond the spread: {verdict}")
    lines.append(f"sweep endpoints differ: {'yes' if report['endpoints_differ'] else 'NO'}")
    comp = report["compute"]
    lines.append(f"compute: {comp['trainings']} trainings, {comp['training_minutes']:.1f} min of training, "
                 f"{comp['all_stage_minutes']:.1f} min for all stages run now")
    lines.append(f"outputs: {report['outputs']['front']}, {report['outputs']['summary']}")
    return "\n".join(lines)
