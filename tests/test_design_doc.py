"""docs/design.md's worked example, executed: the doc's code can never go stale.

Every fenced block opened with ```` ```python example ```` runs, in order, in one namespace that
holds ``CKPT``, the directory of a tiny random-weight Qwen2.5-VL checkpoint (``tests/tiny.py``,
saved with ``save_pretrained`` like a real one). A block that raises or an assertion in it that
fails fails this test. The doc's other ```` ```python ```` blocks must at least compile.
"""

import re
from pathlib import Path

import pytest

import jaxmm.attention as A
import tiny

DOC = Path(__file__).resolve().parents[1] / "docs" / "design.md"
FENCE = re.compile(r"^```(python[^\n]*)\n(.*?)^```[ \t]*$", re.M | re.S)


def blocks():
    """(info string, code) of every fenced python block of the doc, in order."""
    return [(m.group(1).split(), m.group(2)) for m in FENCE.finditer(DOC.read_text())]


def test_every_python_block_compiles():
    found = blocks()
    assert found, f"{DOC}: no python blocks"
    for i, (_, code) in enumerate(found):
        compile(code, f"{DOC.name} block {i}", "exec")


def test_worked_example_runs(tmp_path):
    example = [code for info, code in blocks() if info[1:] == ["example"]]
    assert len(example) >= 5, f"{DOC}: expected the worked example's blocks (```python example)"
    tiny.save_hf_model("gqa_untied", tmp_path, seed=0)
    # __name__: the example's classes are registered under this module name, never as shipped jaxmm.* ones
    ns = {"CKPT": str(tmp_path), "__name__": "design_doc_example"}
    saved = {kind: dict(reg) for kind, reg in A.REGISTRY.items()}
    try:
        for i, code in enumerate(example):
            try:
                exec(compile(code, f"{DOC.name} example block {i}", "exec"), ns)
            except Exception as e:
                pytest.fail(f"{DOC.name} example block {i} failed: {type(e).__name__}: {e}\n---\n{code}")
    finally:
        for kind, reg in saved.items():
            A.REGISTRY[kind].clear()
            A.REGISTRY[kind].update(reg)
    assert "LastRowImageShift" in ns and "LastImageMass" in ns, "the example defines both classes"
