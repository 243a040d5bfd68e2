"""The images of the container runtime (`goml chaos run --runtime containers`), built
offline: nothing here pulls from a registry (none is reachable where goml is tested).

    goml-base:bookworm      `docker import` of the deploy lab's Debian root file system
                            (pyinfra/lab.py debootstraps it into /var/cache/goml-lab)
    goml:VERSION            the base + a virtualenv with goml installed from a wheelhouse
                            built here (goml's wheel + binary wheels of its dependencies)
    goml-toxiproxy:2.12.0   the base + toxiproxy-server built from its Go sources
                            (`CGO_ENABLED=0 go install ...@v2.12.0`, a static binary)

`python -m goml.chaos.image` (what `nox -s image` runs) builds the three. Every step is
cached: the base is imported again only when the root file system changed, goml's wheel
is rebuilt only when goml's sources changed, the dependencies are downloaded again only
when pyproject.toml changed, Toxiproxy is compiled once per version, and `docker build`
reuses its layers, so a rebuild with no change takes seconds. The goml image carries the
digest of the sources it was built from (label org.goml.source-digest): the runtime
refuses an image built from other sources than the goml it runs with.

The classic builder is used (DOCKER_BUILDKIT=0): the Dockerfiles need nothing more and
it needs no buildx plugin.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import goml
from goml.chaos.server import TOXIPROXY_MODULE, TOXIPROXY_VERSION

BASE_IMAGE = "goml-base:bookworm"
TOXIPROXY_IMAGE = f"goml-toxiproxy:{TOXIPROXY_VERSION.removeprefix('v')}"
LABEL_ROOTFS = "org.goml.rootfs"
LABEL_SOURCE = "org.goml.source-digest"
LABEL_VERSION = "org.goml.version"
LAB_CACHE = Path(os.environ.get("GOML_LAB_CACHE", "/var/cache/goml-lab"))
DEFAULT_ROOTFS = LAB_CACHE / "rootfs-bookworm"
ROOTFS_READY = ".goml-lab-ready"  # written by pyinfra/lab.py when the debootstrap is complete
BUILD_COMMAND = "nox -s image"  # or `python -m goml.chaos.image`
HOW_TO_BUILD = f"build it with `{BUILD_COMMAND}` (or `python -m goml.chaos.image`)"
SOURCE_SUFFIXES = (".py", ".pyi", ".proto", ".yaml", ".typed")
STEP_TIMEOUT_S = 1800.0  # one docker import, pip download, go install or docker build
PROBE_TIMEOUT_S = 60.0


class ImageError(RuntimeError):
    """An image cannot be built or used; the message says what to do."""


def goml_version() -> str:
    return importlib.metadata.version("goml")


def goml_image() -> str:
    """The goml image's tag: goml's version."""
    return f"goml:{goml_version()}"


def package_dir() -> Path:
    return Path(goml.__file__).resolve().parent


def source_digest(directory: Path | None = None) -> str:
    """A digest of goml's package files (what its wheel installs): the same for the
    checkout the image was built from and for the installed package."""
    root = directory or package_dir()
    digest = hashlib.sha256()
    files = sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and p.suffix in SOURCE_SUFFIXES and "__pycache__" not in p.parts
    )
    assert files, f"no goml sources under {root}"
    for path in files:
        digest.update(str(path.relative_to(root)).encode())
        digest.update(b"\0")
        digest.update(path.read_bytes())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "goml" / "image"


# ------------------------------------------------------------------------ running


def _run(
    command: list[str],
    what: str,
    *,
    stdin: int | None = None,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> str:
    """Run a build step; its failure is an ImageError with the end of its output."""
    try:
        done = subprocess.run(
            command,
            stdin=stdin,
            capture_output=True,
            text=True,
            env=env,
            cwd=cwd,
            timeout=STEP_TIMEOUT_S,
            check=False,
        )
    except FileNotFoundError:
        raise ImageError(f"{what}: `{command[0]}` not found") from None
    except subprocess.TimeoutExpired:
        raise ImageError(f"{what}: took over {STEP_TIMEOUT_S:.0f} s") from None
    if done.returncode != 0:
        output = (done.stderr.strip() or done.stdout.strip())[-3000:]
        raise ImageError(f"{what} failed ({done.returncode}):\n{output}")
    return done.stdout


def docker_cli() -> str:
    found = shutil.which("docker")
    if found is None:
        raise ImageError(
            "no `docker` command: install Docker (Debian: `apt-get install "
            "--no-install-recommends docker.io`) and start its engine (`dockerd &` as root)"
        )
    return found


def image_labels(tag: str) -> dict[str, str] | None:
    """The labels of a local image (None when the engine has no such image)."""
    done = subprocess.run(
        [docker_cli(), "image", "inspect", "--format", "{{json .Config.Labels}}", tag],
        capture_output=True,
        text=True,
        timeout=PROBE_TIMEOUT_S,
        check=False,
    )
    if done.returncode != 0:
        if "No such image" in done.stderr or "No such object" in done.stderr:
            return None
        raise ImageError(f"docker image inspect {tag}: {done.stderr.strip()}")
    import json

    labels = json.loads(done.stdout.strip() or "null")
    return dict(labels) if isinstance(labels, dict) else {}


# --------------------------------------------------------------------------- steps


def rootfs_identity(rootfs: Path) -> str:
    """What names one debootstrap of the root file system (it is rebuilt as a whole)."""
    ready = rootfs / ROOTFS_READY
    if not ready.is_file():
        raise ImageError(
            f"no complete root file system at {rootfs} (no {ROOTFS_READY}): make it with "
            "`python pyinfra/lab.py rootfs` (root; debootstrap, ≈3 min), which `nox -s image` runs"
        )
    stat = ready.stat()
    text = f"{rootfs.resolve()}:{stat.st_mtime_ns}:{ready.read_text().strip()}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def ensure_base(rootfs: Path, log: Callable[[str], None]) -> str:
    """goml-base:bookworm from the root file system, imported again only if it changed."""
    identity = rootfs_identity(rootfs)
    labels = image_labels(BASE_IMAGE)
    if labels is not None and labels.get(LABEL_ROOTFS) == identity:
        log(f"{BASE_IMAGE}: up to date (root file system {identity})")
        return identity
    log(f"{BASE_IMAGE}: docker import of {rootfs}")
    with tempfile.TemporaryFile() as tar_err:
        tar = subprocess.Popen(
            ["tar", "--numeric-owner", "-C", str(rootfs), "-c", "."],
            stdout=subprocess.PIPE,
            stderr=tar_err,
        )
        assert tar.stdout is not None
        try:
            _run(
                [
                    *(docker_cli(), "import"),
                    *("--change", f"LABEL {LABEL_ROOTFS}={identity}"),
                    *("-", BASE_IMAGE),
                ],
                f"docker import {rootfs}",
                stdin=tar.stdout.fileno(),
            )
        finally:
            tar.stdout.close()
            tar.wait(timeout=PROBE_TIMEOUT_S)
        if tar.returncode != 0:
            tar_err.seek(0)
            raise ImageError(f"tar of {rootfs} failed: {tar_err.read().decode()[-2000:]}")
    return identity


def base_python() -> tuple[str, str]:
    """(machine, "3.11") of the base image's python3, asked in a container with no network."""
    out = _run(
        [
            *(docker_cli(), "run", "--rm", "--network", "none", BASE_IMAGE),
            *("python3", "-c", "import platform, sys; print(platform.machine(), '%d.%d' % sys.version_info[:2])"),
        ],
        f"python3 in {BASE_IMAGE}",
    )  # fmt: skip
    machine, version = out.split()
    return machine, version


