"""Rolling upgrade: deploy to one host at a time, each only after the cluster is healthy.

    python pyinfra/rolling_upgrade.py INVENTORY [--data goml_version=0.2.0 ...]

Each step is `pyinfra -y INVENTORY deploy.py --limit HOST`; deploy.py's verification
waits (with a deadline) until a leader is elected, every control node is reachable and
caught up and every agent is alive again, so the next host is touched only then. A step
that fails stops the upgrade with the remaining hosts untouched. Pass --order to choose
the sequence (e.g. followers first, the leader last).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def inventory_hosts(inventory: Path) -> list[str]:
    """The host names of a pyinfra inventory file (groups are lists of names or
    (name, data) tuples), in file order."""
    namespace: dict[str, object] = {"__file__": str(inventory)}
    exec(compile(inventory.read_text(), str(inventory), "exec"), namespace)
    names: list[str] = []
    for key, value in namespace.items():
        if key.startswith("_") or not isinstance(value, list):
            continue
        for entry in value:
            name = entry[0] if isinstance(entry, tuple) else entry
            if isinstance(name, str) and name not in names:
                names.append(name)
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inventory", type=Path)
    parser.add_argument("--data", action="append", default=[], help="key=value for pyinfra")
    parser.add_argument("--order", help="comma-separated host names (default: inventory order)")
    args = parser.parse_args(argv)
    hosts = args.order.split(",") if args.order else inventory_hosts(args.inventory)
    data = [arg for item in args.data for arg in ("--data", item)]
    started = time.monotonic()
    for index, name in enumerate(hosts, 1):
        step = time.monotonic()
        print(f"rolling upgrade: [{index}/{len(hosts)}] {name}", flush=True)
        command = [
            sys.executable,
            "-m",
            "pyinfra",
            "-y",
            str(args.inventory),
            str(HERE / "deploy.py"),
            "--limit",
            name,
            *data,
        ]
        result = subprocess.run(command, check=False)
        if result.returncode != 0:
            print(
                f"rolling upgrade stopped at {name} (exit {result.returncode}); "
                f"not touched: {', '.join(hosts[index:]) or 'none'}",
                file=sys.stderr,
            )
            return 1
        print(f"rolling upgrade: {name} healthy after {time.monotonic() - step:.1f} s", flush=True)
    print(f"rolling upgrade: {len(hosts)} hosts in {time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
