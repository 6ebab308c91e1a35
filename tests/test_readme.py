"""Every ```python block of README.md runs as written, on the CPU, and writes nothing where it is run."""
import os
import pathlib
import re
import subprocess
import sys

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
# runs each block in a fresh namespace, as a reader pasting it into a new interpreter would
RUNNER = """
import sys
blocks = sys.stdin.read().split("\\0")
for index, block in enumerate(blocks):
    print(f"--- README python block {index + 1} of {len(blocks)}", flush=True)
    exec(compile(block, f"README.md python block {index + 1}", "exec"), {"__name__": "__main__"})
"""


def python_blocks():
    return re.findall(r"^```python\n(.*?)^```$", README.read_text(), flags=re.S | re.M)


@pytest.mark.slow  # trains and evaluates: ~12 s
def test_readme_python_blocks_run(tmp_path):
    blocks = python_blocks()
    assert len(blocks) >= 3  # the loss, the augmentation, the trainer
    work, temp = tmp_path / "cwd", tmp_path / "tmp"
    work.mkdir()
    temp.mkdir()
    env = dict(os.environ, TMPDIR=str(temp), CUDA_VISIBLE_DEVICES="")  # the CPU, as the README promises
    run = subprocess.run([sys.executable, "-c", RUNNER], input="\0".join(blocks), cwd=work, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"--- README python block {len(blocks)} of {len(blocks)}" in run.stdout
    assert list(work.iterdir()) == []  # nothing written where the snippets run (no ./runs)