def checkout() -> Path:
    """The source checkout goml runs from (its wheel and the Dockerfiles come from it)."""
    repo = package_dir().parent
    for needed in ("pyproject.toml", "docker/goml.Dockerfile", "docker/toxiproxy.Dockerfile"):
        if not (repo / needed).is_file():
            raise ImageError(
                f"{repo / needed} is missing: build the images from a goml source checkout "
                "(pip install -e .)"
            )
    return repo


def goml_wheel(repo: Path, digest: str, log: Callable[[str], None]) -> Path:
    """goml's wheel, built from a clean copy of the checkout, cached by source digest."""
    out = cache_dir() / "wheels" / f"goml-{digest}"
    found = sorted(out.glob("goml-*.whl")) if out.is_dir() else []
    if found:
        log(f"goml wheel: cached ({found[0].name}, sources {digest})")
        return found[0]
    log(f"goml wheel: building from {repo} (sources {digest})")
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="goml-image-src-") as source:
        src = Path(source)
        for name in ("pyproject.toml", "README.md", "LICENSE"):
            if (repo / name).is_file():
                shutil.copy2(repo / name, src / name)
        shutil.copytree(
            repo / "goml", src / "goml", ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
        )
        _run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", str(src), "-w", str(partial)],
            "pip wheel (goml)",
        )
    built = sorted(partial.glob(f"goml-{goml_version()}-*.whl"))
    if not built:
        raise ImageError(
            f"pip wheel built no goml-{goml_version()} wheel in {partial}: is the installed "
            "goml this checkout's version? (pip install -e .)"
        )
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    return out / built[0].name


