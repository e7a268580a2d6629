"""`SummarySettings`: how a front is scored (the `front.summary:` section of an `rs front` config).

None of it changes the rows, so every setting can be changed afterwards and the run re-reported
(`rs front report RUN_DIR` reads them from run.json).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from rs_lightning.front.metrics import Normalisation

NADIR_FROM = ("config", "init", "worst")
SPLITS = ("val", "test")


@dataclass
class SummarySettings:
    """How a front is scored.

    Attributes:
        rewards: the logged rewards to score, in order (aligned with the experts and with mu); default:
            every `test/reward/*` in logging order.
        ideal: per-reward best value for the normalisation (with `nadir`); default: from the data.
        nadir: per-reward worst value.
        nadir_from: where the normalisation's nadir comes from: "config" (`nadir`), "init" (the init row's
            rewards, the paper's choice) or "worst" (per-reward minimum over the evaluated points). The
            ideal is `ideal` when given, else the per-reward maximum over the evaluated points. Default:
            "config" when ideal/nadir are given, else the data's min/max.
        reference: hypervolume reference point in RAW reward units; default: nadir - ref_margin * (ideal - nadir).
        ref_margin: margin of the default reference point, in normalised units.
        preferences: the mu vectors to report lam* for; default: the simplex lattice of step 1/4.
        select_on: the rows lam* is selected on: "val" (the default; the sweep must have run with
            front.validate) or "test" (asked for explicitly; optimistic, and said so in summary.json).
        n_boot: paired-bootstrap replicates for the intervals (0: no intervals).
        level: two-sided level of the percentile intervals.
        boot_seed: seed of the bootstrap's resampled example indices.
    """

    rewards: list[str] | None = None
    ideal: list[float] | None = None
    nadir: list[float] | None = None
    nadir_from: Literal["config", "init", "worst"] | None = None
    reference: list[float] | None = None
    ref_margin: float = 0.1
    preferences: list[list[float]] | None = None
    select_on: Literal["val", "test"] = "val"
    n_boot: int = 1000
    level: float = 0.95
    boot_seed: int = 0

    def check(self) -> None:
        """Raise ValueError naming the bad setting, so it fails before a sweep, not after it."""
        if self.nadir_from not in (None, *NADIR_FROM):
            raise ValueError(f"summary.nadir_from must be one of {', '.join(NADIR_FROM)} (or unset), "
                             f"got {self.nadir_from!r}")
        if self.select_on not in SPLITS:
            raise ValueError(f"summary.select_on must be 'val' or 'test', got {self.select_on!r}")
        if isinstance(self.n_boot, bool) or not isinstance(self.n_boot, int) or self.n_boot < 0:
            raise ValueError(f"summary.n_boot must be an integer >= 0 (0: no intervals), got {self.n_boot!r}")
        if not 0.0 < float(self.level) < 1.0:
            raise ValueError(f"summary.level must be in (0, 1), e.g. 0.95, got {self.level!r}")
        if self.nadir_from in ("init", "worst"):
            if self.nadir is not None:
                raise ValueError(f"summary.nadir is given but summary.nadir_from is {self.nadir_from!r}: the nadir "
                                 "comes from the rows; drop one of the two")
        elif self.nadir_from == "config" and (self.ideal is None or self.nadir is None):
            raise ValueError("summary.nadir_from: config needs both summary.ideal and summary.nadir")
        elif (self.ideal is None) != (self.nadir is None):
            raise ValueError("summary.ideal and summary.nadir go together: give both or neither "
                             "(or set summary.nadir_from: init / worst to take the nadir from the rows)")
        for i, mu in enumerate(self.preferences or []):
            if not mu or not all(math.isfinite(m) and m >= 0 for m in mu) or not any(m > 0 for m in mu):
                raise ValueError(f"summary.preferences[{i}] is {list(mu)}: a preference must be finite, >= 0 and not "
                                 "all zero (one weight per reward, normalised to sum 1)")
        for name in ("ideal", "nadir", "reference"):
            values = getattr(self, name)
            if values is not None and not all(math.isfinite(v) for v in values):
                raise ValueError(f"summary.{name} is {list(values)}: every value must be finite")
        sizes = self._sizes()
        if len(set(sizes.values())) > 1:
            raise ValueError(f"summary settings disagree on the number of rewards: {sizes}")
        if self.ideal is not None and self.nadir is not None:
            Normalisation(tuple(self.ideal), tuple(self.nadir))

    def _sizes(self) -> dict[str, int]:
        sizes = {f: len(getattr(self, f)) for f in ("rewards", "ideal", "nadir", "reference") if getattr(self, f)}
        sizes.update({f"preferences[{i}]": len(p) for i, p in enumerate(self.preferences or [])})
        return sizes

    def check_names(self, logged: Sequence[str]) -> None:
        """Raise ValueError unless the rewards these settings score are logged and every per-reward list has one
        value per scored reward; `logged` are the names the module logs (known once a first point has run)."""
        missing = [n for n in self.rewards or [] if n not in logged]
        if missing:
            raise ValueError(f"summary.rewards: {missing[0]!r} is not logged by the module, which logs "
                             f"{', '.join(logged) or 'no reward'}: fix the name, or log the reward in the task")
        names = list(self.rewards or logged)
        for setting, n in self._sizes().items():
            if n != len(names):
                raise ValueError(f"summary.{setting} has {n} values but the sweep scores {len(names)} rewards "
                                 f"({', '.join(names)}): give one per reward")
