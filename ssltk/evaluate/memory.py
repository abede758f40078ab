"""The L-BFGS probe's memory plan: what one layer's fit holds, worked out (and printed) before
anything is allocated, so a probe that cannot fit is one line naming what would, not an
out-of-memory error an hour into the run.

On a device the training features are one copy in their cache dtype (float16 halves it),
standardised a chunk at a time; val and the report split are scored from host memory a chunk at
a time. On the CPU they are standardised once into a float32 copy when that fits half the memory
available, else streamed from the memory-mapped cache a chunk at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

from ssltk.errors import UserError
from ssltk.evaluate import lbfgs

__all__ = ["ProbePlan", "plan_probe", "require_fit"]

GIB = 2**30
#: L-BFGS-B's history (scipy's default ``maxcor``) and work arrays, in parameter vectors.
_HOST_VECTORS = 2 * 10 + 8
#: ``W``, its float32 copy, the variables, both gradients and the bias' terms on the array module.
_DEVICE_VECTORS = 6


@dataclass(frozen=True)
class ProbePlan:
    """Bytes one layer's fit holds at its peak on ``device`` (``cpu`` or ``cuda``)."""

    device: str
    rows: int
    dim: int
    classes: int
    dtype: str  # the features' dtype as cached: float32 or float16
    resident: bool  # the training features (one copy) held in memory: device or host RAM
    features: int  # that one copy
    chunk: int  # a standardised chunk and its logits
    solver: int  # parameters, gradients and the preconditioner at its largest
    available: int | None  # what the device (or RAM) has free; None: unknown

    @property
    def total(self) -> int:
        return self.features + self.chunk + self.solver

    @property
    def fits(self) -> bool:
        return self.available is None or self.total <= self.available

    def describe(self) -> str:
        where = "on the GPU" if self.device == "cuda" else "in RAM"
        if self.device == "cuda":
            copy = f"one {self.dtype} copy {_gib(self.features)} {where}"
        elif self.resident:
            copy = f"one standardised float32 copy {_gib(self.features)} {where}"
        else:
            copy = f"streamed from the {self.dtype} cache on disk"
        free = "" if self.available is None else f" of {_gib(self.available)} free"
        return (
            f"memory plan ({self.device}): train {self.rows:,} x {self.dim:,} {self.dtype}, "
            f"{self.classes:,} classes: {copy} + chunk {_gib(self.chunk)} + solver "
            f"{_gib(self.solver)} = {_gib(self.total)}{free}"
        )


def _gib(size: int) -> str:
    return f"{size / GIB:.2f} GiB"


def _preconditioner_bytes(kind: str, dim: int) -> int:
    if kind == "full":
        # the largest of: the float64 covariance and its float32 copy; that copy, float32
        # eigenvectors and LAPACK's work (≤ 2 d² floats); the float64 basis and its float32 source
        return 16 * dim * dim
    if kind == "low_rank":
        probes = lbfgs.LOW_RANK + lbfgs._LowRankPreconditioner.OVERSAMPLE
        return dim * probes * (8 + 4 + 8) + 3 * probes * probes * 8
    return 0


def plan_probe(
    rows: int,
    dim: int,
    classes: int,
    *,
    device: str,
    dtype: str = "float32",
    available: int | None = None,
    chunk_rows: int = lbfgs.CHUNK_ROWS,
    resident: bool | None = None,
    precondition: lbfgs.Precondition = None,
) -> ProbePlan:
    """The plan of :func:`ssltk.evaluate.lbfgs.fit_path` on ``rows x dim`` features of ``dtype``
    with ``classes`` classes, on ``device`` with ``available`` bytes free."""
    itemsize = {"float32": 4, "float16": 2}[dtype]
    on_device = device == "cuda"
    chunk_n = min(chunk_rows, rows)
    # the standardiser's float64 chunk and its squares (the fit: more than a float32 chunk and its
    # standardised copy), float32 + float64 logits and softmax
    chunk = chunk_n * dim * (8 + 8) + chunk_n * classes * (4 + 8 + 8)
    params = dim * classes + classes
    kind = lbfgs.preconditioner_kind(precondition, dim, on_device)
    solver = 8 * params * (_DEVICE_VECTORS + (0 if on_device else _HOST_VECTORS))
    solver += _preconditioner_bytes(kind, dim)
    if on_device:
        return ProbePlan(
            device, rows, dim, classes, dtype, True, rows * dim * itemsize, chunk, solver, available
        )
    if resident is None:
        budget = lbfgs.resident_budget() if available is None else available // 2
        resident = 4 * rows * dim <= budget
    features = 4 * rows * dim if resident else 0
    return ProbePlan(
        device, rows, dim, classes, dtype, resident, features, chunk, solver, available
    )


def require_fit(plan: ProbePlan, layer: str) -> None:
    """One line (a :class:`UserError`, exit 2) when ``plan`` does not fit, naming what would."""
    if plan.fits:
        return
    options = ["eval.device=cpu (streams the cache from disk)"]
    if plan.dtype != "float16":
        half = plan.total - plan.features // 2
        options.append(f"eval.cache_dtype=float16 ({_gib(half)})")
    options.append("a smaller eval.max_features (layers are probed one at a time)")
    raise UserError(
        f"eval: the lbfgs probe of layer {layer} needs {_gib(plan.total)} on {plan.device} but "
        f"{_gib(plan.available or 0)} is free ({plan.describe()}); would fit: " + "; ".join(options)
    )
