"""Task library: each built-in against an independent NumPy/SciPy computation, argument
validation, the result size cap, and entry-point discovery from a fake dist-info."""

from __future__ import annotations

import importlib
import json
import logging
import math
import subprocess
import sys
import textwrap
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from goml.agent import tasks
from goml.agent.tasks import (
    TaskArgsError,
    TaskResultInvalid,
    TaskResultTooLarge,
    registry,
    registry_errors,
    reload_registry,
    run_task,
    validate_args,
)

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "goml-example-tasks"
BIG = 10 << 20


def run(name: str, result_bytes_max: int = BIG, **args: Any) -> Any:
    return json.loads(run_task(name, json.dumps(args), result_bytes_max))


# --------------------------------------------------------------------------- built-ins


def test_matmul_matches_numpy() -> None:
    out = run("matmul", n=40, m=30, k=50, seed=7)
    rng = np.random.default_rng(7)
    c = rng.standard_normal((40, 30)) @ rng.standard_normal((30, 50))
    assert out["shape"] == [40, 50]
    assert out["frobenius_norm"] == pytest.approx(math.sqrt((c**2).sum()), rel=1e-12)
    assert out["diagonal_sum"] == pytest.approx(sum(c[i, i] for i in range(40)), rel=1e-9)
    assert out["sum"] == pytest.approx(c.sum(), rel=1e-9, abs=1e-9)


def test_svd_matches_numpy_full_svd() -> None:
    out = run("svd", rows=60, cols=45, top_k=5, seed=3)
    a = np.random.default_rng(3).standard_normal((60, 45))
    s = np.linalg.svd(a)[1]  # full SVD with U and V, unlike the task
    assert out["shape"] == [60, 45]
    assert out["singular_values"] == pytest.approx(s[:5].tolist(), rel=1e-10)
    assert out["frobenius_norm"] == pytest.approx(np.linalg.norm(a), rel=1e-10)


def test_eigh_matches_general_eigensolver() -> None:
    out = run("eigh", n=50, seed=11)
    a = np.random.default_rng(11).standard_normal((50, 50))
    expected = np.sort(np.linalg.eigvals((a + a.T) / 2).real)
    assert out["eigenvalues"] == pytest.approx(expected.tolist(), abs=1e-9)
    assert out["min"] == out["eigenvalues"][0]
    assert out["max"] == out["eigenvalues"][-1]


def test_fft_finds_the_generated_frequencies() -> None:
    # 4000 samples at 1 kHz: 0.25 Hz bins, so 50 and 120 Hz fall exactly on bins.
    out = run(
        "fft", freqs=[120.0, 50.0], amplitudes=[0.5, 1.0], sample_rate=1000.0,
        n_samples=4000, noise=0.3, seed=5,
    )  # fmt: skip
    assert out["dominant_frequencies"] == [50.0, 120.0]
    assert out["magnitudes"] == pytest.approx([1.0, 0.5], abs=0.03)
    # Independent: strongest bin of the full complex FFT of the same signal.
    t = np.arange(4000) / 1000.0
    x = np.sin(2 * np.pi * 50 * t) + 0.5 * np.sin(2 * np.pi * 120 * t)
    x = x + 0.3 * np.random.default_rng(5).standard_normal(4000)
    spectrum = np.abs(np.fft.fft(x))[:2000]
    assert np.argmax(spectrum) * 0.25 == out["dominant_frequencies"][0]
    assert run("fft", freqs=[50.0, 120.0], top=1)["dominant_frequencies"] == [
        pytest.approx(50.0, abs=0.25)
    ]


