"""Z-Image: ZImageTransformer2DModel driven by ZImagePipeline (diffusers 0.42).

Model: per-sample lists in (latents and caption features of varying length), one padded batch inside. The forward
embeds the timestep, patchifies and embeds the image and caption tokens, runs the ``noise_refiner`` and
``context_refiner`` layers, joins them into one sequence per sample ([image, caption], padded to the batch's longest
with an attention mask), then the main ``layers`` (single-stream ZImageTransformerBlock, called as ``layer(x,
attn_mask, freqs_cis, adaln_input, ...)`` and returning x), the final layer and the unpatchify. ``embed`` runs that
prefix with the model's own helpers (so the stock ops), the main layers are the blocks S² drops, and ``head`` is the
final layer and unpatchify, stacked into one (rows, C, F, H, W) tensor. Per-row constants: the timestep embedding,
the rotary table and (when sequences differ in length) the attention mask. The omni mode (nested lists, SigLIP
features) and ControlNet residuals are refused.

Pipeline: with CFG the loop makes one call on [cond..., uncond...] (a list of 2B samples) and combines per sample in
fp32 as ``C + λ(C − U)`` (note: cond-based, not the usual ``U + λ(C − U)``), then, with ``cfg_normalization``,
shrinks a sample whose norm exceeds ‖C‖·cfg_normalization to that norm; it negates the result before the scheduler
step. S² there is D = C + λ(C − U) − ω(S − C) in fp32 (``StepRequest.combine``), then the same renormalisation with
the true C (``StepRequest.finish``); both halves of the returned list are D, so the pipeline's line yields
D + λ·0 = D and its renormalisation leaves D as it is (‖D‖ > ‖D‖·r is false for r ≥ 1; ratios below 1 are refused).
CFG truncation: at steps where ``t_norm > cfg_truncation`` the loop runs cond only (``current_guidance_scale = 0``):
S² there is D = C − ω(S − C), in fp32 as the loop reads it. The fused step is off (the loop negates and casts the
prediction before the step).
"""

from __future__ import annotations

from typing import Any, Dict

import torch

from ..kernels import mean_of_subs
from .base import BranchRows, FamilyAdapter, LaneState, StepRequest, model_output


def zimage_combine(cond, uncond, subs, scale, omega, correction=None):
    """Eq. 4 in ZImagePipeline's form and precision: C + λ(C − U) − ω(S̄ − C), every operand in fp32; with a stored
    ``correction`` Δ (S2Config.correction_every) in place of S̄ − C: C + λ(C − U) − ωΔ."""
    c = cond.float()
    d = c if uncond is None else c + scale * (c - uncond.float())
    if correction is not None:
        return d - omega * correction.float()
    if not subs or omega == 0:
        return d
    return d - omega * (mean_of_subs(subs).float() - c)


