"""guided_flow_step through the optional CUDA C++ extension ``s2fast._C`` (csrc/), built only on request:

    S2FAST_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST="9.0" pip install -e .

Importing this module raises ImportError when the extension was not built; kernels/dispatch.py then falls back.
"""

from __future__ import annotations

from typing import Optional

import torch  # noqa: F401  (first: the extension resolves its symbols from torch's libraries)

from s2fast import _C  # noqa: E402


def launch(
    sample: torch.Tensor,
    cond: torch.Tensor,
    uncond: Optional[torch.Tensor],
    sub: Optional[torch.Tensor],
    num_subs: int,
    dt: torch.Tensor,
    out: torch.Tensor,
    guided_out: Optional[torch.Tensor],
    lam: float,
    omega: float,
    exact: bool,
    round_dt: bool,
) -> None:
    """Same contract as kernels/flow_step_triton.launch (the extension re-checks devices, dtypes and sizes)."""
    _C.guided_flow_step(sample, cond, uncond, sub, num_subs, dt, out, guided_out, lam, omega, exact, round_dt)
