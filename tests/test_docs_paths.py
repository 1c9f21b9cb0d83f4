"""Source files that the documentation names (README, docs/, model and LoRA cards) exist where it says."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# A path in backticks, inside this repository, to a Python file (prose may also name folders and patterns).
PY_PATH = re.compile(r"`((?:stepvideo_core|nodes|bench|scripts|tests)/[\w./-]+\.py)`")


def test_python_files_named_in_the_docs_exist():
    docs = [ROOT / "README.md", *ROOT.glob("docs/**/*.md"), *ROOT.glob("models/**/README.md")]
    missing = [f"{doc.relative_to(ROOT)}: {path}" for doc in docs if doc.is_file()
               for path in PY_PATH.findall(doc.read_text(encoding="utf-8")) if not (ROOT / path).is_file()]
    assert not missing, missing
