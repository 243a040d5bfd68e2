"""`goml sim sweep`: on a real Dask cluster (a scheduler and two workers, started here and
stopped by PID), interrupted with SIGINT and resumed, and its report opened in a real
headless Chromium."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import IO, Any

import pytest

from goml.report.sweep_html import SeedResult, write_sweep_report
from goml.sim.sweep import DaskExecutor, Job, code_sha256

ROOT = Path(__file__).resolve().parent.parent
STEADY = "scenarios/steady.yaml"
SWEEP_TIMEOUT_S = 300  # one sweep of 6 steady seeds takes about 20 s on 2 cores
START_TIMEOUT_S = 60  # a Dask process up and registered
STOP_TIMEOUT_S = 20
POLL_S = 0.05
# Keys of a summary that depend on the machine, not the seed.
WALL_KEYS = {"wall_seconds", "speedup", "worker"}
CHROMIUM = "/usr/bin/chromium"

# The leader crashes twice within 10 s: failovers to histogram, in a second a seed.
CRASHES = """
name: crashes
duration_s: 10
workload:
  clients: [{name: c-aws, node: aws-1}, {name: c-gcp, node: gcp-1}]
  rate_per_s: 10
  stop_s: 9
  mix:
    matmul: {args: {n: 8}}
  duration_ms: {kind: uniform, min_ms: 5, max_ms: 50}
faults:
  - {at_s: 2, kind: crash, target: leader, restart_after_s: 2}
  - {at_s: 6, kind: crash, target: leader, restart_after_s: 2}
expectations:
  - tasks_lost == 0
  # Fails for the seeds with the slower failovers, so the page lists failing seeds.
  - failover_s.max < 0.5
"""


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll `condition` until it holds; fail naming `what` at the deadline."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(POLL_S)


def env() -> dict[str, str]:
    # The checkout first on the path, for the sweep and for every Dask worker.
    return {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}


def descendants(pid: int) -> set[int]:
    """Every live process below `pid`, from /proc."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        parents[int(stat.parent.name)] = int(fields[1])
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    """A process that exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def stop(*processes: subprocess.Popen[bytes]) -> None:
    """SIGTERM to each by PID (all first: each takes seconds to shut down), SIGKILL to any
    that lingers; reaped, then checked gone."""
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(STOP_TIMEOUT_S)
        assert process.returncode is not None
        assert not alive(process.pid), f"process {process.pid} is still there"


def sweep(*args: str, out: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "goml", "sim", "sweep", *args, "--out", str(out)],
        capture_output=True, text=True, cwd=ROOT, env=env(), timeout=SWEEP_TIMEOUT_S,
        check=False,
    )  # fmt: skip


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def seed_only(line: dict[str, Any]) -> dict[str, Any]:
    """A summary line without what depends on the machine that ran it."""
    return {k: v for k, v in line.items() if k not in WALL_KEYS}


def complete_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


# ------------------------------------------------------------------------- Dask


def start(argv: list[str], log: IO[bytes], started: list[subprocess.Popen[bytes]]) -> None:
    started.append(
        subprocess.Popen(argv, cwd=ROOT, env=env(), stdout=log, stderr=subprocess.STDOUT)
    )


@dataclass(frozen=True)
class DaskCluster:
    address: str  # tcp://127.0.0.1:PORT
    worker_ids: frozenset[str]  # HOST:PID of each worker, as the summaries name them


@pytest.fixture(scope="module")
def dask_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaskCluster]:
    """A real Dask scheduler and two workers (one thread each), stopped by PID after the
    module's tests, and checked gone."""
    from distributed import Client

    base = tmp_path_factory.mktemp("dask")
    started: list[subprocess.Popen[bytes]] = []
    scheduler_file = base / "scheduler.json"
    log = (base / "dask.log").open("wb")
    try:
        start(
            [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
             "--port", "0", "--no-dashboard", "--scheduler-file", str(scheduler_file)],
            log, started,
        )  # fmt: skip
        wait_for(scheduler_file.exists, START_TIMEOUT_S, "the scheduler file")
        wait_for(lambda: bool(scheduler_file.read_text()), START_TIMEOUT_S, "its contents")
        address = json.loads(scheduler_file.read_text())["address"]
        assert address.startswith("tcp://127.0.0.1:")
        for name in ("w1", "w2"):
            # No nanny: the process started here is the worker that runs the seeds.
            start(
                [sys.executable, "-m", "distributed.cli.dask_worker", address, "--name", name,
                 "--nworkers", "1", "--nthreads", "1", "--no-nanny", "--no-dashboard",
                 "--host", "127.0.0.1", "--local-directory", str(base / name)],
                log, started,
            )  # fmt: skip
        # distributed types Client() in part only
        with Client(address, timeout=START_TIMEOUT_S) as client:  # type: ignore[no-untyped-call]
            client.wait_for_workers(2, timeout=START_TIMEOUT_S)
        yield DaskCluster(
            address, frozenset(f"{socket.gethostname()}:{p.pid}" for p in started[1:])
        )
    finally:
        stop(*reversed(started))  # workers first: the scheduler outlives them
        log.close()
    assert all(not alive(p.pid) for p in started)


