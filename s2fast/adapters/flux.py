"""Flux.1: FluxTransformer2DModel driven by FluxPipeline (diffusers 0.42).

Model: the double-stream ``transformer_blocks`` then the ``single_transformer_blocks``; in 0.42 both take
``(hidden_states, encoder_hidden_states, temb, image_rotary_emb, joint_attention_kwargs)`` and return
``(encoder, hidden)``, so the flat list of all blocks reproduces ``FluxTransformer2DModel.forward`` op for op.
Rotary embeddings have no batch dimension: one per lane, shared by its rows.
Pipeline: true CFG (``true_cfg_scale > 1`` with negative embeddings) makes two calls per step, cond then uncond,
each under ``transformer.cache_context``. The cond call computes uncond, cond and the sub-networks batched (the
negative embeddings are already encoded: the pipeline's locals hold them) and returns D; the uncond call is served
the same D, so the pipeline's ``neg + λ(cond − neg)`` yields D exactly. The two calls are told apart by their order
in the step, never by which tensors they pass (a negative prompt may be the prompt's own tensor). Batch-1 prompt
embeddings with ``num_images_per_prompt`` > 1 are broadcast to the latents' rows, as the stock forward broadcasts
them. Without true CFG, D = C − ω(S − C).
"""

from __future__ import annotations

from typing import Any, Dict

import torch

from .base import BranchRows, LaneState, StepRequest, TwoStreamAdapter, model_output, split_lora_scale


class FluxAdapter(TwoStreamAdapter):
    model_classes = ("FluxTransformer2DModel",)
    batched_inputs = ("hidden_states", "timestep", "guidance", "pooled_projections", "encoder_hidden_states")
    shared_inputs = ("txt_ids", "img_ids")
    pipeline_locals = ("i", "t", "timesteps", "latents", "do_true_cfg", "true_cfg_scale", "negative_image_embeds",
                       "negative_prompt_embeds", "negative_pooled_prompt_embeds")
    optional_locals = ("negative_text_ids",)  # set by the loop only with true CFG
    unsupported_inputs = {
        "controlnet_block_samples": "ControlNet residuals",
        "controlnet_single_block_samples": "ControlNet residuals",
    }
    family = "flux"
    cfg_style = ("true CFG (true_cfg_scale > 1 and a negative prompt): cond then uncond call, both served D; "
                 "else cond only, D = C − ω(S − C)")
    schedulers = "FlowMatchEulerDiscreteScheduler"
    refuses = ("IP-Adapter",)

    def blocks(self, model):
        return [*model.transformer_blocks, *model.single_transformer_blocks]

    def embed(self, model, inputs: Dict[str, Any]) -> LaneState:
        hidden = model.x_embedder(inputs["hidden_states"])
        timestep = inputs["timestep"].to(hidden.dtype) * 1000
        guidance = inputs.get("guidance")
        pooled = inputs["pooled_projections"]
        if guidance is None:
            temb = model.time_text_embed(timestep, pooled)
        else:
            temb = model.time_text_embed(timestep, guidance.to(hidden.dtype) * 1000, pooled)
        encoder = model.context_embedder(inputs["encoder_hidden_states"])
        txt_ids, img_ids = (inputs[k][0] if inputs[k].ndim == 3 else inputs[k] for k in self.shared_inputs)
        rotary = model.pos_embed(torch.cat((txt_ids, img_ids), dim=0))
        attention_kwargs, _ = split_lora_scale(inputs.get(self.attention_kwargs_key))
        return LaneState([hidden, encoder], [temb], {"attention_kwargs": attention_kwargs, "rotary": rotary})

    def block_extras(self, shared):
        return {"image_rotary_emb": shared["rotary"]}

    def head(self, model, state: LaneState) -> torch.Tensor:
        return model.proj_out(model.norm_out(state.flow[0], state.row_consts[0]))

    def check_call(self, call_locals, inputs):
        super().check_call(call_locals, inputs)
        if call_locals["negative_image_embeds"] is not None:
            raise ValueError("s2fast does not support IP-Adapter yet; unwrap the pipeline (s2fast.unwrap) to use it")

    def request(self, pipe, call_locals, inputs, memo) -> StepRequest:
        keys = (*self.batched_inputs, *self.shared_inputs, self.attention_kwargs_key)
        cond = {k: inputs.get(k) for k in keys}
        return_dict = inputs.get("return_dict", True)

        def respond(d: torch.Tensor, predictions=None):
            return model_output(d, return_dict)

        if not call_locals["do_true_cfg"]:
            return StepRequest(BranchRows(self.batched_inputs, 1, branches=[cond]), None, respond)
        uncond = dict(
            cond,
            encoder_hidden_states=call_locals["negative_prompt_embeds"],
            pooled_projections=call_locals["negative_pooled_prompt_embeds"],
            txt_ids=self.uncond_txt_ids(cond["txt_ids"], call_locals, memo),
        )
        rows = BranchRows(self.batched_inputs, 2, branches=[uncond, cond])
        # the uncond call that follows in this step is served the same D (the pipeline's line then yields D)
        return StepRequest(rows, float(call_locals["true_cfg_scale"]), respond, follow_ups=1)

    def uncond_txt_ids(self, txt_ids, call_locals, memo):
        """The text position ids of the loop's uncond call (FluxPipeline encodes the negative prompt's own)."""
        return self._negative_txt_ids(txt_ids, call_locals["negative_text_ids"], memo)

    @staticmethod
    def _negative_txt_ids(txt_ids, negative_txt_ids, memo):
        # Equal position ids let both branches share one batched call; compare once per pipeline call (a device
        # sync) and hand the cond tensor itself to later steps, so stacking needs no comparison.
        if "txt_ids_equal" not in memo:
            memo["txt_ids_equal"] = txt_ids.shape == negative_txt_ids.shape and bool(torch.equal(txt_ids, negative_txt_ids))
        return txt_ids if memo["txt_ids_equal"] else negative_txt_ids
