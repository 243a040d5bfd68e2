"""Getting a Toxiproxy server: a running one (`--toxiproxy-url`), a binary
(`--toxiproxy-bin`, `toxiproxy-server` on PATH or in goml's cache), one built with Go
(`go install github.com/Shopify/toxiproxy/v2/cmd/server@v2.12.0`, copied into the cache
as `toxiproxy-server`), or the official image where a Docker engine runs. Without any of
these, `ToxiproxyUnavailable` says exactly how to get one.

A server this module starts is stopped by PID (or container id) when its context ends.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from goml.chaos.toxiproxy import Toxiproxy, ToxiproxyError
from goml.cluster.local import free_ports

TOXIPROXY_VERSION = "v2.12.0"
TOXIPROXY_MODULE = f"github.com/Shopify/toxiproxy/v2/cmd/server@{TOXIPROXY_VERSION}"
TOXIPROXY_IMAGE = "ghcr.io/shopify/toxiproxy:2.12.0"
BINARY_NAME = "toxiproxy-server"
GO_INSTALL_TIMEOUT_S = 900.0
START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 5.0

HOW_TO_GET_ONE = (
    "no Toxiproxy server available. Get one of:\n"
    f"  - Go installed: `go install {TOXIPROXY_MODULE}` and copy $(go env GOPATH)/bin/server "
    f"to a directory on PATH as {BINARY_NAME} (goml does this itself when `go` is on PATH);\n"
    f"  - a release binary from https://github.com/Shopify/toxiproxy/releases ({BINARY_NAME}), "
    "then pass --toxiproxy-bin PATH or put it on PATH;\n"
    f"  - a running server: pass --toxiproxy-url http://HOST:8474 "
    f"(e.g. `docker run --network host {TOXIPROXY_IMAGE}`)."
)


class ToxiproxyUnavailable(RuntimeError):
    pass


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "goml" / "bin"


def find_binary(explicit: Path | None = None) -> Path | None:
    """`explicit` (must exist), else `toxiproxy-server` on PATH, else in goml's cache."""
    if explicit is not None:
        if not explicit.is_file() or not os.access(explicit, os.X_OK):
            raise ToxiproxyUnavailable(f"--toxiproxy-bin {explicit}: not an executable file")
        return explicit
    on_path = shutil.which(BINARY_NAME)
    if on_path:
        return Path(on_path)
    cached = cache_dir() / BINARY_NAME
    return cached if cached.is_file() and os.access(cached, os.X_OK) else None


def install_with_go(log: list[str]) -> Path | None:
    """Build Toxiproxy with `go install` into a temporary GOBIN and copy the binary
    (named `server`) into the cache as `toxiproxy-server`. None when Go is missing."""
    go = shutil.which("go")
    if go is None:
        log.append("`go` is not on PATH: cannot build Toxiproxy")
        return None
    target = cache_dir() / BINARY_NAME
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="goml-toxiproxy-") as gobin:
        env = dict(os.environ, GOBIN=gobin)
        log.append(f"building Toxiproxy: go install {TOXIPROXY_MODULE}")
        try:
            done = subprocess.run(
                [go, "install", TOXIPROXY_MODULE],
                env=env,
                capture_output=True,
                text=True,
                timeout=GO_INSTALL_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise ToxiproxyUnavailable(
                f"`go install {TOXIPROXY_MODULE}` took over {GO_INSTALL_TIMEOUT_S:.0f} s"
            ) from None
        if done.returncode != 0:
            raise ToxiproxyUnavailable(
                f"`go install {TOXIPROXY_MODULE}` failed:\n{done.stderr.strip()[-2000:]}"
            )
        built = Path(gobin) / "server"
        if not built.is_file():
            raise ToxiproxyUnavailable(f"`go install {TOXIPROXY_MODULE}` built no `server`")
        partial = target.with_suffix(".partial")
        shutil.copy2(built, partial)
        partial.chmod(0o755)
        partial.replace(target)
    log.append(f"installed {target}")
    return target


def docker_engine_available() -> tuple[bool, str]:
    docker = shutil.which("docker")
    if docker is None:
        return False, "no `docker` command"
    try:
        done = subprocess.run(
            [docker, "info"], capture_output=True, text=True, timeout=10, check=False
        )
    except subprocess.TimeoutExpired:
        return False, "`docker info` did not answer within 10 s"
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or ["no engine"])[-1]
        return False, f"`docker info` failed ({reason})"
    return True, "Docker engine found"


