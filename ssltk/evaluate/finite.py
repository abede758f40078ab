"""Every stage of an evaluation is checked to hold finite numbers: a diverged checkpoint or a
corrupt array must end the evaluation in one line, never score NaN rows as correct."""

from __future__ import annotations

from typing import Any

import numpy as np

from ssltk.errors import UserError

__all__ = ["NonFinite", "require_finite"]

_CHUNK_ROWS = 8192  # memory-mapped features are checked a slice at a time


class NonFinite(UserError):
    """A NaN or infinity in features, a fitted probe or its logits."""


def require_finite(array: Any, what: str, layer: str, split: str) -> None:
    """Raise :class:`NonFinite` naming ``what``, ``layer`` and ``split`` unless every value of
    ``array`` (NumPy, memory-mapped or a torch tensor) is finite."""
    if hasattr(array, "detach"):
        array = array.detach().cpu().numpy()
    array = np.asarray(array)
    rows = (
        [array]
        if array.ndim == 0
        else (array[i : i + _CHUNK_ROWS] for i in range(0, len(array), _CHUNK_ROWS))
    )
    if not all(np.isfinite(chunk).all() for chunk in rows):
        raise NonFinite(
            f"eval: non-finite {what} at layer {layer} on split {split!r} (diverged weights? "
            "nothing was written back)"
        )