def test_kmeans_recovers_well_separated_centers() -> None:
    k, n = 4, 800
    out = run("kmeans", n_samples=n, n_clusters=k, dims=2, cluster_std=0.2, seed=21)
    # The documented generator: centers U(-10, 10) first from the same rng.
    centers = np.random.default_rng(21).uniform(-10, 10, size=(k, 2))
    got = np.array(out["centroids"])
    for c in centers:
        assert np.min(np.linalg.norm(got - c, axis=1)) < 0.1
    assert out["cluster_sizes"] == [n // k] * k
    assert out["converged"] is True
    # Inertia recomputed from the returned centroids and regenerated points.
    rng = np.random.default_rng(21)
    c0 = rng.uniform(-10, 10, size=(k, 2))
    x = c0[np.arange(n) % k] + 0.2 * rng.standard_normal((n, 2))
    d = ((x[:, None, :] - got[None, :, :]) ** 2).sum(-1).min(1).sum()
    assert out["inertia"] == pytest.approx(d, rel=1e-9)
    assert out["centroids"] == sorted(out["centroids"])


def _regression_data(seed: int, n: int, d: int, noise: float) -> tuple[Any, ...]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    w = rng.standard_normal(d)
    b = rng.standard_normal()
    y = x @ w + b + noise * rng.standard_normal(n)
    return x, y, w, b


def test_linreg_recovers_true_coefficients() -> None:
    x, y, w, b = _regression_data(9, 2000, 4, 0.05)
    for method in ("lstsq", "gd"):
        out = run("linreg", n_samples=2000, n_features=4, noise=0.05, method=method, seed=9)
        assert out["coefficients"] == pytest.approx(w.tolist(), abs=0.01)
        assert out["intercept"] == pytest.approx(b, abs=0.01)
        pred = x @ np.array(out["coefficients"]) + out["intercept"]
        assert out["final_loss"] == pytest.approx(np.mean((pred - y) ** 2), rel=1e-9)
        assert out["final_loss"] == pytest.approx(0.05**2, rel=0.2)


def test_linreg_divergence_is_an_error() -> None:
    with pytest.raises(FloatingPointError, match="diverged"), np.errstate(all="ignore"):
        run("linreg", method="gd", lr=10.0, epochs=2000)


def test_logreg_reaches_scipy_optimum() -> None:
    from scipy.optimize import minimize  # type: ignore[import-untyped, unused-ignore]

    n, d, l2 = 1500, 3, 0.01
    out = run("logreg", n_samples=n, n_features=d, lr=1.0, epochs=3000, l2=l2, seed=4)
    rng = np.random.default_rng(4)
    x = rng.standard_normal((n, d))
    w = 2 * rng.standard_normal(d)
    b = rng.standard_normal()
    y = (rng.random(n) < 1 / (1 + np.exp(-(x @ w + b)))).astype(float)
    xb = np.hstack([x, np.ones((n, 1))])

    def loss(theta: Any) -> float:
        z = xb @ theta
        return float(np.mean(np.log1p(np.exp(z)) - y * z) + 0.5 * l2 * theta[:-1] @ theta[:-1])

    best = minimize(loss, np.zeros(d + 1), method="BFGS", options={"gtol": 1e-9})
    assert out["weights"] == pytest.approx(best.x[:-1].tolist(), abs=1e-3)
    assert out["intercept"] == pytest.approx(best.x[-1], abs=1e-3)
    assert out["final_loss"] == pytest.approx(best.fun, abs=1e-6)
    theta = np.array([*out["weights"], out["intercept"]])
    assert out["accuracy"] == pytest.approx(np.mean((xb @ theta > 0) == (y == 1)))
    assert out["accuracy"] > 0.75


@pytest.mark.parametrize(("method", "dims"), [("L-BFGS-B", 6), ("BFGS", 4), ("Nelder-Mead", 2)])
def test_minimize_reaches_rosenbrock_optimum(method: str, dims: int) -> None:
    out = run("minimize", dims=dims, method=method, seed=0)
    assert out["success"] is True
    assert out["x"] == pytest.approx([1.0] * dims, abs=1e-3)
    x = np.array(out["x"])
    rosen = np.sum(100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2)
    assert out["fun"] == pytest.approx(rosen, rel=1e-6, abs=1e-12)
    assert out["fun"] < 1e-6
    assert out["nit"] > 0


def test_minimize_can_stop_at_rosenbrock_local_minimum() -> None:
    # From this start BFGS lands in the known 4-d local minimum near (-1, 1, 1, 1).
    from scipy.optimize import rosen, rosen_der  # type: ignore[import-untyped, unused-ignore]

    out = run("minimize", dims=4, method="BFGS", seed=2)
    assert out["success"] is True
    assert out["fun"] == pytest.approx(3.7014, abs=1e-3)
    assert out["fun"] == pytest.approx(rosen(np.array(out["x"])), rel=1e-9)
    assert np.linalg.norm(rosen_der(np.array(out["x"]))) < 1e-4


@pytest.mark.parametrize("samples", [300_000, 2_500_000])
def test_monte_carlo_pi(samples: int) -> None:
    out = run("monte_carlo_pi", samples=samples, seed=13)
    rng = np.random.default_rng(13)
    hits, left = 0, samples
    while left:  # the documented chunking: x then y, 1e6 at a time
        size = min(left, 1_000_000)
        x, y = rng.random(size), rng.random(size)
        hits += int(np.sum(x**2 + y**2 <= 1))
        left -= size
    assert out["estimate"] == 4 * hits / samples
    p = hits / samples
    assert out["stderr"] == pytest.approx(4 * math.sqrt(p * (1 - p) / samples))
    assert abs(out["estimate"] - math.pi) < 5 * out["stderr"]


def test_builtins_are_deterministic_and_seed_sensitive() -> None:
    for name in registry():
        if name in ("sleep_ms", "fail", "allocate_mb") or name not in tasks.BUILTINS:
            continue
        first = run_task(name, '{"seed": 1}', BIG)
        assert run_task(name, '{"seed": 1}', BIG) == first, name
        if name != "minimize":  # several starts can land on the same optimum
            assert run_task(name, '{"seed": 2}', BIG) != first, name


def test_sleep_ms_and_fail_helpers() -> None:
    start = time.monotonic()
    assert run("sleep_ms", ms=50) == {"slept_ms": 50}
    assert time.monotonic() - start >= 0.05
    with pytest.raises(RuntimeError, match=r"^boom: disk on fire$"):
        run("fail", message="boom: disk on fire")


def test_scipy_not_imported_by_the_module() -> None:
    code = "import sys, goml.agent.tasks; print('scipy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_task_args_imports_neither_numpy_nor_scipy() -> None:
    # Every control-plane node imports goml.api.task_args to validate submits; NumPy there
    # would cost each node its import time and memory for nothing.
    # Import only: validating would also load whatever user entry points are installed,
    # and those may import NumPy themselves.
    code = "import sys, goml.api.task_args; print(sorted({'numpy', 'scipy'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("name", "args", "fragments"),
    [
        ("svd", {"rows": 5000}, ["'svd'", "'rows'", "less than or equal to 2000"]),
        ("matmul", {"n": 3, "bogus": 1}, ["'matmul'", "'bogus'", "Extra inputs"]),
        ("matmul", {"n": "3"}, ["'matmul'", "'n'", "valid integer"]),
        ("matmul", {"n": True}, ["'matmul'", "'n'"]),
        ("eigh", {"seed": -1}, ["'eigh'", "'seed'"]),
        ("svd", {"rows": 5, "cols": 8, "top_k": 6}, ["'svd'", "top_k"]),
        ("fft", {"freqs": [600.0]}, ["'fft'", "sample_rate/2"]),
        ("fft", {"freqs": [1.0, 2.0], "amplitudes": [1.0]}, ["'fft'", "amplitudes"]),
        ("minimize", {"method": "SGD"}, ["'minimize'", "'method'", "'BFGS'"]),
        ("sleep_ms", {}, ["'sleep_ms'", "'ms'", "Field required"]),
        ("kmeans", {"n_samples": 2, "n_clusters": 3}, ["'kmeans'", "n_samples"]),
    ],
)
def test_invalid_args_name_function_and_field(
    name: str, args: dict[str, Any], fragments: list[str]
) -> None:
    with pytest.raises(TaskArgsError) as info:
        validate_args(name, json.dumps(args))
    for fragment in fragments:
        assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("args_json", "fragment"),
    [("{not json", "not JSON"), ('{"n": NaN}', "not JSON"), ("[1, 2]", "JSON object")],
)
def test_args_must_be_a_json_object(args_json: str, fragment: str) -> None:
    with pytest.raises(TaskArgsError, match=fragment) as info:
        validate_args("matmul", args_json)
    assert "'matmul'" in str(info.value)


