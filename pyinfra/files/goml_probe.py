"""Health and latency probe, run on a host with goml's virtualenv Python (deploy.py
uploads it to /opt/goml/probe.py). Prints one JSON object:

    {"status": {...} | null, "error": str | null, "latency_ms": {"host:port": ms | null}}

`status` is the leader's view (members, agents); latency is the median TCP connect time
(one SYN/SYN-ACK round trip) to each target, over `--samples` attempts.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import time
from pathlib import Path


def connect_rtt_ms(target: str, samples: int, timeout_s: float = 1.0) -> float | None:
    host, _, port = target.rpartition(":")
    times: list[float] = []
    for _ in range(samples):
        start = time.perf_counter()
        try:
            with socket.create_connection((host, int(port)), timeout=timeout_s):
                times.append((time.perf_counter() - start) * 1000.0)
        except OSError:
            continue
    return statistics.median(times) if times else None


def cluster_status(profile_path: Path) -> dict[str, object]:
    from goml.client import Client, Profile

    with Client(Profile.load(profile_path), call_timeout_s=2.0, retry_s=4.0) as client:
        response = client.status()
    return {
        "leader": response.leader_id,
        "term": response.term,
        "commit_index": response.commit_index,
        "voters": list(response.voters),
        "learners": list(response.learners),
        "members": [
            {
                "id": m.id,
                "role": m.role,
                "reachable": m.reachable,
                "commit_index": m.commit_index,
                "applied_index": m.applied_index,
            }
            for m in response.members
        ],
        "agents": [{"id": a.id, "state": a.state} for a in response.agents],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--profile", type=Path)
    parser.add_argument("--latency", nargs="*", default=[])
    parser.add_argument("--samples", type=int, default=10)
    args = parser.parse_args()
    result: dict[str, object] = {"status": None, "error": None, "latency_ms": {}}
    if args.profile is not None:
        try:
            result["status"] = cluster_status(args.profile)
        except Exception as error:  # reported, judged by the caller
            result["error"] = f"{type(error).__name__}: {error}"
    result["latency_ms"] = {t: connect_rtt_ms(t, args.samples) for t in args.latency}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
