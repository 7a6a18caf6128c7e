"""Flux.2: Flux2Transformer2DModel driven by Flux2Pipeline (guidance-distilled, one call per step) and
Flux2KleinPipeline (true CFG, or none for step-distilled Klein models) (diffusers 0.42).

Model: the double-stream ``transformer_blocks`` (``block(hidden_states, encoder_hidden_states, temb_mod_img,
temb_mod_txt, image_rotary_emb, joint_attention_kwargs)`` → ``(encoder, hidden)``), then the forward concatenates
[encoder, hidden] into one stream for the ``single_transformer_blocks`` and keeps the image part at the end. Here
every single block is called with both streams and ``split_hidden_states=True``: the block concatenates [encoder,
hidden] itself and splits its output back, which is the same values through the same ops as the forward's one
concatenation (a copy is exact), so the flat list of all blocks keeps one flow [hidden, encoder] and a block can be
skipped anywhere, the last double one included. Per-row constants: ``temb`` (head), the three modulations (double
image, double text, single), computed once per call from ``temb`` as the forward does; the rotary pair (text then
image positions) has no batch dimension and is shared by a lane's rows. The KV-cache modes (reference images cached
across steps, Flux2KleinKVPipeline) are refused.

Pipelines: Flux2Pipeline embeds ``guidance_scale`` (guidance distillation) and makes one call per step: S² there is
D = C − ω(S − C). Flux2KleinPipeline with CFG (``guidance_scale > 1`` on a non-distilled model) calls cond, then
uncond, and mixes ``U + λ(C − U)``: the cond call computes every branch and returns D, the uncond call is served D.
Both keep the prediction's first ``latents`` tokens (reference-image tokens are appended after them); Eq. 4 acts
token by token, so it is computed over every token and the pipeline slices. With reference images the prediction is
longer than the latents, so the fused step runs unfused (it needs a prediction shaped like x_t).
"""

from __future__ import annotations

from typing import Any, Dict

import torch

from .base import BranchRows, FamilyAdapter, LaneState, StepRequest, model_output, split_lora_scale


def _is_single(block) -> bool:
    return not hasattr(block, "norm1_context")  # the double-stream block has a text-side norm, the single one none


