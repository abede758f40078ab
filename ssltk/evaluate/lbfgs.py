"""Multinomial logistic regression with L2, trained by L-BFGS on precomputed features:
the paper's main protocol (not in its released code).

For standardised features ``x_i`` (train statistics), labels ``y_i``, weights ``W [d, K]`` and an
unregularised bias ``b [K]`` the objective is::

    f(W, b) = 1/n · Σ_i CE(Wᵀx_i + b, y_i) + l2/2 · ‖W‖²

which is scikit-learn's ``LogisticRegression(C=1 / (l2 · n))`` (lbfgs, multinomial,
``fit_intercept=True``), with ``n`` the number of training rows.

The objective and its gradient are written once against the array API and run on NumPy, or on
CuPy when the features are CuPy arrays. SciPy's L-BFGS-B drives float64 parameters, in a basis
that whitens the features' covariance (see ``_Preconditioner``: same problem, far fewer
iterations) and stops on scikit-learn's test, the largest gradient entry. Per row chunk
the two matmuls (logits and the weight gradient) run in float32, the softmax in float64, and the
sums accumulate in float64. A memory-mapped ``X`` (``np.load(path, mmap_mode="r")``) is streamed:
each chunk is read and standardised when needed, so peak memory is a chunk, not a copy of ``X``;
an in-memory ``X`` is standardised once into a float32 copy. Zero initialisation and no
randomness: the same inputs give bit-identical outputs.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
from scipy import optimize

Array = Any  # a NumPy array (possibly memory-mapped) or a CuPy array

CHUNK_ROWS = 2048
MAX_LINE_SEARCH = 50  # as scikit-learn's lbfgs solver (SciPy's default is 20)
# Largest gradient entry at a solution: scikit-learn's default 1e-4 can stop ~1e-4 short of f*.
TOL = 1e-5
FTOL = 1e-10  # relative decrease that ends a fit: well above the float32 matmuls' noise

#: Whitening costs an eigendecomposition cubic in the feature count; on a 2-core CPU it stops
#: paying for the iterations it saves between 2048 and 4096 features. A GPU's eigendecomposition
#: stays cheap at 9,000 features. The low-rank one (``precondition="low_rank"``) did not pay at
#: 8192 features (reports/linear_probe_scale.md: 56 evaluations unconverged vs 41), so a CPU above
#: the limit runs unpreconditioned.
PRECONDITION_MAX_FEATURES = 2048
LOW_RANK = 256

#: ``None`` (pick), ``True`` / ``"full"``, ``"low_rank"``, ``False`` / ``"none"``.
Precondition = bool | str | None


def preconditioner_kind(precondition: Precondition, dim: int, on_device: bool) -> str:
    """``"full"``, ``"low_rank"`` or ``"none"``: ``None`` gives full whitening on a device or up
    to ``PRECONDITION_MAX_FEATURES`` features, else none."""
    if precondition is None:
        return "full" if on_device or dim <= PRECONDITION_MAX_FEATURES else "none"
    if isinstance(precondition, bool):
        return "full" if precondition else "none"
    if precondition not in ("full", "low_rank", "none"):
        raise ValueError(f"precondition must be full, low_rank or none, got {precondition!r}")
    return precondition


def resident_budget() -> int:
    """Bytes a standardised copy of memory-mapped features may take: half the memory available
    now (so a cache larger than that streams from disk, a chunk at a time)."""
    try:
        pages = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0
    return pages // 2


def is_resident(X: Array, resident: bool | None) -> bool:
    """Whether the probe standardises ``X`` once into host memory (see :func:`fit`)."""
    if array_module(X) is not np:
        return False  # one copy on the device, standardised per chunk
    if resident is not None:
        return resident
    return not isinstance(X, np.memmap) or 4 * X.shape[0] * X.shape[1] <= resident_budget()


def array_module(x: Array) -> ModuleType:
    """``cupy`` for a CuPy array, else ``numpy``.

    Only an imported CuPy can have made ``x``, so CuPy is never imported (or its GPU probed) here:
    a missing CuPy or a machine without a GPU simply means NumPy.
    """
    cupy = sys.modules.get("cupy")
    return np if cupy is None else cupy.get_array_module(x)


def _to_numpy(a: Array) -> np.ndarray:
    return a.get() if array_module(a) is not np else np.asarray(a)


def _row_chunks(n: int, chunk_rows: int) -> Iterator[slice]:
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be positive, got {chunk_rows}")
    for start in range(0, n, chunk_rows):
        yield slice(start, min(start + chunk_rows, n))


# --------------------------------------------------------------------------------------------------
# Standardisation


@dataclass(frozen=True)
class Standardizer:
    """Per-feature ``(x − mean) / scale`` with training statistics (population std).

    A feature that is constant on the training rows gets ``mean`` = its value and ``scale`` = 1,
    so it standardises to exactly 0 there.
    """

    mean: np.ndarray  # float64 [d]
    scale: np.ndarray  # float64 [d]

    @classmethod
    def fit(cls, X: Array, chunk_rows: int = CHUNK_ROWS) -> Standardizer:
        """Two passes over ``X`` in row chunks: the mean, then the squared deviations."""
        xp = array_module(X)
        n, d = X.shape
        if n == 0:
            raise ValueError("cannot standardise zero rows")
        total = xp.zeros(d, dtype=xp.float64)
        low = high = None
        for rows in _row_chunks(n, chunk_rows):
            chunk = xp.asarray(X[rows], dtype=xp.float64)
            total += chunk.sum(axis=0)
            low = chunk.min(axis=0) if low is None else xp.minimum(low, chunk.min(axis=0))
            high = chunk.max(axis=0) if high is None else xp.maximum(high, chunk.max(axis=0))
        mean = total / n
        squares = xp.zeros(d, dtype=xp.float64)
        for rows in _row_chunks(n, chunk_rows):
            squares += ((xp.asarray(X[rows], dtype=xp.float64) - mean) ** 2).sum(axis=0)
        constant = low == high
        mean = xp.where(constant, low, mean)
        scale = xp.where(constant, 1.0, xp.sqrt(squares / n))
        return cls(_to_numpy(mean), _to_numpy(scale))

    def transform(self, X: Array) -> Array:
        """Standardised float32 rows, on ``X``'s array module, computed in ``X``'s precision."""
        xp = array_module(X)
        dtype = xp.result_type(X.dtype, xp.float32)
        mean = xp.asarray(self.mean, dtype=dtype)
        inv_scale = xp.asarray(1.0 / self.scale, dtype=dtype)
        return ((xp.asarray(X, dtype=dtype) - mean) * inv_scale).astype(xp.float32, copy=False)


class _Rows:
    """Standardised float32 row chunks of ``X`` with their labels, in a fixed order.

    ``resident``: ``X`` is standardised once into one float32 copy (host memory) and every pass
    reads views of it; otherwise each chunk is read and standardised on every pass (a memory map
    larger than the plan allows, or device features: one copy there, standardised per chunk).
    Both give the same float32 chunks, so the choice never changes a figure.
    """

    def __init__(
        self, X: Array, y: Array, standardizer: Standardizer, chunk_rows: int, resident: bool
    ) -> None:
        if X.ndim != 2 or len(X) != len(y) or len(X) == 0:
            raise ValueError(f"need X [n, d] and y [n] with n > 0, got {X.shape} and {y.shape}")
        self.xp = array_module(X)
        self.n, self.dim = X.shape
        self._X, self._standardizer = X, standardizer
        self._slices = list(_row_chunks(self.n, chunk_rows))
        labels = self.xp.asarray(y).astype(self.xp.int64)
        self._labels = [labels[rows] for rows in self._slices]
        self._copy = None
        if resident:
            self._copy = self.xp.empty((self.n, self.dim), dtype=self.xp.float32)
            for rows in self._slices:
                self._copy[rows] = standardizer.transform(X[rows])

    def __iter__(self) -> Iterator[tuple[Array, Array]]:
        for i, rows in enumerate(self._slices):
            x = (
                self._standardizer.transform(self._X[rows])
                if self._copy is None
                else self._copy[rows]
            )
            yield x, self._labels[i]


# --------------------------------------------------------------------------------------------------
# Objective


def _logits(x: Array, weight32: Array, bias: Array) -> Array:
    """float64 logits of standardised float32 rows: the matmul in float32, the bias in float64."""
    return (x @ weight32).astype(bias.dtype) + bias


def _data_term(rows: _Rows, weight: Array, bias: Array) -> tuple[float, Array, Array]:
    """Σ_i CE and its gradients in ``W`` and ``b``, accumulated in float64 over the row chunks."""
    xp = rows.xp
    weight32 = weight.astype(xp.float32)
    total = xp.zeros((), dtype=xp.float64)
    grad_w = xp.zeros(weight.shape, dtype=xp.float64)
    grad_b = xp.zeros(bias.shape, dtype=xp.float64)
    for x, y in rows:
        z = _logits(x, weight32, bias)
        z -= z.max(axis=1, keepdims=True)
        e = xp.exp(z)
        norm = e.sum(axis=1, keepdims=True)
        picked = xp.arange(len(y))
        total += (xp.log(norm[:, 0]) - z[picked, y]).sum()
        e /= norm  # softmax; minus the one-hot target it is d CE / d z
        e[picked, y] -= 1.0
        grad_w += x.T @ e.astype(xp.float32)
        grad_b += e.sum(axis=0)
    return float(total), grad_w, grad_b


class _Preconditioner:
    """``W = U · diag(s) · V``: L-BFGS runs on ``V``, which leaves the problem (and its minimiser in
    ``W``) unchanged but makes its curvature nearly uniform.

    ``U Λ Uᵀ`` is the covariance of the standardised training rows. The Hessian of ``f`` in ``W``
    is about ``a·Λ + l2`` along ``U`` (``a`` the softmax curvature, taken as ``1/K``), so
    ``s = (Λ + K·l2)^-½`` scales it to about ``a`` in every direction. Random and pretrained
    features are strongly correlated, so plain L-BFGS needs many times more iterations.
    """

    def __init__(self, rows: _Rows) -> None:
        xp = rows.xp
        cov = xp.zeros((rows.dim, rows.dim), dtype=xp.float64)
        for x, _ in rows:
            cov += x.T @ x
        # Any invertible U gives the same minimiser: float32 is accurate enough and twice as fast.
        # In place, freed before the eigendecomposition: at most 16·d² bytes (see memory.py).
        cov /= rows.n
        cov32 = cov.astype(xp.float32)
        del cov
        eigenvalues, basis = xp.linalg.eigh(cov32)
        del cov32
        self.eigenvalues = xp.maximum(eigenvalues.astype(xp.float64), 0.0)
        self.basis = basis.astype(xp.float64)

    def scales(self, l2: float, classes: int) -> Array:
        floor = max(classes * l2, 1e-8 * float(self.eigenvalues.max()), 1e-12)
        return 1.0 / (self.eigenvalues + floor) ** 0.5

    def bind(self, l2: float, classes: int) -> _Map:
        return _EigenMap(self.basis, self.scales(l2, classes))


class _LowRankPreconditioner:
    """The top ``rank`` eigenpairs of the covariance (a randomised range finder with one power
    iteration: three passes over the rows, no ``d × d`` matrix) and the mean of the others.

    ``W = P · V`` with ``P = s₀·I + U (diag(s) − s₀) Uᵀ`` (symmetric, positive definite): the
    leading directions, where correlated features put most of the curvature, are whitened as by
    :class:`_Preconditioner`, the rest scaled by the mean remaining eigenvalue ``λ₀``. Costs
    ``O(n·d·rank)`` once and ``O(d·rank·K)`` per evaluation, where the full eigendecomposition's
    ``O(d³)`` stops paying on a CPU.
    """

    OVERSAMPLE = 16

    def __init__(self, rows: _Rows, rank: int) -> None:
        xp = rows.xp
        rank = min(rank, rows.dim)
        probes = min(rank + self.OVERSAMPLE, rows.dim)
        # A fixed seed: the same rows give the same preconditioner, bit for bit.
        omega = np.random.default_rng(0).standard_normal((rows.dim, probes)).astype(np.float32)
        basis = xp.asarray(omega)
        trace = 0.0
        for step in range(3):
            product = xp.zeros((rows.dim, basis.shape[1]), dtype=xp.float64)
            for x, _ in rows:
                product += x.T @ (x @ basis)
                if step == 0:
                    trace += float((x.astype(xp.float64) ** 2).sum())
            product /= rows.n
            if step < 2:
                basis = xp.linalg.qr(product)[0].astype(xp.float32)
        # product = C·Q for the orthonormal Q of the power iteration: Qᵀ C Q is small.
        small = basis.astype(xp.float64).T @ product
        eigenvalues, vectors = xp.linalg.eigh((small + small.T) / 2)
        top = xp.argsort(eigenvalues)[::-1][:rank]
        self.eigenvalues = xp.maximum(eigenvalues[top], 0.0)
        self.basis = basis.astype(xp.float64) @ vectors[:, top]
        rest = rows.dim - rank
        self.rest = (
            max((trace / rows.n - float(self.eigenvalues.sum())) / rest, 0.0) if rest else 0.0
        )

    def bind(self, l2: float, classes: int) -> _Map:
        top = float(self.eigenvalues.max()) if len(self.eigenvalues) else 1.0
        floor = max(classes * l2, 1e-8 * max(top, self.rest), 1e-12)
        scales = 1.0 / (self.eigenvalues + floor) ** 0.5
        return _LowRankMap(self.basis, scales, 1.0 / (self.rest + floor) ** 0.5)


class _Map:
    """``W`` as a linear function of the variables ``V`` L-BFGS sees, and its adjoint."""

    def weight(self, v: Array) -> Array:
        return v

    def variables(self, weight: Array) -> Array:
        return weight

    def adjoint(self, grad_w: Array) -> Array:
        return grad_w


class _EigenMap(_Map):
    def __init__(self, basis: Array, scales: Array) -> None:
        self.basis, self.scales = basis, scales

    def weight(self, v: Array) -> Array:
        return self.basis @ (self.scales[:, None] * v)

    def variables(self, weight: Array) -> Array:
        # exact up to the basis' orthogonality (warm starts only)
        return (self.basis.T @ weight) / self.scales[:, None]

    def adjoint(self, grad_w: Array) -> Array:
        return self.scales[:, None] * (self.basis.T @ grad_w)


class _LowRankMap(_Map):
    def __init__(self, basis: Array, scales: Array, rest: float) -> None:
        self.basis, self.scales, self.rest = basis, scales, rest

    def _apply(self, a: Array, diagonal: Array, rest: float) -> Array:
        return rest * a + self.basis @ ((diagonal - rest)[:, None] * (self.basis.T @ a))

    def weight(self, v: Array) -> Array:
        return self._apply(v, self.scales, self.rest)

    def variables(self, weight: Array) -> Array:
        return self._apply(weight, 1.0 / self.scales, 1.0 / self.rest)

    def adjoint(self, grad_w: Array) -> Array:
        return self.weight(grad_w)  # P is symmetric


class _Objective:
    """``f`` and its gradient in the variables L-BFGS sees (``V`` row-major, then ``b``), float64
    on the host; remembers the largest gradient entry in ``(W, b)`` at the last point."""

    def __init__(self, rows: _Rows, classes: int, l2: float, precondition: Any) -> None:
        self.rows, self.classes, self.l2 = rows, classes, l2
        self.map = _Map() if precondition is None else precondition.bind(l2, classes)
        self.last: tuple[np.ndarray, float] | None = None
        self.evaluations = 0

    def variables(self, weight: Array) -> Array:
        """The ``V`` of ``weight`` (for warm starts)."""
        return self.map.variables(weight)

    def pack(self, weight: Array, bias: Array) -> np.ndarray:
        return np.concatenate([_to_numpy(self.variables(weight)).ravel(), _to_numpy(bias)])

    def unpack(self, theta: np.ndarray) -> tuple[Array, Array]:
        xp, dim = self.rows.xp, self.rows.dim
        v = xp.asarray(theta[: dim * self.classes].reshape(dim, self.classes))
        return self.map.weight(v), xp.asarray(theta[dim * self.classes :])

    def __call__(self, theta: np.ndarray) -> tuple[float, np.ndarray]:
        self.evaluations += 1
        weight, bias = self.unpack(theta)
        total, grad_w, grad_b = _data_term(self.rows, weight, bias)
        n, xp = self.rows.n, self.rows.xp
        loss = total / n + 0.5 * self.l2 * float((weight * weight).sum())
        grad_w = grad_w / n + self.l2 * weight
        grad_b = grad_b / n
        self.last = (theta, float(max(xp.abs(grad_w).max(), xp.abs(grad_b).max())))
        grad_v = self.map.adjoint(grad_w)
        return loss, np.concatenate([_to_numpy(grad_v).ravel(), _to_numpy(grad_b)])


# --------------------------------------------------------------------------------------------------
# Probes


@dataclass(frozen=True)
class Accuracy:
    """Top-1 and top-5 accuracy as fractions in [0, 1]."""

    top1: float
    top5: float


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Fraction of rows whose label ranks in the top ``k``; ties rank the lower class index first
    (as ``argmax``), so equal logits are never all counted correct. A row holding a NaN ranks
    nothing: it counts as wrong (every comparison with NaN is false, which would rank it first)."""
    labels = np.asarray(labels, dtype=np.int64)
    mine = logits[np.arange(len(labels)), labels][:, None]
    lower_index = np.arange(logits.shape[1])[None, :] < labels[:, None]
    rank = (logits > mine).sum(axis=1) + ((logits == mine) & lower_index).sum(axis=1)
    ranked = ~np.isnan(logits).any(axis=1)
    return float(((rank < k) & ranked).mean())


