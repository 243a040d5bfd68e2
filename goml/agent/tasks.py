"""Task library: the NumPy/SciPy functions that agents run.

A task is a name plus JSON arguments. The argument models, the entry-point discovery of
user functions and :func:`validate_args` live in ``goml.api.task_args``, which imports no
NumPy, so the control plane can validate a submit without it; this module pairs each model
there with its implementation. Agents call :func:`run_task`, which validates with that same
code, runs the function and returns the result as JSON text, capped in size. SciPy is
imported lazily inside the functions that need it, so preloading this module stays cheap.

Built-ins are listed in ``BUILTINS``. User packages add functions through the entry-point
group ``goml.tasks``: each entry point names a :class:`TaskFunction` object whose ``name``
equals the entry point's name (see ``examples/goml-example-tasks``). The names in
``__all__`` that now live in ``goml.api.task_args`` are re-exported, so callers that import
them from here keep working.

Every random built-in draws from ``numpy.random.default_rng(seed)`` in a documented order,
so the same arguments give the same result and tests can recompute it with plain NumPy.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

import numpy as np
import numpy.typing as npt

from goml.api import task_args
from goml.api.task_args import (
    ARGS_JSON_MAX,
    BUILTIN_ARGS,
    ENTRY_POINT_GROUP,
    AllocateMbArgs,
    EighArgs,
    FailArgs,
    FftArgs,
    KmeansArgs,
    LinregArgs,
    LogregArgs,
    MatmulArgs,
    MinimizeArgs,
    MonteCarloPiArgs,
    SleepMsArgs,
    SvdArgs,
    TaskArgs,
    TaskArgsError,
    TaskError,
    TaskFunction,
    registry_errors,
    validate_args,
    validate_for_run,
)

__all__ = [
    "ARGS_JSON_MAX",
    "BUILTINS",
    "ENTRY_POINT_GROUP",
    "TaskArgs",
    "TaskArgsError",
    "TaskError",
    "TaskFunction",
    "TaskResultInvalid",
    "TaskResultTooLarge",
    "registry",
    "registry_errors",
    "reload_registry",
    "run_task",
    "validate_args",
]

FloatArray = npt.NDArray[np.float64]


# --------------------------------------------------------------------------- errors


class TaskResultTooLarge(TaskError):
    """The JSON-encoded result is larger than the agent's limit."""

    def __init__(self, name: str, size: int, limit: int) -> None:
        super().__init__(
            f"result of task function {name!r} is {size} bytes, over the limit of {limit} bytes"
        )
        self.name = name
        self.size = size
        self.limit = limit


class TaskResultInvalid(TaskError):
    """The function returned something that cannot be encoded as strict JSON."""


# --------------------------------------------------------------------------- helpers


def _floats(a: npt.ArrayLike) -> list[float]:
    return [float(v) for v in np.asarray(a, dtype=np.float64).ravel()]


def _sort_rows(a: FloatArray) -> FloatArray:
    # Lexicographic row order (first column first) makes k-means output independent of
    # the arbitrary labels the algorithm assigns.
    return a[np.lexsort(a.T[::-1])]


# --------------------------------------------------------------------------- matmul


def matmul(a: MatmulArgs) -> dict[str, object]:
    """C = A @ B with A (nxm) then B (mxk) drawn as standard normals from one rng."""
    rng = np.random.default_rng(a.seed)
    lhs = rng.standard_normal((a.n, a.m))
    rhs = rng.standard_normal((a.m, a.k))
    c = lhs @ rhs
    return {
        "shape": [a.n, a.k],
        "frobenius_norm": float(np.linalg.norm(c)),
        "diagonal_sum": float(np.trace(c)),  # sum of the main diagonal, also when not square
        "sum": float(c.sum()),
    }


# --------------------------------------------------------------------------- svd


def svd(a: SvdArgs) -> dict[str, object]:
    """Singular values of a standard-normal rowsxcols matrix: the top_k largest, descending."""
    mat = np.random.default_rng(a.seed).standard_normal((a.rows, a.cols))
    s = np.linalg.svd(mat, compute_uv=False)  # values only: much cheaper than U and V
    return {
        "shape": [a.rows, a.cols],
        "singular_values": _floats(s[: a.top_k]),
        "frobenius_norm": float(np.sqrt(np.sum(s * s))),
    }


