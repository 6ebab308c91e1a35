"""Build of empssl: the packages (kernels/ installed as empssl.kernels) and the compiled extension.

Environment switches:
  EMPSSL_BUILD_EXT=0     no compiled extension at all (pure Python: Triton + reference)
  EMPSSL_BUILD_CUDA=0/1  skip / force the CUDA part (default: built when torch has CUDA and a usable nvcc is found)
  TORCH_CUDA_ARCH_LIST   CUDA targets (default "8.0;9.0")

Whatever cannot be built is left out with one warning that says why and which switch decides it:
no usable nvcc gives the CPU-only extension, no C++ compiler (or no torch at build time) a pure-Python
install. What was built is recorded in empssl/_build_info.py and shown by `empssl info`.
"""

import glob
import os
import shutil
import sys
import sysconfig

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
BUILD_INFO = os.path.join(ROOT, "empssl", "_build_info.py")


def _flag(name):
    value = os.environ.get(name, "").strip().lower()
    if value in ("", "auto"):
        return None
    return value not in ("0", "false", "no", "off")


def _warn(message):
    # setuptools hides a build's stdout unless pip runs with -v; stderr lines reach the user
    print(f"empssl build: WARNING: {message}", file=sys.stderr)


def _packages():
    """Every package under empssl/, found rather than listed, and kernels/ installed as empssl.kernels."""
    found = find_packages(ROOT, include=["empssl", "empssl.*"])
    kernels = ["empssl.kernels"] + [f"empssl.kernels.{name}" for name in find_packages(os.path.join(ROOT, "kernels"))]
    return found + kernels, {"empssl.kernels": "kernels"}


def _nvidia_wheel_include_dirs():
    """CUDA headers torch needs (cusparse.h, ...) may live in the nvidia/cu13 wheel, not CUDA_HOME."""
    import importlib.util

    dirs = []
    spec = importlib.util.find_spec("nvidia")
    for base in list(spec.submodule_search_locations or []) if spec else []:
        for candidate in glob.glob(os.path.join(base, "cu*", "include")):
            dirs.append(candidate)
    return dirs


def _is_cuda_toolkit(folder):
    return os.path.exists(os.path.join(folder, "bin", "nvcc")) and os.path.exists(
        os.path.join(folder, "include", "cuda_runtime.h")
    )


def _find_cuda_home():
    """torch guesses CUDA_HOME from `which nvcc`, wrong when nvcc is a wrapper script outside the toolkit."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    for candidate in ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True):
        if _is_cuda_toolkit(candidate):
            os.environ["CUDA_HOME"] = candidate
            return


def _cuda_missing_reason(cpp_extension, torch):
    """Why the CUDA part cannot be built here, or None when it can."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    home = cpp_extension.CUDA_HOME
    if home is None:
        return "no CUDA toolkit found (no nvcc on the PATH, CUDA_HOME unset)"
    if not os.path.exists(os.path.join(home, "bin", "nvcc")):
        return f"CUDA_HOME={home} holds no bin/nvcc"
    return None


def _compiler_missing_reason():
    compiler = (os.environ.get("CXX") or sysconfig.get_config_var("CXX") or "c++").split()[0]
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler!r} not found; set CXX)"
    return None


def _write_build_info(built, cuda_archs="", reason="", cuda_home=""):
    """empssl/_build_info.py: what this build made (read by `empssl info`); written before setup() collects
    the package, so wheels and editable installs carry it alike (git ignores it). One entry per Python ABI,
    as the compiled module's file name is: two interpreters' editable installs of one checkout keep theirs."""
    torch_version = ""
    try:
        import torch

        torch_version = torch.__version__
    except ImportError:
        pass
    builds = {}
    try:
        with open(BUILD_INFO, encoding="utf-8") as f:
            exec(f.read(), builds)  # noqa: S102 (this build's own earlier record)
        builds = dict(builds.get("BUILDS", {}))
    except Exception:  # absent, or an older layout: start over
        builds = {}
    builds[sysconfig.get_config_var("EXT_SUFFIX") or ""] = {
        "extension": built,
        "cuda_archs": cuda_archs,
        "torch": torch_version,
        "reason": reason,
        "cuda_home": cuda_home or "",
    }
    text = (
        '"""Written by setup.py at build time: what the compiled extension holds, per Python ABI\n'
        "(not tracked by git).\n\n"
        "extension: 'cpu+cuda', 'cpu' or 'none'; reason: why a part was left out.\n\"\"\"\n"
        f"BUILDS = {builds!r}\n"
    )
    with open(BUILD_INFO, "w", encoding="utf-8") as f:
        f.write(text)


