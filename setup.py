"""Build of empssl: the Python package, its Triton kernels and the compiled extension.

Environment switches:
  EMPSSL_BUILD_EXT=0     no compiled extension at all (pure Python: Triton + reference)
  EMPSSL_BUILD_CUDA=0/1  skip / force the CUDA part (default: built when torch has CUDA and nvcc is found)
  TORCH_CUDA_ARCH_LIST   CUDA targets (default "8.0;9.0")
"""
import glob
import os
import shutil

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    value = os.environ.get(name, "").strip().lower()
    if value in ("", "auto"):
        return None
    return value not in ("0", "false", "no", "off")


def _nvidia_wheel_include_dirs():
    """CUDA headers torch needs (cusparse.h, ...) may live in the nvidia/cu13 wheel, not CUDA_HOME."""
    import importlib.util

    dirs = []
    spec = importlib.util.find_spec("nvidia")
    for base in list(spec.submodule_search_locations or []) if spec else []:
        for candidate in glob.glob(os.path.join(base, "cu*", "include")):
            dirs.append(candidate)
    return dirs


def _find_cuda_home():
    """torch guesses CUDA_HOME from `which nvcc`, wrong when nvcc is a wrapper script outside the toolkit."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    for candidate in ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True):
        if os.path.exists(os.path.join(candidate, "bin", "nvcc")) and os.path.exists(
            os.path.join(candidate, "include", "cuda_runtime.h")
        ):
            os.environ["CUDA_HOME"] = candidate
            return


def _write_generated_headers():
    """csrc/include/augment_layout.h from the one definition of the layout, empssl/augment_params.py
    (loaded by path: importing the package needs the extension this build makes)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_augment_params", os.path.join(ROOT, "empssl", "augment_params.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.write_c_header(ROOT)


def _extensions():
    if _flag("EMPSSL_BUILD_EXT") is False:
        return [], {}
    _write_generated_headers()
    _find_cuda_home()
    from torch.utils import cpp_extension

    want_cuda = _flag("EMPSSL_BUILD_CUDA")
    nvcc_found = cpp_extension.CUDA_HOME is not None or shutil.which("nvcc") is not None
    torch_has_cuda = __import__("torch").version.cuda is not None
    build_cuda = (torch_has_cuda and nvcc_found) if want_cuda is None else want_cuda
    if want_cuda and not (torch_has_cuda and nvcc_found):
        raise RuntimeError("EMPSSL_BUILD_CUDA=1 but torch has no CUDA or nvcc was not found")

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
    else:
        ext = cpp_extension.CppExtension
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

setup(
    name="empssl",
    version="0.1.0",
    description="Fast EMP-SSL: fused multi-patch augmentation and Total Coding Rate loss",
    python_requires=">=3.11",
    packages=["empssl", "empssl.reference", "empssl.kernels", "empssl.bench"],
    package_dir={"empssl": "empssl", "empssl.reference": "empssl/reference", "empssl.bench": "empssl/bench",
                 "empssl.kernels": "kernels"},
    # the floors are the GPU machine's stack, which CI tests (.ci/run), as it tests the newest
    install_requires=["torch>=2.11", "torchvision>=0.26", "numpy>=2.4", "tqdm"],
    extras_require={
        "triton": ["triton>=3.6"],
        "test": ["pytest", "pytest-timeout", "pillow", "ninja"],
        "bench": ["matplotlib", "pillow"],
    },
    entry_points={"console_scripts": ["empssl=empssl.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