def _wait_reachable(client: Toxiproxy, alive: Callable[[], bool] | None, what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not client.reachable():
        if alive is not None and not alive():
            raise ToxiproxyUnavailable(f"{what} exited before its API answered")
        if time.monotonic() > deadline:
            raise ToxiproxyUnavailable(f"{what}: API at {client.url} not up in {START_TIMEOUT_S} s")
        time.sleep(0.05)  # polling another process's port: nothing to wait on locally


@contextlib.contextmanager
def toxiproxy_server(
    url: str | None = None,
    binary: Path | None = None,
    log_path: Path | None = None,
    notes: list[str] | None = None,
    started_pids: list[int] | None = None,
) -> Iterator[Toxiproxy]:
    """A reachable Toxiproxy: the one at `url`, else one this starts (and stops)."""
    notes = notes if notes is not None else []
    if url is not None:
        client = Toxiproxy(url)
        try:
            client.version()
        except ToxiproxyError as error:
            raise ToxiproxyUnavailable(f"--toxiproxy-url {url}: {error}") from None
        notes.append(f"using the Toxiproxy server at {url}")
        yield client
        return
    path = find_binary(binary)
    if path is None:
        path = install_with_go(notes)
    if path is None:
        usable, why = docker_engine_available()
        if not usable:
            notes.append(f"Docker path skipped: {why}")
            raise ToxiproxyUnavailable(f"{HOW_TO_GET_ONE}\n(Docker: {why})")
        with _docker_server(notes) as client:
            yield client
        return
    port = free_ports(1)[0]
    if log_path:
        log_path.parent.mkdir(parents=True, exist_ok=True)
    log_file = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
    try:
        process = subprocess.Popen(
            [str(path), "-host", "127.0.0.1", "-port", str(port)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    finally:
        if log_path:
            log_file.close()  # type: ignore[union-attr]
    if started_pids is not None:
        started_pids.append(process.pid)
    notes.append(f"started {path} (pid {process.pid}) on 127.0.0.1:{port}")
    try:
        client = Toxiproxy(f"http://127.0.0.1:{port}")
        _wait_reachable(client, lambda: process.poll() is None, f"{path}")
        yield client
    finally:
        stop_process(process)


def stop_process(process: subprocess.Popen[bytes], timeout_s: float = STOP_TIMEOUT_S) -> None:
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=timeout_s)


@contextlib.contextmanager
def _docker_server(notes: list[str]) -> Iterator[Toxiproxy]:
    """The official image on the host network (the proxies must reach loopback ports)."""
    port = free_ports(1)[0]
    done = subprocess.run(
        [
            *("docker", "run", "-d", "--rm", "--network", "host", TOXIPROXY_IMAGE),
            *("-host", "127.0.0.1", "-port", str(port)),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if done.returncode != 0:
        raise ToxiproxyUnavailable(f"docker run {TOXIPROXY_IMAGE} failed: {done.stderr.strip()}")
    container = done.stdout.strip()
    notes.append(f"started container {container[:12]} ({TOXIPROXY_IMAGE}) on port {port}")
    try:
        client = Toxiproxy(f"http://127.0.0.1:{port}")
        _wait_reachable(client, None, f"container {container[:12]}")
        yield client
    finally:
        subprocess.run(["docker", "rm", "-f", container], capture_output=True, timeout=60)


def ensure_binary(explicit: Path | None = None) -> Path:
    """A Toxiproxy binary, built with Go into the cache if none is found."""
    notes: list[str] = []
    path = find_binary(explicit) or install_with_go(notes)
    if path is None:
        _, why = docker_engine_available()
        raise ToxiproxyUnavailable(f"{HOW_TO_GET_ONE}\n(Docker: {why})")
    return path


def main() -> int:
    """`python -m goml.chaos.server`: print the Toxiproxy binary, installing it if needed."""
    import sys

    try:
        print(ensure_binary())
    except ToxiproxyUnavailable as error:
        print(f"toxiproxy: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
