"""The event loop the real runtimes run on (goml/event_loop.py): the choice, and a real
node cluster over mutual TLS committing under each loop.

The cluster test starts 3 `goml node run` processes with GOML_EVENT_LOOP in their
environment and stops them by PID (`local.running_cluster`), also on failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest

from goml import event_loop
from goml.client import Client
from goml.cluster import local

uvloop: ModuleType | None = None
with contextlib.suppress(ImportError):  # no dependency of goml: its cases skip without it
    uvloop = importlib.import_module("uvloop")
LOOPS = (
    "asyncio",
    pytest.param(
        "uvloop", marks=pytest.mark.skipif(uvloop is None, reason="uvloop is not installed")
    ),
)
LOG_TIMEOUT_S = 30.0


def test_the_setting_picks_the_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(event_loop.EVENT_LOOP_ENV, raising=False)
    assert event_loop.chosen() == "asyncio"  # the default
    assert event_loop.chosen(" UVLOOP ") == "uvloop"
    monkeypatch.setenv(event_loop.EVENT_LOOP_ENV, "uvloop")
    assert event_loop.chosen() == "uvloop"
    assert event_loop.chosen("asyncio") == "asyncio"  # an explicit setting wins
    monkeypatch.setenv(event_loop.EVENT_LOOP_ENV, "")
    assert event_loop.chosen() == "asyncio"
    with pytest.raises(event_loop.EventLoopError, match="expected one of"):
        event_loop.chosen("tokio")


def test_uvloop_asked_for_but_missing_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import now fails
    assert event_loop.loop_factory("asyncio") is asyncio.new_event_loop
    with pytest.raises(event_loop.EventLoopError, match="not installed"):
        event_loop.loop_factory("uvloop")

    async def never() -> None:
        raise AssertionError("must not run")

    with pytest.raises(event_loop.EventLoopError, match="not installed"):
        event_loop.run(never(), "uvloop")


@pytest.mark.parametrize("loop", LOOPS)
def test_run_uses_the_chosen_loop(loop: str) -> None:
    async def kind() -> type[asyncio.AbstractEventLoop]:
        await asyncio.sleep(0)
        return type(asyncio.get_running_loop())

    ran_on = event_loop.run(kind(), loop)
    if loop == "uvloop":
        assert uvloop is not None
        assert ran_on is uvloop.Loop, ran_on
    else:
        assert issubclass(ran_on, asyncio.SelectorEventLoop), ran_on


@pytest.mark.slow
@pytest.mark.parametrize("loop", LOOPS)
def test_a_tls_cluster_commits_under_each_loop(
    loop: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(event_loop.EVENT_LOOP_ENV, loop)  # inherited by the node processes
    layout = local.prepare(tmp_path / "cluster", 3, insecure=False)
    with (
        local.running_cluster(layout) as processes,
        Client(layout.profile, call_timeout_s=5.0, retry_s=30.0) as client,
    ):
        local.wait_for_leader(layout.profile, timeout_s=30)
        task_id = client.submit("matmul", {"n": 2, "m": 2, "k": 2}, cpu=0.1, memory_mb=16)
        assert client.get(task_id).id == task_id
        for process in processes:  # every node says which loop it serves on
            deadline = time.monotonic() + LOG_TIMEOUT_S
            while f"(event loop {loop})" not in process.log_path.read_text():
                assert process.popen.poll() is None, f"{process.name} exited"
                assert time.monotonic() < deadline, process.log_path.read_text()[-2000:]
                time.sleep(0.05)  # polling another process's log file, with a deadline


def test_an_unknown_loop_is_a_one_line_error_of_the_node(tmp_path: Path) -> None:
    layout = local.prepare(tmp_path, 1, insecure=False)
    (config,) = layout.node_configs.values()
    env = {**os.environ, event_loop.EVENT_LOOP_ENV: "bogus"}
    done = subprocess.run(
        [sys.executable, "-m", "goml", "node", "run", "--config", str(config)],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "GOML_EVENT_LOOP='bogus': expected one of asyncio, uvloop" in done.stderr
    assert "Traceback" not in done.stderr
