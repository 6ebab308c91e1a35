"""Every ```python block of README.md and of the docs/*.md pages runs as written, on the CPU, and writes
nothing where it is run; the README keeps its two set-up commands (CI runs the test command it gives); every
link between these pages, and every "page.md section N" pointer, names a file, heading or section that exists."""

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
# runs each block in a fresh namespace, as a reader pasting it into a new interpreter would
RUNNER = """
import sys
blocks = sys.stdin.read().split("\\0")
for index, block in enumerate(blocks):
    name, code = block.split("\\n", 1)
    print(f"--- python block {index + 1} of {len(blocks)}: {name}", flush=True)
    exec(compile(code, name, "exec"), {"__name__": "__main__"})
"""


def python_blocks(path=README):
    return re.findall(r"^```python\n(.*?)^```$", path.read_text(), flags=re.S | re.M)


def bash_blocks(path=README):
    return re.findall(r"^```bash\n(.*?)^```$", path.read_text(), flags=re.S | re.M)


def test_the_readme_keeps_its_two_set_up_commands():
    """One set-up runs the main job on the built-in data (train, then evaluate trained and random-init);
    one runs all tests with `python -m pytest -q -ra`, the command CI (.ci/run) runs."""
    blocks = [block.replace("\\\n", " ") for block in bash_blocks()]
    main_job = [block for block in blocks if "empssl train --dataset synthetic" in block]
    assert len(main_job) == 1, "the README's main job: one block that trains on the synthetic data"
    assert "pip install" in main_job[0] and "--checkpoint" in main_job[0] and "--random-init" in main_job[0]
    tests = [block for block in blocks if "python -m pytest -q -ra" in block.splitlines()]
    assert len(tests) == 1, "the README's test command: one block ending in `python -m pytest -q -ra`"
    assert "pip install" in tests[0] and "pytest" in tests[0].split("python -m pytest")[0]


def _anchors(page):
    """GitHub's anchor of each heading: lower case, punctuation dropped, spaces to hyphens."""
    return {
        re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        for heading in re.findall(r"^#+ (.*)$", page.read_text(), flags=re.M)
    }


def _sections(page):
    return {int(number) for number in re.findall(r"^## (\d+)\.", page.read_text(), flags=re.M)}


def test_every_link_and_section_pointer_of_the_docs_exists():
    links, broken = 0, []
    for path in (README, *DOCS):
        text = re.sub(r"^```.*?^```$", "", path.read_text(), flags=re.S | re.M)  # not inside code blocks
        for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)", text):
            if target.startswith(("http://", "https://")):
                continue
            links += 1
            page = (path.parent / target).resolve() if target else path
            if not page.exists():
                broken.append(f"{path.relative_to(ROOT)}: link to {target}, which does not exist")
            elif anchor and page.suffix == ".md" and anchor not in _anchors(page):
                broken.append(f"{path.relative_to(ROOT)}: link to {target}#{anchor}, no such heading")
        # "[training.md](training.md) section 5", "docs/method.md sections 5 and 6", "[docs/install.md section 3](...)"
        for name, first, last in re.findall(
            r"([\w-]+)\.md(?:\]\([^)]*\))? sections? (\d+)(?:(?: and |-|, )(\d+))?", text
        ):
            page = ROOT / "docs" / f"{name}.md"
            numbers = {int(first), int(last or first)}
            if not page.exists() or not numbers <= _sections(page):
                broken.append(f"{path.relative_to(ROOT)}: {name}.md section {sorted(numbers)} does not exist")
    assert links >= 30  # the README links its pages, and they link each other
    assert not broken, broken


@pytest.mark.slow  # trains and evaluates: ~15 s
def test_readme_python_blocks_run(tmp_path):
    blocks = [(path, block) for path in (README, *DOCS) for block in python_blocks(path)]
    assert (
        len(python_blocks(README)) >= 3
    )  # the loss, the augmentation, the trainer (.ci/release_check.sh asks as much)
    assert len(blocks) > len(python_blocks(README))  # and the pages' own
    work, temp = tmp_path / "cwd", tmp_path / "tmp"
    work.mkdir()
    temp.mkdir()
    env = dict(os.environ, TMPDIR=str(temp), CUDA_VISIBLE_DEVICES="")  # the CPU, as the README promises
    named = [
        f"{path.relative_to(ROOT)} python block {sum(1 for p, _ in blocks[: i + 1] if p == path)}\n{block}"
        for i, (path, block) in enumerate(blocks)
    ]
    run = subprocess.run(
        [sys.executable, "-c", RUNNER],
        input="\0".join(named),
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"--- python block {len(blocks)} of {len(blocks)}" in run.stdout
    assert list(work.iterdir()) == []  # nothing written where the snippets run (no ./runs)
