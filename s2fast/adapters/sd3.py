"""SD3 / SD3.5: SD3Transformer2DModel driven by StableDiffusion3Pipeline (diffusers 0.42).

Model: ``transformer_blocks`` of JointTransformerBlock, called as ``block(hidden_states, encoder_hidden_states, temb,
joint_attention_kwargs)`` and returning ``(encoder, hidden)``, encoder first; the last block is context_pre_only and
returns encoder None. Every method below mirrors ``SD3Transformer2DModel.forward`` op for op, so a pass through
them is bit-identical to the stock forward (tests check it).
Pipeline: one transformer call per step on the rows [uncond, cond] (CFG) or [cond]; the pipeline's CFG line is
``U + λ(C − U)``, so returning [D, D] makes it yield D exactly.
"""

from __future__ import annotations

from typing import Any, Dict

import torch

from .base import BranchRows, LaneState, StepRequest, TwoStreamAdapter, model_output, split_lora_scale


class SD3Adapter(TwoStreamAdapter):
    model_classes = ("SD3Transformer2DModel",)
    batched_inputs = ("hidden_states", "timestep", "encoder_hidden_states", "pooled_projections")
    pipeline_locals = ("i", "t", "timesteps", "latents", "skip_guidance_layers")
    unsupported_inputs = {
        "skip_layers": "the pipeline's own skip-layer guidance (skip_guidance_layers)",
        "block_controlnet_hidden_states": "ControlNet residuals",
    }
    family = "sd3"
    cfg_style = "one call a step on [uncond, cond] rows; served [D, D]"
    schedulers = "FlowMatchEulerDiscreteScheduler"
    refuses = ("skip_guidance_layers (use SGGConfig)", "IP-Adapter")

    def blocks(self, model):
        return list(model.transformer_blocks)

    def embed(self, model, inputs: Dict[str, Any]) -> LaneState:
        x = inputs["hidden_states"]
        height, width = x.shape[-2:]
        hidden = model.pos_embed(x).contiguous()  # as forward: PatchEmbed's output is non-contiguous
        temb = model.time_text_embed(inputs["timestep"], inputs["pooled_projections"])
        encoder = model.context_embedder(inputs["encoder_hidden_states"])
        attention_kwargs, _ = split_lora_scale(inputs.get(self.attention_kwargs_key))
        return LaneState([hidden, encoder], [temb], {"attention_kwargs": attention_kwargs, "size": (height, width)})

    def head(self, model, state: LaneState) -> torch.Tensor:
        hidden = model.norm_out(state.flow[0], state.row_consts[0])
        hidden = model.proj_out(hidden)
        p = model.config.patch_size
        height, width = (s // p for s in state.shared["size"])
        hidden = hidden.reshape(shape=(hidden.shape[0], height, width, p, p, model.out_channels))
        hidden = torch.einsum("nhwpqc->nchpwq", hidden)
        return hidden.reshape(shape=(hidden.shape[0], model.out_channels, height * p, width * p))

    def check_call(self, call_locals, inputs):
        super().check_call(call_locals, inputs)
        if call_locals["skip_guidance_layers"] is not None:
            raise ValueError(
                "skip_guidance_layers (the pipeline's skip-layer guidance) cannot be combined with s2fast, which "
                "runs its own skipped-block pass: use s2fast.SGGConfig(cfg_window=(0, 1), skip_window=(0.01, 0.2), "
                "skip_blocks=...) for skip-layer guidance, or s2fast.unwrap(pipe)"
            )

    def request(self, pipe, call_locals, inputs, memo) -> StepRequest:
        cfg = bool(pipe.do_classifier_free_guidance)
        count = 2 if cfg else 1
        stacked = {k: inputs.get(k) for k in (*self.batched_inputs, self.attention_kwargs_key)}
        return_dict = inputs.get("return_dict", True)

        def respond(d: torch.Tensor, predictions=None):
            # [D, D]: the pipeline's U + λ(C − U) then equals D bit for bit (D − D = 0).
            return model_output(torch.cat([d, d]) if cfg else d, return_dict)

        return StepRequest(BranchRows(self.batched_inputs, count, stacked=stacked),
                           float(pipe.guidance_scale) if cfg else None, respond)
