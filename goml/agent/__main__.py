"""`python -m goml.agent --config FILE`: run a node agent (see `goml.agent.runtime`)."""

from __future__ import annotations

import argparse

from goml.agent.runtime import main


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m goml.agent", description=__doc__)
    parser.add_argument("--config", required=True, help="agent config file (YAML or JSON)")
    args = parser.parse_args(argv)
    return main(args.config)


if __name__ == "__main__":
    raise SystemExit(cli())
