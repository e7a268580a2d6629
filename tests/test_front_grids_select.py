"""Grids (sweep, lattice, extrapolation, errors), LMC gaps, preference selection and the row store."""

import json

import numpy as np
import pytest

from rs_lightning.front import FrontError, GridSpec, build_grid, lattice_grid, lmc_gaps, select_lambda
from rs_lightning.front.lmc import summarise_gaps
from rs_lightning.front.rows import RowStore, read_rows
from rs_lightning.front.select import preference_report
from rs_lightning.soup import SoupError


def test_default_sweep_is_11_points_from_expert_1_to_expert_2():
    grid = build_grid(GridSpec(), 2)
    assert len(grid) == 11
    assert grid[0] == [1.0, 0.0] and grid[-1] == [0.0, 1.0]  # lam = weight of the SECOND expert
    assert [w[1] for w in grid] == [i / 10 for i in range(11)]


def test_extrapolated_sweep_needs_the_flag():
    spec = GridSpec(points=5, low=-0.5, high=1.5)
    with pytest.raises(SoupError, match="allow_extrapolation"):
        build_grid(spec, 2)
    grid = build_grid(spec, 2, allow_extrapolation=True)
    assert [w[1] for w in grid] == [-0.5, 0.0, 0.5, 1.0, 1.5]
    assert grid[0] == [1.5, -0.5]


def test_lattice_counts_and_extrapolated_lattice():
    grid = build_grid(GridSpec(m=4), 3)  # auto -> lattice for 3 experts; plus the uniform soup
    assert len(grid) == 15 + 1
    assert grid[-1] == pytest.approx([1 / 3] * 3)
    assert all(abs(sum(w) - 1) < 1e-12 and min(w) >= 0 for w in grid)
    two = lattice_grid(2, 4, low=-0.5)
    assert [w[1] for w in two] == [-0.5, 0.0, 0.5, 1.0, 1.5]
    three = lattice_grid(3, 2, low=-0.25)
    assert min(min(w) for w in three) == -0.25 and all(abs(sum(w) - 1) < 1e-12 for w in three)


def test_uniform_point_is_added_once():
    assert len(build_grid(GridSpec(points=11), 2)) == 11  # 0.5 already there
    assert [0.5, 0.5] in build_grid(GridSpec(points=4), 2)
    assert len(build_grid(GridSpec(points=4, include_uniform=False), 2)) == 4


def test_grid_errors():
    with pytest.raises(FrontError, match="empty"):
        build_grid(GridSpec(kind="explicit", weights=[]), 2)
    with pytest.raises(FrontError, match="empty"):
        build_grid(GridSpec(points=0), 2)
    with pytest.raises(FrontError, match="exactly 2 experts"):
        build_grid(GridSpec(kind="sweep"), 3)
    with pytest.raises(SoupError, match="sum to"):
        build_grid(GridSpec(kind="explicit", weights=[[0.5, 0.6]]), 2)
    with pytest.raises(SoupError, match="3 weights for 2"):
        build_grid(GridSpec(kind="explicit", weights=[[0.2, 0.3, 0.5]]), 2)
    with pytest.raises(FrontError, match="kind"):
        build_grid(GridSpec(kind="random"), 2)


def test_lmc_gaps_formula_and_summary():
    experts = np.array([[1.0, -2.0], [-2.0, 1.0]])
    w = np.array([[0.5, 0.5], [0.9, 0.1]])
    soups = np.array([[0.25, 0.25], [0.97, -1.43]])
    gaps = lmc_gaps(w, soups, experts)
    np.testing.assert_allclose(gaps, [[0.75, 0.75], [0.97 - 0.7, -1.43 + 1.7]])
    s = summarise_gaps(gaps, ["a", "b"])
    assert s["a"]["min"] == pytest.approx(0.27) and s["a"]["above_chord_fraction"] == 1.0
    with pytest.raises(ValueError, match="shape"):
        lmc_gaps(w, soups, experts[:1])


def test_select_lambda_ties_nan_and_errors():
    w = [[1, 0], [0.5, 0.5], [0, 1], [0.3, 0.7]]
    r = [[1, 0], [0.6, 0.6], [0, 1], [np.nan, 9]]
    sel = select_lambda(w, r, [0.5, 0.5])
    assert sel.weights == [0.5, 0.5] and sel.score == pytest.approx(0.6)  # the NaN row is skipped
    assert select_lambda(w, r, [2, 0]).index == 0  # mu is normalised
    assert select_lambda([[1, 0], [0, 1]], [[1, 1], [1, 1]], [0.5, 0.5]).index == 0  # ties: first row
    with pytest.raises(ValueError, match="one per reward"):
        select_lambda(w, r, [1.0])
    with pytest.raises(ValueError, match=">= 0"):
        select_lambda(w, r, [-1, 2])


def test_preference_report_against_lambda_eq_mu_and_morl():
    w = [[1, 0], [0.75, 0.25], [0.5, 0.5], [0, 1]]
    r = [[1, 0], [0.9, 0.5], [0.6, 0.6], [0, 1]]
    (entry,) = preference_report(w, r, [[0.5, 0.5]], morl=[([0.5, 0.5], [0.8, 0.8])])
    assert entry["lambda_star"] == [0.75, 0.25]
    assert entry["lambda_eq_mu_score"] == pytest.approx(0.6)
    assert entry["regret_lambda_eq_mu"] == pytest.approx(0.1)
    assert entry["morl_score"] == pytest.approx(0.8) and entry["rs_minus_morl"] == pytest.approx(-0.1)


def test_row_store_drops_a_cut_line_and_refuses_another_config(tmp_path):
    path = tmp_path / "front.jsonl"
    store = RowStore(path, "h1")
    store.append({"kind": "soup", "name": "a", "weights": [0.5, 0.5], "rewards": {"r": 1.0}})
    with open(path, "a") as f:
        f.write('{"kind": "soup", "name": "b", "wei')  # a kill in the middle of a write
    store = RowStore(path, "h1")
    assert [r["name"] for r in store.rows] == ["a"]
    assert not path.read_text().endswith("\n")  # opening only reads: the next append cuts the line
    store.append({"kind": "soup", "name": "b", "weights": [0.2, 0.8], "rewards": {"r": None}})
    assert [r["name"] for r in read_rows(path)] == ["a", "b"] and path.read_text().count("\n") == 2
    with pytest.raises(ValueError):  # non-finite values never reach the file (allow_nan=False)
        store.append({"kind": "x", "name": "y", "weights": None, "v": float("nan")})
    assert [json.loads(line)["name"] for line in path.read_text().splitlines()] == ["a", "b"]
    with pytest.raises(FrontError, match="--overwrite"):
        RowStore(path, "h2")
    assert RowStore(path, "h2", overwrite=True).rows == []
