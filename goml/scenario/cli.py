"""`goml scenario ...`: check scenario files and print their JSON Schema."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from goml.scenario.loader import ScenarioError, load_scenario
from goml.scenario.schema import json_schema

scenario_app = typer.Typer(
    help="Check scenario files and print the scenario JSON Schema.", no_args_is_help=True
)


@scenario_app.command()
def validate(
    files: Annotated[list[Path], typer.Argument(help="Scenario YAML files to check.")],
) -> None:
    """Print `FILE: ok` (and any warnings) or every problem as FILE:LINE: field: message."""
    failed = False
    for path in files:
        try:
            loaded = load_scenario(path)
        except ScenarioError as exc:
            failed = True
            typer.echo(str(exc), err=True)
            continue
        typer.echo(f"{path}: ok")
        for warning in loaded.warnings:
            typer.echo(str(warning))
    if failed:
        raise typer.Exit(code=1)


@scenario_app.command()
def schema() -> None:
    """Print the JSON Schema of scenario files (for editors)."""
    typer.echo(json.dumps(json_schema(), indent=2))
