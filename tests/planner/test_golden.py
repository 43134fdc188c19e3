"""Every golden plan in plans/ is what compiling it again gives, byte for byte.

Its own file (minutes of compiling) so that `pytest -n 2 --dist loadfile` runs it beside test_compile.py.
"""

from __future__ import annotations

import pytest

from planner.golden import GOLDEN, PLANS_DIR


@pytest.mark.parametrize("golden", GOLDEN, ids=[g.file for g in GOLDEN])
def test_golden_plan_is_reproduced_byte_for_byte(golden):
    path = PLANS_DIR / golden.file
    assert path.is_file(), f"{path} missing: run `make plans`"
    fresh = golden.compile_text()
    assert fresh == path.read_text(), f"{golden.file} changed: inspect with podplan diff, then `make plans`"
