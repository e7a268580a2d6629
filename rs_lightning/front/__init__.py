"""Fronts of rewarded soups: sweep a weight grid (soup in place, then trainer.test), score and plot the front.

Library: `pareto_mask`, `hypervolume` (exact), `igd_plus`, `spacing`, `Normalisation` (metrics.py);
`lmc_gaps` (lmc.py); `build_grid`/`GridSpec` (grids.py); `select_lambda`/`preference_report` (select.py);
`run_sweep` (sweep.py, imports Lightning lazily; per-example rewards via per_example.py);
`build_summary`/`write_outputs` (summary.py), with paired-bootstrap intervals and `verdict` (uncertainty.py).
Weight convention: weights aligned with the experts, theta = sum_i w_i theta_i; two experts: lam = w_2.
"""

from rs_lightning.front.checkpoints import Checkpoint
from rs_lightning.front.errors import FrontError
from rs_lightning.front.grids import GridSpec, build_grid, lattice_grid
from rs_lightning.front.lmc import lmc_gaps, summarise_gaps
from rs_lightning.front.metrics import (
    Normalisation,
    expected_utility,
    hypervolume,
    igd_plus,
    pareto_mask,
    spacing,
    sparsity,
)
from rs_lightning.front.select import Selection, preference_report, select_lambda
from rs_lightning.front.summary import SummarySettings, build_summary, write_outputs
from rs_lightning.front.sweep import run_sweep
from rs_lightning.front.uncertainty import verdict

__all__ = [
    "Checkpoint", "FrontError", "GridSpec", "Normalisation", "Selection", "SummarySettings", "build_grid",
    "build_summary", "expected_utility", "hypervolume", "igd_plus", "lattice_grid", "lmc_gaps", "pareto_mask",
    "preference_report", "run_sweep", "select_lambda", "sparsity", "spacing", "summarise_gaps", "verdict",
    "write_outputs",
]
