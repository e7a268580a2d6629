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
        self._key: list[int] | None = None
        self._models: list[nn.Module] = []

    def get(self, states: Sequence[Mapping[str, Tensor]], build: Callable[[Mapping[str, Tensor]], nn.Module]
            ) -> list[nn.Module]:
        """One model per state (`build(state)`), cached by the identity of the state dicts."""
        key = [id(s) for s in states]
        if key != self._key:
            self._models = [build(s).eval() for s in states]
            self._key = key
        return self._models
