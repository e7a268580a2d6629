"""Member models of a prediction ensemble (functional ensembling: `rs front` with `front.ensemble: true`).

A task's `set_ensemble(states, weights)` needs one model per expert; building them (a copy of the task's model
with the expert's weights) costs a copy per expert, so they are built once per list of expert states and reused
at every grid point of the sweep (the sweep passes the same state dicts each time). Held outside the module's
submodules: the members are not part of the task's state dict or checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from torch import Tensor, nn


class EnsembleMembers:
    """The members for the current list of expert states, rebuilt only when the list changes."""

    def __init__(self) -> None:
        self._states: list[Mapping[str, Tensor]] = []
        self._models: list[nn.Module] = []

    def get(self, states: Sequence[Mapping[str, Tensor]], build: Callable[[Mapping[str, Tensor]], nn.Module]
            ) -> list[nn.Module]:
        """One model per state (`build(state)`), reused while the SAME state dict objects are passed. The states
        are held (not just their ids: a freed dict's id can be reused by a new one with other weights)."""
        same = len(states) == len(self._states) and all(a is b for a, b in zip(states, self._states))
        if not same:
            self._models = [build(s).eval() for s in states]
            self._states = list(states)
        return self._models

    def clear(self) -> None:
        """Drop the members (N model copies) and the states they came from."""
        self._states, self._models = [], []