@dataclass(frozen=True)
class LinearProbe:
    """A fitted probe: ``logits = standardize(x) @ weight + bias``."""

    weight: np.ndarray  # float64 [d, K], on standardised features
    bias: np.ndarray  # float64 [K]
    standardizer: Standardizer
    l2: float
    loss: float  # the objective f at the solution, on the training rows
    n_iter: int
    converged: bool  # the tol (gradient) or ftol (relative decrease) test ended the fit
    evaluations: int = 0  # of the objective and its gradient

    def logits(
        self, X: Array, chunk_rows: int = CHUNK_ROWS, xp: ModuleType | None = None
    ) -> np.ndarray:
        """float64 ``[n, K]`` logits (on the host), computed chunk by chunk as in training; with
        ``xp`` (e.g. ``cupy``) host rows are computed there, one chunk at a time."""
        xp = xp or array_module(X)
        weight32 = xp.asarray(self.weight, dtype=xp.float32)
        bias = xp.asarray(self.bias, dtype=xp.float64)
        out = np.empty((len(X), len(self.bias)), dtype=np.float64)
        for rows in _row_chunks(len(X), chunk_rows):
            x = self.standardizer.transform(xp.asarray(X[rows]))
            out[rows] = _to_numpy(_logits(x, weight32, bias))
        return out

    def predict(self, X: Array, chunk_rows: int = CHUNK_ROWS) -> np.ndarray:
        return self.logits(X, chunk_rows).argmax(axis=1)

    def score(
        self, X: Array, y: Array, chunk_rows: int = CHUNK_ROWS, xp: ModuleType | None = None
    ) -> Accuracy:
        logits, labels = self.logits(X, chunk_rows, xp), _to_numpy(y)
        return Accuracy(topk_accuracy(logits, labels, 1), topk_accuracy(logits, labels, 5))


