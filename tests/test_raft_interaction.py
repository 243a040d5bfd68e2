"""Golden interaction tests for the Raft core: `tests/testdata/raft/*.txt`.

Regenerate after a deliberate change with `GOML_REWRITE=1 pytest
tests/test_raft_interaction.py`, then read the diff: a golden file that enshrines a
bug is worse than none.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.raft_interaction import run_file

TESTDATA = Path(__file__).parent / "testdata" / "raft"
FILES = sorted(TESTDATA.glob("*.txt"))


def test_golden_files_exist() -> None:
    assert len(FILES) >= 10, FILES


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_interaction(path: Path) -> None:
    rewrite = os.environ.get("GOML_REWRITE") == "1"
    problems = run_file(path, rewrite)
    if problems and not rewrite:
        pytest.fail("\n\n".join(problems[:3]) + f"\n\n({len(problems)} mismatching cases)")
