"""Paired-bootstrap intervals of a front (rs_lightning.front.uncertainty), the normalisation choices and the
validation-row selection, checked against a plain-loop float64 reference on awkward sizes."""


import numpy as np
import pytest

from rs_lightning.front import FrontError, SummarySettings, build_summary
from rs_lightning.front.lmc import lmc_gaps
from rs_lightning.front.metrics import Normalisation, hypervolume
from rs_lightning.front.per_example import interleave_ranks
from rs_lightning.front.select import TEST_NOTE
from rs_lightning.front.uncertainty import (
    bootstrap_indices,
    hypervolume_draws,
    resampled_means,
    verdict,
)


def make_rows(k=2, n=37, seed=0, soups=(0.25, 0.5, 0.75), noise=0.4, morl=True, init=True):
    """2 (or k) experts, soups, init and MORL with per-example rewards whose noise differs per point."""
    rng = np.random.default_rng(seed)
    names = [f"r{i + 1}" for i in range(k)]
    shared = rng.normal(0, noise, size=(n, k))  # the example's difficulty: common to every point (pairing)

    def row(kind, name, w, mu, base):
        x = base[None, :] + shared + rng.normal(0, noise / 2, size=(n, k))
        means = dict(zip(names, x.mean(0).tolist()))
        return {"kind": kind, "name": name, "weights": w, "mu": mu, "rewards": means, "val_rewards": dict(means),
                "per_example": {nm: x[:, j].tolist() for j, nm in enumerate(names)}}

    rows = [row("expert", f"e{i + 1}", np.eye(k)[i].tolist(), None, 1.0 + np.eye(k)[i]) for i in range(k)]
    for lam in soups:
        w = [1 - lam, lam] if k == 2 else [(1 - lam) / (k - 1)] * (k - 1) + [lam]
        rows.append(row("soup", f"lam={lam:g}", w, None, 1.0 + np.sqrt(np.asarray(w)) * 0.9))
    if init:
        rows.append(row("init", "init", None, None, np.full(k, 0.7)))
    if morl:
        rows.append(row("morl", "morl", None, [1 / k] * k, np.full(k, 1.5)))
    return rows, names


def reference(rows, names, s: SummarySettings):
    """Plain loops in float64: every replicate's means, normalisation, hypervolumes, LMC gaps and margins."""
    n = len(rows[0]["per_example"][names[0]])
    idx = bootstrap_indices(n, s.n_boot, s.boot_seed)
    kinds = [r["kind"] for r in rows]
    experts = [i for i, k in enumerate(kinds) if k == "expert"]
    soups = [i for i, k in enumerate(kinds) if k == "soup"]
    init = kinds.index("init") if "init" in kinds else None
    groups = {"rs": experts + soups, "morl": [i for i, k in enumerate(kinds) if k == "morl"], "experts": experts,
              "init": [init] if init is not None else []}

    def stats(means):  # means: (P, K) of one replicate
        if s.nadir_from == "init":
            lo = means[init]
        elif s.nadir is not None:
            lo = np.asarray(s.nadir)
        else:
            lo = means.min(0)
        hi = np.asarray(s.ideal) if s.ideal is not None else means.max(0)
        lo = np.where(hi > lo, lo, hi - 1.0)
        norm = Normalisation(tuple(hi), tuple(lo))
        z = norm.apply(means)
        ref = norm.apply([s.reference])[0] if s.reference is not None else np.full(len(names), -s.ref_margin)
        out = {}
        for g, members in groups.items():
            if members:
                out[("hv", g)] = hypervolume(z[members], ref)
        for g in ("morl", "experts", "init"):
            if groups[g]:
                out[("hv", f"rs_minus_{g}")] = out[("hv", "rs")] - out[("hv", g)]
        w = np.asarray([rows[i]["weights"] for i in soups])
        gaps = lmc_gaps(w, means[soups], means[experts])
        for k, name in enumerate(names):
            out[("lmc", name, "mean")] = gaps[:, k].mean()
            out[("lmc", name, "min")] = gaps[:, k].min()
            if init is not None:
                out[("margin", name, "vs_init")] = means[experts[k], k] - means[init, k]
            for j, e in enumerate(experts):
                if j != k:
                    out[("margin", name, rows[e]["name"])] = means[experts[k], k] - means[e, k]
        return out

    x = np.asarray([[r["per_example"][nm] for nm in names] for r in rows]).transpose(0, 2, 1)  # (P, n, K)
    draws_means = []
    draws = {}
    for b in range(s.n_boot):
        means = np.asarray([[np.mean([x[p, j, k] for j in idx[b]]) for k in range(len(names))]
                            for p in range(len(rows))])
        draws_means.append(means)
        for key, v in stats(means).items():
            draws.setdefault(key, []).append(v)
    values = stats(x.mean(1))
    a = (1 - s.level) / 2
    iv = {key: (values[key], *np.quantile(np.asarray(d), [a, 1 - a])) for key, d in draws.items()}
    pts = np.quantile(np.asarray(draws_means), [a, 1 - a], axis=0)
    return iv, pts, x.mean(1)


