"""Which merge method gives the best front? linear / fisher / ties / dare_ties / prediction ensembles.

For each method, `rs front` sweeps the same experts and grid with `front.method` set (theta_0 = the shared init;
Fisher files from the toy's closed form or from `rs fisher`), and the fronts are compared on the SAME test
examples: one paired bootstrap (1000 draws over the test examples, shared by every method's points) gives each
method's hypervolume of "experts + soups" (normalised with the sweep's fixed ranges and reference point) and its
difference to the linear soup, with 95 % percentile intervals; LMC gaps (soup minus chord, mean over lambda) per
reward come from summary.json. On the demo task the linear sweep also evaluates the token-level mixtures of the
experts' predictions at every lambda (front.ensemble: N forward passes per token), the functional-ensembling
baseline. On the quadratic toy the rewards are deterministic (no interval) and Fisher
averaging is exact (Matena & Raffel 2022: the Fisher is the Hessian of a Gaussian log-likelihood).

    .venv/bin/python benchmarks/bench_front_methods.py --toy                       # seconds
    .venv/bin/python benchmarks/bench_front_methods.py --demo runs/demo/captioning --replicate 0   # minutes

Writes <out>/methods.md (the table) and <out>/methods.png (the fronts). Under pytest (`make bench`) the toy study
runs and its table goes into extra_info; the demo study needs a finished `make demo`.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import sys
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
METHODS = {"linear": {}, "fisher": {}, "ties": {}, "dare_ties": {}}
N_BOOT, LEVEL, SEED = 1000, 0.95, 0


def _rs(*argv) -> None:
    from rs_lightning.cli import main

    with contextlib.redirect_stdout(io.StringIO()):
        code = main([str(a) for a in argv])
    if code != 0:
        raise SystemExit(f"rs {' '.join(map(str, argv[:3]))} ... failed with exit code {code}")


def sweep(config: dict, method: str, out: Path, fisher: list[str] | None, ensemble: bool = False
          ) -> tuple[list[dict], dict]:
    """Run one method's sweep (resumable) and return its rows and summary; the linear sweep also evaluates the
    prediction ensembles when `ensemble` (front.ensemble)."""
    cfg = copy.deepcopy(config)
    cfg["front"]["method"] = {"name": method, "options": METHODS[method],
                              "fisher": fisher if method == "fisher" else []}
    cfg["front"]["ensemble"] = ensemble and method == "linear"
    cfg["front"]["out_dir"] = str(out / method)
    cfg["front"].pop("morl", None)
    path = out / f"{method}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    _rs("front", "--config", path, "--no-progress")
    rows = [json.loads(line) for line in (out / method / "front.jsonl").read_text().splitlines()]
    return rows, json.loads((out / method / "summary.json").read_text())


def compare(results: dict[str, tuple[list[dict], dict]], names: list[str]) -> list[dict]:
    """Per method: HV of experts + soups and HV minus linear's, one paired bootstrap for all methods."""
    from rs_lightning.front.summary import on_simplex
    from rs_lightning.front.uncertainty import (
        bootstrap_indices,
        hypervolume_draws,
        interval,
        per_example_array,
        resampled_means,
    )

    _, lin_summary = results["linear"]
    norm = lin_summary["normalisation"]
    low, high = np.asarray(norm["nadir"], float), np.asarray(norm["ideal"], float)
    ref = np.asarray(lin_summary["reference_point"]["normalised"], float)
    table, draws = [], {}
    entries = [(m, rows, summary, ("expert", "soup")) for m, (rows, summary) in results.items()]
    lin_rows = results["linear"][0]
    if any(r["kind"] == "ensemble" for r in lin_rows):
        entries.append(("ensemble", lin_rows, {}, ("expert", "ensemble")))
    for method, rows, summary, kinds in entries:
        idx = [i for i, r in enumerate(rows) if r["kind"] in kinds and on_simplex(r["weights"])]
        values = np.asarray([[rows[i]["rewards"][n] for n in names] for i in idx])
        z = (values - low) / (high - low)
        hv = float(hypervolume_draws(z[None], ref[None])[0])
        x, why = per_example_array(rows, idx, names)
        if x is not None:
            boot = bootstrap_indices(x.shape[1], N_BOOT, SEED)
            zb = (resampled_means(x, boot) - low) / (high - low)
            draws[method] = hypervolume_draws(zb, np.broadcast_to(ref, (N_BOOT, len(ref))))
        lmc = (summary.get("lmc") or {}).get("per_reward") or {}
        table.append({"method": method, "hv": hv, "hv_interval": interval(draws[method], hv, LEVEL)
                      if method in draws else None,
                      "lmc_mean": {n: lmc.get(n, {}).get("mean") for n in names},
                      "soup_seconds": float(np.mean([r["seconds"] for r in rows if r["kind"] == kinds[1]]))})
    base = next(t for t in table if t["method"] == "linear")
    for t in table:
        t["minus_linear"] = t["hv"] - base["hv"]
        if t["method"] in draws and "linear" in draws:
            t["minus_linear_interval"] = interval(draws[t["method"]] - draws["linear"], t["minus_linear"], LEVEL)
    return table


