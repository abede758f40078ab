"""Seeding, deterministic kernels, and every random generator's state as checkpointable tensors.

The data pipeline draws from counter-based keys (``ssltk.data.rng``) and needs no state. What
remains is model-internal randomness (e.g. dropout in the patch heads), which uses torch's global
generators; their states, and Python's and numpy's for good measure, are captured as tensors so a
checkpoint loads with ``weights_only=True`` and a resumed run continues the same random sequence.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

#: cuBLAS needs a fixed workspace for deterministic results; it must be set before CUDA starts.
CUBLAS_WORKSPACE = ":4096:8"


@contextmanager
def deterministic_mode() -> Iterator[None]:
    """Deterministic algorithms everywhere (an error where torch has none), no autotuning;
    the previous settings come back on exit.
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    previous = (
        torch.are_deterministic_algorithms_enabled(),
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.deterministic,
    )
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = previous[1:]


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and every CUDA device), numpy's and Python's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every global generator's state, as tensors and plain values."""
    version, mt, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": torch.tensor(mt, dtype=torch.int64),
        "python_version": version,
        "python_gauss": gauss,
        "numpy": torch.from_numpy(keys.astype(np.int64)),
        "numpy_pos": int(pos),
        "numpy_gauss": (int(has_gauss), float(cached)),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.clone() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"].cpu())
    mt = tuple(int(x) for x in state["python"].tolist())
    random.setstate((state["python_version"], mt, state["python_gauss"]))
    has_gauss, cached = state["numpy_gauss"]
    keys = state["numpy"].cpu().numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, state["numpy_pos"], has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        for index, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state.cpu(), index)