def dependency_wheels(
    repo: Path, wheel: Path, machine: str, python: str, log: Callable[[str], None]
) -> Path:
    """Binary wheels of goml's dependencies for the image's CPython and architecture,
    downloaded once per pyproject.toml."""
    requirements = hashlib.sha256((repo / "pyproject.toml").read_bytes()).hexdigest()[:16]
    out = cache_dir() / "wheels" / f"deps-{requirements}-{machine}-py{python}"
    if (out / ".complete").is_file():
        log(f"dependency wheels: cached ({out.name})")
        return out
    log(f"dependency wheels: pip download for CPython {python} on {machine}")
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    _run(
        [
            *(sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:"),
            *("--implementation", "cp", "--python-version", python),
            *("--platform", f"manylinux2014_{machine}", "--platform", f"manylinux_2_28_{machine}"),
            *("-d", str(partial), str(wheel)),
        ],
        "pip download (goml's dependencies)",
    )
    for own in partial.glob("goml-*.whl"):
        own.unlink()
    (partial / ".complete").write_text("ok\n")
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    return out


def toxiproxy_binary(log: Callable[[str], None]) -> Path:
    """A static toxiproxy-server built from its Go sources, once per version."""
    out = cache_dir() / f"toxiproxy-{TOXIPROXY_VERSION}" / "toxiproxy-server"
    if out.is_file():
        log(f"toxiproxy-server {TOXIPROXY_VERSION}: cached ({out})")
        return out
    go = shutil.which("go") or (
        "/usr/local/go/bin/go" if Path("/usr/local/go/bin/go").is_file() else None
    )
    if go is None:
        raise ImageError(
            f"Go is needed to build Toxiproxy for its image (`go install {TOXIPROXY_MODULE}`): "
            "install Go and put it on PATH"
        )
    log(f"toxiproxy-server: CGO_ENABLED=0 go install {TOXIPROXY_MODULE}")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="goml-toxiproxy-") as gobin:
        _run(
            [go, "install", TOXIPROXY_MODULE],
            f"go install {TOXIPROXY_MODULE}",
            env={**os.environ, "GOBIN": gobin, "CGO_ENABLED": "0"},
        )
        built = Path(gobin) / "server"  # the module's binary is named after its directory
        if not built.is_file():
            raise ImageError(f"go install {TOXIPROXY_MODULE} built no `server` binary")
        partial = out.with_suffix(".partial")
        shutil.copy2(built, partial)
        partial.chmod(0o755)
        partial.replace(out)
    return out


def _context(name: str, files: dict[str, Path]) -> Path:
    """A fresh build context of hard links (or copies) to cached files: `files` maps a
    path inside the context to a file or a directory of files."""
    context = cache_dir() / "context" / name
    shutil.rmtree(context, ignore_errors=True)
    context.mkdir(parents=True)
    for inside, source in files.items():
        target = context / inside
        sources = (
            sorted(p for p in source.iterdir() if p.is_file()) if source.is_dir() else [source]
        )
        (target if source.is_dir() else target.parent).mkdir(parents=True, exist_ok=True)
        for path in sources:
            dest = target / path.name if source.is_dir() else target
            try:
                os.link(path, dest)
            except OSError:
                shutil.copy2(path, dest)
    return context


