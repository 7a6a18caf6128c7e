"""guided_flow_step through the optional CUDA C++ extension ``s2fast.kernels._C`` (csrc/), built only on request:

    S2FAST_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST="9.0" pip install --no-build-isolation -e .

Importing this module raises ImportError when the extension was not built; kernels/dispatch.py then falls back.
"""

from __future__ import annotations

import torch  # noqa: F401  (first: the extension resolves its symbols from torch's libraries)

from . import _C  # noqa: E402


def launch(*args) -> None:
    """The contract of kernels/flow_step_triton.launch, argument for argument (the extension re-checks devices,
    dtypes and sizes before it launches)."""
    _C.guided_flow_step(*args)
