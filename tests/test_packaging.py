"""The package as a user installs it: a wheel and an sdist that hold every module and source, and
build fallbacks that leave out what cannot be built with one warning that says why.

The build decisions run setup.py (`python setup.py --name`: setup.py decides what to build before
setup() runs, and --name builds nothing) in a copy of the tree, since it writes its build record."""

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile

import pytest

from empssl import backends

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tracked_files():
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip(f"optional dependency not installed: a git checkout ({listed.stderr.strip()})")
    return [path for path in listed.stdout.splitlines() if os.path.exists(os.path.join(ROOT, path))]


@pytest.fixture(scope="module")
def clean_tree(tmp_path_factory):
    """A copy of what git tracks (and new files it does not ignore): never a build's outputs."""
    tree = tmp_path_factory.mktemp("tree")
    for path in _tracked_files():
        os.makedirs(os.path.dirname(tree / path), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, path), tree / path)
    return tree


def _python_modules(tree):
    """Every module of the package as it is installed: empssl/... and kernels/... as empssl/kernels/..."""
    modules = set()
    for top, installed_as in (("empssl", "empssl"), ("kernels", "empssl/kernels")):
        for folder, _, names in os.walk(tree / top):
            for name in names:
                if name.endswith(".py") and name != "_build_info.py":
                    rel = os.path.relpath(os.path.join(folder, name), tree / top)
                    modules.add(os.path.normpath(os.path.join(installed_as, rel)))
    return modules


def _setup(tree, **env):
    environment = {k: v for k, v in os.environ.items() if not k.startswith("EMPSSL_BUILD")}
    environment.update(env)
    environment = {k: v for k, v in environment.items() if v is not None}  # None: unset
    return subprocess.run(
        [sys.executable, "setup.py", "--name"], cwd=tree, env=environment, capture_output=True, text=True, timeout=300
    )


def _build_record(tree, text=None):
    """This Python's entry of a build record, with the keys upper-cased as the tests name them."""
    import sysconfig

    namespace = {}
    exec(text if text is not None else (tree / "empssl" / "_build_info.py").read_text(), namespace)
    entry = namespace["BUILDS"][sysconfig.get_config_var("EXT_SUFFIX")]
    return {key.upper(): value for key, value in entry.items()}


@pytest.mark.slow
def test_pure_python_wheel_holds_every_module(clean_tree, tmp_path):
    wheels = tmp_path / "wheels"
    env = dict(os.environ, EMPSSL_BUILD_EXT="0")
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-build-isolation",
            "--no-deps",
            "-w",
            str(wheels),
            str(clean_tree),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    [wheel] = list(wheels.iterdir())
    assert wheel.name.endswith("-py3-none-any.whl")  # no compiled code claimed
    with zipfile.ZipFile(wheel) as archive:
        shipped = set(archive.namelist())
        record = _build_record(None, archive.read("empssl/_build_info.py").decode())
    missing = sorted(_python_modules(clean_tree) - shipped)
    assert not missing, f"the wheel lacks {missing}"
    assert "empssl/ops/__init__.py" in shipped and "empssl/kernels/tcr.py" in shipped
    assert "empssl/data/imagenet100.txt" in shipped  # read at run time by imagenet100:PATH
    assert record["EXTENSION"] == "none" and record["REASON"] == "EMPSSL_BUILD_EXT=0"


