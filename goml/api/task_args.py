"""Task-argument schemas: what the control plane needs to check a submit, without NumPy.

A task is a name plus JSON arguments. The control plane calls :func:`validate_args` at
submit time; that must stay cheap on every node, so this module imports only the standard
library and pydantic. The NumPy/SciPy implementations of the built-ins live in
``goml.agent.tasks``, which pairs each model in ``BUILTIN_ARGS`` with its function and runs
it; only agents import that.

User packages add functions through the entry-point group ``goml.tasks``: each entry point
names a :class:`TaskFunction` object whose ``name`` equals the entry point's name (see
``examples/goml-example-tasks``). Discovery lives here rather than with the built-ins
because validating a user function's args needs its ``args_model``, and only the built-in
*names* are needed to refuse an entry point that would shadow one.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Generic, Literal, Self, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

__all__ = [
    "ARGS_JSON_MAX",
    "BUILTIN_ARGS",
    "ENTRY_POINT_GROUP",
    "MAX_DIM",
    "MAX_SEED",
    "AllocateMbArgs",
    "EighArgs",
    "FailArgs",
    "FftArgs",
    "KmeansArgs",
    "LinregArgs",
    "LogregArgs",
    "MatmulArgs",
    "MinimizeArgs",
    "MonteCarloPiArgs",
    "SleepMsArgs",
    "SvdArgs",
    "TaskArgs",
    "TaskArgsError",
    "TaskError",
    "TaskFunction",
    "registry_errors",
    "reload_registry",
    "user_functions",
    "validate_args",
    "validate_for_run",
]

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "goml.tasks"
# Arguments are parsed on the control plane's submit path; refuse huge documents before
# json.loads spends time on them. Built-in arguments are a few hundred bytes at most.
ARGS_JSON_MAX = 1 << 20

MAX_DIM = 2000  # matrix side: a 2000x2000 float64 is 32 MB, fine for an agent
MAX_SEED = 2**63 - 1


# --------------------------------------------------------------------------- errors


class TaskError(Exception):
    """Base class of the task library's own errors (not of errors raised by functions)."""


class TaskArgsError(TaskError, ValueError):
    """Unknown function, args that are not JSON, or args invalid for the function."""


# --------------------------------------------------------------------------- registry types