class Flux2Adapter(FamilyAdapter):
    """Flux2Pipeline: guidance-distilled, one transformer call per step (S² on the cond prediction)."""

    model_classes = ("Flux2Transformer2DModel",)
    batched_inputs = ("hidden_states", "timestep", "guidance", "encoder_hidden_states")
    shared_inputs = ("img_ids", "txt_ids")
    family = "flux2"
    cfg_style = "cond only (guidance-distilled), D = C − ω(S − C); reference-image tokens cut off by the pipeline"
    schedulers = "FlowMatchEulerDiscreteScheduler"
    refuses = ("reference KV cache (kv_cache_mode)", "IP-Adapter")

    # --- model ------------------------------------------------------------------------------------------------
    def blocks(self, model):
        return [*model.transformer_blocks, *model.single_transformer_blocks]

    def embed(self, model, inputs: Dict[str, Any]) -> LaneState:
        x = inputs["hidden_states"]
        timestep = inputs["timestep"].to(x.dtype) * 1000
        guidance = inputs.get("guidance")
        if guidance is not None:
            guidance = guidance.to(x.dtype) * 1000
        temb = model.time_guidance_embed(timestep, guidance)
        mod_img = model.double_stream_modulation_img(temb)
        mod_txt = model.double_stream_modulation_txt(temb)
        mod_single = model.single_stream_modulation(temb)
        hidden = model.x_embedder(x)
        encoder = model.context_embedder(inputs["encoder_hidden_states"])
        img_ids, txt_ids = (inputs[k][0] if inputs[k].ndim == 3 else inputs[k] for k in self.shared_inputs)
        image_rotary = model.pos_embed(img_ids)
        text_rotary = model.pos_embed(txt_ids)
        rotary = (torch.cat([text_rotary[0], image_rotary[0]], dim=0), torch.cat([text_rotary[1], image_rotary[1]], dim=0))
        attention_kwargs, _ = split_lora_scale(inputs.get(self.attention_kwargs_key))
        return LaneState([hidden, encoder], [temb, mod_img, mod_txt, mod_single],
                         {"attention_kwargs": attention_kwargs, "rotary": rotary})

    def run_block(self, block, flow, row_consts, shared):
        if _is_single(block):
            encoder, hidden = block(hidden_states=flow[0], encoder_hidden_states=flow[1], temb_mod=row_consts[3],
                                    image_rotary_emb=shared["rotary"], joint_attention_kwargs=shared["attention_kwargs"],
                                    split_hidden_states=True)
        else:
            encoder, hidden = block(hidden_states=flow[0], encoder_hidden_states=flow[1], temb_mod_img=row_consts[1],
                                    temb_mod_txt=row_consts[2], image_rotary_emb=shared["rotary"],
                                    joint_attention_kwargs=shared["attention_kwargs"])
        return [hidden, encoder]

    def head(self, model, state: LaneState) -> torch.Tensor:
        return model.proj_out(model.norm_out(state.flow[0], state.row_consts[0]))

    def skipped_block_output(self, args, kwargs):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        encoder = kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else args[1]
        if "temb_mod" in kwargs and not kwargs.get("split_hidden_states", False):
            return hidden  # a single block as the forward calls it: one joint stream in, one out
        return encoder, hidden

    # --- pipeline ---------------------------------------------------------------------------------------------
    def check_call(self, call_locals, inputs):
        if inputs.get("kv_cache_mode") is not None or inputs.get("kv_cache") is not None:
            raise ValueError("s2fast does not support Flux.2's reference KV cache (kv_cache_mode); unwrap the "
                             "pipeline (s2fast.unwrap) to use it")
        if "ip_adapter_image_embeds" in (inputs.get(self.attention_kwargs_key) or {}):
            raise ValueError("s2fast does not support IP-Adapter yet; unwrap the pipeline (s2fast.unwrap) to use it")

    def _cond(self, inputs):
        return {k: inputs.get(k) for k in (*self.batched_inputs, *self.shared_inputs, self.attention_kwargs_key)}

    def _respond(self, inputs):
        return_dict = inputs.get("return_dict", True)
        return lambda d, predictions=None: model_output(d, return_dict)

    def request(self, pipe, call_locals, inputs, memo) -> StepRequest:
        return StepRequest(BranchRows(self.batched_inputs, 1, branches=[self._cond(inputs)]), None,
                           self._respond(inputs))


class Flux2KleinAdapter(Flux2Adapter):
    """Flux2KleinPipeline: true CFG (cond, then uncond call per step) where ``do_classifier_free_guidance``, else one
    call; λ is the loop's ``guidance_scale``."""

    pipeline_locals = ("i", "t", "timesteps", "latents", "guidance_scale")
    cfg_style = ("true CFG (guidance_scale > 1, not distilled): cond then uncond call, both served D; distilled: "
                 "cond only, D = C − ω(S − C)")
    optional_locals = ("negative_prompt_embeds", "negative_text_ids")  # set by the loop only with CFG

    def request(self, pipe, call_locals, inputs, memo) -> StepRequest:
        if not pipe.do_classifier_free_guidance:
            return super().request(pipe, call_locals, inputs, memo)
        cond = self._cond(inputs)
        uncond = dict(cond, encoder_hidden_states=call_locals["negative_prompt_embeds"],
                      txt_ids=self._negative_txt_ids(cond["txt_ids"], call_locals["negative_text_ids"], memo))
        rows = BranchRows(self.batched_inputs, 2, branches=[uncond, cond])
        # the uncond call that follows in this step is served the same D (the pipeline's line then yields D)
        return StepRequest(rows, float(call_locals["guidance_scale"]), self._respond(inputs), follow_ups=1)

    @staticmethod
    def _negative_txt_ids(txt_ids, negative_txt_ids, memo):
        # Equal position ids let both branches share one batched call; compare once per pipeline call (a device
        # sync) and hand the cond tensor itself to later steps, so stacking needs no comparison.
        if "txt_ids_equal" not in memo:
            memo["txt_ids_equal"] = txt_ids.shape == negative_txt_ids.shape and bool(torch.equal(txt_ids, negative_txt_ids))
        return txt_ids if memo["txt_ids_equal"] else negative_txt_ids
