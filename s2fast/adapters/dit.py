"""DiT: DiTTransformer2DModel driven by DiTPipeline (diffusers 0.42), class-conditional.

Model: ``transformer_blocks`` of BasicTransformerBlock (norm_type "ada_norm_zero"): every block re-embeds the raw
timestep and class labels, so both are per-row constants and the flow is the hidden states alone. The output head
uses ``transformer_blocks[0].norm1.emb`` (as the stock forward does, whichever blocks a sub-network drops) and has
2 × C channels when the model learns its variance.
Pipeline: one call per step on the rows [cond, null class] (cond first, unlike SD3); the loop has no step counter
``i`` and reassigns ``timesteps`` every step, so a call is identified by the scheduler's timesteps and steps are
counted. Guidance applies to the C eps channels only; the pipeline's ``uncond + λ(cond − uncond)`` on [D, D]
yields D exactly, and the learned-sigma channels are handed back as the stock forward computes them (the pipeline
discards them). The loop keeps x_t in ``latent_model_input``, so the fused step does not apply.
"""

from __future__ import annotations

from typing import Any, Dict

import torch
import torch.nn.functional as F

from .base import BranchRows, FamilyAdapter, LaneState, StepRequest, model_output


class DiTAdapter(FamilyAdapter):
    model_classes = ("DiTTransformer2DModel",)
    batched_inputs = ("hidden_states", "timestep", "class_labels")
    attention_kwargs_key = "cross_attention_kwargs"
    pipeline_locals = ("guidance_scale", "latent_channels")
    supports_fused_step = False
    family = "dit"
    cfg_style = "one call a step on [cond, null class] rows; Eq. 4 on the eps channels, served [D, D]"
    schedulers = "any (KarrasDiffusionSchedulers)"

    def blocks(self, model):
        return list(model.transformer_blocks)

    def embed(self, model, inputs: Dict[str, Any]) -> LaneState:
        hidden = model.pos_embed(inputs["hidden_states"])
        shared = {"attention_kwargs": inputs.get(self.attention_kwargs_key)}
        return LaneState([hidden], [inputs["timestep"], inputs["class_labels"]], shared)

    def run_block(self, block, flow, row_consts, shared):
        hidden = block(flow[0], attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                       timestep=row_consts[0], cross_attention_kwargs=shared["attention_kwargs"],
                       class_labels=row_consts[1])
        return [hidden]

    def skipped_block_output(self, args, kwargs):
        return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]  # a DiT block returns hidden only

    def head(self, model, state: LaneState) -> torch.Tensor:
        hidden = state.flow[0]
        timestep, class_labels = state.row_consts
        conditioning = model.transformer_blocks[0].norm1.emb(timestep, class_labels, hidden_dtype=hidden.dtype)
        shift, scale = model.proj_out_1(F.silu(conditioning)).chunk(2, dim=1)
        hidden = model.norm_out(hidden) * (1 + scale[:, None]) + shift[:, None]
        hidden = model.proj_out_2(hidden)
        p = model.patch_size
        size = int(hidden.shape[1] ** 0.5)
        hidden = hidden.reshape(shape=(-1, size, size, p, p, model.out_channels))
        hidden = torch.einsum("nhwpqc->nchpwq", hidden)
        return hidden.reshape(shape=(-1, model.out_channels, size * p, size * p))

    def call_schedule(self, pipe, call_locals):
        return pipe.scheduler.timesteps

    def step_index(self, call_locals, steps_so_far: int) -> int:
        return steps_so_far  # one transformer call per step

    def request(self, pipe, call_locals, inputs, memo) -> StepRequest:
        cfg = call_locals["guidance_scale"] > 1
        channels = call_locals["latent_channels"]
        return_dict = inputs.get("return_dict", True)
        stacked = {k: inputs.get(k) for k in (*self.batched_inputs, self.attention_kwargs_key)}
        # The pipeline stacks [cond, null class]: kept as is (cond_branch=0), so with ω = 0 the batched call is the
        # stock one, row for row.
        rows = BranchRows(self.batched_inputs, 2 if cfg else 1, stacked=stacked, cond_branch=0)

        def respond(d: torch.Tensor, predictions):
            # [D, D] in the eps channels; the other channels (learned sigma) as the model gives them.
            branches = predictions[:2] if cfg else predictions[:1]
            eps = torch.cat([d] * len(branches))
            return model_output(torch.cat([eps, torch.cat([p[:, channels:] for p in branches])], dim=1), return_dict)

        return StepRequest(rows, float(call_locals["guidance_scale"]) if cfg else None, respond,
                           guided_part=lambda p: p[:, :channels])