def test_empty_args_mean_defaults() -> None:
    assert validate_args("matmul", "") == validate_args("matmul", "{}")
    assert validate_args("matmul", '{"n": 3}').model_dump()["n"] == 3


def test_oversized_args_are_refused_before_parsing() -> None:
    with pytest.raises(TaskArgsError, match="over the limit"):
        validate_args("fail", json.dumps({"message": "x" * (tasks.ARGS_JSON_MAX + 1)}))


def test_unknown_function_lists_known_ones() -> None:
    with pytest.raises(TaskArgsError) as info:
        run_task("qr", "{}", BIG)
    message = str(info.value)
    assert "unknown task function 'qr'" in message
    for known in ("eigh", "fft", "kmeans", "matmul", "monte_carlo_pi", "svd"):
        assert known in message


def test_result_size_cap() -> None:
    text = run_task("eigh", '{"n": 200}', BIG)
    size = len(text.encode())
    assert run_task("eigh", '{"n": 200}', size) == text  # exactly at the limit is fine
    with pytest.raises(TaskResultTooLarge) as info:
        run_task("eigh", '{"n": 200}', size - 1)
    assert str(size) in str(info.value)
    assert f"limit of {size - 1} bytes" in str(info.value)
    assert (info.value.size, info.value.limit) == (size, size - 1)
    with pytest.raises(ValueError, match="positive"):
        run_task("eigh", "{}", 0)


