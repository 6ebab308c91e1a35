"""Every CUDA source compiles with nvcc for sm_80 and sm_90 without register spills or stack.

ptxas -v prints, per compiled function and architecture,
    ptxas info    : Compiling entry function '<name>' for 'sm_90'
    ptxas info    : Function properties for <name>
        0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
    ptxas info    : Used 121 registers, used 1 barriers
A spill or a stack frame puts per-thread data in local memory (DRAM traffic) in kernels
designed to keep it in registers / shared memory. No GPU is needed.
"""

import glob
import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
ARCHS = ("80", "90")

PROPERTIES = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
COMPILING = re.compile(r"Compiling entry function '([^']+)' for 'sm_(\d+)'")
FUNCTION = re.compile(r"Function properties for (\S+)")
REGISTERS = re.compile(r"Used (\d+) registers")


def parse_ptxas(log):
    """{(function, arch): {"stack": int, "spill_stores": int, "spill_loads": int, "registers": int}}"""
    usage, arch, function = {}, None, None
    for line in log.splitlines():
        if m := COMPILING.search(line):
            function, arch = m.group(1), m.group(2)
        elif m := FUNCTION.search(line):
            function = m.group(1)
        elif m := PROPERTIES.search(line):
            stack, stores, loads = map(int, m.groups())
            usage.setdefault((function, arch), {}).update(stack=stack, spill_stores=stores, spill_loads=loads)
        elif (m := REGISTERS.search(line)) and function is not None:
            usage.setdefault((function, arch), {})["registers"] = int(m.group(1))
    return usage


def test_parse_ptxas_reads_spills_and_registers():
    log = """ptxas info    : Compiling entry function '_Z1kPf' for 'sm_90'
ptxas info    : Function properties for _Z1kPf
    16 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers"""
    assert parse_ptxas(log) == {("_Z1kPf", "90"): dict(stack=16, spill_stores=8, spill_loads=4, registers=40)}


def _nvcc():
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
            if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
                return os.path.join(home, "bin", "nvcc")
    return nvcc


@pytest.mark.slow  # nvcc: 8-9 s per source
@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found")
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=os.path.basename)
def test_cuda_source_compiles_without_spills(source, tmp_path):
    gencode = [flag for arch in ARCHS for flag in ("-gencode", f"arch=compute_{arch},code=sm_{arch}")]
    cmd = [
        _nvcc(),
        "-std=c++17",
        "-O3",
        *gencode,
        "-Xptxas",
        "-v",
        "-I",
        os.path.join(ROOT, "csrc", "include"),
        "-c",
        source,
        "-o",
        str(tmp_path / "out.o"),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    usage = parse_ptxas(result.stdout + result.stderr)
    kernels = {arch for (_fn, arch) in usage}
    assert kernels == set(ARCHS), f"expected ptxas reports for sm_{ARCHS}, got {sorted(kernels)}"
    bad = {
        key: u for key, u in usage.items() if u.get("stack", 0) or u.get("spill_stores", 0) or u.get("spill_loads", 0)
    }
    assert not bad, f"local memory use (stack/spills) in {os.path.basename(source)}: {bad}"
    for (function, arch), u in sorted(usage.items()):
        print(f"{os.path.basename(source)} sm_{arch} {function}: {u}")
