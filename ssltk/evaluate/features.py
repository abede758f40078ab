"""Frozen-backbone features for linear evaluation, cached on disk.

``extract_features`` runs a task's ``representation`` (its linear-evaluation preprocessing) over a
split in eval mode, pools every requested endpoint to at most ``eval.max_features`` values and
writes one ``.npy`` (float32, or float16 with ``eval.cache_dtype``) per (weights, split, layer)
straight to disk, so a split larger than memory never sits in RAM. A small JSON manifest beside
each array names what it was computed from and the array file's SHA-256; a hit needs every field
to match and the bytes to hash the same, so changed weights, data or pooling never hit and a
corrupt array is recomputed. An array is allocated in full before it is filled (a full disk is an
error, not a SIGBUS), under a temporary name that a later run removes if its process died.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.lib.format import open_memmap
from torch import nn

from ssltk.data.dataset import PreparedSplit
from ssltk.data.loader import images_in_workers
from ssltk.evaluate.pooling import make_pool
from ssltk.fsutil import WriteError, pid_alive, reserve, write_atomic
from ssltk.pretext import PretextTask
from ssltk.train.progress import format_duration

__all__ = ["FeatureCache", "Features", "extract_features", "extraction_threads", "weights_digest"]

CACHE_FORMAT = 2  # 2: the manifest holds the array's SHA-256
_REPORT_EVERY = 10  # batches between progress lines


def weights_digest(module: nn.Module) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of ``module``'s state (params + buffers)."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{value.dtype}:{tuple(value.shape)};".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class Features:
    """Per-layer ``[n, d]`` float32 or float16 arrays (possibly memory-mapped), int64 labels."""

    layers: Mapping[str, np.ndarray]
    labels: np.ndarray
    cached: bool


def _path(stem: Path, suffix: str) -> Path:
    return stem.with_name(stem.name + suffix)  # stems hold a dot: "<split>.<layer>"


class FeatureCache:
    """``root/<weights[:16]>/<split>.<layer>.npy`` with a ``.json`` manifest beside each."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def _stem(self, identity: Mapping[str, Any], split: str, layer: str) -> Path:
        return self.root / str(identity["weights"])[:16] / f"{split}.{layer}"

    def load(self, identity: Mapping[str, Any], split: str, layer: str) -> np.ndarray | None:
        """The cached array, or None when it is missing, from other inputs or corrupt."""
        stem = self._stem(identity, split, layer)
        try:
            manifest = json.loads(_path(stem, ".json").read_text(encoding="utf-8"))
            digest = manifest.pop("sha256", None) if isinstance(manifest, dict) else None
            if manifest != _manifest(identity, split, layer, manifest.get("shape")):
                return None
            if digest != _sha256(_path(stem, ".npy")):
                _log(f"features {split}.{layer}: the cached array fails its checksum; recomputing")
                return None
            array = np.load(_path(stem, ".npy"), mmap_mode="r")
        except (OSError, ValueError):
            return None
        return array if list(array.shape) == manifest["shape"] else None

    def remove_stale(self, identity: Mapping[str, Any]) -> None:
        """Remove the temporary arrays that processes which died left for these weights."""
        folder = self._stem(identity, "split", "layer").parent
        for tmp in folder.glob(".*.npy.tmp") if folder.is_dir() else ():
            pid = tmp.name.removesuffix(".npy.tmp").rsplit(".", 1)[-1]
            if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
                tmp.unlink(missing_ok=True)

    def writer(
        self,
        identity: Mapping[str, Any],
        split: str,
        layer: str,
        shape: tuple[int, int],
        dtype: str = "float32",
    ) -> _CacheWriter:
        stem = self._stem(identity, split, layer)
        return _CacheWriter(stem, identity, split, layer, shape, dtype)

    def require_space(self, identity: Mapping[str, Any], split: str, size: int) -> None:
        """One line (:class:`WriteError`) when the cache's disk has less than ``size`` bytes free,
        before any array is allocated."""
        folder = self._stem(identity, split, "layer").parent
        folder.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(folder).free
        if free < size:
            raise WriteError(
                f"cannot write the feature cache of {split} to {folder}: it needs "
                f"{_mib(size)} and the disk has {_mib(free)} free (eval.cache_dir, "
                "eval.cache_dtype=float16 or fewer eval.layers would need less)"
            )


def _mib(size: float) -> str:
    return f"{size / 2**20:.1f} MiB"


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _manifest(identity: Mapping[str, Any], split: str, layer: str, shape: Any) -> dict[str, Any]:
    return {"format": CACHE_FORMAT, **identity, "split": split, "layer": layer, "shape": shape}


