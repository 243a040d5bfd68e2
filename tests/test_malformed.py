"""Malformed input ends in one clear line and exit code 2, never a traceback or a hang.

Each file of `tests/malformed/` is a scenario that once passed validation, hung the
simulator or crashed the loader. Its first line says what it tests and the message
expected: `# WHAT | expect: FRAGMENT`, where FRAGMENT is what follows the file's name
(`:LINE: field: message`, or `: message` when there is no line). Each is validated by
`goml scenario validate` in its own process, as a user runs it. Files too large to keep
in the repository are generated below.

The CLI cases run against a profile whose only node is a loopback port that is bound
but not listening (so it refuses connections and nothing else can take it): a value
the CLI lets through would reach that port and fail with another message.

Every process is started here and stopped here, by its PID, also when a test fails;
each has a hard timeout, and each case must finish well inside it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from goml.cluster.certs import init_certs
from goml.proto import api_pb2, api_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
CORPUS = sorted((Path(__file__).resolve().parent / "malformed").glob("*.yaml"))
HEADER_MARK = " | expect: "
PROCESS_TIMEOUT_S = 20.0  # the hard limit on one `goml` process
CASE_BUDGET_S = 10.0  # what each case must stay under
# A --timeout far above what a refused connection needs: finishing well under it shows
# the client gave up on the cause, not on the budget.
CLIENT_TIMEOUT_S = 20
SERVER_STOP_TIMEOUT_S = 5.0
FILE_BYTES_MAX = 1024 * 1024  # goml.scenario.loader.FILE_BYTES_MAX, as a user reads it


@dataclass(frozen=True)
class Run:
    code: int
    out: str
    err: str
    elapsed_s: float


def goml(*args: str, stdin: bytes = b"", env: dict[str, str] | None = None) -> Run:
    """`python -m goml ARGS` in its own process, killed by PID if it outlives the limit."""
    started_s = time.monotonic()
    popen = subprocess.Popen(
        [sys.executable, "-m", "goml", *args],
        cwd=ROOT,
        env={**os.environ, **(env or {}), "COLUMNS": "200"},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        out, err = popen.communicate(input=stdin, timeout=PROCESS_TIMEOUT_S)
    finally:
        if popen.poll() is None:
            popen.kill()
            popen.wait()
    elapsed_s = time.monotonic() - started_s
    return Run(popen.returncode, out.decode(), err.decode(), elapsed_s)


def assert_refused(run: Run, fragment: str) -> None:
    """Exit code 2, the fragment on one line of stderr, no traceback, in time."""
    assert "Traceback" not in run.err, run.err
    assert run.code == 2, (run.code, run.err)
    assert any(fragment in line for line in run.err.splitlines()), (fragment, run.err)
    assert run.elapsed_s < CASE_BUDGET_S, run.elapsed_s


def expected_fragment(path: Path) -> str:
    first = path.read_bytes().split(b"\n", 1)[0].decode()
    assert first.startswith("# "), f"{path.name}: the first line is `# WHAT | expect: ...`"
    assert HEADER_MARK in first, f"{path.name}: the first line lacks '{HEADER_MARK}'"
    fragment = first.split(HEADER_MARK, 1)[1]
    assert fragment.startswith(":"), f"{path.name}: the fragment follows the file name"
    return fragment


# --------------------------------------------------------------------------- scenarios


def test_the_corpus_is_there() -> None:
    names = {p.stem for p in CORPUS}
    assert {"rate-inf", "duration-1e400", "nested-500-flow", "metric-unknown"} <= names
    assert len(CORPUS) >= 30


@pytest.mark.parametrize("path", CORPUS, ids=lambda p: p.stem)
def test_scenario_validate_refuses_the_corpus(path: Path) -> None:
    fragment = expected_fragment(path)
    run = goml("scenario", "validate", str(path))
    assert_refused(run, f"{path}{fragment}")  # the file's name, then line and field
    assert run.out == "", run.out  # no `FILE: ok`


def _generated(tmp_path: Path) -> list[tuple[Path, str]]:
    """Files too big for the repository, and the fragment each must be refused with."""
    cases: list[tuple[Path, str]] = []

    def add(name: str, data: bytes, fragment: str) -> None:
        path = tmp_path / name
        path.write_bytes(data)
        cases.append((path, fragment))

    # The 10 MB file took 16 s and 0.76 GB; it is refused before parsing.
    tasks = b"".join(b"  - {at_s: 1, kind: heal}\n" for _ in range(400_000))
    add(
        "ten-megabytes.yaml",
        b"name: t\nduration_s: 10\nfaults:\n" + tasks,
        f": larger than {FILE_BYTES_MAX} bytes, the limit for a scenario file: not parsed",
    )
    header = b"name: t\nduration_s: 10\n"
    add(
        "one-byte-over.yaml",
        (header + b"description: '").ljust(FILE_BYTES_MAX - 2, b"x") + b"'\n\n",
        f": larger than {FILE_BYTES_MAX} bytes",
    )
    add(
        "many-values.yaml",
        header + b"x-many: [" + b"1," * 150_000 + b"]\n",
        ":3: more than 100000 values (the limit for a scenario file)",
    )
    add(
        "deep-within-a-megabyte.yaml",
        header + b"x-deep: " + b"[" * 400_000 + b"]" * 400_000 + b"\n",
        ":3: nested more than 32 levels deep",
    )
    bogus = b"".join(b"bogus%d: 1\n" % i for i in range(200))
    add("many-problems.yaml", header + bogus, ": ... and 150 more problems")
    return cases


def test_scenario_validate_refuses_generated_files(tmp_path: Path) -> None:
    for path, fragment in _generated(tmp_path):
        run = goml("scenario", "validate", str(path))
        assert_refused(run, f"{path}{fragment}")


def test_a_file_of_exactly_the_limit_is_validated(tmp_path: Path) -> None:
    path = tmp_path / "at-the-limit.yaml"
    path.write_bytes(
        (b"name: t\nduration_s: 10\nx-pad: '").ljust(FILE_BYTES_MAX - 2, b"x") + b"'\n"
    )
    assert path.stat().st_size == FILE_BYTES_MAX
    run = goml("scenario", "validate", str(path))
    assert run.code == 0, run.err
    assert run.out == f"{path}: ok\n"
    assert run.elapsed_s < CASE_BUDGET_S, run.elapsed_s


def test_scenario_validate_still_accepts_the_shipped_scenarios() -> None:
    shipped = sorted((ROOT / "scenarios").glob("*.yaml")) + sorted(
        (ROOT / "scenarios" / "chaos").glob("*.yaml")
    )
    run = goml("scenario", "validate", *map(str, shipped))
    assert run.code == 0, run.err
    assert run.out.splitlines() == [f"{path}: ok" for path in shipped]


# --------------------------------------------------------------------------- CLI


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port that refuses connections while the test runs."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])
    finally:
        sock.close()


@pytest.fixture
def profile_env(tmp_path: Path, closed_port: int) -> dict[str, str]:
    profile = tmp_path / "profile.json"
    body = {"nodes": {"n1": f"127.0.0.1:{closed_port}"}, "token": "t", "insecure": True}
    profile.write_text(json.dumps(body))
    return {"GOML_PROFILE": str(profile), "GRPC_VERBOSITY": "ERROR"}


BAD_VALUES = [
    (["submit", "matmul", "--priority", "99999999999"], "Invalid value for '--priority'"),
    (["submit", "matmul", "--priority", str(-(2**31) - 1)], "(an int32)"),
    (["submit", "matmul", "--max-attempts", "3e9"], "Invalid value for '--max-attempts'"),
    (["submit", "matmul", "--max-attempts", "3000000000"], "Invalid value for '--max-attempts'"),
    (["submit", "matmul", "--max-attempts", "0"], "Invalid value for '--max-attempts'"),
    (["submit", "matmul", "--timeout-ms", str(2**63)], "Invalid value for '--timeout-ms'"),
    (["submit", "matmul", "--memory-mb", "-1"], "Invalid value for '--memory-mb'"),
    (["submit", "matmul", "--gpu", str(2**64)], "Invalid value for '--gpu'"),
    (["submit", "matmul", "--cpu", "nan"], "Invalid value for '--cpu': nan is not a finite"),
    (["submit", "matmul", "--cpu", "inf"], "Invalid value for '--cpu': inf is not a finite"),
    (["submit", "matmul", "--cpu", "-1"], "Invalid value for '--cpu'"),
    (["submit", "matmul", "--wait-s", "nan"], "Invalid value for '--wait-s'"),
    (["submit", "matmul", "--args", "null"], "error: --args must be a JSON object"),
    (["submit", "matmul", "--args", "[1, 2]"], "error: --args must be a JSON object"),
    (["submit", "matmul", "--args", '{"n": NaN}'], "NaN is not a JSON number"),
    (["submit", "matmul", "--args", "{n: 4"], "error: --args is not JSON"),
    (["submit", "matmul", "--args", "[" * 50_000 + "]" * 50_000], "--args: nested too deeply"),
    (["submit", "matmul", "--args", "{}", "--args-file", "-"], "give --args or --args-file"),
    (["submit", "matmul", "--args-file", "/nonexistent/args.json"], "--args-file: cannot read"),
    (["submit", "x" * 300], "Invalid value for 'FUNCTION': 300 bytes"),
    (["submit", "matmul", "--key", "k" * 300], "Invalid value for '--key': 300 bytes"),
    (["submit", "matmul", "--bogus"], "No such option: --bogus"),
    (["task", "get", "x" * 100_000], "Invalid value for 'TASK_ID': 100000 bytes"),
    (["task", "cancel", "x" * 257], "Invalid value for 'TASK_ID': 257 bytes"),
    (["task", "watch", "t-1", "x" * 300], "Invalid value for 'TASK_ID': 300 bytes"),
    (["task", "watch", "--seconds", "inf"], "Invalid value for '--seconds'"),
    (["task", "list", "--limit", "99999999999"], "Invalid value for '--limit'"),
    (["task", "list", "--state", "bogus"], "error: --state: unknown state 'bogus'"),
    (["task", "list", "--function", "f" * 300], "Invalid value for '--function'"),
    (["task", "frobnicate"], "No such command 'frobnicate'"),
    (["status", "--timeout", "nan"], "Invalid value for '--timeout'"),
    (["status", "--timeout", "0"], "Invalid value for '--timeout'"),
    (["status", "--timeout", "1e9"], "Invalid value for '--timeout'"),
    (["sim", "run", "--seed", "9" * 30], "Invalid value for '--seed'"),
    (["sim", "sweep", "x.yaml", "-j", "100000"], "Invalid value for '-j'"),
    (["raft", "check", "--seeds", "x"], "Invalid value for '--seeds'"),
    (["certs", "init", "/nonexistent/certs", "--node", "../escape"], "Invalid value for '--node'"),
]


@pytest.mark.parametrize(("args", "fragment"), BAD_VALUES, ids=lambda v: str(v)[:40])
def test_cli_refuses_bad_values_in_one_line(
    profile_env: dict[str, str], args: list[str], fragment: str
) -> None:
    run = goml(*args, env=profile_env)
    assert_refused(run, fragment)
    errors = [line for line in run.err.splitlines() if line.lower().startswith("error:")]
    assert len(errors) == 1, run.err
    assert "refused" not in run.err  # refused before any connection was tried


def test_args_file_from_stdin(profile_env: dict[str, str], tmp_path: Path) -> None:
    run = goml("submit", "matmul", "--args-file", "-", stdin=b"null", env=profile_env)
    assert_refused(run, "error: --args-file must be a JSON object of arguments, not null")
    big = tmp_path / "big.json"
    big.write_bytes(b'{"message": "' + b"x" * FILE_BYTES_MAX + b'"}')
    run = goml("submit", "fail", "--args-file", str(big), env=profile_env)
    assert_refused(run, f"error: --args-file: more than {FILE_BYTES_MAX} bytes")
    # Valid args from stdin go all the way to the (closed) node.
    run = goml("submit", "matmul", "--args-file", "-", stdin=b'{"n": 4}', env=profile_env)
    assert_refused(run, "connection refused at every node")


@pytest.mark.parametrize(
    "args",
    [
        ["status"],
        ["task", "get", "t-1-0"],
        ["task", "list"],
        ["task", "watch"],
        ["task", "cancel", "t-1-0"],
        ["submit", "matmul", "--args", '{"n": 4}'],
    ],
    ids=lambda a: " ".join(a),
)
def test_cli_against_a_closed_port_names_it_at_once(
    profile_env: dict[str, str], closed_port: int, args: list[str]
) -> None:
    run = goml(*args, "--timeout", str(CLIENT_TIMEOUT_S), env=profile_env)
    assert_refused(run, f"connection refused at every node (n1 at 127.0.0.1:{closed_port})")
    assert run.elapsed_s < CLIENT_TIMEOUT_S / 2, run.elapsed_s  # not the whole budget
    assert run.out == "", run.out  # `task watch` printed nothing and exited 0 before


class _Served(api_pb2_grpc.ClientServicer):
    def Status(
        self, request: api_pb2.StatusRequest, context: grpc.ServicerContext
    ) -> api_pb2.StatusResponse:
        return api_pb2.StatusResponse(leader_id="n1")


def test_cli_with_the_wrong_ca_names_the_cause(tmp_path: Path) -> None:
    """A real mutual-TLS server of one CA; a profile trusting another."""
    from concurrent import futures

    server_ca, other_ca = tmp_path / "a", tmp_path / "b"
    for directory in (server_ca, other_ca):
        init_certs(directory, ["n1"], ["127.0.0.1", "localhost"])
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    try:
        api_pb2_grpc.add_ClientServicer_to_server(_Served(), server)  # type: ignore[no-untyped-call]
        credentials = grpc.ssl_server_credentials(
            [((server_ca / "n1.key").read_bytes(), (server_ca / "n1.pem").read_bytes())],
            root_certificates=(server_ca / "ca.pem").read_bytes(),
            require_client_auth=True,
        )
        port = server.add_secure_port("127.0.0.1:0", credentials)
        assert port > 0
        server.start()
        profile = tmp_path / "profile.json"
        body = {
            "nodes": {"n1": f"127.0.0.1:{port}"},
            "token": "t",
            "ca": str(other_ca / "ca.pem"),
            "cert": str(other_ca / "client.pem"),
            "key": str(other_ca / "client.key"),
        }
        profile.write_text(json.dumps(body))
        run = goml("status", "--timeout", str(CLIENT_TIMEOUT_S), env={"GOML_PROFILE": str(profile)})
    finally:
        assert server.stop(grace=None).wait(SERVER_STOP_TIMEOUT_S), "the server did not stop"
    assert_refused(run, f"TLS handshake failed at every node (n1 at 127.0.0.1:{port})")
    assert "wrong CA?" in run.err, run.err
    assert run.elapsed_s < CLIENT_TIMEOUT_S / 2, run.elapsed_s
    # grpc core's own INFO lines about the handshake stay out of the user's way.
    assert len(run.err.strip().splitlines()) == 1, run.err
