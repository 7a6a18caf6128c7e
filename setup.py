"""Builds the optional CUDA C++ extension (csrc/) only on request:

    S2FAST_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST="9.0" pip install --no-build-isolation -e .

--no-build-isolation: the build compiles against the torch installed in the environment (the one the extension
will be loaded into); pip's isolated build environment has no torch, and installing one there could build against
another version. Without the flag this is a plain Python package: the extension is never required at import, and
every op falls back to Triton or the torch reference. TORCH_CUDA_ARCH_LIST selects the architectures (e.g. "9.0"
for Hopper).
"""

import glob
import os

from setuptools import setup


def cuda_extensions():
    if os.environ.get("S2FAST_BUILD_CUDA", "0") != "1":
        return [], {}
    sources = sorted(glob.glob("csrc/*.cu") + glob.glob("csrc/*.cpp"))
    if not sources:
        raise SystemExit("S2FAST_BUILD_CUDA=1 but csrc/ has no sources to build")
    try:
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension  # torch only when building
    except ImportError as e:
        raise SystemExit(f"S2FAST_BUILD_CUDA=1 needs torch in the build environment ({e}): build with "
                         "`pip install --no-build-isolation -e .` in the environment that has torch") from e

    ext = CUDAExtension(
        "s2fast.kernels._C",  # kernels/ imports it relatively: it never imports s2fast
        sources,
        include_dirs=[os.path.abspath("csrc")],
        # No fast-math: exact mode relies on IEEE fp32 rounding (__fmul_rn/__fadd_rn are never contracted anyway).
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]},
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = cuda_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