class _Solver:
    """Fits on one set of training rows at any L2 strength, from any start."""

    def __init__(
        self,
        rows: _Rows,
        classes: int,
        std: Standardizer,
        precondition: Precondition,
        max_iter: int,
        tol: float,
        ftol: float,
    ) -> None:
        self.rows, self.classes, self.std = rows, classes, std
        kind = preconditioner_kind(precondition, rows.dim, rows.xp is not np)
        self.preconditioner: Any = None
        if kind == "full":
            self.preconditioner = _Preconditioner(rows)
        elif kind == "low_rank":
            self.preconditioner = _LowRankPreconditioner(rows, LOW_RANK)
        self.max_iter, self.tol, self.ftol = max_iter, tol, ftol

    def solve(self, l2: float, start: LinearProbe | None = None) -> LinearProbe:
        if l2 < 0:
            raise ValueError(f"l2 must be non-negative, got {l2}")
        xp, dim, classes = self.rows.xp, self.rows.dim, self.classes
        objective = _Objective(self.rows, classes, l2, self.preconditioner)
        if start is None:
            theta0 = np.zeros(dim * classes + classes)
        else:
            theta0 = objective.pack(xp.asarray(start.weight), xp.asarray(start.bias))
        reached = False

        def stop_at_tolerance(intermediate_result: optimize.OptimizeResult) -> None:
            # scikit-learn's test, max |∂f| <= tol, in (W, b): L-BFGS-B's own gtol would see V.
            nonlocal reached
            last = objective.last
            if (
                last is not None
                and last[1] <= self.tol
                and np.array_equal(last[0], intermediate_result.x)
            ):
                reached = True
                raise StopIteration

        result = optimize.minimize(
            objective,
            theta0,
            method="L-BFGS-B",
            jac=True,
            callback=stop_at_tolerance,
            options={
                "maxiter": self.max_iter,
                "gtol": 0.0,
                "ftol": self.ftol,
                "maxls": MAX_LINE_SEARCH,
            },
        )
        weight, bias = objective.unpack(result.x)
        converged = reached or result.status == 0
        return LinearProbe(
            _to_numpy(weight).copy(),
            _to_numpy(bias).copy(),
            self.std,
            l2,
            float(result.fun),
            int(result.nit),
            bool(converged),
            objective.evaluations,
        )


