"""The summary's normalisation rule, for the point estimate and for every bootstrap draw at once.

Each reward is mapped by (R - nadir) / (ideal - nadir) before any indicator (metrics.Normalisation). Where
the two ends come from is the rule (SummarySettings.nadir_from):

- "config": ideal and nadir from the config, fixed per task (comparable across runs);
- "init": nadir = the init row's rewards, the paper's choice (Rame et al. 2023 normalise so that the
  shared initialisation sits at 0); ideal from the config, else the per-reward max over the points;
- "worst": nadir = the per-reward min over the evaluated points; ideal as for "init";
- "data" (the default without ideal/nadir): min/max over all valid points (NOT comparable across runs).

`NormRule.bounds` applies the rule to a [B, P, K] stack of reward means (B bootstrap draws of the same P
points), so one draw's normalisation is fixed across all of its groups, exactly as the point estimate's is;
`NormRule.point` is the B = 1 case with clear errors instead of the draws' silent fallbacks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from rs_lightning.front.errors import FrontError
from rs_lightning.front.metrics import Normalisation

DATA_SOURCE = "data: min/max over all valid evaluated points"


@dataclass(frozen=True)
class NormRule:
    """Where the ideal and the nadir come from (see the module docstring).

    Attributes:
        kind: "config", "init", "worst" or "data".
        ideal: the config's ideal (raw units), or None for the per-reward max over the points.
        nadir: the config's nadir ("config" only).
    """

    kind: str
    ideal: tuple[float, ...] | None = None
    nadir: tuple[float, ...] | None = None

    @classmethod
    def from_settings(cls, s) -> NormRule:
        """The rule of a SummarySettings (already checked)."""
        ideal = tuple(s.ideal) if s.ideal is not None else None
        if s.nadir_from in ("init", "worst"):
            return cls(s.nadir_from, ideal)
        if s.ideal is not None and s.nadir is not None:
            return cls("config", ideal, tuple(s.nadir))
        return cls("data")

    def source(self) -> str:
        """The `normalisation.source` line of summary.json."""
        if self.kind == "config":
            return "config (fixed per task)"
        if self.kind == "data":
            return DATA_SOURCE
        ideal = "config" if self.ideal is not None else "per-reward max over the valid evaluated points"
        nadir = ("the init row's rewards (nadir_from: init, the paper's choice)" if self.kind == "init"
                 else "per-reward min over the valid evaluated points (nadir_from: worst)")
        return f"nadir: {nadir}; ideal: {ideal}"

    def bounds(self, means: np.ndarray, init: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(nadir, ideal), each [B, K], of a [B, P, K] stack of the valid points' rewards.

        `init` is the init's index along P (rule "init"). Where an axis comes out degenerate (ideal <= nadir)
        the nadir becomes ideal - 1, as `Normalisation.from_points` does; `point` refuses that case instead.
        """
        m = np.asarray(means, dtype=np.float64)
        b, _, k = m.shape
        if self.kind == "config":
            lo = np.broadcast_to(np.asarray(self.nadir, dtype=np.float64), (b, k))
            hi = np.broadcast_to(np.asarray(self.ideal, dtype=np.float64), (b, k))
            return lo, hi
        hi = m.max(axis=1) if self.ideal is None else np.broadcast_to(np.asarray(self.ideal, dtype=np.float64), (b, k))
        if self.kind == "init":
            if init is None:
                raise FrontError("summary.nadir_from: init needs the init row (front.init) with valid rewards")
            lo = m[:, init, :]
        else:  # "worst" and "data": the per-reward minimum
            lo = m.min(axis=1)
        return np.where(hi > lo, lo, hi - 1.0), hi

    def point(self, values: np.ndarray, init: int | None, names: Sequence[str]) -> Normalisation:
        """The point estimate's Normalisation from the valid points' (P, K) rewards."""
        v = np.asarray(values, dtype=np.float64)
        if self.kind == "config":
            return Normalisation(self.ideal, self.nadir, source=self.source())
        if self.kind == "data":
            return Normalisation.from_points(v)
        lo, hi = self.bounds(v[None], init)
        raw_lo = v[init] if self.kind == "init" else v.min(axis=0)
        bad = [f"{n} (nadir {a:.6g}, ideal {c:.6g})" for n, a, c in zip(names, raw_lo, hi[0]) if not c > a]
        if bad and (self.kind == "init" or self.ideal is not None):
            raise FrontError(f"summary.nadir_from: {self.kind} leaves no room between nadir and ideal on "
                             f"{', '.join(bad)}: every reward needs ideal > nadir")
        return Normalisation(tuple(hi[0].tolist()), tuple(lo[0].tolist()), source=self.source())
