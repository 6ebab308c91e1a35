#!/usr/bin/env bash
# The package as a user installs it, not as a developer's editable checkout:
#   1. an sdist built from the clean tree (tracked files only), checked to hold every source and header;
#   2. two wheels built FROM that sdist: with the CPU extension (EMPSSL_BUILD_CUDA=0: the CUDA part
#      builds in the editable install and tests/test_compile_nvcc.py) and pure Python (EMPSSL_BUILD_EXT=0);
#   3. each wheel installed in turn into one fresh virtual environment, then used from another folder:
#      --version, info, every ```python block of the README, and a two-step `empssl train`.
#
#   bash .ci/release_check.sh PYTHON WORK      # PYTHON: an interpreter with torch, setuptools, wheel, build
set -euo pipefail
py=${1:?usage: bash .ci/release_check.sh PYTHON WORK}
work=${2:?usage: bash .ci/release_check.sh PYTHON WORK}
repo=$(cd "$(dirname "$0")/.." && pwd)
rm -rf "$work" && mkdir -p "$work"/{tree,dist,elsewhere}
work=$(cd "$work" && pwd)
start=$(date +%s)
elapsed() { echo "$(( $(date +%s) - start )) s"; }

# the clean tree: what git tracks (and new files git does not ignore), never a build's outputs
(cd "$repo" && git ls-files -co --exclude-standard -z | xargs -0 tar -cf - ) | tar -xf - -C "$work/tree"
(cd "$work/tree" && EMPSSL_BUILD_EXT=0 "$py" -m build --no-isolation --sdist -o "$work/dist" . > "$work/sdist.log" 2>&1) \
  || { cat "$work/sdist.log"; echo "release check: the sdist did not build"; exit 1; }
sdist=$(ls "$work"/dist/empssl-*.tar.gz)
"$py" - "$sdist" "$work/tree" <<'PY'
import os, sys, tarfile
sdist, tree = sys.argv[1:]
with tarfile.open(sdist) as tar:
    shipped = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
wanted = [os.path.relpath(os.path.join(root, name), tree)
          for top in ("csrc", "kernels", "empssl") for root, _, names in os.walk(os.path.join(tree, top)) for name in names
          if name != "_build_info.py"]  # the build's own record, written by setup.py where it runs
missing = sorted(path for path in wanted if path not in shipped)
assert not missing, f"the sdist lacks {missing}"
print(f"sdist {os.path.basename(sdist)}: all {len(wanted)} files of csrc/, kernels/ and empssl/")
PY
echo "sdist built and checked: $(elapsed)"

mkdir -p "$work/unpacked" && tar -xzf "$sdist" -C "$work/unpacked"
from_sdist=$(ls -d "$work"/unpacked/empssl-*)
build_wheel() {  # build_wheel KIND ENV...: a wheel from the unpacked sdist, as pip builds one for a user
  local kind=$1; shift
  rm -rf "$from_sdist/build"
  (cd "$from_sdist" && env "$@" "$py" -m pip wheel -q --no-build-isolation --no-deps -w "$work/wheels-$kind" . \
     > "$work/wheel-$kind.log" 2>&1) || { cat "$work/wheel-$kind.log"; echo "release check: the $kind wheel did not build"; exit 1; }
  echo "$kind wheel $(basename "$(ls "$work"/wheels-"$kind"/*.whl)"): $(elapsed)"
}
build_wheel cpu EMPSSL_BUILD_CUDA=0 MAX_JOBS=2
build_wheel pure EMPSSL_BUILD_EXT=0

"$py" -m venv "$work/venv"
venv_py="$work/venv/bin/python"
# torch is the one in use at build time: an extension only loads into the torch it was built against
torch_version=$("$py" -c "import torch; print(torch.__version__.split('+')[0])")
"$venv_py" -m pip install -q "torch==$torch_version" torchvision numpy tqdm pillow > "$work/deps.log" 2>&1 \
  || { cat "$work/deps.log"; echo "release check: the fresh venv's dependencies did not install"; exit 1; }
echo "fresh venv with torch $torch_version: $(elapsed)"

use_installed() {  # use_installed KIND EXPECTED_BUILD: the installed wheel, from a folder outside any source tree
  local kind=$1 expected=$2
  cd "$work/elsewhere"
  "$venv_py" - "$expected" "$repo" "$work" <<'PY'
import os, sys
expected, repo, work = sys.argv[1:]
import empssl
from empssl import backends
location = os.path.dirname(os.path.abspath(empssl.__file__))
assert location.startswith(os.path.join(work, "venv")), f"empssl imported from {location}, not the fresh venv"
assert not any(p and os.path.abspath(p).startswith((repo, os.path.join(work, "tree"))) for p in sys.path), sys.path
import empssl.ops, empssl.kernels.tcr, empssl.kernels.augment, empssl.reference, empssl.bench  # noqa: F401
assert backends.build_info()["extension"] == expected, backends.build_info()
print(f"imported from {location}; built: {backends.build_summary()}")
PY
  "$venv_py" -m empssl --version
  "$venv_py" -m empssl info > info.txt && sed -n 1,8p info.txt
  # the README's python blocks, each in a fresh interpreter namespace, as a reader pastes them
  "$venv_py" - "$repo/README.md" <<'PY'
import re, sys
blocks = re.findall(r"^```python\n(.*?)^```$", open(sys.argv[1]).read(), flags=re.S | re.M)
assert len(blocks) >= 3
for index, block in enumerate(blocks):
    exec(compile(block, f"README.md python block {index + 1}", "exec"), {"__name__": "__main__"})
print(f"README: all {len(blocks)} python blocks ran")
PY
  rm -rf run && "$work/venv/bin/empssl" train --dataset synthetic --image-size 16 --train-size 64 --batch-size 16 \
    --width 0.125 --hidden-dim 64 --z-dim 32 --num-patches 2 --max-steps 2 --no-progress --out-dir run > train.txt 2>&1 \
    || { cat train.txt; echo "release check: empssl train failed ($kind)"; exit 1; }
  tail -n 1 train.txt
  [ -f run/checkpoint.pt ] && [ -f run/metrics.jsonl ] || { echo "release check: no checkpoint or metrics ($kind)"; exit 1; }
  echo "$kind wheel used from $(pwd): $(elapsed)"
}

"$venv_py" -m pip install -q --no-deps "$work"/wheels-cpu/*.whl
use_installed cpu cpu
"$venv_py" -m pip uninstall -q -y empssl
"$venv_py" -m pip install -q --no-deps "$work"/wheels-pure/*.whl
use_installed pure none
echo "release check passed: $(elapsed)"
