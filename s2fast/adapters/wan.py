"""Wan 2.1 / 2.2: WanTransformer3DModel driven by WanPipeline, WanImageToVideoPipeline and WanVideoToVideoPipeline
(diffusers 0.42).

Model: ``blocks`` of WanTransformerBlock, called as ``block(hidden_states, encoder_hidden_states, timestep_proj,
rotary_emb)`` and returning the hidden states alone. The flow is [hidden]; the per-row constants are the block
modulation (``timestep_proj``), the text stream (image embeddings first, for image-to-video) and ``temb`` (read
by the output head only); the rotary embedding has no batch dimension and is shared by a lane's rows. Wan 2.2
TI2V-5B (``expand_timesteps``) passes one timestep per token: ``timestep`` is (B, tokens) and the modulation
carries a token dimension, which the same code serves. Every method mirrors ``WanTransformer3DModel.forward`` op
for op.

Pipeline (WanPipeline, WanImageToVideoPipeline, WanVideoToVideoPipeline): with CFG the loop makes two calls per
step, cond then uncond (each under ``cache_context``), and mixes them as ``uncond + λ(cond − uncond)``. The cond
call computes uncond, cond and the sub-networks in one batched call (the negative embeddings are already encoded:
the pipeline's locals hold them) and returns D; the uncond call is served the same D, so the pipeline's line
yields D exactly. Wan 2.2 A14B switches experts by step (``transformer`` while t ≥ boundary_ratio · 1000 with
``guidance_scale``, ``transformer_2`` below it with ``guidance_scale_2``): λ is the loop's own
``current_guidance_scale``, and the controller draws the step's mask for the block count of the expert that runs.
Without CFG (λ ≤ 1) D = C − ω(S − C).
"""

from __future__ import annotations

from typing import Any, Dict

import torch

from .base import BranchRows, FamilyAdapter, LaneState, StepRequest, model_output


class WanAdapter(FamilyAdapter):
    model_classes = ("WanTransformer3DModel",)
    denoisers = ("transformer", "transformer_2")
    batched_inputs = ("hidden_states", "timestep", "encoder_hidden_states", "encoder_hidden_states_image")
    attention_kwargs_key = "attention_kwargs"
    pipeline_locals = ("i", "t", "timesteps", "latents", "negative_prompt_embeds", "current_guidance_scale")
    optional_locals = ("boundary_timestep",)  # Wan 2.2's expert switch; read only when one model is both experts
    guidance_local = "current_guidance_scale"  # the loop's λ for this step (the expert's own scale)
    family = "wan"
    cfg_style = "cond then uncond call, both served D; two experts switch by step, each with its own λ"
    schedulers = "UniPCMultistepScheduler (hub default, unfused) or FlowMatchEulerDiscreteScheduler"

    # --- model ------------------------------------------------------------------------------------------------
    def blocks(self, model):
        return list(model.blocks)

    def embed(self, model, inputs: Dict[str, Any]) -> LaneState:
        x = inputs["hidden_states"]
        _, _, frames, height, width = x.shape
        p_t, p_h, p_w = model.config.patch_size
        rotary = model.rope(x)
        hidden = model.patch_embedding(x).flatten(2).transpose(1, 2).contiguous()
        timestep = inputs["timestep"]
        tokens = None
        if timestep.ndim == 2:  # Wan 2.2 TI2V: one timestep per token
            tokens = timestep.shape[1]
            timestep = timestep.flatten()
        temb, timestep_proj, encoder, encoder_image = model.condition_embedder(
            timestep, inputs["encoder_hidden_states"], inputs.get("encoder_hidden_states_image"),
            timestep_seq_len=tokens)
        timestep_proj = timestep_proj.unflatten(2 if tokens is not None else 1, (6, -1))
        if encoder_image is not None:
            encoder = torch.concat([encoder_image, encoder], dim=1)
        size = (frames // p_t, height // p_h, width // p_w)
        return LaneState([hidden], [timestep_proj, encoder, temb], {"rotary": rotary, "size": size})

    def run_block(self, block, flow, row_consts, shared):
        return [block(flow[0], row_consts[1], row_consts[0], shared["rotary"])]

    def head(self, model, state: LaneState) -> torch.Tensor:
        hidden, temb = state.flow[0], state.row_consts[2]
        if temb.ndim == 3:  # per-token modulation (TI2V)
            shift, scale = (model.scale_shift_table.unsqueeze(0).to(temb.device) + temb.unsqueeze(2)).chunk(2, dim=2)
            shift, scale = shift.squeeze(2), scale.squeeze(2)
        else:
            shift, scale = (model.scale_shift_table.to(temb.device) + temb.unsqueeze(1)).chunk(2, dim=1)
        shift, scale = shift.to(hidden.device), scale.to(hidden.device)
        hidden = (model.norm_out(hidden.float()) * (1 + scale) + shift).type_as(hidden)
        hidden = model.proj_out(hidden)
        frames, height, width = state.shared["size"]
        p_t, p_h, p_w = model.config.patch_size
        hidden = hidden.reshape(hidden.shape[0], frames, height, width, p_t, p_h, p_w, -1)
        hidden = hidden.permute(0, 7, 1, 4, 2, 5, 3, 6)
        return hidden.flatten(6, 7).flatten(4, 5).flatten(2, 3)

    def skipped_block_output(self, args, kwargs):
        return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    # --- pipeline ---------------------------------------------------------------------------------------------
    def denoiser_called(self, pipe, call_locals, model):
        names = [name for name in self.denoisers if getattr(pipe, name, None) is model]
        if len(names) < 2:
            return names[0] if names else None
        # one model as both experts: the loop's own switch (transformer while t ≥ boundary_timestep, else transformer_2)
        boundary = call_locals.get("boundary_timestep")
        return "transformer" if boundary is None or call_locals["t"] >= boundary else "transformer_2"

    def check_call(self, call_locals, inputs):
        kwargs = inputs.get(self.attention_kwargs_key) or {}
        if "ip_adapter_image_embeds" in kwargs:
            raise ValueError("s2fast does not support IP-Adapter yet; unwrap the pipeline (s2fast.unwrap) to use it")

    def request(self, pipe, call_locals, inputs, memo) -> StepRequest:
        cond = {k: inputs.get(k) for k in (*self.batched_inputs, self.attention_kwargs_key)}
        return_dict = inputs.get("return_dict", True)

        def respond(d: torch.Tensor, predictions=None):
            return model_output(d, return_dict)

        if not pipe.do_classifier_free_guidance:
            return StepRequest(BranchRows(self.batched_inputs, 1, branches=[cond]), None, respond)
        uncond = dict(cond, encoder_hidden_states=call_locals["negative_prompt_embeds"])
        rows = BranchRows(self.batched_inputs, 2, branches=[uncond, cond])
        # the uncond call that follows in this step is served the same D (the pipeline's line then yields D)
        return StepRequest(rows, float(call_locals[self.guidance_local]), respond, follow_ups=1)


class WanVideoToVideoAdapter(WanAdapter):
    """WanVideoToVideoPipeline: WanPipeline's two calls per step on one transformer, λ = ``guidance_scale``, over the
    strength-shortened schedule (``timesteps`` is the loop's slice of the scheduler's, a new tensor every call)."""

    denoisers = ("transformer",)
    pipeline_locals = ("i", "t", "timesteps", "latents", "negative_prompt_embeds", "guidance_scale")
    optional_locals = ()
    guidance_local = "guidance_scale"
    cfg_style = "cond then uncond call, both served D, over the strength-shortened schedule"