@pytest.mark.slow
def test_sdist_holds_every_source_and_header(clean_tree, tmp_path):
    built = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--sdist", "-o", str(tmp_path), str(clean_tree)],
        env=dict(os.environ, EMPSSL_BUILD_EXT="0"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    if built.returncode != 0 and "No module named build" in built.stderr:
        pytest.skip("optional dependency not installed: build")
    assert built.returncode == 0, built.stdout + built.stderr
    [sdist] = [path for path in tmp_path.iterdir() if path.name.endswith(".tar.gz")]
    with tarfile.open(sdist) as archive:
        shipped = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    wanted = {path for path in _tracked_files() if path.startswith(("csrc/", "kernels/", "empssl/"))}
    assert any(path.endswith(".cu") for path in wanted) and any(path.endswith(".h") for path in wanted)
    assert not sorted(wanted - shipped), f"the sdist lacks {sorted(wanted - shipped)}"
    assert "empssl/data/imagenet100.txt" in shipped
    assert "empssl/_build_info.py" not in shipped  # each build writes its own record


def test_no_usable_nvcc_builds_the_cpu_extension_with_one_warning(clean_tree):
    run = _setup(clean_tree, CUDA_HOME="/nonexistent")
    assert run.returncode == 0, run.stderr
    warnings = [line for line in run.stderr.splitlines() if "empssl build: WARNING" in line]
    assert len(warnings) == 1 and "CUDA_HOME=/nonexistent holds no bin/nvcc" in warnings[0]
    assert "EMPSSL_BUILD_CUDA" in warnings[0]
    record = _build_record(clean_tree)
    assert record["EXTENSION"] == "cpu" and "nvcc" in record["REASON"]


def test_the_cuda_part_is_built_with_a_whole_toolkit(clean_tree):
    import torch

    if torch.version.cuda is None or shutil.which("nvcc") is None:
        pytest.skip("needs a CUDA GPU: or at least torch with CUDA and nvcc on the PATH, to build the CUDA part")
    run = _setup(clean_tree, CUDA_HOME=None, CUDA_PATH=None)
    assert run.returncode == 0 and "WARNING" not in run.stderr, run.stderr
    record = _build_record(clean_tree)
    # torch reads CUDA_HOME when its cpp_extension is imported: a wrapper nvcc on the PATH must not decide it
    assert record["EXTENSION"] == "cpu+cuda"
    assert os.path.exists(os.path.join(record["CUDA_HOME"], "include", "cuda_runtime.h")), record["CUDA_HOME"]


def test_forcing_cuda_without_nvcc_is_an_error_that_says_why(clean_tree):
    run = _setup(clean_tree, CUDA_HOME="/nonexistent", EMPSSL_BUILD_CUDA="1")
    assert run.returncode != 0
    assert "EMPSSL_BUILD_CUDA=1 but CUDA_HOME=/nonexistent holds no bin/nvcc" in run.stderr


def test_no_compiler_gives_a_pure_python_install_with_one_warning(clean_tree):
    run = _setup(clean_tree, CXX="/nonexistent/c++")
    assert run.returncode == 0, run.stderr
    warnings = [line for line in run.stderr.splitlines() if "empssl build: WARNING" in line]
    assert len(warnings) == 1 and "no C++ compiler" in warnings[0] and "EMPSSL_BUILD_EXT=0" in warnings[0]
    assert _build_record(clean_tree)["EXTENSION"] == "none"


def test_each_python_keeps_its_own_build_record(clean_tree):
    """Two interpreters' editable installs of one checkout (the newest and the floor stack in CI) share the
    record file: each writes its own entry, keyed like the compiled module's file name."""
    import sysconfig

    path = clean_tree / "empssl" / "_build_info.py"
    other = {
        ".cpython-399-x86_64-linux-gnu.so": {
            "extension": "cpu+cuda",
            "cuda_archs": "9.0",
            "torch": "9.9",
            "reason": "",
            "cuda_home": "/x",
        }
    }
    path.write_text(f"BUILDS = {other!r}\n")
    assert _setup(clean_tree, EMPSSL_BUILD_CUDA="0").returncode == 0
    namespace = {}
    exec(path.read_text(), namespace)
    assert namespace["BUILDS"][".cpython-399-x86_64-linux-gnu.so"] == other[".cpython-399-x86_64-linux-gnu.so"]
    assert namespace["BUILDS"][sysconfig.get_config_var("EXT_SUFFIX")]["extension"] == "cpu"


def test_build_ext_off_is_silent_and_recorded(clean_tree):
    run = _setup(clean_tree, EMPSSL_BUILD_EXT="0")
    assert run.returncode == 0 and "WARNING" not in run.stderr
    assert _build_record(clean_tree)["EXTENSION"] == "none"


def test_explicit_cuda_off_is_silent(clean_tree):
    run = _setup(clean_tree, EMPSSL_BUILD_CUDA="0")
    assert run.returncode == 0 and "WARNING" not in run.stderr
    record = _build_record(clean_tree)
    assert record["EXTENSION"] == "cpu" and record["REASON"] == "EMPSSL_BUILD_CUDA=0"


@pytest.mark.parametrize(
    "record, expected",
    [
        (
            {"extension": "cpu+cuda", "cuda_archs": "9.0", "torch": "2.11.0", "reason": ""},
            "CPU and CUDA kernels (TORCH_CUDA_ARCH_LIST 9.0), against torch 2.11.0",
        ),
        (
            {"extension": "cpu", "cuda_archs": "", "torch": "2.11.0", "reason": "EMPSSL_BUILD_CUDA=0"},
            "CPU kernels only, against torch 2.11.0; left out: EMPSSL_BUILD_CUDA=0",
        ),
        (
            {"extension": "none", "cuda_archs": "", "torch": "2.11.0", "reason": "EMPSSL_BUILD_EXT=0"},
            "no compiled extension (pure Python); left out: EMPSSL_BUILD_EXT=0",
        ),
        ({}, "no build record (installed before setup.py wrote one)"),
    ],
)
def test_build_summary_says_what_was_built(monkeypatch, record, expected):
    monkeypatch.setattr(backends, "build_info", lambda: record)
    assert backends.build_summary() == expected


def test_an_extension_built_against_another_torch_says_so(monkeypatch):
    import importlib

    import torch

    monkeypatch.delenv("EMPSSL_DISABLE_EXT", raising=False)
    monkeypatch.setattr(
        backends, "build_info", lambda: {"extension": "cpu", "cuda_archs": "", "torch": "1.0.0", "reason": ""}
    )

    def undefined_symbol(name):
        raise ImportError(f"{name}: undefined symbol: _ZN3c10")

    monkeypatch.setattr(importlib, "import_module", undefined_symbol)
    module, reason = backends._load_extension.__wrapped__()
    assert module is None
    assert (
        f"built against torch 1.0.0, running torch {torch.__version__}" in reason and "--no-build-isolation" in reason
    )


def test_a_pure_python_install_says_so_without_importing(monkeypatch):
    import importlib

    monkeypatch.delenv("EMPSSL_DISABLE_EXT", raising=False)
    monkeypatch.setattr(
        backends,
        "build_info",
        lambda: {
            "extension": "none",
            "cuda_archs": "",
            "torch": "",
            "reason": "no C++ compiler ('c++' not found; set CXX)",
        },
    )
    monkeypatch.setattr(
        importlib, "import_module", lambda name: pytest.fail("a pure-Python install has no _C to import")
    )
    module, reason = backends._load_extension.__wrapped__()
    assert module is None and reason.startswith("not built (no C++ compiler") and "pure-Python install" in reason