def _write_generated_headers():
    """csrc/include/augment_layout.h from the one definition of the layout, empssl/augment/params.py
    (loaded by path: importing the package needs the extension this build makes)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "_augment_params", os.path.join(ROOT, "empssl", "augment", "params.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.write_c_header(ROOT)


def _extensions():
    if _flag("EMPSSL_BUILD_EXT") is False:
        _write_build_info("none", reason="EMPSSL_BUILD_EXT=0")
        return [], {}
    reason = _compiler_missing_reason()
    _find_cuda_home()  # before torch's cpp_extension reads CUDA_HOME at import
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as err:
        reason = reason or f"torch is not importable at build time ({err})"
    if reason:
        if _flag("EMPSSL_BUILD_EXT"):
            raise RuntimeError(f"EMPSSL_BUILD_EXT=1 but {reason}")
        _warn(
            f"{reason}: installing without the compiled extension (Triton and reference backends only; "
            "EMPSSL_BUILD_EXT=0 silences this)"
        )
        _write_build_info("none", reason=reason)
        return [], {}
    _write_generated_headers()

    want_cuda = _flag("EMPSSL_BUILD_CUDA")
    cuda_missing = _cuda_missing_reason(cpp_extension, torch) if want_cuda is not False else "EMPSSL_BUILD_CUDA=0"
    if want_cuda and cuda_missing:
        raise RuntimeError(f"EMPSSL_BUILD_CUDA=1 but {cuda_missing}")
    build_cuda = cuda_missing is None
    if want_cuda is None and not build_cuda:
        _warn(
            f"{cuda_missing}: building the CPU part of the extension only (the CUDA kernels need nvcc; "
            "EMPSSL_BUILD_CUDA=0 silences this, =1 makes it an error)"
        )

    def rel(paths):
        return sorted(os.path.relpath(p, ROOT) for p in paths)

    sources = rel([os.path.join(ROOT, "csrc", "ops.cpp")] + glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    cxx_flags = ["-O3", "-fopenmp"]
    extra = {"cxx": cxx_flags}
    define_macros = []
    if build_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        sources += rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
        # after the toolkit's own headers, so that it only fills the gaps (it lacks crt/host_config.h)
        cxx_flags += [flag for d in _nvidia_wheel_include_dirs() for flag in ("-idirafter", d)]
        define_macros.append(("EMPSSL_WITH_CUDA", "1"))
        extra["nvcc"] = ["-O3", "-lineinfo", "-Xptxas=-v"]
        ext = cpp_extension.CUDAExtension
        _write_build_info("cpu+cuda", cuda_archs=os.environ["TORCH_CUDA_ARCH_LIST"], cuda_home=cpp_extension.CUDA_HOME)
    else:
        ext = cpp_extension.CppExtension
        _write_build_info("cpu", reason=cuda_missing)
    module = ext(
        name="empssl._C",
        sources=sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"],
    )
    cmdclass = {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}
    return [module], cmdclass


ext_modules, cmdclass = _extensions()
packages, package_dir = _packages()

# the project's metadata (name, version, dependencies, extras, the command) is pyproject.toml's [project]; this file
# only finds the packages and builds the extension
setup(
    packages=packages,
    package_dir=package_dir,
    # data the package reads at run time: ImageNet-100's class list (empssl/data/layouts.py names its source)
    package_data={"empssl.data": ["imagenet100.txt"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
