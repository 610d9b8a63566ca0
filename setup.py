"""Build script for fastalign.

The Python package and the Triton kernels need no compilation. The C++ extension ``fastalign._C``
is built with pybind11 through ``torch.utils.cpp_extension`` (ninja when available):

* CPU sources (``csrc/*.cpp``) always, compiled with OpenMP;
* CUDA sources (``csrc/cuda/*.cu``) only when nvcc and a CUDA build of torch are both present;
* nothing at all when ``FASTALIGN_BUILD_EXT=0`` or when torch cannot be imported (pip build
  isolation without torch). fastalign then falls back to other implementations at import time and
  says so in one warning.

Build against the installed torch with ``pip install --no-build-isolation -e .``.
"""

import glob
import os
import shutil

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _extension_modules():
    if os.environ.get("FASTALIGN_BUILD_EXT", "1") == "0":
        print("fastalign: FASTALIGN_BUILD_EXT=0, skipping the C++ extension")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("fastalign: torch is not importable in this build environment (build isolation?); "
              "skipping the C++ extension. Use `pip install --no-build-isolation .` to build it.")
        return [], {}

    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    # -ffp-contract=off: backward recomputes the logits and must round them exactly as forward did;
    # a multiply-add fused in one pass but not the other shifts z by half an ulp, which at |z| ~ 80
    # moves a dominant probability by 4e-6 and the gradient 1 - p by far more.
    cxx_flags = ["-O3", "-fopenmp", "-std=c++17", "-ffp-contract=off"]
    if os.environ.get("FASTALIGN_NATIVE", "0") == "1":
        cxx_flags.append("-march=native")  # only for local builds: wheels must run on any x86-64
    has_cuda_toolchain = torch.version.cuda is not None and shutil.which("nvcc") is not None
    if cuda_sources and has_cuda_toolchain:
        ext = CUDAExtension(
            "fastalign._C",
            cpp_sources + cuda_sources,
            define_macros=[("FASTALIGN_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--use_fast_math"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension(
            "fastalign._C",
            cpp_sources,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    build_ext = BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)
    return [ext], {"build_ext": build_ext}


ext_modules, cmdclass = _extension_modules()

setup(
    # kernels/ lives at the top of the repository but is installed as fastalign.kernels:
    # a top-level module named `kernels` would clash with other projects.
    packages=["fastalign", "fastalign.assets", "fastalign.bench", "fastalign.kernels",
              "fastalign.losses", "fastalign.ops", "fastalign.trainers"],
    package_dir={"fastalign": "fastalign", "fastalign.kernels": "kernels"},
    package_data={"fastalign": ["py.typed"],
                  "fastalign.assets": ["tiny-llama/*.json", "data/*.jsonl"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
