"""Qwen-Image: QwenImageTransformer2DModel driven by QwenImagePipeline and QwenImageEditPlusPipeline (diffusers 0.42).

Model: ``transformer_blocks`` of dual-stream QwenImageTransformerBlock, called as ``block(hidden_states,
encoder_hidden_states, encoder_hidden_states_mask, temb, image_rotary_emb, joint_attention_kwargs, modulate_index)``
and returning ``(encoder, hidden)``. The flow is [hidden, encoder]; the per-row constants are ``temb`` and, where the
pipeline passes one, the text mask (bool, as the forward normalises it); the rotary pair (image, text) has no batch
dimension and is shared by a lane's rows. Every method mirrors ``QwenImageTransformer2DModel.forward`` op for op.
``zero_cond_t`` models (a second, zero-timestep modulation for the reference-image tokens: temb has 2B rows) are
refused: their row constants do not split by row.

Pipeline: true CFG (``true_cfg_scale > 1`` with a negative prompt) makes two calls per step, cond then uncond, then
``comb = U + λ(C − U)`` and the norm rescale ``comb · (‖C‖/‖comb‖)`` over the channel dimension of each token.
S² there is that same rescale applied to Eq. 4 with the true cond prediction: R = D · (‖C‖/‖D‖) with D = U + λ(C − U)
− ω(S − C). The cond call computes U, C and S (batched where the embeddings have one length) and returns R; the
uncond call is served R too, so the pipeline's line yields R + λ·0 = R and its rescale R · (‖R‖/‖R‖) = R. The
rescale sits between the combination and the scheduler step, so the fused step is off. Without true CFG (one call,
or a guidance-distilled model) D = C − ω(S − C), no rescale, as the pipeline does none.
QwenImageEditPlusPipeline appends the reference images' tokens to the latents and keeps the first ``latents``
tokens of the prediction; the combination and the per-token rescale act token by token, so computing them over
every token and letting the pipeline slice is the same thing.
"""

from __future__ import annotations

from typing import Any, Dict

import torch

from .base import BranchRows, FamilyAdapter, LaneState, StepRequest, model_output, split_lora_scale


def norm_rescale(d: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """Qwen-Image's rescale of a combined prediction, in the pipeline's own op order: d · (‖cond‖ / ‖d‖) per token."""
    cond_norm = torch.norm(cond, dim=-1, keepdim=True)
    noise_norm = torch.norm(d, dim=-1, keepdim=True)
    return d * (cond_norm / noise_norm)


class QwenImageAdapter(FamilyAdapter):
    """QwenImagePipeline, QwenImageEditPlusPipeline: true CFG with the norm rescale (or none), one transformer."""

    model_classes = ("QwenImageTransformer2DModel",)
    batched_inputs = ("hidden_states", "timestep", "guidance", "encoder_hidden_states", "encoder_hidden_states_mask",
                      "additional_t_cond")
    shared_inputs = ("img_shapes",)
    attention_kwargs_key = "attention_kwargs"
    pipeline_locals = ("i", "t", "timesteps", "latents", "do_true_cfg", "true_cfg_scale", "negative_prompt_embeds",
                       "negative_prompt_embeds_mask")
    supports_fused_step = False
    fused_step_refusal = "its norm rescale sits between the CFG combination and the scheduler step"
    family = "qwenimage"
    cfg_style = ("true CFG (true_cfg_scale > 1 and a negative prompt): cond then uncond call, both served Eq. 4's D "
                 "rescaled per token to the true cond's norm, as the pipeline rescales; else cond only, "
                 "D = C − ω(S − C); Edit-Plus: prediction cut to the noise tokens by the pipeline")
    schedulers = "FlowMatchEulerDiscreteScheduler"
    refuses = ("ControlNet residuals", "zero_cond_t models (at wrap)")

    # --- model ------------------------------------------------------------------------------------------------
    def blocks(self, model):
        return list(model.transformer_blocks)

    def embed(self, model, inputs: Dict[str, Any]) -> LaneState:
        from diffusers.models.transformers.transformer_qwenimage import compute_text_seq_len_from_mask

        hidden = model.img_in(inputs["hidden_states"])
        timestep = inputs["timestep"].to(hidden.dtype)
        encoder = model.txt_in(model.txt_norm(inputs["encoder_hidden_states"]))
        text_seq_len, _, mask = compute_text_seq_len_from_mask(encoder, inputs.get("encoder_hidden_states_mask"))
        guidance = inputs.get("guidance")
        additional = inputs.get("additional_t_cond")
        if guidance is None:
            temb = model.time_text_embed(timestep, hidden, additional)
        else:
            temb = model.time_text_embed(timestep, guidance.to(hidden.dtype) * 1000, hidden, additional)
        rotary = model.pos_embed(inputs["img_shapes"], max_txt_seq_len=text_seq_len, device=hidden.device)
        attention_kwargs, _ = split_lora_scale(inputs.get(self.attention_kwargs_key))
        row_consts = [temb] if mask is None else [temb, mask]
        return LaneState([hidden, encoder], row_consts, {"attention_kwargs": attention_kwargs, "rotary": rotary})

    def run_block(self, block, flow, row_consts, shared):
        encoder, hidden = block(
            hidden_states=flow[0],
            encoder_hidden_states=flow[1],
            encoder_hidden_states_mask=row_consts[1] if len(row_consts) > 1 else None,
            temb=row_consts[0],
            image_rotary_emb=shared["rotary"],
            joint_attention_kwargs=shared["attention_kwargs"],
            modulate_index=None,
        )
        return [hidden, encoder]

    def head(self, model, state: LaneState) -> torch.Tensor:
        return model.proj_out(model.norm_out(state.flow[0], state.row_consts[0]))

    def skipped_block_output(self, args, kwargs):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        encoder = kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else args[1]
        return encoder, hidden

    # --- pipeline ---------------------------------------------------------------------------------------------
    def check_call(self, call_locals, inputs):
        if inputs.get("controlnet_block_samples") is not None:
            raise ValueError("s2fast does not combine S² with ControlNet residuals; unwrap the pipeline "
                             "(s2fast.unwrap) to use them")

    def request(self, pipe, call_locals, inputs, memo) -> StepRequest:
        cond = {k: inputs.get(k) for k in (*self.batched_inputs, *self.shared_inputs, self.attention_kwargs_key)}
        return_dict = inputs.get("return_dict", True)

        def respond(d: torch.Tensor, predictions=None):
            return model_output(d, return_dict)

        if not call_locals["do_true_cfg"]:
            return StepRequest(BranchRows(self.batched_inputs, 1, branches=[cond]), None, respond)
        uncond = dict(cond, encoder_hidden_states=call_locals["negative_prompt_embeds"],
                      encoder_hidden_states_mask=call_locals["negative_prompt_embeds_mask"])
        rows = BranchRows(self.batched_inputs, 2, branches=[uncond, cond])
        # the uncond call that follows in this step is served the same rescaled value
        return StepRequest(rows, float(call_locals["true_cfg_scale"]), respond, follow_ups=1, finish=norm_rescale)

    def check_denoiser(self, model) -> None:
        if getattr(model.config, "zero_cond_t", False):
            raise ValueError("s2fast does not support QwenImageTransformer2DModel with zero_cond_t=True (its "
                             "modulation has 2B rows: a zero-timestep set for the reference tokens)")
