"""The README's examples run as written."""

from pathlib import Path

import pytest

pytest.importorskip("transformers")

README = Path(__file__).resolve().parents[1] / "README.md"


def python_block_after(heading: str) -> str:
    text = README.read_text()
    start = text.index(heading)
    opening = text.index("```python\n", start) + len("```python\n")
    return text[opening:text.index("```", opening)]


@pytest.mark.usefixtures("one_thread")
def test_quick_start_runs_and_its_shapes_are_as_commented():
    names: dict = {}
    exec(compile(python_block_after("## Quick start"), "README quick start", "exec"), names)
    assert names["u"].epistemic.shape == (256,)
    assert names["c"].mass.shape == (2, 2)
    assert names["a"].sink_mass.shape == (1, 8, 2048)
    assert names["record"].sink_mass.shape == (2, 4)
