"""Front indicators: Pareto mask, exact hypervolume (hand cases, brute force, pymoo/botorch), IGD+, spacing."""

import itertools

import numpy as np
import pytest

from rs_lightning.front.metrics import (
    Normalisation,
    expected_utility,
    hypervolume,
    igd_plus,
    pareto_mask,
    spacing,
    sparsity,
)


def hv_inclusion_exclusion(points, ref):
    """Independent exact HV: inclusion-exclusion over all subsets of the boxes [ref, p] (small n only)."""
    q = np.asarray(points, float) - np.asarray(ref, float)
    q = q[np.all(q > 0, axis=1)]
    total = 0.0
    for k in range(1, len(q) + 1):
        for subset in itertools.combinations(range(len(q)), k):
            total += (-1) ** (k + 1) * np.prod(q[list(subset)].min(axis=0))
    return total


def random_front(rng, n, d):
    """Points on a sphere (mostly mutually non-dominated) mixed with a few dominated ones and a duplicate."""
    p = np.abs(rng.normal(size=(n, d)))
    p /= np.linalg.norm(p, axis=1, keepdims=True)
    p[: n // 4] *= 0.7
    if n > 1:
        p[-1] = p[0]
    return p


# Pareto mask


def test_pareto_mask_hand_case_with_ties_and_duplicates():
    pts = [[1, 0], [0, 1], [0.5, 0.5], [0.5, 0.4], [1, 0], [0.5, 0.5], [0.2, 1]]
    # [0.5, 0.4] is dominated by [0.5, 0.5] (tie on the first reward); [0, 1] by [0.2, 1] (tie on the second).
    assert pareto_mask(pts).tolist() == [True, False, True, False, True, True, True]
    assert pareto_mask(pts, unique=True).tolist() == [True, False, True, False, False, False, True]


def test_pareto_mask_nan_rows_are_off_the_front_and_dominate_nothing():
    pts = [[np.nan, 5.0], [1.0, 1.0], [0.5, 2.0]]
    assert pareto_mask(pts).tolist() == [False, True, True]


def test_pareto_mask_single_and_empty():
    assert pareto_mask([[3.0, 1.0]]).tolist() == [True]
    assert pareto_mask(np.zeros((0, 2))).tolist() == []


# Hypervolume: hand-computed cases


def test_hypervolume_2d_hand():
    # Staircase of (1,3), (2,2), (3,1) from (0,0): 3 + 2 + 1 = 6.
    assert hypervolume([[1, 3], [2, 2], [3, 1]], [0, 0]) == pytest.approx(6.0, abs=1e-12)
    # A dominated point and a duplicate change nothing.
    assert hypervolume([[1, 3], [2, 2], [3, 1], [1, 1], [2, 2]], [0, 0]) == pytest.approx(6.0, abs=1e-12)


def test_hypervolume_3d_and_4d_hand():
    # Two boxes [0,2]x[0,1]x[0,1] and [0,1]x[0,2]x[0,1] overlap on the unit cube: 2 + 2 - 1.
    assert hypervolume([[2, 1, 1], [1, 2, 1]], [0, 0, 0]) == pytest.approx(3.0, abs=1e-12)
    # Three axis-aligned 2x1x1 slabs overlapping on the unit cube pairwise and all together: 6 - 3 + 1.
    assert hypervolume([[2, 1, 1], [1, 2, 1], [1, 1, 2]], [0, 0, 0]) == pytest.approx(4.0, abs=1e-12)
    # 4-D: one box 1x2x3x4 with ref shifted by -1 everywhere: 2*3*4*5.
    assert hypervolume([[1, 2, 3, 4]], [-1, -1, -1, -1]) == pytest.approx(120.0, abs=1e-12)
    # 4-D: two boxes [0,2]x[0,1]^3 and [0,1]x[0,2]x[0,1]^2: 2 + 2 - 1.
    assert hypervolume([[2, 1, 1, 1], [1, 2, 1, 1]], [0, 0, 0, 0]) == pytest.approx(3.0, abs=1e-12)


def test_points_that_do_not_dominate_ref_add_nothing():
    assert hypervolume([[1, 1]], [1, 0]) == 0.0  # on the reference's edge: zero width
    assert hypervolume([[2, 2], [5, -1], [-1, 5]], [0, 0]) == pytest.approx(4.0)
    assert hypervolume([[np.nan, 9], [1, 1]], [0, 0]) == pytest.approx(1.0)
    assert hypervolume(np.zeros((0, 3)), [0, 0, 0]) == 0.0


def test_hypervolume_one_reward_and_five_rewards_hand():
    assert hypervolume([[0.5], [2.0], [1.0]], [0.0]) == pytest.approx(2.0, abs=1e-12)
    # 5-D (past the 4-D limit of the slicing it replaced): two unit-overlapping boxes of volume 2 each.
    assert hypervolume([[2, 1, 1, 1, 1], [1, 1, 1, 1, 2]], [0] * 5) == pytest.approx(3.0, abs=1e-12)


def test_hypervolume_rejects_bad_shapes():
    with pytest.raises(ValueError, match="ref has"):
        hypervolume([[1, 2]], [0, 0, 0])
    with pytest.raises(ValueError, match="finite"):
        hypervolume([[1, 2]], [0, np.nan])


# Hypervolume: random sets against independent references


@pytest.mark.parametrize("d", [2, 3, 4, 5, 6])
def test_hypervolume_matches_inclusion_exclusion(d):
    rng = np.random.default_rng(d)
    for _ in range(25):
        n = int(rng.integers(1, 9))
        pts = random_front(rng, n, d)
        ref = rng.uniform(-0.3, 0.2, size=d)
        assert hypervolume(pts, ref) == pytest.approx(hv_inclusion_exclusion(pts, ref), rel=1e-12, abs=1e-14)


def test_hypervolume_matches_monte_carlo_3d():
    rng = np.random.default_rng(7)
    pts = random_front(rng, 30, 3)
    ref = np.array([-0.1, -0.1, -0.1])
    samples = rng.uniform(ref, pts.max(axis=0), size=(200_000, 3))
    covered = np.zeros(len(samples), dtype=bool)
    for p in pts:
        covered |= np.all(samples <= p, axis=1)
    box = np.prod(pts.max(axis=0) - ref)
    mc = covered.mean() * box
    stderr = box * np.sqrt(covered.mean() * (1 - covered.mean()) / len(samples))
    assert abs(hypervolume(pts, ref) - mc) < 5 * stderr


@pytest.mark.parametrize("d", [2, 3, 4])
def test_hypervolume_matches_pymoo(d):
    hv_mod = pytest.importorskip("pymoo.indicators.hv")
    rng = np.random.default_rng(100 + d)
    for _ in range(10):
        pts = random_front(rng, int(rng.integers(2, 40)), d)
        ref = rng.uniform(-0.2, 0.1, size=d)
        keep = np.all(pts > ref, axis=1)  # pymoo's convention for points beyond ref may differ; ours drops them
        expected = hv_mod.HV(ref_point=-ref)(-pts[keep]) if keep.any() else 0.0  # pymoo minimises
        assert hypervolume(pts, ref) == pytest.approx(expected, rel=1e-10, abs=1e-14)


@pytest.mark.parametrize("d", [2, 3, 4])
def test_hypervolume_matches_botorch(d):
    torch = pytest.importorskip("torch")
    hv_mod = pytest.importorskip("botorch.utils.multi_objective.hypervolume")
    rng = np.random.default_rng(200 + d)
    for _ in range(5):
        pts = random_front(rng, int(rng.integers(2, 30)), d)
        ref = rng.uniform(-0.2, 0.1, size=d)
        expected = hv_mod.Hypervolume(torch.tensor(ref)).compute(torch.tensor(pts))  # botorch maximises
        assert hypervolume(pts, ref) == pytest.approx(float(expected), rel=1e-10, abs=1e-14)


# IGD+, spacing, sparsity, EUM, normalisation


def test_igd_plus_hand_case():
    ref_front = [[1.0, 0.0], [0.0, 1.0]]
    assert igd_plus(ref_front, ref_front) == 0.0
    # (0.5, 0.5) is 0.5 short on one reward of each reference point: distance 0.5 to both.
    assert igd_plus([[0.5, 0.5]], ref_front) == pytest.approx(0.5)
    # A point beyond the reference on one axis is not penalised for it (the "+" of IGD+).
    assert igd_plus([[2.0, 0.0]], [[1.0, 0.0]]) == 0.0


def test_igd_plus_and_spacing_match_pymoo():
    igd_mod = pytest.importorskip("pymoo.indicators.igd_plus")
    spacing_mod = pytest.importorskip("pymoo.indicators.spacing")
    rng = np.random.default_rng(3)
    for d in (2, 3):
        a, z = random_front(rng, 12, d), random_front(rng, 20, d)
        assert igd_plus(a, z) == pytest.approx(igd_mod.IGDPlus(-z)(-a), rel=1e-10)
        assert spacing(a) == pytest.approx(spacing_mod.SpacingIndicator()(-a), rel=1e-10)


def test_spacing_hand_case():
    assert spacing([[0, 3], [1, 2], [2, 1], [3, 0]]) == 0.0  # evenly spaced
    # Nearest cityblock distances 1, 1, 3 -> mean 5/3, population std sqrt(8/9).
    assert spacing([[0, 0], [1, 0], [4, 0]]) == pytest.approx(np.sqrt(8 / 9))
    assert np.isnan(spacing([[1, 1]]))


def test_sparsity_and_expected_utility_hand():
    assert sparsity([[0, 2], [1, 1], [2, 0]]) == pytest.approx((1 + 1 + 1 + 1) / 2)
    assert expected_utility([[1, 0], [0, 1]], [[1, 0], [0.5, 0.5]]) == pytest.approx((1 + 0.5) / 2)


def test_normalisation_round_trip_and_errors():
    norm = Normalisation((1.0, 10.0), (-1.0, 0.0))
    pts = np.array([[1.0, 10.0], [-1.0, 0.0], [0.0, 5.0]])
    assert norm.apply(pts).tolist() == [[1.0, 1.0], [0.0, 0.0], [0.5, 0.5]]
    np.testing.assert_allclose(norm.invert(norm.apply(pts)), pts)
    assert "nadir -> 0" in norm.describe(["a", "b"])["formula"]
    with pytest.raises(ValueError, match="ideal > nadir"):
        Normalisation((0.0,), (1.0,))
    data = Normalisation.from_points([[0, 1], [2, 1], [np.nan, 5]])
    assert data.ideal == (2.0, 1.0) and data.nadir == (0.0, 0.0) and data.source.startswith("data")