def markdown(table: list[dict], names: list[str], title: str) -> str:
    def iv(d):
        return f"{d['value']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]" if d else "-"

    lines = [f"### {title}", "", "| method | HV (experts + its points) | HV − linear | "
             + " | ".join(f"LMC gap {n}, mean" for n in names) + " | s per point |",
             "|---|---|---|" + "---|" * len(names) + "---|"]
    for t in table:
        hv = iv(t["hv_interval"]) if t["hv_interval"] else f"{t['hv']:.4f}"
        diff = iv(t.get("minus_linear_interval")) if t.get("minus_linear_interval") else f"{t['minus_linear']:+.4f}"
        gaps = " | ".join("-" if t["lmc_mean"][n] is None else f"{t['lmc_mean'][n]:+.4f}" for n in names)
        lines.append(f"| {t['method']} | {hv} | {diff} | {gaps} | {t['soup_seconds']:.2f} |")
    return "\n".join(lines) + "\n"


def plot(results, names, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 5.0))
    curves = [(m, rows, "soup") for m, (rows, _) in results.items()]
    if any(r["kind"] == "ensemble" for r in results["linear"][0]):
        curves.append(("ensemble", results["linear"][0], "ensemble"))
    for method, rows, kind in curves:
        pts = sorted((r for r in rows if r["kind"] in ("expert", kind)), key=lambda r: r["weights"][-1])
        pts = [(r["rewards"][names[0]], r["rewards"][names[1]]) for r in pts
               if r["kind"] == kind or method in ("linear", "ensemble")]
        ax.plot(*zip(*pts), marker="^" if kind == "ensemble" else "o", ms=3, ls=":" if kind == "ensemble" else "-",
                label="prediction ensemble" if kind == "ensemble" else method)
    rows = results["linear"][0]
    for r in rows:
        if r["kind"] in ("expert", "init"):
            ax.scatter(r["rewards"][names[0]], r["rewards"][names[1]], marker="*" if r["kind"] == "init" else "D",
                       s=80, color="black", zorder=5)
            ax.annotate(r["name"], (r["rewards"][names[0]], r["rewards"][names[1]]), fontsize=8)
    ax.set_xlabel(f"{names[0]} (higher is better)")
    ax.set_ylabel(f"{names[1]} (higher is better)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def toy_study(out: Path) -> tuple[list[dict], str]:
    from rs_lightning.tasks.toy import quadratic

    cfg = yaml.safe_load((REPO / "configs" / "front" / "quadratic.yaml").read_text())
    ck = out / "ckpt"
    module = quadratic.QuadraticRewards(**cfg["model"]["init_args"])
    experts = [str(ck / f"expert_{n}.safetensors") for n in ("r1", "r2")]
    quadratic.write_checkpoints(module, experts, str(ck / "init.safetensors"), [])
    fisher = []
    for i in range(2):
        fisher.append(str(ck / f"fisher_{i}.safetensors"))
        quadratic.write_fisher(module, i, fisher[-1])
    cfg["front"].update(experts=[{"path": e, "name": n} for e, n in zip(experts, ("r1", "r2"))],
                        init={"path": str(ck / "init.safetensors"), "name": "init"})
    names = cfg["front"]["summary"]["rewards"]
    results = {m: sweep(cfg, m, out, fisher) for m in METHODS}
    table = compare(results, names)
    text = markdown(table, names, "Quadratic toy (configs/front/quadratic.yaml, 11 lambda, exact Fisher)")
    plot(results, names, out / "methods.png", "Quadratic toy: fronts by merge method")
    return table, text


def demo_study(demo: Path, replicate: int, out: Path, samples: int) -> tuple[list[dict], str]:
    cfg = yaml.safe_load((demo / "configs" / f"r{replicate}-front.yaml").read_text())
    names = cfg["front"]["summary"]["rewards"]
    fisher = []
    for expert in cfg["front"]["experts"]:
        path = out / f"fisher_{expert['name']}.safetensors"
        if not path.exists():
            train_cfg = demo / "configs" / f"r{replicate}-expert-{expert['name']}.yaml"
            _rs("fisher", "--config", train_cfg, "--ckpt", expert["path"], "--out", path, "--samples", samples,
                "--progress", "false")
        fisher.append(str(path))
    results = {m: sweep(cfg, m, out, fisher, ensemble=True) for m in METHODS}
    table = compare(results, names)
    n = len(results["linear"][0][0].get("per_example", {}).get(names[0], []))
    text = markdown(table, names, f"Captioning demo, replicate {replicate} ({n} test images, greedy; Fisher from "
                                  f"{samples} training images per expert)")
    plot(results, names, out / "methods.png", f"Captioning demo, replicate {replicate}: fronts by merge method")
    return table, text


def pooled_markdown(tables: dict[int, list[dict]], title: str) -> str:
    """HV − linear per replicate [paired bootstrap] and across replicates [Student t], per method."""
    from rs_lightning.demo.report import across_replicates

    reps = sorted(tables)
    methods = [t["method"] for t in tables[reps[0]] if t["method"] != "linear"]

    def cell(d):
        return f"{d['value']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]"

    lines = [f"### {title}", "", "| HV − linear | " + " | ".join(f"replicate {r}" for r in reps) + " | pooled |",
             "|---|" + "---|" * (len(reps) + 1)]
    for m in methods:
        per = [next(t for t in tables[r] if t["method"] == m) for r in reps]
        cells = [cell(t["minus_linear_interval"]) if t.get("minus_linear_interval") else f"{t['minus_linear']:+.4f}"
                 for t in per]
        pooled = across_replicates([t["minus_linear"] for t in per])
        pooled_cell = cell(pooled) if pooled.get("low") is not None else f"{pooled['value']:+.4f}"
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {pooled_cell} |")
    return "\n".join(lines) + "\n"


def test_front_methods_on_the_toy(benchmark, tmp_path):
    table, text = benchmark.pedantic(toy_study, args=(tmp_path,), rounds=1, iterations=1)
    benchmark.extra_info["table"] = text
    by = {t["method"]: t for t in table}
    assert by["linear"]["minus_linear"] == 0.0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--toy", action="store_true", help="the quadratic toy (seconds)")
    what.add_argument("--demo", type=Path, help="a finished demo folder, e.g. runs/demo/captioning")
    p.add_argument("--replicate", type=int, nargs="+", default=[0],
                   help="demo replicates to study; with several, HV − linear is also pooled across them")
    p.add_argument("--samples", type=int, default=64, help="rs fisher examples per expert (demo)")
    p.add_argument("--out", type=Path, default=None, help="default runs/front_methods/<toy|demo-rR>")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    # The models are tiny: one thread (a second OpenMP thread on a shared 2-core machine turns each op into a
    # scheduler wait; the demo's stages run single-threaded for the same reason).
    torch.set_num_threads(args.threads)
    if args.toy:
        out = args.out or Path("runs/front_methods") / "toy"
        out.mkdir(parents=True, exist_ok=True)
        studies = {None: (out, *toy_study(out))}
    else:
        studies = {}
        for r in args.replicate:
            out = (args.out or Path("runs/front_methods")) / f"demo-r{r}"
            out.mkdir(parents=True, exist_ok=True)
            studies[r] = (out, *demo_study(args.demo, r, out, args.samples))
    for out, table, text in studies.values():
        (out / "methods.md").write_text(text)
        (out / "methods.json").write_text(json.dumps(table, indent=2))
        print(text)
        print(f"plot: {out / 'methods.png'}")
    if len(studies) > 1:
        text = pooled_markdown({r: t for r, (_, t, _) in studies.items()},
                               f"HV − linear across demo replicates {', '.join(map(str, studies))}")
        (args.out or Path("runs/front_methods")).joinpath("methods_pooled.md").write_text(text)
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
