"""Local build steps of the deploy (run on the machine that runs pyinfra, once per run):
the wheelhouse for each (architecture, Python) the hosts need, and the cluster
credentials (CA, node certificates, client certificate, secret, token).

The goml wheel is rebuilt only when its sources change, so a repeat deploy uploads
nothing new.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from functools import cache
from pathlib import Path

# The goml source tree the wheel is built from (GOML_SOURCE_DIR overrides: e.g. a release
# checkout for a rolling upgrade).
REPO = Path(os.environ.get("GOML_SOURCE_DIR") or Path(__file__).resolve().parent.parent)
DEFAULT_BUILD_DIR = Path(__file__).resolve().parent / ".build"
# pyinfra loads deploy.py for every host concurrently (gevent); the pre-flight holds this.
PREFLIGHT_LOCK = threading.Lock()
PLATFORM_ARCH = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}


class BuildError(RuntimeError):
    pass


def _source_digest() -> str:
    digest = hashlib.sha256()
    files = [REPO / "pyproject.toml", *sorted((REPO / "goml").rglob("*"))]
    for path in files:
        if path.is_file() and "__pycache__" not in path.parts:
            digest.update(str(path.relative_to(REPO)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _run(command: list[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise BuildError(
            f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr[-3000:]}"
        )


def _fresh(out: Path) -> Path:
    """An empty scratch directory beside `out` (renamed onto it when complete)."""
    tmp = out.parent / f"{out.name}.partial"
    if tmp.is_dir():
        shutil.rmtree(tmp)
    else:
        tmp.unlink(missing_ok=True)
    tmp.mkdir(parents=True)
    return tmp


@cache
def goml_wheel(build_dir: Path, version: str) -> Path:
    """The goml wheel for `version`, built from this checkout (cached by source digest)."""
    out = build_dir / "goml-wheel" / _source_digest()
    wheels = sorted(out.glob(f"goml-{version}-*.whl")) if out.is_dir() else []
    if wheels:
        return wheels[0]
    tmp = _fresh(out)
    with tempfile.TemporaryDirectory(prefix="goml-wheel-src-") as source:
        # A clean copy: an in-tree build would leave build/ and stale state in the checkout.
        src = Path(source)
        for name in ("pyproject.toml", "README.md", "LICENSE", "setup.cfg", "MANIFEST.in"):
            if (REPO / name).is_file():
                shutil.copy2(REPO / name, src / name)
        shutil.copytree(
            REPO / "goml", src / "goml", ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
        )
        _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", str(src), "-w", str(tmp)])
    built = sorted(tmp.glob("goml-*.whl"))
    if not built:
        raise BuildError(f"pip wheel wrote no goml wheel into {tmp}")
    if not built[0].name.startswith(f"goml-{version}-"):
        raise BuildError(
            f"this checkout builds {built[0].name}, but the inventory asks for goml_version "
            f"{version}: set goml_version to the checkout's version"
        )
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return sorted(out.glob("goml-*.whl"))[0]


@cache
def wheelhouse(build_dir: Path, version: str, arch: str, python: str) -> tuple[Path, ...]:
    """The wheels that install goml==version offline on `arch` with CPython `python`
    (e.g. "3.11"): goml's own wheel plus binary wheels of its dependencies. The
    dependencies are cached by pyproject.toml, so a source change downloads nothing."""
    platform_arch = PLATFORM_ARCH.get(arch)
    if platform_arch is None:
        raise BuildError(f"no wheels for architecture {arch!r} (known: {sorted(PLATFORM_ARCH)})")
    wheel = goml_wheel(build_dir, version)
    requirements = hashlib.sha256((REPO / "pyproject.toml").read_bytes()).hexdigest()[:16]
    out = build_dir / "deps" / f"{requirements}-{platform_arch}-py{python}"
    if not (out / ".complete").is_file():
        tmp = _fresh(out)
        _run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "-q",
                "--only-binary=:all:",
                "--implementation",
                "cp",
                "--python-version",
                python,
                "--platform",
                f"manylinux2014_{platform_arch}",
                "--platform",
                f"manylinux_2_28_{platform_arch}",
                "-d",
                str(tmp),
                str(wheel),
            ]
        )
        for own in tmp.glob("goml-*.whl"):
            own.unlink()
        (tmp / ".complete").write_text("ok\n")
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    return (wheel, *sorted(out.glob("*.whl")))


@cache
def credentials(
    state_dir: Path,
    nodes: tuple[str, ...],
    hosts: tuple[str, ...],
    agents: tuple[str, ...] = (),
    node_addresses: tuple[tuple[str, str], ...] = (),
    retired: tuple[str, ...] = (),
) -> Path:
    """The cluster's credentials under state_dir/certs, created once and then reused
    (the CA is never replaced silently). Each agent has its own certificate and token
    (`goml.api.auth`: an agent may act only as itself); an agent added to the inventory
    later is issued one with the existing CA, and so is a node added later (its
    certificate names its own address, `node_addresses`), as `goml node add` does. A
    state directory that holds none of the inventory's nodes, `retired` ones included,
    belongs to another cluster: refused."""
    from goml.api.auth import Identity, Role
    from goml.cluster.certs import TOKENS_FILE, ensure_identity, init_certs, issue_identity

    certs = state_dir / "certs"
    if not (certs / "ca.pem").exists():
        state_dir.mkdir(parents=True, exist_ok=True)
        try:
            init_certs(certs, list(nodes), list(hosts), agents=agents)
        except ValueError as error:
            raise BuildError(str(error)) from None
        return certs
    missing = [n for n in nodes if not (certs / f"{n}.pem").is_file()]
    known = [n for n in (*nodes, *retired) if (certs / f"{n}.pem").is_file()]
    if missing and not known:
        raise BuildError(
            f"{certs} holds no certificate for any node of this inventory "
            f"({', '.join(nodes)}): this state directory belongs to another cluster "
            "(set goml_state_dir)"
        )
    if not (certs / TOKENS_FILE).is_file():
        raise BuildError(
            f"{certs} predates per-identity credentials (no {TOKENS_FILE}): move it away "
            "to issue new ones (every host then gets new certificates)"
        )
    address_of = dict(node_addresses)
    for node in missing:
        # A node new in the inventory: its certificate from the cluster's CA.
        try:
            issue_identity(certs, Identity(Role.NODE, node), [address_of.get(node, node)])
        except ValueError as error:
            raise BuildError(f"node {node}: {error}") from None
    for agent in agents:
        ensure_identity(certs, Identity(Role.AGENT, agent), certificate=True)
    return certs