class _CacheWriter:
    """Fills a memory-mapped ``.npy`` under a temporary name; ``commit`` renames it into place."""

    def __init__(
        self,
        stem: Path,
        identity: Mapping[str, Any],
        split: str,
        layer: str,
        shape: tuple[int, int],
        dtype: str = "float32",
    ) -> None:
        self.stem = stem
        self.tmp = stem.with_name(f".{stem.name}.{os.getpid()}.npy.tmp")
        self.manifest = _manifest(identity, split, layer, list(shape))
        try:
            stem.parent.mkdir(parents=True, exist_ok=True)
            self.array = open_memmap(self.tmp, mode="w+", dtype=np.dtype(dtype), shape=shape)
            reserve(self.tmp)
        except OSError as err:
            self.discard()
            size = np.dtype(dtype).itemsize * shape[0] * shape[1]
            raise WriteError(
                f"cannot write the feature cache {_path(stem, '.npy')} ({_mib(size)}): "
                f"{err.strerror or err}"
            ) from None

    def commit(self) -> np.ndarray:
        npy = _path(self.stem, ".npy")
        try:
            self.array.flush()
            del self.array
            os.replace(self.tmp, npy)
            manifest = {**self.manifest, "sha256": _sha256(npy)}
        except OSError as err:
            self.discard()
            raise WriteError(f"cannot write the feature cache {npy}: {err.strerror}") from None
        text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
        write_atomic(_path(self.stem, ".json"), text.encode())
        return np.load(npy, mmap_mode="r")

    def discard(self) -> None:
        self.__dict__.pop("array", None)
        self.tmp.unlink(missing_ok=True)


@torch.no_grad()
def extract_features(
    task: PretextTask,
    split: PreparedSplit,
    layers: list[str],
    *,
    identity: Mapping[str, Any],
    cache: FeatureCache,
    batch_size: int,
    max_features: int,
    pooling: str = "max",
    device: torch.device | None = None,
    progress: bool = True,
    dtype: str = "float32",
    workers: int = 0,
    autocast: str = "none",
) -> Features:
    """Pooled features of ``layers`` for every image of ``split``, in the split's order.

    ``identity`` (weights digest, data hash, pooling, …) keys the cache; layers found there are
    read back without running the network, the others are computed in one pass. ``dtype``: of
    the cached arrays (the network computes in float32, or bf16 under ``autocast="bf16"`` on
    CUDA). ``workers`` loader processes decode batches ahead of the forward pass. The arrays are
    allocated in full after the first batch (their size printed, the disk checked) before the
    long work.
    """
    labels = split.labels.numpy().astype(np.int64)
    cache.remove_stale(identity)
    found = {layer: cache.load(identity, split.name, layer) for layer in layers}
    missing = [layer for layer, array in found.items() if array is None]
    if not missing:
        return Features({layer: found[layer] for layer in layers}, labels, cached=True)

    device = device or next(task.parameters()).device
    task.eval()
    pool = make_pool(max_features, pooling)
    total = len(split)
    writers: dict[str, _CacheWriter] = {}
    started = time.perf_counter()
    batches = [torch.arange(s, min(s + batch_size, total)) for s in range(0, total, batch_size)]
    bf16 = autocast == "bf16" and device.type == "cuda"
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(extraction_threads(workers))
    try:
        decoded = images_in_workers(split, batches, workers, reuse_buffers=True)
        for index, images in zip(batches, decoded, strict=True):
            start = int(index[0])
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
                out = task.representation(images.to(device), missing, pool=pool)
            if not writers:
                _allocate(writers, cache, identity, split.name, total, out, missing, dtype)
            for layer in missing:
                value = out[layer].float().cpu().numpy()
                writers[layer].array[start : start + len(index)] = value
            done = start + len(index)
            if progress and (done == total or done // batch_size % _REPORT_EVERY == 0):
                _report(split.name, done, total, started)
        for layer in missing:
            found[layer] = writers.pop(layer).commit()
    finally:
        torch.set_num_threads(threads)
        for writer in writers.values():
            writer.discard()
    return Features({layer: found[layer] for layer in layers}, labels, cached=False)


def extraction_threads(workers: int) -> int:
    """torch's intra-op threads for extraction on the CPU beside ``workers`` decoding processes:
    spinning threads on the workers' cores cut throughput ~4x on 2 cores
    (benchmarks/extraction.py). Float sums depend on it, so the cache identity names it."""
    threads = torch.get_num_threads()
    return threads if workers == 0 else max(1, min(threads, (os.cpu_count() or 1) - workers))


def _allocate(
    writers: dict[str, _CacheWriter],
    cache: FeatureCache,
    identity: Mapping[str, Any],
    split: str,
    total: int,
    out: Mapping[str, torch.Tensor],
    layers: list[str],
    dtype: str,
) -> None:
    """Every layer's array at once, its size printed and the disk checked first."""
    shapes = {layer: (total, int(out[layer].shape[1])) for layer in layers}
    size = sum(np.dtype(dtype).itemsize * n * d for n, d in shapes.values())
    _log(f"features {split}: {len(layers)} layers, {_mib(size)} of {dtype} to write")
    cache.require_space(identity, split, size)
    for layer, shape in shapes.items():
        writers[layer] = cache.writer(identity, split, layer, shape, dtype)


def _report(split: str, done: int, total: int, started: float) -> None:
    elapsed = time.perf_counter() - started
    eta = elapsed / done * (total - done)
    print(
        f"features {split}: {done}/{total} images, {done / max(elapsed, 1e-9):.0f} img/s, "
        f"eta {format_duration(eta)}",
        file=sys.stderr,
        flush=True,
    )
