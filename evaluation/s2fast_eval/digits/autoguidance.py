"""AutoGuidance (Karras et al. 2024) on the digits pipeline: D = W + λ (C − W), W the cond prediction of a weaker
model (here an earlier checkpoint of the same training run) in place of the unconditional one.

The pipeline's own CFG line computes ``uncond + λ (cond − uncond)`` from a batch of [cond rows; null-class rows].
While :func:`autoguided` is active, the transformer's forward answers the null-class half with the weak model's
*conditional* prediction (for the same labels as the cond half), so that line becomes W + λ (C − W) and the
pipeline's noise, scheduler and steps stay exactly those of every other method.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from s2fast.digits.pipeline import DigitsFlowPipeline


@contextmanager
def autoguided(pipe: DigitsFlowPipeline, weak: torch.nn.Module):
    """Within the block, ``pipe(..., guidance_scale=λ)`` samples with AutoGuidance against ``weak``."""
    strong = pipe.transformer
    if strong.config.num_embeds_ada_norm != weak.config.num_embeds_ada_norm:
        raise ValueError("AutoGuidance: the weak model must have the same classes as the pipeline's transformer")
    own_forward = strong.forward
    weak_forward = own_forward if weak is strong else weak  # the model as its own weak model: W = C

    def forward(hidden_states, timestep=None, class_labels=None, **kwargs):
        half = len(hidden_states) // 2
        null = strong.config.num_embeds_ada_norm
        if len(hidden_states) % 2 or not bool((class_labels[half:] == null).all()):
            raise RuntimeError("AutoGuidance expects the pipeline's [cond; null] CFG batch (guidance_scale > 1)")
        labels = class_labels[:half]
        c = own_forward(hidden_states[:half], timestep=timestep[:half], class_labels=labels, **kwargs).sample
        w = weak_forward(hidden_states[half:], timestep=timestep[half:], class_labels=labels, **kwargs).sample
        return Transformer2DModelOutput(sample=torch.cat([c, w]))

    strong.forward = forward  # an instance attribute: nn.Module.__call__ finds it before the class's forward
    try:
        yield pipe
    finally:
        del strong.forward