# --------------------------------------------------------------------------- entry points


FakeDist = Callable[[str, dict[str, str], dict[str, str]], None]


@pytest.fixture
def fake_dist(tmp_path: Path) -> Iterator[FakeDist]:
    """Put tmp_path on sys.path and let the test write dist-infos and modules into it,
    exactly what pip would leave in site-packages, without installing anything."""
    added_modules: list[str] = []

    def make(dist: str, eps: dict[str, str], modules: dict[str, str]) -> None:
        info = tmp_path / f"{dist.replace('-', '_')}-0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
        lines = [f"{k} = {v}" for k, v in eps.items()]
        (info / "entry_points.txt").write_text("[goml.tasks]\n" + "\n".join(lines) + "\n")
        for mod, src in modules.items():
            (tmp_path / f"{mod}.py").write_text(textwrap.dedent(src))
            added_modules.append(mod)
        importlib.invalidate_caches()
        reload_registry()

    sys.path.insert(0, str(tmp_path))
    try:
        yield make
    finally:
        sys.path.remove(str(tmp_path))
        for mod in added_modules:
            sys.modules.pop(mod, None)
        importlib.invalidate_caches()
        reload_registry()


USER_MODULE = """
    import math
    import numpy as np
    from pydantic import Field
    from goml.agent.tasks import TaskArgs, TaskFunction

    class DoubleArgs(TaskArgs):
        x: float = Field(le=1e6)

    double = TaskFunction("user_double", DoubleArgs, lambda a: {"y": np.float64(2 * a.x)})
    nan = TaskFunction("user_nan", DoubleArgs, lambda a: {"y": math.nan})
    opaque = TaskFunction("user_opaque", DoubleArgs, lambda a: {"y": object()})
"""