def _num_classes(num_classes: int | None, *labels: Array) -> int:
    top = max(int(_to_numpy(y).max()) for y in labels) + 1
    if num_classes is None:
        return top
    if top > num_classes:
        raise ValueError(f"label {top - 1} out of range for num_classes={num_classes}")
    return num_classes


def fit(
    X: Array,
    y: Array,
    l2: float,
    *,
    num_classes: int | None = None,
    max_iter: int = 500,
    tol: float = TOL,
    ftol: float = FTOL,
    precondition: Precondition = None,
    chunk_rows: int = CHUNK_ROWS,
    resident: bool | None = None,
) -> LinearProbe:
    """Fit one probe at L2 strength ``l2`` from zero.

    ``X [n, d]`` raw features (NumPy, memory-mapped NumPy, or CuPy), ``y [n]`` integer labels.
    Stops when the largest gradient entry in ``(W, b)`` is at most ``tol`` (scikit-learn's
    ``tol`` test), the relative decrease is below ``ftol``, or after ``max_iter`` iterations.
    ``precondition=False`` runs L-BFGS on ``W`` itself (same minimiser, many more iterations);
    ``None`` picks one (:func:`preconditioner_kind`). ``resident``: standardise ``X`` once into a
    float32 copy in memory (``None``: unless ``X`` is on a device, or memory-mapped and larger
    than :func:`resident_budget`); figures are the same either way.
    """
    classes = _num_classes(num_classes, y)
    std = Standardizer.fit(X, chunk_rows)
    rows = _Rows(X, y, std, chunk_rows, is_resident(X, resident))
    return _Solver(rows, classes, std, precondition, max_iter, tol, ftol).solve(l2)


