"""Ahead-of-time compile of every Triton kernel configuration for sm_80 and sm_90, on the CPU.

(``EMPSSL_AOT_TARGETS=90`` compiles for sm_90 only.)

Convention: a kernel module ``empssl.kernels.<op>`` lists what its dispatch can launch as

    AOT_CONFIGS = [(kernel, signature, constexprs, options), ...]

- ``kernel``: the ``@triton.jit`` function;
- ``signature``: ``{parameter name: Triton type}`` for every parameter, e.g. ``"*fp32"``,
  ``"*bf16"``, ``"i32"``, ``"fp32"``, or ``"constexpr"`` for the constexpr parameters and for
  integers that Triton specialises at run time (an argument equal to 1 becomes a constant);
- ``constexprs``: ``{parameter name: value}`` for every ``"constexpr"`` entry of the signature;
- ``options``: the launch's ``num_warps`` as an int, or a dict of ``triton.compile`` options
  (``{"num_warps": 16, "num_stages": 1}``), optionally with ``"cc": [90]``: the targets this
  configuration is launched on (default: every target).

The list must hold every configuration the module's ``launch_config`` can pick (each module's
own tests check that). This test compiles each one for both targets with
``triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", cc, 32))``,
reads the cubin's resources with the ``cuobjdump`` bundled in Triton, and asserts that every
kernel compiles with no stack frame and no local memory (register spills would land there).

The compiles run in a subprocess with TRITON_INTERPRET=0: tests/conftest.py turns the
interpreter on for this process, where ``@triton.jit`` yields interpreter functions that
cannot be compiled.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

KERNEL_MODULES = ("empssl.kernels.tcr", "empssl.kernels.augment")
# EMPSSL_AOT_TARGETS=90 narrows the targets (bench/gpu_check.sh --rehearse compiles for the H200's only)
TARGETS = tuple(int(cc) for cc in os.environ.get("EMPSSL_AOT_TARGETS", "80,90").split(","))

_COMPILE_SCRIPT = r"""
import importlib, json, os, re, subprocess, sys, tempfile, time
import triton
from triton.backends.compiler import GPUTarget

module = importlib.import_module(sys.argv[1])
targets = [int(cc) for cc in sys.argv[2].split(",")]
cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
for kernel, signature, constexprs, options in module.AOT_CONFIGS:
    options = {"num_warps": options} if isinstance(options, int) else dict(options)
    launched_on = options.pop("cc", targets)
    for cc in (cc for cc in targets if cc in launched_on):
        record = {"kernel": kernel.__name__, "constexprs": constexprs, "options": options, "cc": cc,
                  "dtypes": sorted({t for t in signature.values() if t.startswith("*")})}
        start = time.perf_counter()
        try:
            compiled = triton.compile(triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                                      target=GPUTarget("cuda", cc, 32), options=options)
            with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
                cubin.write(compiled.asm["cubin"])
                cubin.flush()
                usage = subprocess.run([cuobjdump, "--dump-resource-usage", cubin.name],
                                       capture_output=True, text=True, check=True).stdout
            found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
            record.update(regs=int(found[1]), stack=int(found[2]), shared=int(found[3]), local=int(found[4]))
        except Exception as err:  # reported per configuration by the test
            record["error"] = f"{type(err).__name__}: {err}"[-2000:]
        record["seconds"] = round(time.perf_counter() - start, 2)
        print("AOT " + json.dumps(record), flush=True)
"""


def _compile_all(module_name):
    env = dict(os.environ, TRITON_INTERPRET="0")
    done = subprocess.run(
        [sys.executable, "-c", _COMPILE_SCRIPT, module_name, ",".join(map(str, TARGETS))],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    records = [json.loads(line[4:]) for line in done.stdout.splitlines() if line.startswith("AOT ")]
    assert done.returncode == 0, f"compile script failed:\n{done.stderr[-4000:]}"
    return records


@pytest.mark.slow
@pytest.mark.parametrize("module_name", KERNEL_MODULES)
def test_every_kernel_config_compiles_for_sm80_and_sm90_without_local_memory(module_name):
    if importlib.util.find_spec(module_name) is None:
        pytest.skip(f"{module_name} does not exist")
    records = _compile_all(module_name)
    assert records, f"{module_name}.AOT_CONFIGS is empty"
    assert {r["cc"] for r in records} == set(TARGETS)

    print(f"\n{module_name}: kernel, dtypes, constexprs, options, cc -> registers / stack / local / shared, seconds")
    for r in records:
        print(
            f"  {r['kernel']} {r['dtypes']} {r['constexprs']} {r['options']} sm_{r['cc']}: "
            + (
                f"REG {r['regs']} STACK {r['stack']} LOCAL {r['local']} SHARED {r['shared']}"
                if "error" not in r
                else "ERROR " + r["error"].splitlines()[-1]
            )
            + f" ({r['seconds']} s)"
        )

    failed = [r for r in records if "error" in r]
    assert not failed, "configurations that do not compile:\n" + "\n".join(json.dumps(r) for r in failed)
    spilling = [r for r in records if r["stack"] != 0 or r["local"] != 0]
    assert not spilling, "configurations with a stack frame or local memory (spills):\n" + "\n".join(
        json.dumps(r) for r in spilling
    )
    # a register count above the hardware's per-thread maximum would mean cuobjdump output was misread
    assert all(0 < r["regs"] <= 255 for r in records)
