"""An ophyd Signal that describes array data the way event-model and TiledWriter want it."""

from __future__ import annotations

import numpy as np
from ophyd import Signal


class ArraySignal(Signal):
    """A soft signal holding a numpy array of fixed ``shape`` and ``dtype``.

    ophyd's generic ``describe()`` guesses shape and ``dtype_numpy`` from the current value
    (None before the first trigger) and can write a ``dtype_numpy`` event-model rejects; this
    one declares them up front, with ``dtype_numpy`` from ``np.dtype(...).str``.
    """

    def __init__(self, *args, shape=(), dtype="<f8", dims=None, **kwargs):
        self._shape = tuple(int(s) for s in shape)
        self._dtype = np.dtype(dtype)
        self._dims = list(dims) if dims else None
        kwargs.setdefault("value", np.zeros(self._shape, self._dtype))
        super().__init__(*args, **kwargs)

    def describe(self):
        desc = super().describe()
        desc[self.name].update(
            dtype="array", shape=list(self._shape), dtype_numpy=self._dtype.str
        )
        if self._dims:
            desc[self.name]["dims"] = self._dims
        return desc
