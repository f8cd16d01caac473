"""Build the cacheblend ops library as a PyTorch extension.

CUDA kernels are built when nvcc is found *and* torch is a CUDA build; a GPU is not
needed at build time. Otherwise a CPU-only extension is built. Environment knobs:

  CACHEBLEND_BUILD_CUDA=0|1   force the CPU-only build (0) or fail unless CUDA builds (1)
  TORCH_CUDA_ARCH_LIST        target architectures (default "8.0;8.6;8.9;9.0")
  MAX_JOBS                    parallel compile jobs (ninja)

Always install with ``pip install --no-build-isolation .`` so the extension is built
against the torch you run.
"""

import glob
import os
import shutil

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;8.6;8.9;9.0"


def _find_cuda_home():
    """Locate the CUDA toolkit before torch guesses (a nvcc wrapper script in
    /usr/local/bin makes torch pick /usr/local, which is wrong)."""
    for candidate in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if candidate and os.path.exists(os.path.join(candidate, "bin", "nvcc")):
            return candidate
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        home = os.path.dirname(os.path.dirname(real))
        if os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            return home
    return None


_cuda_home = _find_cuda_home()
if _cuda_home:
    os.environ["CUDA_HOME"] = _cuda_home

import torch  # noqa: E402  (CUDA_HOME must be set first)
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _want_cuda():
    flag = os.environ.get("CACHEBLEND_BUILD_CUDA", "").strip()
    possible = _cuda_home is not None and torch.version.cuda is not None
    if flag == "0":
        return False
    if flag == "1" and not possible:
        raise RuntimeError(
            "CACHEBLEND_BUILD_CUDA=1 but CUDA kernels cannot be built: "
            f"nvcc found at {_cuda_home!r}, torch.version.cuda={torch.version.cuda!r}"
        )
    return possible


def _nvidia_wheel_includes():
    """Math-library headers (cublas_v2.h, ...) ship in the nvidia-* wheels that CUDA
    torch depends on; ATen's CUDA headers include them."""
    dirs = []
    try:
        import nvidia  # type: ignore

        for base in nvidia.__path__:
            dirs += glob.glob(os.path.join(base, "*", "include"))
            dirs += glob.glob(os.path.join(base, "cu*", "include"))
    except ImportError:
        pass
    return sorted({d for d in dirs if os.path.isdir(d)})


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def make_extension():
    with_cuda = _want_cuda()
    sources = ["csrc/torch_bindings.cpp"] + _sources("csrc/cpu/*.cpp")
    cxx_flags = ["-O3", "-std=c++20", "-DCACHEBLEND_PYTHON_MODULE"]
    if os.environ.get("CACHEBLEND_OPENMP", "1") != "0":
        cxx_flags.append("-fopenmp")
    include_dirs = [os.path.join(ROOT, "csrc")]
    if not with_cuda:
        return CppExtension(
            "cacheblend_ext._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"] if "-fopenmp" in cxx_flags else [],
        )
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    system_includes = []
    for d in _nvidia_wheel_includes():
        system_includes += ["-isystem", d]
    cxx_flags += ["-DCACHEBLEND_WITH_CUDA"] + system_includes
    nvcc_flags = [
        "-O3",
        "-std=c++20",
        "-DCACHEBLEND_WITH_CUDA",
        "--expt-relaxed-constexpr",
        "-lineinfo",
        "-U__CUDA_NO_HALF_OPERATORS__",
        "-U__CUDA_NO_HALF_CONVERSIONS__",
        "-U__CUDA_NO_BFLOAT16_OPERATORS__",
        "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
    ] + system_includes
    return CUDAExtension(
        "cacheblend_ext._C",
        sources + _sources("csrc/cuda/*.cu"),
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=["-fopenmp"] if "-fopenmp" in cxx_flags else [],
    )


setup(
    name="cacheblend",
    version="0.1.0",
    description="CacheBlend: KV-cache reuse with selective recompute for RAG (PyTorch C++/CUDA ops)",
    packages=find_packages(include=["cacheblend_ext", "cacheblend_ext.*"]),
    ext_modules=[make_extension()],
    cmdclass={"build_ext": BuildExtension},
    python_requires=">=3.10",
    install_requires=["numpy"],
    extras_require={
        "hf": ["transformers>=4.56,<5.40", "safetensors", "gguf>=0.10"],
        "test": ["pytest", "transformers>=4.56,<5.40", "safetensors", "gguf>=0.10", "redis>=5", "hiredis"],
        "bench": ["matplotlib"],
        "redis": ["redis>=5", "hiredis"],
    },
    zip_safe=False,
)
