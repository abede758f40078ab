"""Counter-based random streams keyed by (seed, epoch, sample index).

Every random decision of the data pipeline is a pure function of a per-sample key, a stream id and
a counter, so a sample's augmentation never depends on batch composition, worker count or on how
far a run got before it was resumed. The mixer is SplitMix64 (Steele et al., 2014), evaluated
vectorised in numpy's wrapping uint64 arithmetic.
"""

from __future__ import annotations

import numpy as np
import torch

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser: a bijective avalanche of 64-bit words."""
    z = z.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def _combine(a: np.ndarray, b: np.ndarray | int) -> np.ndarray:
    with np.errstate(over="ignore"):
        return _mix(np.asarray(a, dtype=np.uint64) * _GOLDEN + np.asarray(b, dtype=np.uint64))


def _to_u64(x: torch.Tensor | np.ndarray | int) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x).astype(np.int64).view(np.uint64)


def sample_keys(seed: int, epoch: int, indices: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Per-sample keys (int64 tensor holding 64 random bits) for dataset ``indices`` in ``epoch``."""
    base = _combine(_combine(np.uint64(seed & (2**64 - 1)), epoch), 0x55)
    keys = _combine(np.broadcast_to(base, _to_u64(indices).shape), _to_u64(indices))
    return torch.from_numpy(keys.view(np.int64).copy())


def batch_key(seed: int, epoch: int, step: int) -> torch.Tensor:
    """A key for decisions shared by a whole batch (e.g. Jigsaw's permutation subset)."""
    key = _combine(_combine(_combine(np.uint64(seed & (2**64 - 1)), epoch), 0xBA7C), step)
    return torch.from_numpy(np.atleast_1d(key).view(np.int64).copy())


def bits(keys: torch.Tensor, stream: int, n: int) -> np.ndarray:
    """``[len(keys), n]`` uint64 words of stream ``stream`` for each key."""
    k = _combine(_to_u64(keys), stream)[:, None]
    return _combine(k, np.arange(n, dtype=np.uint64)[None, :])


def uniform(keys: torch.Tensor, stream: int, n: int = 1) -> torch.Tensor:
    """``[len(keys), n]`` float64 uniforms in [0, 1) from 53 random bits each."""
    u = (bits(keys, stream, n) >> np.uint64(11)).astype(np.float64) * (1.0 / 2**53)
    return torch.from_numpy(u)


def randint(keys: torch.Tensor, stream: int, high: int | torch.Tensor, n: int = 1) -> torch.Tensor:
    """``[len(keys), n]`` int64 integers uniform in [0, high) (``high`` scalar or per key)."""
    high_t = torch.as_tensor(high, dtype=torch.float64)
    if high_t.ndim == 1:
        high_t = high_t[:, None]
    return torch.minimum((uniform(keys, stream, n) * high_t).floor(), high_t - 1).long()


def permutation(keys: torch.Tensor, stream: int, n: int) -> torch.Tensor:
    """``[len(keys), n]`` random permutations of ``range(n)`` (argsort of uniforms; ties have prob 0)."""
    return torch.argsort(uniform(keys, stream, n), dim=1)