# --------------------------------------------------------------------------- eigh


def eigh(a: EighArgs) -> dict[str, object]:
    """Eigenvalues (ascending) of S = (A + Aᵀ)/2, A standard normal nxn."""
    mat = np.random.default_rng(a.seed).standard_normal((a.n, a.n))
    w = np.linalg.eigvalsh((mat + mat.T) / 2)
    return {"n": a.n, "eigenvalues": _floats(w), "min": float(w[0]), "max": float(w[-1])}


# --------------------------------------------------------------------------- fft


def fft(a: FftArgs) -> dict[str, object]:
    """Spectrum of sum(amp·sin(2πft)) + noise·N(0,1); returns the strongest spectral peaks.

    t = arange(n_samples)/sample_rate; amplitudes default to 1. Peaks are local maxima of
    |rfft|, so one sine's leakage into neighbouring bins does not hide another sine.
    Magnitudes are 2|X|/n: a sine's amplitude when its frequency falls on a bin, less when
    it falls between bins.
    """
    t = np.arange(a.n_samples) / a.sample_rate
    amps = a.amplitudes if a.amplitudes is not None else [1.0] * len(a.freqs)
    signal = np.zeros(a.n_samples)
    for f, amp in zip(a.freqs, amps, strict=True):
        signal += amp * np.sin(2 * np.pi * f * t)
    signal += a.noise * np.random.default_rng(a.seed).standard_normal(a.n_samples)

    mag = 2 * np.abs(np.fft.rfft(signal)) / a.n_samples
    bins = np.fft.rfftfreq(a.n_samples, d=1 / a.sample_rate)
    padded = np.concatenate(([-np.inf], mag, [-np.inf]))
    peaks = np.flatnonzero((mag > padded[:-2]) & (mag >= padded[2:]))
    top = a.top if a.top is not None else len(a.freqs)
    best = peaks[np.argsort(-mag[peaks], kind="stable")[:top]]
    return {
        "dominant_frequencies": _floats(bins[best]),
        "magnitudes": _floats(mag[best]),
        "resolution_hz": float(a.sample_rate / a.n_samples),
    }


# --------------------------------------------------------------------------- kmeans


def make_blobs(
    rng: np.random.Generator, n_samples: int, n_clusters: int, dims: int, std: float, box: float
) -> tuple[FloatArray, FloatArray]:
    """Centers uniform in [-box, box]^dims, then points: sample i belongs to center i % k."""
    centers = rng.uniform(-box, box, size=(n_clusters, dims))
    labels = np.arange(n_samples) % n_clusters
    points = centers[labels] + std * rng.standard_normal((n_samples, dims))
    return centers, points


def _sq_dists(x: FloatArray, c: FloatArray) -> FloatArray:
    d: FloatArray = (x * x).sum(1)[:, None] - 2 * x @ c.T + (c * c).sum(1)[None, :]
    return np.maximum(d, 0.0)  # rounding can make tiny distances negative


def _kmeans_pp(rng: np.random.Generator, x: FloatArray, k: int) -> FloatArray:
    centers = [x[rng.integers(len(x))]]
    closest = _sq_dists(x, centers[0][None, :])[:, 0]
    for _ in range(1, k):
        total = closest.sum()
        # All points coincide with chosen centers: any point is as good as another.
        i = rng.choice(len(x), p=closest / total) if total > 0 else int(rng.integers(len(x)))
        centers.append(x[i])
        closest = np.minimum(closest, _sq_dists(x, x[i][None, :])[:, 0])
    return np.array(centers)


def _lloyd(
    x: FloatArray, centers: FloatArray, max_iter: int, tol: float
) -> tuple[FloatArray, float, int, bool]:
    k = len(centers)
    for it in range(1, max_iter + 1):
        labels = _sq_dists(x, centers).argmin(1)
        counts = np.bincount(labels, minlength=k)
        sums = np.zeros_like(centers)
        np.add.at(sums, labels, x)
        # An emptied cluster keeps its old center rather than becoming NaN.
        new = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], centers)
        shift = float(np.max(np.abs(new - centers)))
        centers = new
        if shift <= tol:
            inertia = float(_sq_dists(x, centers).min(1).sum())
            return centers, inertia, it, True
    return centers, float(_sq_dists(x, centers).min(1).sum()), max_iter, False


