"""The demo's closing report: every figure per replicate with its bootstrap interval, pooled across replicates.

Two sources of noise, two intervals:
- within a replicate, the test set: each sweep's summary.json carries paired-bootstrap intervals over the test
  examples (front/uncertainty.py) for every point's rewards, the hypervolumes and their differences, the LMC
  gaps and the experts' margins;
- across replicates, training: each replicate has its own init, seeds, experts, MORL and sweep, so the spread of
  a figure across replicates is its training noise. The pooled figure is the mean over replicates with a
  Student-t 95 % interval (R - 1 degrees of freedom; none with one replicate).

Every verdict is read off an interval: "above" / "below" when it excludes 0, else "indistinguishable at 95 %".
A claim is only as strong as its interval; the report never prints one without it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from rs_lightning.demo.runner import load_timings
from rs_lightning.front.rows import read_rows
from rs_lightning.front.uncertainty import verdict

LEVEL = 0.95


def across_replicates(values: list[float], level: float = LEVEL) -> dict:
    """Mean over replicates with a Student-t interval: {"value", "low", "high", "n", "per_replicate"}."""
    # Rounded to 12 digits: float noise (a gap of -1e-17 between identical models) must not become a verdict.
    values = [round(v, 12) + 0.0 for v in values]
    n = len(values)
    mean = round(sum(values) / n, 12) + 0.0
    out = {"value": mean, "low": None, "high": None, "n": n, "per_replicate": values}
    if n >= 2:
        from scipy.stats import t

        sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
        half = float(t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
        out.update(low=mean - half, high=mean + half)
    return out


def _interval(entry: dict | None) -> dict | None:
    return None if entry is None else {k: entry.get(k) for k in ("value", "low", "high")}


def _uniform_soup(rows: dict, n: int) -> str | None:
    """The name of the soup row whose weights are all 1/n, if the sweep has one."""
    for name, row in rows.items():
        weights = row.get("weights") or []
        if row.get("kind") == "soup" and len(weights) == n and all(abs(w - 1.0 / n) < 1e-9 for w in weights):
            return name
    return None


def replicate_figures(front_dir: Path, rewards: list[str]) -> dict:
    """One replicate's numbers from its sweep (summary.json with `uncertainty`, and the rows)."""
    summary = json.loads((front_dir / "summary.json").read_text())
    rows = {row["name"]: row for row in read_rows(front_dir / "front.jsonl")}
    unc = summary.get("uncertainty") or {}
    points = unc.get("points", {})
    policies = {}
    # Two rewards: the lam = 0.5 soup and MORL at mu = 0.5; more: the uniform soup and MORL at uniform mu.
    middle = ("soup lam=0.5", "lam=0.5") if len(rewards) == 2 else ("uniform soup", _uniform_soup(rows, len(rewards)))
    morl = "MORL mu=0.5" if len(rewards) == 2 else "MORL uniform mu"
    for label, name in [("init", "init"), *[(f"expert {r}", r) for r in rewards], middle, (morl, "morl")]:
        if name in rows:
            policies[label] = {r: {"value": rows[name]["rewards"].get(r), **(_interval(points.get(name, {}).get(r))
                                                                         or {})} for r in rewards}
    hv = unc.get("hypervolume", {})
    figures = {"hv_" + g: _interval(hv.get(g)) for g in ("rs", "morl", "experts", "init", "rs_minus_morl",
                                                          "rs_minus_init")}
    for r, gap in unc.get("lmc", {}).items():
        figures[f"lmc_mean_{r}"] = _interval(gap.get("mean"))
        figures[f"lmc_min_{r}"] = _interval(gap.get("min"))
    margins = unc.get("expert_margins", {})
    for r in rewards:
        m = margins.get(r, {})
        figures[f"gain_over_init_{r}"] = _interval(m.get("vs_init"))
        for other, interval in (m.get("vs_others") or {}).items():
            figures[f"tradeoff_{r}_vs_{other}"] = _interval(interval)
    return {"front": str(front_dir), "policies": policies, "figures": {k: v for k, v in figures.items() if v},
            "selection": summary.get("selection", {}), "n_examples": unc.get("n_examples"),
            "bootstrap": {k: unc.get(k) for k in ("method", "n_boot", "level")}}


# (figure key pattern, the sentence's subject, positive verdict, negative verdict)
CLAIMS = [
    ("hv_rs_minus_morl", "hypervolume RS - MORL", "RS above MORL", "RS below MORL"),
    ("hv_rs_minus_init", "hypervolume RS - init", "RS above the init", "RS below the init"),
    ("lmc_mean_{r}", "LMC gap on {r}, mean over lambda", "above the chord", "below the chord"),
    ("lmc_min_{r}", "LMC gap on {r}, worst lambda", "above the chord", "below the chord"),
    ("gain_over_init_{r}", "{r} expert - init, on {r}", "the expert beats the init", "the expert is below the init"),
    ("tradeoff_{r}_vs_{o}", "{r} expert - {o} expert, on {r}", "trade-off holds", "trade-off reversed"),
]


