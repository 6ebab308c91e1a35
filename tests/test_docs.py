"""The project's own documents: every pointer from the sources to docs/ names a file and section that exist,
and no source points outside the repository (the team's SPEC.md and DESIGN.md are not shipped)."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
SOURCES = [
    p
    for folder in ("empssl", "kernels", "csrc", "bench", "tests", ".ci")
    for p in (ROOT / folder).rglob("*")
    if p.is_file() and p.suffix in (".py", ".h", ".cpp", ".cu", ".sh", "") and "__pycache__" not in p.parts
]
SOURCES += [ROOT / "README.md", ROOT / "setup.py"]
# "docs/method.md section 2", "docs/method.md sections 1 and 5", "docs/design.md sections 1-2"
POINTER = re.compile(r"docs/(\w+)\.md sections? (\d+)(?:(?: and |-|, )(\d+))?")


def _sections(doc):
    return {int(number) for number in re.findall(r"^## (\d+)\.", (ROOT / "docs" / f"{doc}.md").read_text(), re.M)}


def test_every_pointer_into_docs_names_an_existing_section():
    pointers = []
    for path in SOURCES:
        for doc, first, last in POINTER.findall(path.read_text(errors="replace")):
            pointers.append((path.relative_to(ROOT), doc, int(first), int(last or first)))
    assert len(pointers) >= 20  # the sources do point there
    broken = [
        f"{path}: docs/{doc}.md section {n}"
        for path, doc, first, last in pointers
        if not (ROOT / "docs" / f"{doc}.md").exists() or not {first, last} <= _sections(doc)
        for n in (first, last)
    ]
    assert not broken, broken


def test_no_source_points_to_documents_outside_the_repository():
    outside = [
        str(path.relative_to(ROOT))
        for path in SOURCES
        if path != pathlib.Path(__file__) and re.search(r"\b(SPEC|DESIGN)\.md\b", path.read_text(errors="replace"))
    ]
    assert not outside, outside