def zimage_renormalise(ratio: float):
    """ZImagePipeline's cfg_normalization applied per sample, in its op order, with the true cond prediction."""

    def finish(d: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        out = []
        for j in range(d.shape[0]):
            pred = d[j]
            max_new_norm = torch.linalg.vector_norm(cond[j].float()) * ratio
            new_norm = torch.linalg.vector_norm(pred)
            if new_norm > max_new_norm:
                pred = pred * (max_new_norm / new_norm)
            out.append(pred)
        return torch.stack(out)

    return finish


class ZImageAdapter(FamilyAdapter):
    """ZImagePipeline: one call per step on [cond, uncond] (or cond after CFG truncation), fp32 CFG of its own form."""

    model_classes = ("ZImageTransformer2DModel",)
    batched_inputs = ("hidden_states", "timestep", "cap_feats")
    attention_kwargs_key = "joint_attention_kwargs"
    pipeline_locals = ("i", "t", "timesteps", "latents", "apply_cfg", "current_guidance_scale")
    supports_fused_step = False
    fused_step_refusal = "its loop negates the fp32 prediction and renormalises it before the scheduler step"
    family = "zimage"
    cfg_style = ("one call on [cond, uncond] rows; the pipeline's form D = C + λ(C − U) − ω(S − C) in fp32, its "
                 "cfg_normalization with the true C; cond only where cfg_truncation ends CFG")
    schedulers = "FlowMatchEulerDiscreteScheduler"
    refuses = ("ControlNet residuals", "omni mode (SigLIP features)")

    # --- model ------------------------------------------------------------------------------------------------
    def blocks(self, model):
        return list(model.layers)

    def embed(self, model, inputs: Dict[str, Any]) -> LaneState:
        images = list(inputs["hidden_states"].unbind(0))
        p, fp = inputs.get("patch_size", 2), inputs.get("f_patch_size", 1)
        device = images[0].device
        adaln = model.t_embedder(inputs["timestep"] * model.t_scale).type_as(images[0])
        x, cap, sizes, x_pos, cap_pos, x_pad, cap_pad = model.patchify_and_embed(images, inputs["cap_feats"], p, fp)
        x_lens = [len(xi) for xi in x]
        x = model.all_x_embedder[f"{p}-{fp}"](torch.cat(x, dim=0))
        x, x_freqs, x_mask, _, x_noise = model._prepare_sequence(list(x.split(x_lens, dim=0)), x_pos, x_pad,
                                                                 model.x_pad_token, None, device)
        for layer in model.noise_refiner:
            x = layer(x, x_mask, x_freqs, adaln, x_noise, None, None)
        cap_lens = [len(ci) for ci in cap]
        cap = model.cap_embedder(torch.cat(cap, dim=0))
        cap, cap_freqs, cap_mask, _, _ = model._prepare_sequence(list(cap.split(cap_lens, dim=0)), cap_pos, cap_pad,
                                                                 model.cap_pad_token, None, device)
        for layer in model.context_refiner:
            cap = layer(cap, cap_mask, cap_freqs)
        unified, freqs, mask, _ = model._build_unified_sequence(x, x_freqs, x_lens, None, cap, cap_freqs, cap_lens,
                                                                None, None, None, None, None, False, device)
        row_consts = [adaln, freqs] if mask is None else [adaln, freqs, mask]
        return LaneState([unified], row_consts, {"size": sizes[0], "patch": (p, fp)})

    def run_block(self, block, flow, row_consts, shared):
        mask = row_consts[2] if len(row_consts) > 2 else None
        return [block(flow[0], mask, row_consts[1], row_consts[0], None, None, None)]

    def head(self, model, state: LaneState) -> torch.Tensor:
        p, fp = state.shared["patch"]
        out = model.all_final_layer[f"{p}-{fp}"](state.flow[0], c=state.row_consts[0])
        rows = list(out.unbind(dim=0))
        return torch.stack(model.unpatchify(rows, [state.shared["size"]] * len(rows), p, fp))

    def skipped_block_output(self, args, kwargs):
        return kwargs["x"] if "x" in kwargs else args[0]

    # --- pipeline ---------------------------------------------------------------------------------------------
    def check_call(self, call_locals, inputs):
        x = inputs.get("x")
        if inputs.get("controlnet_block_samples") is not None:
            raise ValueError("s2fast does not combine S² with ControlNet residuals; unwrap the pipeline "
                             "(s2fast.unwrap) to use them")
        if inputs.get("siglip_feats") is not None or (isinstance(x, list) and x and isinstance(x[0], list)):
            raise ValueError("s2fast does not support Z-Image's omni mode (nested lists, SigLIP features); unwrap "
                             "the pipeline (s2fast.unwrap) to use it")

    def request(self, pipe, call_locals, inputs, memo) -> StepRequest:
        images = inputs["x"]
        stacked = {"hidden_states": torch.stack(images), "timestep": inputs["t"], "cap_feats": list(inputs["cap_feats"]),
                   "patch_size": inputs.get("patch_size", 2), "f_patch_size": inputs.get("f_patch_size", 1),
                   self.attention_kwargs_key: inputs.get(self.attention_kwargs_key)}
        cfg = bool(call_locals["apply_cfg"])
        return_dict = inputs.get("return_dict", True)

        def respond(d: torch.Tensor, predictions=None):
            samples = list(d.unbind(0))
            return model_output(samples * 2 if cfg else samples, return_dict)  # both halves D under CFG

        if not cfg:
            return StepRequest(BranchRows(self.batched_inputs, 1, stacked=stacked), None, respond,
                               combine=zimage_combine)
        ratio = pipe._cfg_normalization
        finish = None
        if ratio and float(ratio) > 0.0:
            if float(ratio) < 1.0:
                raise ValueError(f"s2fast: ZImagePipeline cfg_normalization={ratio!r} below 1 would rescale the "
                                 "value s2fast returns again; use a ratio ≥ 1 (True is 1), or s2fast.unwrap")
            finish = zimage_renormalise(float(ratio))
        # the loop stacks [cond..., uncond...]
        rows = BranchRows(self.batched_inputs, 2, stacked=stacked, cond_branch=0)
        return StepRequest(rows, float(call_locals["current_guidance_scale"]), respond, combine=zimage_combine,
                           finish=finish)