def docker_build(
    dockerfile: Path, context: Path, tag: str, args: dict[str, str], log: Callable[[str], None]
) -> float:
    """`docker build` with the classic builder (layer cache); returns the seconds taken."""
    started = time.monotonic()
    command = [docker_cli(), "build", "-f", str(dockerfile), "-t", tag]
    for key, value in sorted(args.items()):
        command += ["--build-arg", f"{key}={value}"]
    output = _run(
        [*command, str(context)], f"docker build {tag}", env={**os.environ, "DOCKER_BUILDKIT": "0"}
    )
    cached = output.count("Using cache")
    steps = output.count("\nStep ") + output.startswith("Step ")
    elapsed = time.monotonic() - started
    log(f"{tag}: built in {elapsed:.1f} s ({cached} of {steps} steps from the layer cache)")
    return elapsed


@dataclass(frozen=True)
class Built:
    images: tuple[str, ...]
    seconds: float


def build_images(rootfs: Path = DEFAULT_ROOTFS, log: Callable[[str], None] = print) -> Built:
    """Build (or refresh from the caches) the base, goml and Toxiproxy images."""
    from goml.chaos.containers import engine_problem

    started = time.monotonic()
    problem = engine_problem()
    if problem is not None:
        raise ImageError(problem)
    repo = checkout()
    ensure_base(rootfs, log)
    machine, python = base_python()
    digest = source_digest(repo / "goml")
    wheel = goml_wheel(repo, digest, log)
    deps = dependency_wheels(repo, wheel, machine, python, log)
    context = _context("goml", {"deps": deps, f"app/{wheel.name}": wheel})
    (context / "deps" / ".complete").unlink(missing_ok=True)
    args = {"BASE": BASE_IMAGE, "GOML_VERSION": goml_version(), "SOURCE_DIGEST": digest}
    docker_build(repo / "docker" / "goml.Dockerfile", context, goml_image(), args, log)
    # The goml image this one replaced (older sources) is left untagged: remove it.
    _run(
        [docker_cli(), "image", "prune", "-f", "--filter", f"label={LABEL_SOURCE}"],
        "docker image prune (goml images of older sources)",
    )
    binary = toxiproxy_binary(log)
    context = _context("toxiproxy", {"toxiproxy-server": binary})
    args = {"BASE": BASE_IMAGE, "TOXIPROXY_VERSION": TOXIPROXY_VERSION}
    docker_build(repo / "docker" / "toxiproxy.Dockerfile", context, TOXIPROXY_IMAGE, args, log)
    return Built((BASE_IMAGE, goml_image(), TOXIPROXY_IMAGE), time.monotonic() - started)


def image_problem() -> str | None:
    """Why the runtime cannot use the images (None when both are there and current)."""
    labels = image_labels(goml_image())
    if labels is None:
        return f"image {goml_image()} not found in the Docker engine: {HOW_TO_BUILD}"
    built_from, running = labels.get(LABEL_SOURCE), source_digest()
    if built_from != running:
        return (
            f"image {goml_image()} was built from other goml sources ({built_from}) than the "
            f"goml running this command ({running}): rebuild it with `{BUILD_COMMAND}` "
            "(seconds when only goml changed)"
        )
    if image_labels(TOXIPROXY_IMAGE) is None:
        return f"image {TOXIPROXY_IMAGE} not found in the Docker engine: {HOW_TO_BUILD}"
    return None


def main(argv: list[str] | None = None) -> int:
    """`python -m goml.chaos.image [--rootfs DIR]`: build the images, print their tags."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rootfs",
        type=Path,
        default=DEFAULT_ROOTFS,
        help=f"Debian root file system to import (default {DEFAULT_ROOTFS}, from pyinfra/lab.py)",
    )
    args = parser.parse_args(argv)
    try:
        built = build_images(args.rootfs, log=lambda line: print(f"image: {line}", flush=True))
    except ImageError as error:
        print(f"goml image: {error}", file=sys.stderr)
        return 2
    print(f"image: {', '.join(built.images)} ready in {built.seconds:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