def kmeans(a: KmeansArgs) -> dict[str, object]:
    """Lloyd's algorithm with k-means++ starts on seeded blobs (see ``make_blobs``).

    One rng: blobs first, then n_init k-means++ starts; the run with lowest inertia wins.
    Centroids are returned sorted lexicographically, with their cluster sizes.
    """
    rng = np.random.default_rng(a.seed)
    _, x = make_blobs(rng, a.n_samples, a.n_clusters, a.dims, a.cluster_std, a.center_box)
    best: tuple[FloatArray, float, int, bool] | None = None
    for _ in range(a.n_init):
        run = _lloyd(x, _kmeans_pp(rng, x, a.n_clusters), a.max_iter, a.tol)
        if best is None or run[1] < best[1]:
            best = run
    assert best is not None  # n_init >= 1
    centers, inertia, iterations, converged = best
    centers = _sort_rows(centers)
    sizes = np.bincount(_sq_dists(x, centers).argmin(1), minlength=a.n_clusters)
    return {
        "centroids": [_floats(c) for c in centers],
        "cluster_sizes": [int(s) for s in sizes],
        "inertia": inertia,
        "iterations": iterations,
        "converged": converged,
    }


# --------------------------------------------------------------------------- regression


def make_regression(
    rng: np.random.Generator, n: int, d: int, noise: float
) -> tuple[FloatArray, FloatArray, FloatArray, float]:
    """X ~ N(0,1) (nxd), w ~ N(0,1) (d), b ~ N(0,1), y = Xw + b + noise·N(0,1), in that order."""
    x = rng.standard_normal((n, d))
    w = rng.standard_normal(d)
    b = float(rng.standard_normal())
    y = x @ w + b + noise * rng.standard_normal(n)
    return x, y, w, b


def linreg(a: LinregArgs) -> dict[str, object]:
    """Fit y ≈ Xw + b on ``make_regression`` data by least squares or full-batch gradient
    descent on the mean squared error; final_loss is that MSE."""
    rng = np.random.default_rng(a.seed)
    x, y, _, _ = make_regression(rng, a.n_samples, a.n_features, a.noise)
    xb = np.hstack([x, np.ones((a.n_samples, 1))])  # bias as a last constant column
    if a.method == "lstsq":
        theta = np.linalg.lstsq(xb, y, rcond=None)[0]
        epochs = 0
    else:
        theta = np.zeros(a.n_features + 1)
        for _ in range(a.epochs):
            theta -= a.lr * (2 / a.n_samples) * (xb.T @ (xb @ theta - y))
        epochs = a.epochs
    resid = xb @ theta - y
    loss = float(np.mean(resid * resid))
    if not math.isfinite(loss):
        raise FloatingPointError(f"gradient descent diverged (lr={a.lr} is too large)")
    return {
        "coefficients": _floats(theta[:-1]),
        "intercept": float(theta[-1]),
        "final_loss": loss,
        "epochs": epochs,
    }


def _sigmoid(z: FloatArray) -> FloatArray:
    out: FloatArray = 0.5 * (1 + np.tanh(0.5 * z))  # no overflow for large |z|
    return out


def make_classification(
    rng: np.random.Generator, n: int, d: int
) -> tuple[FloatArray, FloatArray, FloatArray, float]:
    """X ~ N(0,1), w ~ N(0,1)·2, b ~ N(0,1), y ~ Bernoulli(sigmoid(Xw + b)), in that order."""
    x = rng.standard_normal((n, d))
    w = 2 * rng.standard_normal(d)
    b = float(rng.standard_normal())
    y = (rng.random(n) < _sigmoid(x @ w + b)).astype(np.float64)
    return x, y, w, b


