"""Build the cacheblend ops library as a PyTorch extension.

CUDA kernels are built when nvcc is found *and* torch is a CUDA build; a GPU is not
needed at build time. Otherwise a CPU-only extension is built. Environment knobs:

  CACHEBLEND_BUILD_CUDA=0|1   force the CPU-only build (0) or fail unless CUDA builds (1)
  CACHEBLEND_ATTENTION_VARIANTS=1   also compile the attention kernel's benchmarking variants
                              (flash_s2, flash_s3, flash_m32; about three times the compile time)
  TORCH_CUDA_ARCH_LIST        target architectures (default: csrc/build_config.json)
  MAX_JOBS                    parallel compile jobs (ninja)

Compile flags and the default architectures come from csrc/build_config.json, which
CMakeLists.txt reads too.

``pip install --no-build-isolation .`` builds against the torch you run. A plain
``pip install .`` builds in an isolated environment with the torch release that
pyproject.toml pins. Either way the package then requires the torch release it was
compiled against (a torch extension only loads into the torch it was built with).
"""

import glob
import json
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(ROOT, "csrc", "build_config.json")) as f:
    BUILD_CONFIG = json.load(f)


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
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern), recursive=True))


def _generate_attention_sources():
    """The tensor-core attention translation units: one per head dim x dtype x key layout
    of build_config.json's "attention_tensor_core_instances", from one template (CMake
    generates the same). Written only when changed, so rebuilds stay incremental."""
    spec = BUILD_CONFIG["attention_tensor_core_instances"]
    with open(os.path.join(ROOT, "csrc", "cuda", "attention", "tensor_core_instance.cu.in")) as f:
        template = f.read()
    out_dir = os.path.join(ROOT, "build", "generated")
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for head_dim in spec["head_dims"]:
        for dtype_name, dtype in spec["dtypes"].items():
            for keys_name, keys in spec["keys"].items():
                text = (template.replace("@HEAD_DIM@", str(head_dim)).replace("@DTYPE@", dtype)
                        .replace("@KEYS@", keys))
                path = os.path.join(out_dir, f"attention_hdim{head_dim}_{dtype_name}_{keys_name}.cu")
                if not os.path.exists(path) or open(path).read() != text:
                    with open(path, "w") as f:
                        f.write(text)
                paths.append(os.path.relpath(path, ROOT))
    return paths


def make_extension():
    with_cuda = _want_cuda()
    std = f"-std=c++{BUILD_CONFIG['cxx_standard']}"
    sources = ["csrc/torch_bindings.cpp"] + _sources("csrc/cpu/*.cpp")
    cxx_flags = BUILD_CONFIG["cxx_flags"] + [std, "-DCACHEBLEND_PYTHON_MODULE"]
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
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", BUILD_CONFIG["cuda_archs"])
    system_includes = []
    for d in _nvidia_wheel_includes():
        system_includes += ["-isystem", d]
    defines = ["-DCACHEBLEND_WITH_CUDA"]
    if os.environ.get("CACHEBLEND_ATTENTION_VARIANTS", "0") not in ("", "0"):
        defines.append("-DCACHEBLEND_ATTENTION_VARIANTS")
    cxx_flags += defines + system_includes
    nvcc_flags = BUILD_CONFIG["nvcc_flags"] + [std] + defines + system_includes
    # The CUDA entry points are host code (cuda/*.cpp); the kernels and their launch code
    # are one ATen-free translation unit per op (cuda/**/*.cu), and per head dim, dtype and
    # key layout for the tensor-core attention kernels (generated), which ninja compiles
    # in parallel.
    return CUDAExtension(
        "cacheblend_ext._C",
        sources + _sources("csrc/cuda/*.cpp") + _sources("csrc/cuda/**/*.cu") + _generate_attention_sources(),
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=["-fopenmp"] if "-fopenmp" in cxx_flags else [],
    )


class BuildExt(BuildExtension):
    """torch's ``build_ext``; under ``pip install -e`` it keeps its objects in ./build (the
    directory ``setup.py build_ext --inplace`` uses) instead of a fresh temporary one, so
    that re-installing recompiles only what changed (ninja)."""

    def finalize_options(self):
        super().finalize_options()
        if getattr(self, "editable_mode", False):
            self.build_temp = os.path.join(ROOT, "build", f"temp.{self.plat_name}-{sys.implementation.cache_tag}")


# The torch release this build compiles against (local version labels such as +cu130
# dropped): the installed package requires exactly it.
TORCH_RELEASE = torch.__version__.split("+")[0]

setup(
    name="cacheblend",
    version="0.1.0",
    description="CacheBlend: KV-cache reuse with selective recompute for RAG (PyTorch C++/CUDA ops)",
    packages=find_packages(include=["cacheblend_ext", "cacheblend_ext.*"]),
    package_data={"cacheblend_ext.testing": ["data/*.json", "data/*.md"]},
    ext_modules=[make_extension()],
    cmdclass={"build_ext": BuildExt},
    python_requires=">=3.10",
    install_requires=["numpy", f"torch=={TORCH_RELEASE}"],
    extras_require={
        "hf": ["transformers>=5.17,<5.26", "safetensors", "gguf>=0.10"],
        "test": ["pytest", "hypothesis", "transformers>=5.17,<5.26", "safetensors", "gguf>=0.10", "redis>=5", "hiredis"],
        "bench": ["matplotlib"],
        "redis": ["redis>=5", "hiredis"],
    },
    zip_safe=False,
)