def _check(unc, iv, pts, full, rows, names):
    for p, r in enumerate(rows):
        for k, name in enumerate(names):
            got = unc["points"][r["name"]][name]
            assert [got["value"], got["low"], got["high"]] == pytest.approx([full[p, k], pts[0, p, k], pts[1, p, k]],
                                                                           rel=1e-9, abs=1e-12)
    seen = 0
    for key, (v, lo, hi) in iv.items():
        if key[0] == "hv":
            got = unc["hypervolume"][key[1]]
        elif key[0] == "lmc":
            got = unc["lmc"][key[1]][key[2]]
        elif key[2] == "vs_init":
            got = unc["expert_margins"][key[1]]["vs_init"]
        else:
            got = unc["expert_margins"][key[1]]["vs_others"][key[2]]
        assert [got["value"], got["low"], got["high"]] == pytest.approx([v, lo, hi], rel=1e-9, abs=1e-12), key
        seen += 1
    n_unc = (len(unc["hypervolume"]) + sum(len(v) for v in unc["lmc"].values())
             + sum(("vs_init" in m) + len(m["vs_others"]) for m in unc["expert_margins"].values()))
    assert seen == n_unc  # nothing in the summary that the reference does not check


@pytest.mark.parametrize("k, settings", [
    (2, {}),                                                           # data min/max
    (2, {"ideal": [2.5, 2.5], "nadir": [0.0, 0.0]}),                   # config
    (2, {"nadir_from": "init"}),                                        # the paper's: init as nadir, data ideal
    (2, {"nadir_from": "worst", "ideal": [2.5, 2.6], "reference": [0.1, 0.2]}),
    (3, {"nadir_from": "init", "level": 0.9}),                          # d = 3: the sliced hypervolume
])
def test_bootstrap_equals_a_plain_loop_reference(k, settings):
    rows, names = make_rows(k=k, n=37)
    s = SummarySettings(n_boot=53, boot_seed=3, **settings)
    summary = build_summary(rows, s)
    unc = summary["uncertainty"]
    assert {key: unc[key] for key in ("method", "n_boot", "level", "seed", "n_examples")} == {
        "method": "paired bootstrap over test examples (percentile intervals)", "n_boot": 53,
        "level": s.level, "seed": 3, "n_examples": 37}
    assert set(unc["hypervolume"]) == {"rs", "morl", "experts", "init", "rs_minus_morl", "rs_minus_experts",
                                       "rs_minus_init"}
    iv, pts, full = reference(rows, names, s)
    _check(unc, iv, pts, full, rows, names)
    # The full-sample values are the summary's own point estimates.
    for g in ("rs", "morl", "experts", "init", "rs_minus_morl"):
        assert unc["hypervolume"][g]["value"] == pytest.approx(summary["hypervolume"][g], rel=1e-9)
    assert unc["lmc"]["r1"]["mean"]["value"] == pytest.approx(summary["lmc"]["per_reward"]["r1"]["mean"], rel=1e-9)


def test_paired_draws_share_example_indices_across_points():
    rows, names = make_rows(n=41)
    base = np.asarray(rows[0]["per_example"]["r1"])
    rows[1]["per_example"]["r1"] = (base - 0.5).tolist()  # expert 2 = expert 1 - 0.5 on every example
    rows[1]["rewards"]["r1"] = float(np.mean(base - 0.5))
    unc = build_summary(rows, SummarySettings(n_boot=200))["uncertainty"]
    margin = unc["expert_margins"]["r1"]["vs_others"]["e2"]
    # Paired: every replicate resamples the same examples for both points, so the difference never moves.
    assert margin["low"] == pytest.approx(0.5, abs=1e-12) and margin["high"] == pytest.approx(0.5, abs=1e-12)
    e1 = unc["points"]["e1"]["r1"]
    assert e1["high"] - e1["low"] > 0.1  # while each point on its own is uncertain


def test_hypervolume_draws_is_the_exact_hypervolume_of_each_replicate():
    rng = np.random.default_rng(1)
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_front_metrics import hv_inclusion_exclusion  # an independent exact reference

    for d, m in ((1, 5), (2, 9), (3, 7), (4, 6), (5, 6)):
        z = rng.uniform(-0.2, 1.0, size=(11, m, d))
        z[:, 1] = z[:, 0]  # duplicates
        z[:, 2, 0] = -0.5  # below the reference on one reward
        ref = rng.uniform(-0.15, 0.05, size=(11, d))
        got = hypervolume_draws(z, ref)
        want = [hv_inclusion_exclusion(z[b], ref[b]) for b in range(11)]
        assert got == pytest.approx(want, rel=1e-12, abs=1e-15)
        assert got == pytest.approx([hypervolume(z[b], ref[b]) for b in range(11)], rel=1e-12, abs=1e-15)