def logreg_loss(theta: FloatArray, xb: FloatArray, y: FloatArray, l2: float) -> float:
    """Mean log loss plus l2/2·|w|² (bias not penalised), computed without overflow."""
    z = xb @ theta
    w = theta[:-1]
    return float(np.mean(np.logaddexp(0.0, z) - y * z) + 0.5 * l2 * (w @ w))


def logreg(a: LogregArgs) -> dict[str, object]:
    """Full-batch gradient descent on ``logreg_loss`` over ``make_classification`` data."""
    rng = np.random.default_rng(a.seed)
    x, y, _, _ = make_classification(rng, a.n_samples, a.n_features)
    xb = np.hstack([x, np.ones((a.n_samples, 1))])
    theta = np.zeros(a.n_features + 1)
    penalty = np.append(np.full(a.n_features, a.l2), 0.0)
    for _ in range(a.epochs):
        grad = xb.T @ (_sigmoid(xb @ theta) - y) / a.n_samples + penalty * theta
        theta -= a.lr * grad
    accuracy = float(np.mean(((xb @ theta) > 0) == (y > 0.5)))
    return {
        "weights": _floats(theta[:-1]),
        "intercept": float(theta[-1]),
        "final_loss": logreg_loss(theta, xb, y, a.l2),
        "accuracy": accuracy,
        "epochs": a.epochs,
    }


# --------------------------------------------------------------------------- minimize


def minimize(a: MinimizeArgs) -> dict[str, object]:
    """scipy.optimize.minimize of the Rosenbrock function in ``dims`` dimensions from
    x0 ~ U(-2, 2) (seeded). The global optimum is x = (1, ..., 1) with value 0; from 4
    dimensions up there is also a local minimum near (-1, 1, ..., 1), which some starts
    reach (``success`` is then true too: it means converged, not global)."""
    # Lazy: the control plane imports this module to validate args and needs no SciPy.
    # No scipy stubs are installed; the second code keeps this clean if they are.
    from scipy.optimize import (  # type: ignore[import-untyped, unused-ignore]
        minimize as sp_minimize,
    )
    from scipy.optimize import rosen, rosen_der  # type: ignore[import-untyped, unused-ignore]

    x0 = np.random.default_rng(a.seed).uniform(-2, 2, a.dims)
    gradient_free = a.method in ("Nelder-Mead", "Powell")
    res = sp_minimize(
        rosen,
        x0,
        jac=None if gradient_free else rosen_der,
        method=a.method,
        tol=a.tol,
        options={"maxiter": a.maxiter},
    )
    return {
        "x": _floats(res.x),
        "fun": float(res.fun),
        "nit": int(res.nit),
        "success": bool(res.success),
        "message": str(res.message),
    }


# --------------------------------------------------------------------------- monte carlo


MC_CHUNK = 1_000_000  # bounds memory whatever the sample count


def monte_carlo_pi(a: MonteCarloPiArgs) -> dict[str, object]:
    """Estimate π as 4·P(x² + y² <= 1) for x, y ~ U[0, 1). Chunks of ``MC_CHUNK``: per chunk,
    x then y are drawn with ``rng.random(size)``. stderr is the binomial standard error."""
    rng = np.random.default_rng(a.seed)
    hits = 0
    left = a.samples
    while left:
        size = min(left, MC_CHUNK)
        px = rng.random(size)
        py = rng.random(size)
        hits += int(np.count_nonzero(px * px + py * py <= 1.0))
        left -= size
    p = hits / a.samples
    return {
        "estimate": 4 * p,
        "stderr": 4 * math.sqrt(p * (1 - p) / a.samples),
        "samples": a.samples,
    }


# --------------------------------------------------------------------------- test helpers


def sleep_ms(a: SleepMsArgs) -> dict[str, object]:
    """TEST HELPER ONLY: sleeps ``ms`` milliseconds and does nothing else. It exists so
    timeout and cancellation paths can be tested with a task of known duration."""
    time.sleep(a.ms / 1000)
    return {"slept_ms": a.ms}


def fail(a: FailArgs) -> dict[str, object]:
    """TEST HELPER ONLY: raises RuntimeError(message), to exercise the failure path."""
    raise RuntimeError(a.message)