@dataclass(frozen=True)
class PathPoint:
    """One fit along the regularisation path and its score on the validation split."""

    probe: LinearProbe
    val: Accuracy

    @property
    def l2(self) -> float:
        return self.probe.l2


@dataclass(frozen=True)
class ProbePath:
    """The probe at the L2 strength chosen on val, and every point of the path (strong → weak)."""

    probe: LinearProbe
    points: tuple[PathPoint, ...]

    @property
    def l2(self) -> float:
        return self.probe.l2

    def score(self, X: Array, y: Array, chunk_rows: int = CHUNK_ROWS) -> Accuracy:
        return self.probe.score(X, y, chunk_rows)


def fit_path(
    train_X: Array,
    train_y: Array,
    val_X: Array,
    val_y: Array,
    l2s: Sequence[float],
    *,
    num_classes: int | None = None,
    max_iter: int = 500,
    tol: float = TOL,
    ftol: float = FTOL,
    precondition: Precondition = None,
    chunk_rows: int = CHUNK_ROWS,
    resident: bool | None = None,
    on_point: Callable[[PathPoint], None] | None = None,
) -> ProbePath:
    """Fit on train for each L2 strength, strongest first, each fit warm-started from the previous
    solution; keep the one with the best val top-1 (ties: the stronger L2).

    Every fit is on the training rows, so the chosen point *is* the refit on train at the chosen
    strength (the objective is strictly convex for ``l2 > 0``: one minimiser, whatever the start).
    Standardisation uses train statistics only. ``on_point`` is called after each fit. Val is
    scored on the training rows' array module (a device), one chunk at a time.
    """
    strengths = sorted({float(s) for s in l2s}, reverse=True)
    if not strengths:
        raise ValueError("l2s is empty")
    classes = _num_classes(num_classes, train_y, val_y)
    std = Standardizer.fit(train_X, chunk_rows)
    rows = _Rows(train_X, train_y, std, chunk_rows, is_resident(train_X, resident))
    solver = _Solver(rows, classes, std, precondition, max_iter, tol, ftol)
    points: list[PathPoint] = []
    probe = None
    for l2 in strengths:
        probe = solver.solve(l2, start=probe)
        val = probe.score(val_X, val_y, chunk_rows, xp=rows.xp)
        points.append(PathPoint(probe, val))
        if on_point is not None:
            on_point(points[-1])
    best = max(points, key=lambda p: p.val.top1)  # the first maximum: the stronger L2 on ties
    return ProbePath(best.probe, tuple(points))