def build_report(out: Path, rewards: list[str], replicates: int) -> dict:
    """Collect the per-replicate and pooled figures and their verdicts (also written to `<out>/report.json`)."""
    reps = [replicate_figures(out / f"rep{r}" / "front", rewards) for r in range(replicates)]
    pooled, claims = {}, []
    keys = []
    for pattern, subject, pos, neg in CLAIMS:
        for r in rewards if "{r}" in pattern else [None]:
            for o in [o for o in rewards if o != r] if "{o}" in pattern else [None]:
                keys.append((pattern.format(r=r, o=o), subject.format(r=r, o=o), pos, neg))
    for key, subject, pos, neg in keys:
        per_rep = [rep["figures"].get(key) for rep in reps]
        if any(v is None for v in per_rep):
            continue
        pooled[key] = across_replicates([v["value"] for v in per_rep])
        verdicts = [verdict(v, pos, neg, level=LEVEL) for v in per_rep]
        claims.append({
            "figure": key, "subject": subject, "labels": [pos, neg], "per_replicate": per_rep,
            "per_replicate_verdicts": verdicts, "pooled": pooled[key],
            "pooled_verdict": verdict(pooled[key], pos, neg, level=LEVEL) if pooled[key]["low"] is not None
            else "one replicate: no interval across replicates",
            "holds_in_every_replicate": all(v == pos for v in verdicts),
        })
    policies = {}
    for label in reps[0]["policies"]:
        policies[label] = {r: across_replicates([rep["policies"][label][r]["value"] for rep in reps
                                                 if label in rep["policies"]]) for r in rewards}
    timings = load_timings(out)
    trainings = [s for s in timings.values() if s.get("trains")]
    return {
        "rewards": rewards, "replicates": reps, "pooled_policies": policies, "claims": claims,
        "intervals": {"within_replicate": reps[0]["bootstrap"], "across_replicates":
                      f"Student t, {int(LEVEL * 100)} %, over {replicates} replicate means"},
        "compute": {"trainings": len(trainings),
                    "training_cpu_minutes": round(sum(s.get("cpu_seconds") or 0 for s in trainings) / 60, 2),
                    "all_stage_wall_minutes": round(sum(s.get("seconds") or 0 for s in timings.values()) / 60, 2)},
        "outputs": {f"rep{r}": str(out / f"rep{r}" / "front") for r in range(replicates)},
    }


def _cell(entry: dict) -> str:
    if entry.get("value") is None:
        return "n/a"
    if entry.get("low") is None:
        return f"{entry['value']:+.3f}"
    return f"{entry['value']:+.3f} [{entry['low']:+.3f}, {entry['high']:+.3f}]"


def format_report(report: dict) -> str:
    rewards, reps = report["rewards"], report["replicates"]
    width = max(len(p) for p in report["pooled_policies"]) + 2
    lines = ["", f"test rewards: mean over {len(reps)} replicate(s) [95 % t-interval across replicates]",
             "policy".ljust(width) + "".join(f"{r:>28}" for r in rewards)]
    for label, per_reward in report["pooled_policies"].items():
        lines.append(label.ljust(width) + "".join(f"{_cell(per_reward[r]):>28}" for r in rewards))
    lines.append("")
    lines.append("claims: per replicate value [95 % bootstrap over test examples] -> verdict; then pooled")
    for c in report["claims"]:
        per = "; ".join(f"r{i} {_cell(v)} {v_}" for i, (v, v_) in enumerate(zip(c["per_replicate"],
                                                                               c["per_replicate_verdicts"])))
        lines.append(f"- {c['subject']}: {per}")
        lines.append(f"    pooled {_cell(c['pooled'])}: {c['pooled_verdict']}"
                     f"{'' if c['holds_in_every_replicate'] else ' (not in every replicate)'}")
    comp = report["compute"]
    lines.append(f"compute: {comp['trainings']} trainings, {comp['training_cpu_minutes']:.1f} CPU min of training, "
                 f"{comp['all_stage_wall_minutes']:.1f} min of stage wall time (stages ran concurrently)")
    plot = "front.png" if len(report["rewards"]) == 2 else "radar.png"  # rs_lightning/front/plots.py plot_all
    lines.append("fronts: " + ", ".join(f"{k}/{plot}" for k in report["outputs"].values()))
    return "\n".join(lines)


def format_markdown(report: dict) -> str:
    """The same report as Markdown tables (written to report.md, pasted into READMEs as it is)."""
    rewards, reps = report["rewards"], report["replicates"]
    lines = [f"Test rewards, mean over {len(reps)} replicates [95 % Student-t interval across replicates]:", "",
             "| policy | " + " | ".join(rewards) + " |", "|---|" + "---|" * len(rewards)]
    for label, per_reward in report["pooled_policies"].items():
        lines.append(f"| {label} | " + " | ".join(_cell(per_reward[r]) for r in rewards) + " |")
    lines += ["", "Claims: each replicate's value [95 % paired bootstrap over its test examples], and the mean over "
              "replicates [95 % Student-t]; verdicts read off the intervals:", "",
              "| figure | " + " | ".join(f"replicate {i}" for i in range(len(reps))) + " | pooled | verdict |",
              "|---|" + "---|" * (len(reps) + 2)]
    for c in report["claims"]:
        every = "" if c["holds_in_every_replicate"] else " (not in every replicate)"
        lines.append(f"| {c['subject']} | " + " | ".join(_cell(v) for v in c["per_replicate"])
                     + f" | {_cell(c['pooled'])} | {c['pooled_verdict']}{every} |")
    return "\n".join(lines) + "\n"
