"""Plain segmented-guidance (SGG) sampling loops, written for the tests from the method's formula, independently of
s2fast's engine and of s2fast.sgg's plan.

Per step i of N, a window (a, b) holding the steps with a·N ≤ i < b·N:
    D = D_u + λ_i (D_c − D_u) inside cfg_window (when the pipeline runs CFG), else D = D_c;
    D ← D + s_i (D_c − D_skip) inside skip_window,
with D_u, D_c, D_skip three separate batch-B forwards (D_skip: the cond forward with the skip blocks skipped: SD3's
own ``skip_layers``, other families' blocks made identity), and "linear" schedules value + delta · (1 − 2 · progress),
progress going from 0 at a window's first step to 1 at its last.
"""

from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from s2_reference import dit_loop_start, skipping


@dataclass
class Settings:
    cfg_window: tuple = (0.0, 0.5)
    skip_window: tuple = (0.5, 1.0)
    skip_blocks: tuple = (2, 3)
    skip_scale: float = 3.0
    cfg_schedule: str = "constant"
    cfg_delta: float = 0.0
    skip_schedule: str = "constant"
    skip_delta: float = 0.0

    def as_config(self, **engine):
        import s2fast

        return s2fast.SGGConfig(**vars(self), **engine)


def in_window(i, n, window):
    return window[0] * n <= i < window[1] * n


def scheduled(base, schedule, delta, i, n, window):
    if schedule == "constant":
        return base
    steps = [j for j in range(n) if in_window(j, n, window)]
    progress = steps.index(i) / (len(steps) - 1) if len(steps) > 1 else 0.0
    return base + delta * (1.0 - 2.0 * progress)


def guided(i, n, s, lam, cfg, uncond, cond, skip):
    """One step's D from the formula; ``uncond`` and ``skip`` are called only where the formula needs them."""
    c = cond()
    d = c
    if cfg and in_window(i, n, s.cfg_window):
        u = uncond()
        d = u + scheduled(lam, s.cfg_schedule, s.cfg_delta, i, n, s.cfg_window) * (c - u)
    if in_window(i, n, s.skip_window):
        d = d + scheduled(s.skip_scale, s.skip_schedule, s.skip_delta, i, n, s.skip_window) * (c - skip())
    return d


def sd3_sgg(pipe, emb, s: Settings, *, steps, lam, seed=0, height, width, cfg=True):
    model = pipe.transformer
    sched = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(steps)
    latents = pipe.prepare_latents(1, model.config.in_channels, height, width, emb["prompt_embeds"].dtype, "cpu",
                                   torch.Generator().manual_seed(seed))

    def run(x, t, prefix="", skip=None):
        return model(hidden_states=x, timestep=t.expand(1), encoder_hidden_states=emb[f"{prefix}prompt_embeds"],
                     pooled_projections=emb[f"{prefix}pooled_prompt_embeds"], skip_layers=skip, return_dict=False)[0]

    for i, t in enumerate(sched.timesteps):
        d = guided(i, steps, s, lam, cfg, partial(run, latents, t, "negative_"), partial(run, latents, t),
                   partial(run, latents, t, skip=list(s.skip_blocks)))
        latents = sched.step(d, t, latents, return_dict=False)[0]
    return latents


def flux_sgg(pipe, emb, s: Settings, *, steps, lam, seed=0, height, width, cfg=True):
    model = pipe.transformer
    blocks = [*model.transformer_blocks, *model.single_transformer_blocks]
    dtype = emb["prompt_embeds"].dtype
    latents, img_ids = pipe.prepare_latents(1, model.config.in_channels // 4, height, width, dtype, "cpu",
                                            torch.Generator().manual_seed(seed))
    txt_ids = torch.zeros(emb["prompt_embeds"].shape[1], 3, dtype=dtype)
    sched = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    c = sched.config
    mu = calculate_shift(latents.shape[1], c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    guidance = torch.full([1], 3.5) if model.config.guidance_embeds else None

    def run(x, t, prefix="", skip=()):
        with skipping(blocks, skip):
            return model(hidden_states=x, timestep=t.expand(1).to(dtype) / 1000, guidance=guidance,
                         pooled_projections=emb[f"{prefix}pooled_prompt_embeds"],
                         encoder_hidden_states=emb[f"{prefix}prompt_embeds"], txt_ids=txt_ids, img_ids=img_ids,
                         return_dict=False)[0]

    for i, t in enumerate(sched.timesteps):
        d = guided(i, steps, s, lam, cfg, partial(run, latents, t, "negative_"), partial(run, latents, t),
                   partial(run, latents, t, skip=s.skip_blocks))
        latents = sched.step(d, t, latents, return_dict=False)[0]
    return latents


def dit_sgg(pipe, class_labels, s: Settings, *, steps, lam, seed=0, null_class=1000):
    """DiTPipeline's loop (and DigitsFlowPipeline's, null_class=10) with separate forwards; guidance on the eps
    channels; the scheduler steps the cond half."""
    latents, labels, null, sched, run = dit_loop_start(pipe, class_labels, steps=steps, seed=seed,
                                                       null_class=null_class)

    for i, t in enumerate(sched.timesteps):
        x = sched.scale_model_input(latents, t) if hasattr(sched, "scale_model_input") else latents
        d = guided(i, steps, s, lam, lam > 1, partial(run, x, null, t), partial(run, x, labels, t),
                   partial(run, x, labels, t, s.skip_blocks))
        latents = sched.step(d, t, latents).prev_sample
    return latents


def planned_rows(s: Settings, n, num_blocks, cfg=True):
    """Block-rows per step (per row of batch) the formula needs at the least: the cond rows, the uncond rows inside
    cfg_window, and the skip rows from min(skip_blocks) on, minus the skipped blocks."""
    rows = []
    for i in range(n):
        r = num_blocks
        if cfg and in_window(i, n, s.cfg_window):
            r += num_blocks
        if in_window(i, n, s.skip_window):
            r += num_blocks - min(s.skip_blocks) - len(s.skip_blocks)
        rows.append(r)
    return rows
