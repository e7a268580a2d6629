"""Weight validation and the grids a front is swept over."""

import math

import pytest

from rs_lightning.soup import SoupError, lambda_sweep, simplex_lattice, validate_weights


def test_lambda_sweep_is_the_weight_of_the_second_expert():
    grid = lambda_sweep()
    assert len(grid) == 11
    assert grid[0] == [1.0, 0.0] and grid[-1] == [0.0, 1.0]
    assert grid[3] == [0.7, 0.3]
    assert all(math.isclose(sum(w), 1.0) for w in grid)


def test_lambda_sweep_extrapolation_range():
    grid = lambda_sweep(5, -0.5, 1.5)
    assert grid[0] == [1.5, -0.5] and grid[-1] == [-0.5, 1.5]
    with pytest.raises(SoupError):
        validate_weights(grid[0])
    assert validate_weights(grid[0], allow_extrapolation=True) == [1.5, -0.5]


@pytest.mark.parametrize("n, m", [(1, 3), (2, 10), (3, 10), (4, 4)])
def test_simplex_lattice_counts_and_sums(n, m):
    points = simplex_lattice(n, m)
    assert len(points) == math.comb(m + n - 1, n - 1)
    assert len({tuple(p) for p in points}) == len(points)
    for p in points:
        assert len(p) == n and all(x >= 0 for x in p) and math.isclose(sum(p), 1.0)
    assert points[0] == [1.0] + [0.0] * (n - 1)


def test_grid_errors():
    with pytest.raises(SoupError):
        lambda_sweep(0)
    with pytest.raises(SoupError):
        simplex_lattice(3, 0)
    with pytest.raises(SoupError, match="must be numbers"):
        validate_weights(["a", 1])
