"""s2fast.kernels: the elementwise ops at the end of every guided step.

Installed as the subpackage ``s2fast.kernels`` (see pyproject.toml's package-dir mapping); the folder is never a
top-level ``kernels`` package, a name that belongs to a PyPI package diffusers probes for.
Each op has a torch reference here, which is also the CPU path; faster backends (Triton, CUDA C++) dispatch to it
as the reference they are tested against. Triton and the CUDA extension are imported only when an op first needs
them (kernels/dispatch.py).
"""

from .flow_step import guided_flow_step
from .guidance import correction_of, guided_prediction, mean_of_subs

__all__ = ["guided_flow_step", "guided_prediction", "mean_of_subs", "correction_of"]