# The smallest page size: one write every this many bytes makes every page resident.
_TOUCH_STRIDE_BYTES = 4096


def allocate_mb(a: AllocateMbArgs) -> dict[str, object]:
    """TEST HELPER ONLY: allocates ``mb`` MiB (a bytearray), writes to every page of it so
    it is resident and not just reserved, holds it ``hold_ms`` milliseconds, then frees
    it. It exists so the agent's recycling of workers by memory can be tested."""
    block = bytearray(a.mb << 20)
    pages = len(range(0, len(block), _TOUCH_STRIDE_BYTES))
    block[::_TOUCH_STRIDE_BYTES] = b"\x01" * pages
    assert len(block) == a.mb << 20 and block[0] == 1, len(block)
    time.sleep(a.hold_ms / 1000)
    del block
    return {"allocated_mb": a.mb}


# --------------------------------------------------------------------------- registry

BUILTINS: dict[str, TaskFunction[Any]] = {
    t.name: t
    for t in (
        TaskFunction("matmul", MatmulArgs, matmul, "random nxm @ mxk: norm, sums"),
        TaskFunction("svd", SvdArgs, svd, "top-k singular values of a random matrix"),
        TaskFunction("eigh", EighArgs, eigh, "eigenvalues of a random symmetric matrix"),
        TaskFunction("fft", FftArgs, fft, "dominant frequencies of sines plus noise"),
        TaskFunction("kmeans", KmeansArgs, kmeans, "Lloyd's k-means on seeded blobs"),
        TaskFunction("linreg", LinregArgs, linreg, "linear regression on synthetic data"),
        TaskFunction("logreg", LogregArgs, logreg, "logistic regression by gradient descent"),
        TaskFunction("minimize", MinimizeArgs, minimize, "SciPy minimize of Rosenbrock"),
        TaskFunction("monte_carlo_pi", MonteCarloPiArgs, monte_carlo_pi, "Monte Carlo π"),
        TaskFunction("sleep_ms", SleepMsArgs, sleep_ms, "test helper: sleep"),
        TaskFunction("fail", FailArgs, fail, "test helper: raise"),
        TaskFunction("allocate_mb", AllocateMbArgs, allocate_mb, "test helper: use memory"),
    )
}


# The control plane validates with BUILTIN_ARGS and the agents run BUILTINS: one model per
# name in both, or a submit accepted by one would be rejected (or misread) by the other.
assert BUILTINS.keys() == BUILTIN_ARGS.keys()
assert all(BUILTINS[name].args_model is model for name, model in BUILTIN_ARGS.items())


def reload_registry() -> dict[str, TaskFunction[Any]]:
    """Forget the cached registry and discover entry points again."""
    task_args.reload_registry()
    return registry()


def registry() -> dict[str, TaskFunction[Any]]:
    """Built-ins plus user functions from entry points (a copy; broken ones left out)."""
    user = task_args.user_functions()
    assert not user.keys() & BUILTINS.keys()  # discovery refuses shadows of built-ins
    return {**BUILTINS, **user}


# --------------------------------------------------------------------------- run


def _to_json(value: object) -> object:
    if isinstance(value, np.ndarray | np.generic):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def run_task(name: str, args_json: str, result_bytes_max: int) -> str:
    """Validate, run, and return the result as compact JSON text.

    Raises TaskArgsError, TaskResultInvalid, TaskResultTooLarge; exceptions raised by the
    function itself propagate unchanged (the agent reports their text).
    """
    if result_bytes_max <= 0:
        raise ValueError(f"result_bytes_max must be positive, got {result_bytes_max}")
    user, args = validate_for_run(name, args_json)
    fn = user if user is not None else BUILTINS[name]
    assert isinstance(args, fn.args_model)
    result = fn.fn(args)
    try:
        text = json.dumps(result, allow_nan=False, separators=(",", ":"), default=_to_json)
    except (TypeError, ValueError) as exc:
        raise TaskResultInvalid(
            f"result of task function {name!r} is not JSON-serialisable: {exc}"
        ) from None
    size = len(text.encode())
    if size > result_bytes_max:
        raise TaskResultTooLarge(name, size, result_bytes_max)
    return text
