"""Flux.1's other pipelines: FluxImg2ImgPipeline, FluxInpaintPipeline, FluxFillPipeline and FluxKontextPipeline
(diffusers 0.42), on FluxTransformer2DModel. What each loop does around the transformer call, and how S² is served:

- img2img and inpainting: FluxPipeline's loop (true CFG as two calls a step, cond then uncond, or cond only) over
  the last ``strength`` part of the schedule; the uncond call passes the prompt's ``text_ids`` (these loops encode
  no negative position ids). Inpainting blends after the step, ``latents = (1 − mask) · noised image + mask ·
  latents``, on the scheduler's x_{t−1} only, so the fused step stays on (as for SD3 inpainting).
- Fill: no true CFG (guidance-distilled, no negative prompt): one call a step on
  ``cat(latents, masked image latents + mask)`` along the packed channels, a prediction shaped like the latents,
  so D = C − ω(S − C) on the cond rows, every row seeing the image and mask channels.
- Kontext: the reference image's packed latents are appended to the noise tokens (``img_ids`` holds both), and
  the loop keeps the first ``latents.size(1)`` tokens of each prediction, cond and uncond. S² applies the same
  slice to the sub-network's prediction (``StepRequest.guided_part``): Eq. 4 combines the noise tokens of U, C and
  S, and the value handed back is D over the noise tokens, which the loop's slice leaves as it is. (Eq. 4 is
  elementwise, so cutting after it would give the same D; cutting first is what lets the fused step take a
  prediction shaped like the latents.) True CFG as FluxPipeline (with the negative prompt's own position ids).

IP-Adapter is refused where the loop has it (all but Fill).
"""

from __future__ import annotations

import torch

from .base import BranchRows, StepRequest, TwoStreamAdapter, model_output
from .flux import FluxAdapter


class FluxImg2ImgAdapter(FluxAdapter):
    pipeline_locals = ("i", "t", "timesteps", "latents", "do_true_cfg", "true_cfg_scale", "negative_image_embeds",
                       "negative_prompt_embeds", "negative_pooled_prompt_embeds")
    optional_locals = ()
    cfg_style = "as flux, over the strength-shortened schedule"

    def uncond_txt_ids(self, txt_ids, call_locals, memo):
        return txt_ids  # the loop's uncond call passes the prompt's text_ids


class FluxInpaintAdapter(FluxImg2ImgAdapter):
    cfg_style = "as flux, over the strength-shortened schedule; the image is blended back after each step"


class FluxFillAdapter(FluxAdapter):
    pipeline_locals = ("i", "t", "timesteps", "latents")
    optional_locals = ()
    cfg_style = "cond only (guidance-distilled), D = C − ω(S − C); masked image and mask on the input's channels"
    refuses = ()

    def check_call(self, call_locals, inputs):
        TwoStreamAdapter.check_call(self, call_locals, inputs)  # the loop has no IP-Adapter (no negative_image_embeds)

    def request(self, pipe, call_locals, inputs, memo):
        cond = {k: inputs.get(k) for k in (*self.batched_inputs, *self.shared_inputs, self.attention_kwargs_key)}
        return_dict = inputs.get("return_dict", True)

        def respond(d: torch.Tensor, predictions=None):
            return model_output(d, return_dict)

        return StepRequest(BranchRows(self.batched_inputs, 1, branches=[cond]), None, respond)


class FluxKontextAdapter(FluxAdapter):
    cfg_style = ("as flux; predictions (U, C and S) cut to the noise tokens, as the loop cuts cond and uncond, "
                 "before Eq. 4")

    def request(self, pipe, call_locals, inputs, memo):
        request = super().request(pipe, call_locals, inputs, memo)
        noise_tokens = call_locals["latents"].shape[1]
        request.guided_part = lambda prediction: prediction[:, :noise_tokens]
        return request