def test_resampled_means_count_each_drawn_example():
    x = np.random.default_rng(2).normal(size=(3, 7, 2))
    idx = bootstrap_indices(7, 5, seed=4)
    assert idx.shape == (5, 7) and idx.min() >= 0 and idx.max() < 7
    expected = np.stack([x[:, row, :].mean(axis=1) for row in idx])
    assert resampled_means(x, idx) == pytest.approx(expected, rel=1e-12)


def test_verdict_labels_follow_the_interval_and_level():
    assert verdict({"value": 1, "low": 0.1, "high": 2}) == "above"
    assert verdict({"value": -1, "low": -2, "high": -0.1}, "RS wins", "MORL wins") == "MORL wins"
    assert verdict({"value": 0.3, "low": -0.1, "high": 0.5}) == "indistinguishable at 95 %"
    assert verdict({"value": 0.3, "low": 0.0, "high": 0.5}, level=0.9) == "indistinguishable at 90 %"


def test_verdicts_come_from_the_intervals():
    rows, names = make_rows(n=60, noise=0.05)
    summary = build_summary(rows, SummarySettings(n_boot=300))
    unc, v = summary["uncertainty"], summary["verdicts"]
    assert v["rs_vs_morl"] == verdict(unc["hypervolume"]["rs_minus_morl"])
    assert v["lmc"] == {n: verdict(unc["lmc"][n]["mean"]) for n in names}
    assert v["experts"]["r1"] == {"vs_init": "above", "vs_others": "above"}  # expert 1 leads r1 by 1.0
    # Same rows, far noisier examples: the same claims become undecidable.
    noisy, _ = make_rows(n=8, noise=20.0)
    assert build_summary(noisy, SummarySettings(n_boot=300))["verdicts"]["experts"]["r1"]["vs_others"] == \
        "indistinguishable at 95 %"


def test_unequal_numbers_of_examples_are_an_error():
    rows, _ = make_rows(n=9)
    rows[2]["per_example"] = {k: v[:-1] for k, v in rows[2]["per_example"].items()}
    with pytest.raises(FrontError, match="different lengths.*lam=0.25"):
        build_summary(rows)


def test_rows_without_per_example_values_say_there_are_no_intervals():
    rows, _ = make_rows()
    for r in rows:
        del r["per_example"]
    summary = build_summary(rows)
    assert "no per-example rewards" in summary["uncertainty"]["skipped"]
    assert summary["verdicts"] == {"skipped": "no intervals"}
    rows[0]["per_example"] = {"r1": [1.0], "r2": [1.0]}  # only some rows: no intervals either, said which
    assert "e2" in build_summary(rows)["uncertainty"]["skipped"]


def test_bootstrap_of_13_points_200_examples_1000_draws_runs():
    # Its speed is measured in benchmarks/bench_front.py, not asserted here.
    rows, _ = make_rows(n=200, soups=[i / 10 for i in range(1, 10)])
    assert len(rows) == 13
    summary = build_summary(rows, SummarySettings(n_boot=1000))
    assert summary["uncertainty"]["n_boot"] == 1000


# ---- normalisation choices -----------------------------------------------------------------------------------

def test_nadir_from_init_and_worst():
    rows, names = make_rows()
    init = rows[5]
    s = build_summary(rows, SummarySettings(nadir_from="init", n_boot=0))["normalisation"]
    assert s["nadir_from"] == "init" and "init" in s["source"]
    assert s["nadir"] == pytest.approx([init["rewards"][n] for n in names])
    assert s["ideal"] == pytest.approx([max(r["rewards"][n] for r in rows) for n in names])
    s = build_summary(rows, SummarySettings(nadir_from="worst", ideal=[3.0, 3.0], n_boot=0))["normalisation"]
    assert s["nadir_from"] == "worst" and s["ideal"] == [3.0, 3.0]
    assert s["nadir"] == pytest.approx([min(r["rewards"][n] for r in rows) for n in names])
    s = build_summary(rows, SummarySettings(ideal=[3.0, 3.0], nadir=[0.0, 0.0], n_boot=0))["normalisation"]
    assert s["nadir_from"] == "config" and s["source"].startswith("config")
    assert build_summary(rows, SummarySettings(n_boot=0))["normalisation"]["nadir_from"] == "data"


