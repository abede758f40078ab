"""Counter-based random streams keyed by (seed, epoch, sample index).

Every random decision of the data pipeline is a pure function of a per-sample key, a stream id and
a counter, so a sample's augmentation never depends on batch composition, worker count or on how
far a run got before it was resumed. The mixer is SplitMix64 (Steele et al., 2014), evaluated
vectorised in wrapping uint64 arithmetic: numpy for CPU tensors and, with the very same code, cupy
for CUDA tensors (shared through DLPack without a copy), so GPU batches draw bit-identical numbers.
"""

from __future__ import annotations

from enum import IntEnum, unique
from types import ModuleType
from typing import Any

import numpy as np
import torch

_GOLDEN = 0x9E3779B97F4A7C15
_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB
_MASK64 = 2**64 - 1



#: Ids are below this so that ``augment.substream`` can derive per-draw streams from them.
STREAM_ID_LIMIT = 2**40


@unique
class Stream(IntEnum):
    """The stream ids of ssltk's own parts: ``unique`` refuses two parts sharing a stream. A task
    from outside takes its own with :func:`register_stream`."""

    LOADER_ORDER = 0x0DE7
    HOLDOUT = 0x7E1D_0C7
    PATCH_GRAY = 0x7A01
    PATCH_CROP = 0x7A02
    PATCH_JITTER = 0x7A03
    PATCH_EVAL_CROP = 0x7A04
    PATCH_PHASE = 0x7A05
    JIGSAW_PERMUTATIONS = 0x7A10
    ROTATION_INCEPTION = 0x7A20
    EXEMPLAR_GRAY = 0x7A30
    EXEMPLAR_COPY_KEYS = 0x7A31
    EXEMPLAR_INCEPTION = 0x7A32
    FULL_IMAGE_EVAL_CROP = 0x7B01


_STREAMS: dict[int, str] = {int(s): s.name for s in Stream}


def register_stream(name: str, stream_id: int) -> int:
    """Reserve ``stream_id`` for ``name`` (e.g. ``"my_task.crop"``) and return it; an id that is
    taken, by ssltk or by another module, or not in ``[0, 2**40)`` is a ``ValueError``."""
    if not 0 <= stream_id < STREAM_ID_LIMIT:
        raise ValueError(f"stream {name!r}: id {stream_id:#x} is not in [0, 2**40)")
    owner = _STREAMS.get(stream_id)
    if owner is not None and owner != name:
        raise ValueError(f"stream {name!r}: id {stream_id:#x} is already {owner}'s")
    _STREAMS[stream_id] = name
    return stream_id


def unregister_stream(stream_id: int) -> None:
    """Release an id taken with :func:`register_stream` (ssltk's own stay)."""
    if stream_id in {int(s) for s in Stream}:
        raise ValueError(f"stream {stream_id:#x} is ssltk's own")
    del _STREAMS[stream_id]


def array_module(tensor: torch.Tensor) -> ModuleType:
    """numpy for CPU tensors, cupy for CUDA tensors."""
    if tensor.is_cuda:
        import cupy

        return cupy
    return np


def _as_u64(tensor: torch.Tensor, xp: ModuleType) -> Any:
    tensor = tensor.detach().to(torch.int64).contiguous()
    array = tensor.numpy() if xp is np else xp.from_dlpack(tensor)
    return array.view(xp.uint64)


def _to_torch(array: Any, xp: ModuleType) -> torch.Tensor:
    return torch.from_numpy(array) if xp is np else torch.from_dlpack(array)


def _mix(z: Any, xp: ModuleType) -> Any:
    """SplitMix64 finaliser: a bijective avalanche of 64-bit words."""
    u = xp.uint64
    z = (z ^ (z >> u(30))) * u(_M1)
    z = (z ^ (z >> u(27))) * u(_M2)
    return z ^ (z >> u(31))


def _combine(a: Any, b: Any, xp: ModuleType) -> Any:
    with np.errstate(over="ignore"):
        return _mix(a * xp.uint64(_GOLDEN) + b, xp)


def _scalar_key(*parts: int) -> int:
    """Fold small integers into one 64-bit key (plain Python, exact)."""
    z = 0
    for part in parts:
        z = (z * _GOLDEN + (part & _MASK64)) & _MASK64
        z = ((z ^ (z >> 30)) * _M1) & _MASK64
        z = ((z ^ (z >> 27)) * _M2) & _MASK64
        z ^= z >> 31
    return z


def _signed(value: int) -> int:
    return value - 2**64 if value >= 2**63 else value


def sample_keys(seed: int, epoch: int, indices: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Per-sample keys (int64 tensor holding 64 random bits) for dataset ``indices`` in ``epoch``.

    The keys live on the device of ``indices``.
    """
    indices = torch.as_tensor(indices)
    xp = array_module(indices)
    base = xp.uint64(_scalar_key(seed, epoch, 0x55))
    keys = _combine(base, _as_u64(indices, xp), xp)
    return _to_torch(keys.view(xp.int64), xp)


def batch_key(seed: int, epoch: int, step: int) -> torch.Tensor:
    """A key (int64 tensor of one element) for decisions shared by a whole batch."""
    return torch.tensor([_signed(_scalar_key(seed, epoch, 0xBA7C, step))], dtype=torch.int64)


def _words(keys: torch.Tensor, stream: int, n: int, xp: ModuleType) -> Any:
    k = _combine(_as_u64(keys, xp), xp.uint64(stream & _MASK64), xp)[:, None]
    return _combine(k, xp.arange(n, dtype=xp.uint64)[None, :], xp)


def bits(keys: torch.Tensor, stream: int, n: int) -> torch.Tensor:
    """``[len(keys), n]`` 64-bit words (as int64) of stream ``stream`` for each key."""
    xp = array_module(keys)
    return _to_torch(_words(keys, stream, n, xp).view(xp.int64), xp)


def uniform(keys: torch.Tensor, stream: int, n: int = 1) -> torch.Tensor:
    """``[len(keys), n]`` float64 uniforms in [0, 1) (53 random bits each), on the keys' device."""
    xp = array_module(keys)
    u = (_words(keys, stream, n, xp) >> xp.uint64(11)).astype(xp.float64) * (1.0 / 2**53)
    return _to_torch(u, xp)


def randint(keys: torch.Tensor, stream: int, high: int | torch.Tensor, n: int = 1) -> torch.Tensor:
    """``[len(keys), n]`` int64 integers uniform in [0, high) (``high`` scalar or per key)."""
    high_t = torch.as_tensor(high, dtype=torch.float64, device=keys.device)
    if high_t.ndim == 1:
        high_t = high_t[:, None]
    return torch.minimum((uniform(keys, stream, n) * high_t).floor(), high_t - 1).long()


def permutation(keys: torch.Tensor, stream: int, n: int) -> torch.Tensor:
    """``[len(keys), n]`` random permutations of ``range(n)`` (argsort of uniforms)."""
    return torch.argsort(uniform(keys, stream, n), dim=1)