class TaskArgs(BaseModel):
    """Base for argument models: unknown fields are errors and JSON types are not coerced
    (``"5"`` is not an int, ``true`` is not 1), so a typo fails at submit time."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


ArgsT = TypeVar("ArgsT", bound=BaseModel)

_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]{0,63}")


@dataclass(frozen=True)
class TaskFunction(Generic[ArgsT]):
    """A named task: ``fn(args_model instance) -> JSON-serialisable value``.

    NumPy arrays and scalars in the result are converted with ``tolist()``/``item()``;
    NaN and infinities are rejected (they are not JSON).
    """

    name: str
    args_model: type[ArgsT]
    fn: Callable[[ArgsT], object]
    description: str = ""

    def __post_init__(self) -> None:
        if not _NAME_RE.fullmatch(self.name):
            raise ValueError(f"invalid task function name {self.name!r}")
        if not (isinstance(self.args_model, type) and issubclass(self.args_model, BaseModel)):
            raise TypeError(f"task function {self.name!r}: args_model must be a pydantic model")


@dataclass(frozen=True)
class _Loaded:
    functions: dict[str, TaskFunction[Any]]  # user functions only; built-ins never appear
    errors: dict[str, str] = field(default_factory=dict)  # entry point name -> message


# --------------------------------------------------------------------------- helpers


def _seed() -> Any:
    return Field(default=0, ge=0, le=MAX_SEED, description="seed of numpy.random.default_rng")


def _dim(default: int) -> Any:
    return Field(default=default, ge=1, le=MAX_DIM)


# --------------------------------------------------------------------------- built-in models
# Each model's function, with the meaning of every field, is in goml.agent.tasks.


class MatmulArgs(TaskArgs):
    n: int = _dim(256)
    m: int = _dim(256)
    k: int = _dim(256)
    seed: int = _seed()


class SvdArgs(TaskArgs):
    rows: int = _dim(256)
    cols: int = _dim(256)
    top_k: int = Field(default=10, ge=1, le=MAX_DIM)
    seed: int = _seed()

    @model_validator(mode="after")
    def _top_k_fits(self) -> Self:
        if self.top_k > min(self.rows, self.cols):
            raise ValueError(f"top_k ({self.top_k}) must be <= min(rows, cols)")
        return self


class EighArgs(TaskArgs):
    n: int = _dim(128)
    seed: int = _seed()


class FftArgs(TaskArgs):
    freqs: list[float] = Field(default=[50.0, 120.0], min_length=1, max_length=16)
    amplitudes: list[float] | None = Field(default=None, min_length=1, max_length=16)
    sample_rate: float = Field(default=1000.0, gt=0, le=1e7)
    n_samples: int = Field(default=4096, ge=8, le=1 << 22)
    noise: float = Field(default=0.5, ge=0, le=1e3)
    top: int | None = Field(default=None, ge=1, le=16)
    seed: int = _seed()

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.amplitudes is not None and len(self.amplitudes) != len(self.freqs):
            raise ValueError("amplitudes must have one value per frequency")
        nyquist = self.sample_rate / 2
        for f in self.freqs:
            if not 0 < f < nyquist:
                raise ValueError(f"frequency {f} must be in (0, sample_rate/2 = {nyquist})")
        return self


class KmeansArgs(TaskArgs):
    # n_samples x n_clusters distances and n_samples x dims points stay near 100 MB each.
    n_samples: int = Field(default=1000, ge=1, le=100_000)
    n_clusters: int = Field(default=3, ge=1, le=64)
    dims: int = Field(default=2, ge=1, le=128)
    cluster_std: float = Field(default=1.0, gt=0, le=100)
    center_box: float = Field(default=10.0, gt=0, le=1e6)
    max_iter: int = Field(default=300, ge=1, le=10_000)
    n_init: int = Field(default=3, ge=1, le=20)
    tol: float = Field(default=1e-6, ge=0, le=1)
    seed: int = _seed()

    @model_validator(mode="after")
    def _enough_samples(self) -> Self:
        if self.n_samples < self.n_clusters:
            raise ValueError("n_samples must be >= n_clusters")
        return self


class LinregArgs(TaskArgs):
    n_samples: int = Field(default=1000, ge=2, le=100_000)
    n_features: int = Field(default=5, ge=1, le=100)
    noise: float = Field(default=0.1, ge=0, le=1e3)
    method: Literal["lstsq", "gd"] = "lstsq"
    lr: float = Field(default=0.1, gt=0, le=10)
    epochs: int = Field(default=500, ge=1, le=20_000)
    seed: int = _seed()


class LogregArgs(TaskArgs):
    n_samples: int = Field(default=1000, ge=2, le=100_000)
    n_features: int = Field(default=5, ge=1, le=100)
    lr: float = Field(default=0.5, gt=0, le=10)
    epochs: int = Field(default=500, ge=1, le=20_000)
    l2: float = Field(default=0.0, ge=0, le=1e3)
    seed: int = _seed()


class MinimizeArgs(TaskArgs):
    dims: int = Field(default=5, ge=2, le=1000)
    method: Literal["BFGS", "L-BFGS-B", "CG", "Nelder-Mead", "Powell"] = "L-BFGS-B"
    maxiter: int = Field(default=10_000, ge=1, le=1_000_000)
    tol: float | None = Field(default=None, gt=0, le=1)
    seed: int = _seed()


class MonteCarloPiArgs(TaskArgs):
    samples: int = Field(default=1_000_000, ge=1, le=1_000_000_000)
    seed: int = _seed()


class SleepMsArgs(TaskArgs):
    ms: int = Field(ge=0, le=3_600_000)


class FailArgs(TaskArgs):
    message: str = Field(default="task failed on purpose", max_length=10_000)


class AllocateMbArgs(TaskArgs):
    mb: int = Field(ge=1, le=4096)
    hold_ms: int = Field(default=0, ge=0, le=60_000)


# goml.agent.tasks asserts at import that its BUILTINS has exactly these names and models,
# so the control plane and the agents cannot disagree about what a built-in accepts.
BUILTIN_ARGS: dict[str, type[TaskArgs]] = {
    "matmul": MatmulArgs,
    "svd": SvdArgs,
    "eigh": EighArgs,
    "fft": FftArgs,
    "kmeans": KmeansArgs,
    "linreg": LinregArgs,
    "logreg": LogregArgs,
    "minimize": MinimizeArgs,
    "monte_carlo_pi": MonteCarloPiArgs,
    "sleep_ms": SleepMsArgs,
    "fail": FailArgs,
    "allocate_mb": AllocateMbArgs,
}


# --------------------------------------------------------------------------- discovery


def _describe(ep: EntryPoint) -> str:
    dist = ep.dist.name if ep.dist is not None else "unknown distribution"
    return f"entry point {ep.name!r} = {ep.value!r} (group {ENTRY_POINT_GROUP!r}, from {dist})"


def _discover() -> _Loaded:
    functions: dict[str, TaskFunction[Any]] = {}
    errors: dict[str, str] = {}
    sources: dict[str, str] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        # The same distribution can be visible twice on sys.path; that is not a conflict.
        if sources.get(ep.name) == ep.value:
            continue
        where = _describe(ep)
        try:
            obj = ep.load()
        except Exception as exc:  # any import-time failure of user code is reported, not fatal
            errors[ep.name] = f"{where} failed to load: {type(exc).__name__}: {exc}"
            continue
        if not isinstance(obj, TaskFunction):
            errors[ep.name] = f"{where} is a {type(obj).__name__}, not a goml TaskFunction"
        elif obj.name != ep.name:
            errors[ep.name] = f"{where} names a TaskFunction called {obj.name!r}"
        elif ep.name in BUILTIN_ARGS:
            errors[ep.name] = f"{where} would shadow the built-in {ep.name!r}; ignored"
        elif ep.name in sources:
            errors[ep.name] = f"{where} conflicts with {sources[ep.name]!r}; both ignored"
            functions.pop(ep.name, None)
        else:
            functions[ep.name] = obj
            sources[ep.name] = ep.value
    # Built-ins win by construction: registry() in goml.agent.tasks merges without checking.
    assert not functions.keys() & BUILTIN_ARGS.keys()
    assert all(fn.name == name for name, fn in functions.items())
    for message in errors.values():
        log.error("goml task library: %s", message)
    return _Loaded(functions, errors)


_lock = threading.Lock()
_loaded: _Loaded | None = None


def _get() -> _Loaded:
    # Discovery scans every distribution on sys.path and imports user modules: do it once
    # per process, not per submit. reload_registry() picks up newly installed packages.
    global _loaded
    with _lock:
        if _loaded is None:
            _loaded = _discover()
        return _loaded


def reload_registry() -> dict[str, TaskFunction[Any]]:
    """Forget the cached discovery and scan entry points again; returns the user functions
    (``goml.agent.tasks.reload_registry`` returns them together with the built-ins)."""
    global _loaded
    with _lock:
        _loaded = None
    return user_functions()


def user_functions() -> dict[str, TaskFunction[Any]]:
    """User functions from entry points (a copy; broken ones and would-be shadows of a
    built-in left out)."""
    return dict(_get().functions)


def registry_errors() -> dict[str, str]:
    """Entry points that could not be registered: entry point name -> message."""
    return dict(_get().errors)


# --------------------------------------------------------------------------- validate


def _reject_constant(token: str) -> object:
    raise ValueError(f"{token} is not valid JSON")


def _format_errors(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in err["loc"])
        where = f"field {loc!r}" if loc else "args"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


def validate_args(name: str, args_json: str) -> BaseModel:
    """Parse and validate ``args_json`` for task function ``name``; an empty string means
    ``{}``. Raises TaskArgsError naming the function (and field) on any problem."""
    return validate_for_run(name, args_json)[1]


def validate_for_run(name: str, args_json: str) -> tuple[TaskFunction[Any] | None, BaseModel]:
    """:func:`validate_args`, also returning the user TaskFunction whose model validated the
    args, or None for a built-in. The agent runs that very object: looking it up again after
    validating could find another one if reload_registry() ran in between."""
    loaded = _get()
    user = loaded.functions.get(name)
    model: type[BaseModel] | None = BUILTIN_ARGS.get(name)
    assert user is None or model is None  # _discover refuses shadows of built-ins
    if user is not None:
        model = user.args_model
    if model is None:
        if name in loaded.errors:
            raise TaskArgsError(f"task function {name!r} is unavailable: {loaded.errors[name]}")
        known = ", ".join(sorted(BUILTIN_ARGS.keys() | loaded.functions.keys()))
        raise TaskArgsError(f"unknown task function {name!r}; known: {known}")
    if len(args_json) > ARGS_JSON_MAX:
        raise TaskArgsError(
            f"args for task function {name!r} are {len(args_json)} characters, "
            f"over the limit of {ARGS_JSON_MAX}"
        )
    try:
        raw = json.loads(args_json, parse_constant=_reject_constant) if args_json.strip() else {}
    except ValueError as exc:  # JSONDecodeError, or NaN/Infinity via _reject_constant
        raise TaskArgsError(f"args for task function {name!r} are not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise TaskArgsError(
            f"args for task function {name!r} must be a JSON object, not {type(raw).__name__}"
        )
    try:
        args = model.model_validate(raw)
    except ValidationError as exc:
        raise TaskArgsError(
            f"invalid args for task function {name!r}: {_format_errors(exc)}"
        ) from None
    assert isinstance(args, model)
    return user, args