def test_bad_normalisation_settings_are_clear():
    rows, _ = make_rows(init=False)
    with pytest.raises(FrontError, match="nadir_from: init needs the init row"):
        build_summary(rows, SummarySettings(nadir_from="init"))
    with pytest.raises(ValueError, match="summary.nadir is given but summary.nadir_from is 'init'"):
        build_summary(rows, SummarySettings(nadir_from="init", ideal=[1, 1], nadir=[0, 0]))
    with pytest.raises(ValueError, match="nadir_from: config needs both"):
        build_summary(rows, SummarySettings(nadir_from="config"))
    with pytest.raises(ValueError, match="nadir_from must be one of"):
        build_summary(rows, SummarySettings(nadir_from="median"))
    with pytest.raises(ValueError, match="select_on must be 'val' or 'test'"):
        build_summary(rows, SummarySettings(select_on="train"))
    with pytest.raises(ValueError, match="n_boot"):
        build_summary(rows, SummarySettings(n_boot=-1))
    rows, _ = make_rows()
    with pytest.raises(FrontError, match="no room between nadir and ideal on r1"):
        build_summary(rows, SummarySettings(nadir_from="init", ideal=[0.1, 5.0]))


# ---- selection on validation rows ------------------------------------------------------------------------------

def test_selection_reads_validation_rows_and_refuses_their_absence():
    rows, _ = make_rows()
    for r in rows:  # validation prefers the other end of the grid than test does
        r["val_rewards"] = {"r1": r["rewards"]["r2"], "r2": r["rewards"]["r1"]}
    sel = build_summary(rows, SummarySettings(preferences=[[1.0, 0.0]], n_boot=0))["selection"]
    assert sel["split"] == "val" and sel["preferences"][0]["lambda_star"] == [0.0, 1.0]
    assert sel["preferences"][0]["test_rewards_at_lambda_star"] == rows[1]["rewards"]
    sel = build_summary(rows, SummarySettings(preferences=[[1.0, 0.0]], select_on="test", n_boot=0))["selection"]
    assert sel["split"] == "test" and sel["note"] == TEST_NOTE
    assert sel["note"] == "selected on TEST rows (asked for explicitly): optimistic"
    assert sel["preferences"][0]["lambda_star"] == [1.0, 0.0]
    for r in rows:
        del r["val_rewards"]
    with pytest.raises(FrontError, match="no val_rewards: e1, e2, lam=0.25.*front.validate: true.*select_on: test"):
        build_summary(rows)


def test_ddp_shards_are_reinterleaved_into_dataloader_order():
    import torch

    # DistributedSampler, 2 ranks, 5 examples: rank 0 holds 0, 2, 4; rank 1 holds 1, 3 and a repeat of 0.
    gathered = torch.tensor([[10.0, 12.0, 14.0], [11.0, 13.0, 10.0]])
    assert interleave_ranks(gathered, 5).tolist() == [10.0, 11.0, 12.0, 13.0, 14.0]
    assert interleave_ranks(gathered, None).tolist() == [10.0, 11.0, 12.0, 13.0, 14.0, 10.0]


# ---- plots -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [2, 3])
def test_plots_draw_the_intervals_as_error_bars(tmp_path, monkeypatch, k):
    from matplotlib.axes import Axes

    from rs_lightning.front.summary import write_outputs

    calls = []
    original = Axes.errorbar

    def spy(self, x, y, *args, **kwargs):
        calls.append((np.atleast_1d(x), np.atleast_1d(y), kwargs))
        return original(self, x, y, *args, **kwargs)

    monkeypatch.setattr(Axes, "errorbar", spy)
    rows, names = make_rows(k=k, n=30)
    summary = write_outputs(tmp_path, rows, SummarySettings(n_boot=100))
    assert summary["plots"] == (["front.png"] if k == 2 else ["radar.png", "front_pairs.png"])
    assert calls, "no error bars drawn"
    if k == 2:
        x, y, kw = next(c for c in calls if np.isclose(c[0], rows[0]["rewards"]["r1"]).any())
        j = int(np.argmax(np.isclose(x, rows[0]["rewards"]["r1"])))
        iv = summary["uncertainty"]["points"]["e1"]
        assert kw["xerr"][:, j] == pytest.approx([rows[0]["rewards"]["r1"] - iv["r1"]["low"],
                                                  iv["r1"]["high"] - rows[0]["rewards"]["r1"]])
        assert kw["yerr"][:, j] == pytest.approx([rows[0]["rewards"]["r2"] - iv["r2"]["low"],
                                                  iv["r2"]["high"] - rows[0]["rewards"]["r2"]])
        assert sum(len(c[0]) for c in calls) == len(rows)  # every point carries its bars
    calls.clear()
    for r in rows:
        del r["per_example"]
    write_outputs(tmp_path, rows, SummarySettings(n_boot=100))
    assert not calls  # no intervals, no bars
