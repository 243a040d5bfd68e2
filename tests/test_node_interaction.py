"""Golden interaction tests for the control-plane node core: `tests/testdata/cluster/*.txt`.

Regenerate after a deliberate change with `GOML_REWRITE=1 pytest
tests/test_node_interaction.py`, then read the diff: a golden file that enshrines a
bug is worse than none.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.node_interaction import run_file

TESTDATA = Path(__file__).parent / "testdata" / "cluster"
FILES = sorted(TESTDATA.glob("*.txt"))


def test_golden_files_exist() -> None:
    assert len(FILES) >= 6, FILES


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_interaction(path: Path) -> None:
    rewrite = os.environ.get("GOML_REWRITE") == "1"
    problems = run_file(path, rewrite)
    if problems and not rewrite:
        pytest.fail("\n\n".join(problems[:3]) + f"\n\n({len(problems)} mismatching cases)")