def test_dask_sweep_runs_every_seed_once_and_equals_the_local_sweep(
    tmp_path: Path, dask_cluster: DaskCluster
) -> None:
    address = dask_cluster.address
    on_dask = sweep(STEADY, "--seeds", "1-6", "--executor", f"dask://{address[6:]}",
                    out=tmp_path / "dask")  # fmt: skip
    assert on_dask.returncode == 0, on_dask.stdout + on_dask.stderr
    assert "6 passed, 0 failed" in on_dask.stdout
    local = sweep(STEADY, "--seeds", "1-6", "-j", "2", out=tmp_path / "local")
    assert local.returncode == 0, local.stdout + local.stderr

    remote_lines = lines(tmp_path / "dask" / "sweep-steady.jsonl")
    assert Counter(line["seed"] for line in remote_lines) == dict.fromkeys(range(1, 7), 1)
    # Run by the two workers started here, both of them, and not by the sweep itself.
    assert {line["worker"] for line in remote_lines} == dask_cluster.worker_ids
    local_lines = lines(tmp_path / "local" / "sweep-steady.jsonl")
    assert not {line["worker"] for line in local_lines} & dask_cluster.worker_ids

    def by_seed(found: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
        return {line["seed"]: seed_only(line) for line in found}

    remote, here = by_seed(remote_lines), by_seed(local_lines)
    assert {s: r["trace_digest"] for s, r in remote.items()} == {
        s: r["trace_digest"] for s, r in here.items()
    }
    assert len({r["trace_digest"] for r in remote.values()}) == 6  # the seeds differ
    assert remote == here  # the whole summary, not the digest alone
    assert "sweep of 6 seeds" in (tmp_path / "dask" / "sweep-steady.html").read_text()


def test_dask_window_refills_and_loses_no_seed(dask_cluster: DaskCluster) -> None:
    """More seeds than the in-flight window: each one back once, the window never over."""
    jobs = [Job(CRASHES, "crashes.yaml", seed, code_sha256()) for seed in range(1, 8)]
    with DaskExecutor(dask_cluster.address, 2) as pool:
        answers = list(pool.results(iter(jobs)))
    assert sorted(seed for seed, _ in answers) == list(range(1, 8))
    for seed, text in answers:
        data = json.loads(text)
        assert data["seed"] == seed
        assert data["worker"] in dask_cluster.worker_ids
        assert isinstance(data["passed"], bool)
        assert "crash" not in data, data.get("crash")


def test_unreachable_scheduler_and_missing_distributed_are_one_clear_error(
    tmp_path: Path,
) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started_s = time.monotonic()
    refused = sweep(STEADY, "--seeds", "1", "--executor", f"dask://127.0.0.1:{port}",
                    out=tmp_path)  # fmt: skip
    assert refused.returncode == 2, refused.stderr
    assert f"cannot reach the Dask scheduler at tcp://127.0.0.1:{port}" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert time.monotonic() - started_s < SWEEP_TIMEOUT_S
    # Without the package: an import of distributed fails, as on a machine without it.
    missing = subprocess.run(
        [sys.executable, "-c",
         "import sys; sys.modules['distributed'] = None; from goml.cli import main; main()",
         "sim", "sweep", STEADY, "--seeds", "1", "--executor", "dask://127.0.0.1:1",
         "--out", str(tmp_path)],
        capture_output=True, text=True, cwd=ROOT, env=env(), timeout=SWEEP_TIMEOUT_S,
        check=False,
    )  # fmt: skip
    assert missing.returncode == 2, missing.stderr
    assert "needs the distributed package" in missing.stderr
    assert "pip install 'goml[dask]'" in missing.stderr
    assert "Traceback" not in missing.stderr
    bad = sweep(STEADY, "--executor", "dask://nohost", out=tmp_path)
    assert bad.returncode == 2
    assert "Invalid value for '--executor'" in bad.stderr


# ------------------------------------------------------------------ interrupt, resume


def test_sigint_stops_cleanly_and_resume_reruns_no_finished_seed(tmp_path: Path) -> None:
    out = tmp_path / "out"
    jsonl = out / "sweep-steady.jsonl"
    stdout, stderr = (tmp_path / "stdout").open("w+"), (tmp_path / "stderr").open("w+")
    first = subprocess.Popen(
        [sys.executable, "-m", "goml", "sim", "sweep", STEADY, "--seeds", "1-6", "-j", "2",
         "--out", str(out)],
        cwd=ROOT, env=env(), stdout=stdout, stderr=stderr,
    )  # fmt: skip
    try:
        wait_for(lambda: complete_lines(jsonl) >= 2, SWEEP_TIMEOUT_S, "2 finished seeds")
        workers = descendants(first.pid)
        assert workers, "the local pool's processes"
        first.send_signal(signal.SIGINT)
        first.wait(STOP_TIMEOUT_S)
    finally:
        stop(first)
    stderr.seek(0)
    said = stderr.read()
    assert first.returncode == 130, said
    assert "Traceback" not in said
    assert "interrupted:" in said
    assert f"--out {out} --resume" in said
    # The pool's processes, and multiprocessing's resource tracker, which ends on its own
    # once the sweep has gone: nothing is left behind.
    wait_for(lambda: not any(alive(pid) for pid in workers), STOP_TIMEOUT_S, "no leftovers")
    before = jsonl.read_bytes()
    done = [json.loads(line)["seed"] for line in before.splitlines()]
    assert 2 <= len(done) < 6, f"the sweep was to be interrupted midway, it did {done}"

    resumed = sweep(STEADY, "--seeds", "1-6", "-j", "2", "--resume", out=out)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{len(done)} of 6 seeds already done, {6 - len(done)} to run" in resumed.stderr
    after = jsonl.read_bytes()
    assert after.startswith(before)  # the finished seeds' lines untouched
    counts = Counter(line["seed"] for line in lines(jsonl))
    assert counts == dict.fromkeys(range(1, 7), 1)
    # The totals are the file's: all 6 seeds, the ones from before the interrupt included.
    assert "6 passed, 0 failed" in resumed.stdout
    assert "n=6:" in resumed.stdout

    # Resuming a finished sweep runs nothing; a changed scenario is refused, not mixed in.
    again = sweep(STEADY, "--seeds", "1-6", "--resume", out=out)
    assert again.returncode == 0
    assert "6 of 6 seeds already done, 0 to run" in again.stderr
    assert jsonl.read_bytes() == after
    changed = tmp_path / "steady.yaml"
    changed.write_text((ROOT / STEADY).read_text().replace("rate_per_s: 20", "rate_per_s: 21"))
    other = sweep(str(changed), "--seeds", "1-6", "--resume", out=out)
    assert other.returncode == 2
    assert "another scenario text" in other.stderr
    assert jsonl.read_bytes() == after


def test_a_line_cut_short_is_run_again(tmp_path: Path) -> None:
    scenario = tmp_path / "crashes.yaml"
    scenario.write_text(CRASHES)
    first = sweep(str(scenario), "--seeds", "1-2", "-j", "2", out=tmp_path)
    assert first.returncode in (0, 1), first.stderr
    jsonl = tmp_path / "sweep-crashes.jsonl"
    whole = jsonl.read_bytes()
    kept = whole[: whole.index(b"\n") + 1]
    jsonl.write_bytes(kept + whole[len(kept) : len(kept) + 100])  # the machine died mid-line
    resumed = sweep(str(scenario), "--seeds", "1-2", "--resume", out=tmp_path)
    assert resumed.returncode in (0, 1), resumed.stderr
    assert "1 of 2 seeds already done, 1 to run" in resumed.stderr
    after = jsonl.read_bytes()
    assert after.startswith(kept)
    assert Counter(line["seed"] for line in lines(jsonl)) == {1: 1, 2: 1}
    rerun = [line for line in lines(jsonl) if line["seed"] == 2]
    before = [json.loads(line) for line in whole.splitlines() if json.loads(line)["seed"] == 2]
    assert [seed_only(line) for line in rerun] == [seed_only(line) for line in before]


# ------------------------------------------------------------------------ the report


# HTML elements without an end tag; Chromium's DOM dump closes every other one (SVG too).
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source"}


class _Dom(HTMLParser):
    """Elements and text of Chromium's DOM dump, each with the ids of the elements around it."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[tuple[str, str | None]] = []  # (tag, id)
        self.elements: list[tuple[str, dict[str, str | None], set[str]]] = []
        self.texts: list[tuple[str, set[str]]] = []

    def _ids(self) -> set[str]:
        return {element_id for _, element_id in self.stack if element_id}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, dict(attrs), self._ids()))
        if tag not in VOID:
            self.stack.append((tag, dict(attrs).get("id")))

    def handle_endtag(self, tag: str) -> None:
        while self.stack and self.stack.pop()[0] != tag:
            pass

    def handle_data(self, data: str) -> None:
        self.texts.append((data, self._ids()))

    def inside(self, tag: str, element_id: str) -> list[dict[str, str | None]]:
        return [attrs for t, attrs, ids in self.elements if t == tag and element_id in ids]

    def text(self, element_id: str | None = None) -> str:
        return "".join(d for d, ids in self.texts if element_id is None or element_id in ids)


def _unfilter(kind: int, row: bytearray, previous: bytearray, pixel: int) -> None:
    """Undo one of PNG's row filters in place (RFC 2083, 6.2-6.6)."""
    if kind == 1:
        for i in range(pixel, len(row)):
            row[i] = (row[i] + row[i - pixel]) & 255
    elif kind == 2:
        row[:] = bytes((a + b) & 255 for a, b in zip(row, previous, strict=True))
    elif kind == 3:
        for i in range(len(row)):
            left = row[i - pixel] if i >= pixel else 0
            row[i] = (row[i] + (left + previous[i]) // 2) & 255
    elif kind == 4:
        for i in range(len(row)):
            left = row[i - pixel] if i >= pixel else 0
            up, corner = previous[i], previous[i - pixel] if i >= pixel else 0
            guess = left + up - corner
            pa, pb, pc = abs(guess - left), abs(guess - up), abs(guess - corner)
            row[i] = (
                row[i] + (left if pa <= pb and pa <= pc else up if pb <= pc else corner)
            ) & 255
    else:
        assert kind == 0, f"PNG filter {kind}"


def png_colours(path: Path) -> int:
    """How many distinct colours a PNG (8-bit RGB or RGBA, not interlaced) holds."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    position, chunks, header = 8, [], None
    while position < len(data):
        (length,) = struct.unpack(">I", data[position : position + 4])
        kind, body = data[position + 4 : position + 8], data[position + 8 : position + 8 + length]
        position += 12 + length
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            chunks.append(body)
    assert header is not None, "no IHDR"
    width, height, depth, colour_type, _, _, interlace = header
    assert depth == 8 and colour_type in (2, 6) and interlace == 0, header
    pixel = 3 if colour_type == 2 else 4
    stride = width * pixel
    raw = zlib.decompress(b"".join(chunks))
    assert len(raw) == height * (stride + 1)
    previous, colours = bytearray(stride), set[bytes]()
    for y in range(height):
        row = bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        _unfilter(raw[y * (stride + 1)], row, previous, pixel)
        colours.update(bytes(row[i : i + pixel]) for i in range(0, stride, pixel))
        previous = row
    return len(colours)


def chromium(*args: str, profile: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--no-first-run", f"--user-data-dir={profile}", *args],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


@pytest.fixture
def crashes_sweep(tmp_path: Path) -> Iterator[tuple[Path, Path, subprocess.CompletedProcess[str]]]:
    scenario = tmp_path / "crashes.yaml"
    scenario.write_text(CRASHES)
    run = sweep(str(scenario), "--seeds", "1-8", "-j", "2", out=tmp_path / "out")
    yield scenario, tmp_path / "out", run


@pytest.mark.skipif(
    not os.access(CHROMIUM, os.X_OK),
    reason=f"{CHROMIUM} is missing: apt-get install -y --no-install-recommends chromium",
)
def test_sweep_report_in_headless_chromium(
    tmp_path: Path, crashes_sweep: tuple[Path, Path, subprocess.CompletedProcess[str]]
) -> None:
    scenario, out, run = crashes_sweep
    assert run.returncode in (0, 1), run.stderr
    page = out / "sweep-crashes.html"
    results = lines(out / "sweep-crashes.jsonl")
    assert len(results) == 8
    failovers = [v for r in results for v in r["failover_s"]["values"]]
    assert len(failovers) >= 8, "the scenario was to fail over twice a seed"

    shot = tmp_path / "page.png"
    taken = chromium("--screenshot=" + str(shot), "--window-size=1200,1600",
                     page.as_uri(), profile=tmp_path / "profile")  # fmt: skip
    assert taken.returncode == 0, taken.stderr
    assert png_colours(shot) > 20, "a blank screenshot"
    dumped = chromium("--dump-dom", page.as_uri(), profile=tmp_path / "profile")
    assert dumped.returncode == 0, dumped.stderr
    dom = _Dom()
    dom.feed(dumped.stdout)

    # Both histograms are SVG, their bars adding up to what the file holds.
    for section, expected in (("failover-histogram", len(failovers)),
                              ("submit-p99-histogram", len(results))):  # fmt: skip
        assert len(dom.inside("svg", section)) == 1, section
        bars = dom.inside("rect", section)
        assert bars and all(float(str(bar["height"])) > 0 for bar in bars), section
        titles = [t for t, ids in dom.texts if section in ids and " to " in t]
        assert len(titles) == len(bars)
        assert sum(int(t.rsplit(": ", 1)[1]) for t in titles) == expected, section
    text = dom.text()

    # The worst seeds, by the file's own figures, each with its replay command.
    worst_failover = max(results, key=lambda r: (max(r["failover_s"]["values"]), -r["seed"]))
    worst_p99 = max(results, key=lambda r: (r["submit_ms"]["p99"], -r["seed"]))
    for worst, table in ((worst_failover, "worst-failover"), (worst_p99, "worst-submit-p99")):
        replays = [t for t, ids in dom.texts if table in ids and t.startswith("goml sim run")]
        assert replays[0] == f"goml sim run {scenario} --seed {worst['seed']}", table
        assert len(replays) == min(5, len(results))
    failing = [r["seed"] for r in results if not r["passed"]]
    if failing:
        assert f"Failing seeds: {len(failing)}" in text
    assert "No safety violation in 8 seeds." in text
    # Self-contained: nothing to fetch, nothing to run.
    assert not any(t in ("script", "link", "img", "iframe") for t, _, _ in dom.elements)
    assert "http://" not in page.read_text().replace('xmlns="http://www.w3.org/2000/svg"', "")


def test_a_safety_violation_comes_first_in_red(tmp_path: Path) -> None:
    def result(seed: int, violation: str | None = None, why: str = "") -> SeedResult:
        return SeedResult(
            seed=seed, passed=violation is None and not why, why=why, violation=violation,
            crash=None, failovers_s=(0.3 * seed,), submit_p99_ms=10.0 * seed, tasks_lost=0,
            duplicate_results=0, sim_seconds=10.0, wall_seconds=1.0, trace_digest="ab" * 32,
            replay=f"goml sim run s.yaml --seed {seed}",
        )  # fmt: skip

    results = [
        result(1),
        result(2, why="tasks_lost == 0 (got 1)"),
        result(3, violation="election safety: two leaders in term 4", why="SAFETY VIOLATION"),
    ]
    page = write_sweep_report(results, "s", "s.yaml", tmp_path / "x.jsonl", tmp_path / "x.html")
    text = page.read_text()
    alarm = text.index('id="safety" class="alarm"')
    assert alarm < text.index('id="failing"') < text.index('id="failover-histogram"')
    assert text.index("two leaders in term 4") < text.index('id="failing"')
    assert "goml sim run s.yaml --seed 3" in text[alarm : text.index('id="failing"')]
    assert "No safety violation" not in text