def test_entry_point_functions_are_discovered(fake_dist: FakeDist) -> None:
    fake_dist(
        "goml-user-tasks",
        {
            "user_double": "goml_user_tasks_mod:double",
            "user_nan": "goml_user_tasks_mod:nan",
            "user_opaque": "goml_user_tasks_mod:opaque",
        },
        {"goml_user_tasks_mod": USER_MODULE},
    )
    reg = registry()
    assert {"user_double", "user_nan", "user_opaque"} <= set(reg)
    assert set(tasks.BUILTINS) <= set(reg)
    assert registry_errors() == {}
    assert run("user_double", x=2.5) == {"y": 5.0}  # numpy scalar encoded as a float
    with pytest.raises(TaskArgsError, match=r"'user_double'.*'x'"):
        validate_args("user_double", '{"x": 1e9}')
    with pytest.raises(TaskResultInvalid, match="'user_nan'"):
        run("user_nan", x=1.0)
    with pytest.raises(TaskResultInvalid, match=r"'user_opaque'.*object"):
        run("user_opaque", x=1.0)


def test_registry_forgets_uninstalled_entry_points(fake_dist: FakeDist) -> None:
    assert "user_double" not in registry()


def test_broken_entry_points_are_reported_and_builtins_remain(
    fake_dist: FakeDist, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="goml.api.task_args"):
        fake_dist(
            "goml-broken-tasks",
            {
                "missing": "goml_no_such_module_xyz:thing",
                "raising": "goml_raising_mod:thing",
                "not_a_task": "goml_plain_mod:thing",
                "misnamed": "goml_plain_mod:task",
                "svd": "goml_plain_mod:svd",
            },
            {
                "goml_raising_mod": "raise ImportError('needs libfoo')\n",
                "goml_plain_mod": """
                    from goml.agent.tasks import TaskArgs, TaskFunction
                    thing = 42
                    task = TaskFunction("other_name", TaskArgs, lambda a: 1)
                    svd = TaskFunction("svd", TaskArgs, lambda a: 1)
                """,
            },
        )
    reg = registry()
    assert reg.keys() == tasks.BUILTINS.keys()
    assert reg["svd"] is tasks.BUILTINS["svd"]
    errors = registry_errors()
    assert set(errors) == {"missing", "raising", "not_a_task", "misnamed", "svd"}
    assert "'missing'" in errors["missing"]
    assert "ModuleNotFoundError" in errors["missing"]
    assert "goml-broken-tasks" in errors["missing"]
    assert "needs libfoo" in errors["raising"]
    assert "not a goml TaskFunction" in errors["not_a_task"]
    assert "'other_name'" in errors["misnamed"]
    assert "shadow the built-in" in errors["svd"]
    logged = caplog.text
    assert "'missing'" in logged
    assert "needs libfoo" in logged
    with pytest.raises(TaskArgsError, match=r"'raising' is unavailable.*needs libfoo"):
        validate_args("raising", "{}")
    assert run("matmul", n=2, m=2, k=2)["shape"] == [2, 2]


def test_example_package_entry_point(fake_dist: FakeDist) -> None:
    # Use the example's own pyproject entry points, with its source dir on sys.path.
    project = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())
    eps = project["project"]["entry-points"]["goml.tasks"]
    sys.path.insert(0, str(EXAMPLE / "src"))
    try:
        fake_dist("goml-example-tasks", eps, {})
        assert registry_errors() == {}
        out = run("example_moving_average", values=[1, 2, 3, 4], window=2)
        assert out == {"window": 2, "means": [1.5, 2.5, 3.5]}
        with pytest.raises(TaskArgsError, match=r"'example_moving_average'.*window"):
            validate_args("example_moving_average", '{"values": [1], "window": 2}')
    finally:
        sys.path.remove(str(EXAMPLE / "src"))
        sys.modules.pop("goml_example_tasks", None)
