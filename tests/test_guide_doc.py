"""Every ```python block of docs/from-the-guide.md runs, in order, in one namespace."""

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "from-the-guide.md"
BLOCK = re.compile(r"^```python\n(.*?)^```$", re.S | re.M)


def blocks() -> list[str]:
    return BLOCK.findall(DOC.read_text(encoding="utf-8"))


def test_the_doc_has_a_snippet_per_phase():
    text = DOC.read_text(encoding="utf-8")
    assert len(blocks()) >= 15
    # Every fenced block is a python block, so none escapes this test.
    assert text.count("\n```\n") == len(blocks()) and text.count("```") == 2 * len(blocks())


def test_every_snippet_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "from_the_guide"}
    text = DOC.read_text(encoding="utf-8")
    for match in BLOCK.finditer(text):
        # Padded so that a traceback names the line of the doc.
        line = text.count("\n", 0, match.start(1))
        exec(compile("\n" * line + match.group(1), str(DOC), "exec"), namespace)
