"""SD3's image-to-image and inpainting pipelines: StableDiffusion3Img2ImgPipeline and StableDiffusion3InpaintPipeline
(diffusers 0.42), on SD3Transformer2DModel.

Both loops make SD3's one transformer call a step on the rows [uncond, cond] (or [cond]) and apply
``U + λ(C − U)``, so they are served as StableDiffusion3Pipeline is ([D, D]); what differs is around that call:

- img2img runs the last ``strength`` part of the schedule from the noised image latents: ``timesteps`` is the
  loop's slice of the scheduler's (a new tensor every call, as the controller needs), and ``get_timesteps`` sets
  the scheduler's begin index, which the fused step reads like the stock step does.
- inpainting, with a 33-channel transformer (the input layout of SD1.5's inpainting models), concatenates the mask and the masked
  image latents on the channels of the stacked input: they are part of each branch's ``hidden_states``, so every
  row, sub-networks included, sees them; the prediction has 16 channels like the latents. With the 16-channel
  transformer the loop instead blends after the step: ``latents = (1 − mask) · noised image + mask · latents``.
  That blend takes the scheduler's x_{t−1} and never the prediction, and the step itself is the stock
  ``scheduler.step(noise_pred, t, latents)``, so the fused step (which only returns that x_{t−1} from
  ``scheduler.step``) stays on: the blend then runs on the fused value exactly as on the stock one (tested bit for
  bit against the unfused step).

Neither loop has SD3's own skip-layer guidance. IP-Adapter is refused as for SD3.
"""

from __future__ import annotations

from .base import TwoStreamAdapter
from .sd3 import SD3Adapter


class SD3Img2ImgAdapter(SD3Adapter):
    pipeline_locals = ("i", "t", "timesteps", "latents")
    cfg_style = "as sd3, over the strength-shortened schedule"
    refuses = ("IP-Adapter",)

    def check_call(self, call_locals, inputs):
        TwoStreamAdapter.check_call(self, call_locals, inputs)  # no skip_guidance_layers in these loops


class SD3InpaintAdapter(SD3Img2ImgAdapter):
    cfg_style = ("as sd3; a 33-channel model takes mask and masked image on the input's channels, a 16-channel one "
                 "blends the image back after each step")
