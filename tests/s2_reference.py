"""Plain three-pass S² sampling loops, written for the tests independently of s2fast's engine.

Each step calls the stock transformer forward three times: uncond, cond, and cond with the masked blocks skipped
(a skipped block returns its inputs), combines Eq. 4 in the pipelines' op order and steps a fresh scheduler. Latents
come from the pipeline's own prepare_latents with the same generator seed, so they match a pipeline call.
"""

import contextlib

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift


@contextlib.contextmanager
def skipping(blocks, indices):
    """Blocks at ``indices`` return (encoder, hidden) unchanged; SD3 and Flux blocks both return encoder first."""

    def identity(*args, hidden_states=None, encoder_hidden_states=None, **kwargs):
        return encoder_hidden_states, hidden_states

    try:
        for i in indices:
            blocks[i].forward = identity
        yield
    finally:
        for i in indices:
            del blocks[i].forward


def combine(u, c, subs, lam, omega):
    d = c if u is None else u + lam * (c - u)
    if subs:
        # Eq. 3's mean as s2fast defines it (s2fast.kernels.mean_of_subs): an fp32 sum in order, times fp32(1/N).
        s = subs[0] if len(subs) == 1 else (sum(x.float() for x in subs) * (1.0 / len(subs))).to(subs[0].dtype)
        d = d - omega * (s - c)
    return d


class CorrectionReuse:
    """S2Config.correction_every written plainly: per denoiser (``key``: each expert its own), the S² steps (a mask,
    ω > 0) are counted; the first and then every ``every``-th runs its sub-networks and keeps Δ = S̄ − C, the ones
    between combine with the kept Δ and run no sub-network. ``log``: "computed", "reused" or "none" per step."""

    def __init__(self, every):
        self.every, self.kept, self.log = every, {}, []

    def combine(self, key, u, c, masks, run_subs, lam, omega):
        d = c if u is None else u + lam * (c - u)
        if not masks or omega == 0:
            self.log.append("none")
            return d
        kept = self.kept.get(key)
        if kept is None or kept[1] == self.every - 1:
            subs = run_subs()
            s = subs[0] if len(subs) == 1 else (sum(x.float() for x in subs) * (1.0 / len(subs))).to(subs[0].dtype)
            kept = self.kept[key] = [s - c, 0]
            self.log.append("computed")
        else:
            kept[1] += 1
            self.log.append("reused")
        return d - omega * kept[0]


def guided(u, c, masks, run_subs, lam, omega, reuse=None, key=None):
    """Eq. 4 of a step whose sub-networks ``run_subs()`` computes (under ``reuse``, a CorrectionReuse, only where
    the step computes them)."""
    if reuse is None:
        return combine(u, c, run_subs(), lam, omega)
    return reuse.combine(key, u, c, masks, run_subs, lam, omega)


def step_masks(masks, num_masks=1):
    """Config-form masks -> list of per-step lists of masks."""
    out = []
    for m in masks:
        if not m:
            out.append([])
        elif num_masks == 1:
            out.append([tuple(m)])
        else:
            out.append([tuple(x) for x in m])
    return out


def _sample(sched, latents, run, emb, masks, lam, omega, num_masks, cfg, reuse=None):
    """The three-pass loop itself: run(prompt_embeds, pooled, t, skip) -> prediction at the current latents."""
    for i, t in enumerate(sched.timesteps):
        u = run(latents, emb["negative_prompt_embeds"], emb["negative_pooled_prompt_embeds"], t) if cfg else None
        c = run(latents, emb["prompt_embeds"], emb["pooled_prompt_embeds"], t)
        step = step_masks(masks, num_masks)[i]
        subs = lambda: [run(latents, emb["prompt_embeds"], emb["pooled_prompt_embeds"], t, m) for m in step]  # noqa: E731,B023
        latents = sched.step(guided(u, c, step, subs, lam, omega, reuse), t, latents, return_dict=False)[0]
    return latents


def sd3_three_pass(pipe, emb, masks, *, steps, lam, omega, seed=0, height, width, num_masks=1, cfg=True,
                   reuse=None):
    model = pipe.transformer
    blocks = list(model.transformer_blocks)
    dtype = emb["prompt_embeds"].dtype
    sched = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(steps)
    latents = pipe.prepare_latents(1, model.config.in_channels, height, width, dtype, "cpu",
                                   torch.Generator().manual_seed(seed))

    def run(x, pe, pooled, t, skip=()):
        with skipping(blocks, skip):
            return model(hidden_states=x, timestep=t.expand(1), encoder_hidden_states=pe,
                         pooled_projections=pooled, return_dict=False)[0]

    return _sample(sched, latents, run, emb, masks, lam, omega, num_masks, cfg, reuse)


def flux_three_pass(pipe, emb, masks, *, steps, lam, omega, seed=0, height, width, num_masks=1, cfg=True,
                    reuse=None):
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

    def run(x, pe, pooled, t, skip=()):
        with skipping(blocks, skip):
            return model(hidden_states=x, timestep=t.expand(1).to(dtype) / 1000, guidance=guidance,
                         pooled_projections=pooled, encoder_hidden_states=pe, txt_ids=txt_ids, img_ids=img_ids,
                         return_dict=False)[0]

    return _sample(sched, latents, run, emb, masks, lam, omega, num_masks, cfg, reuse)


def dit_loop_start(pipe, class_labels, *, steps, seed, null_class):
    """What DiTPipeline's loop sets up (seeded latents, labels, null labels, a fresh scheduler), and one separate
    forward ``run(x, y, t, skip)`` of its transformer with the blocks in ``skip`` left out (a DiT block returns its
    hidden states), giving the eps channels."""
    model = pipe.transformer
    blocks = list(model.transformer_blocks)
    c = model.config.in_channels
    size = model.config.sample_size
    b = len(class_labels)
    latents = torch.randn(b, c, size, size, generator=torch.Generator().manual_seed(seed))
    labels = torch.tensor(class_labels)
    null = torch.full_like(labels, null_class)
    sched = pipe.scheduler.__class__.from_config(pipe.scheduler.config)
    sched.set_timesteps(steps)

    def run(x, y, t, skip=()):
        try:
            for i in skip:
                blocks[i].forward = lambda hidden_states, *a, **k: hidden_states
            return model(x, timestep=t[None].expand(b), class_labels=y).sample[:, :c]
        finally:
            for i in skip:
                del blocks[i].forward

    return latents, labels, null, sched, run


def dit_three_pass(pipe, class_labels, masks, *, steps, lam, omega, seed=0, num_masks=1, null_class=1000,
                   reuse=None):
    """DiTPipeline's loop with three separate forwards: [cond] and [null] rows, and cond with blocks skipped
    (a DiT block returns its hidden states); Eq. 4 on the eps channels; the scheduler steps the cond half.
    Also DigitsFlowPipeline's loop (null_class=10; its flow-matching scheduler scales no model input)."""
    latents, labels, null, sched, run = dit_loop_start(pipe, class_labels, steps=steps, seed=seed,
                                                       null_class=null_class)

    for i, t in enumerate(sched.timesteps):
        x = sched.scale_model_input(latents, t) if hasattr(sched, "scale_model_input") else latents
        u = run(x, null, t) if lam > 1 else None
        cond = run(x, labels, t)
        step = step_masks(masks, num_masks)[i]
        subs = lambda: [run(x, labels, t, m) for m in step]  # noqa: E731,B023
        latents = sched.step(guided(u, cond, step, subs, lam, omega, reuse), t, latents).prev_sample
    return latents


@torch.no_grad()
def wan_three_pass(pipe, emb, masks, *, steps, lam, omega, lam_2=None, seed=0, height, width, num_frames,
                   image=None, num_masks=1, cfg=True, latents=None, strength=None, reuse=None):
    """WanPipeline's / WanImageToVideoPipeline's loop with separate batch-B forwards (cond, uncond, cond with the
    masked blocks of the expert that runs skipped; a Wan block returns its hidden states), the expert and λ chosen
    by the boundary as the pipeline does, Eq. 4, and a fresh scheduler. ``image``: image-to-video (the condition
    latents from the pipeline's own prepare_latents)."""
    model = pipe.transformer if pipe.transformer is not None else pipe.transformer_2
    dtype = emb["prompt_embeds"].dtype
    generator = torch.Generator().manual_seed(seed)
    b = emb["prompt_embeds"].shape[0]
    expand = pipe.config.get("expand_timesteps", False)
    if latents is not None:  # video-to-video with given noisy latents
        condition = first_frame_mask = None
    elif image is None:
        latents = pipe.prepare_latents(b, model.config.out_channels, height, width, num_frames, torch.float32, "cpu",
                                       generator)
        condition = first_frame_mask = None
    else:
        pixels = pipe.video_processor.preprocess(image, height=height, width=width).to("cpu", dtype=torch.float32)
        out = pipe.prepare_latents(pixels, b, pipe.vae.config.z_dim, height, width, num_frames, torch.float32, "cpu",
                                   generator)
        latents, condition = out[:2]
        first_frame_mask = out[2] if expand else None
    if image is None and expand:
        first_frame_mask = torch.ones(latents.shape, dtype=torch.float32)
    image_embeds = None
    if image is not None and model.config.image_dim is not None:  # Wan 2.1: the pipeline's own image encoder
        image_embeds = pipe.encode_image(image, "cpu").repeat(b, 1, 1).to(dtype)
    sched = pipe.scheduler.__class__.from_config(pipe.scheduler.config)
    sched.set_timesteps(steps)
    timesteps = sched.timesteps
    if strength is not None:  # video-to-video: the last int(steps · strength) steps
        timesteps = timesteps[steps - min(int(steps * strength), steps):]
    ratio = pipe.config.get("boundary_ratio")
    boundary = None if ratio is None else ratio * sched.config.num_train_timesteps
    lam_2 = lam if lam_2 is None else lam_2

    def run(model, x, pe, t, skip=()):
        blocks = model.blocks
        try:
            for i in skip:
                blocks[i].forward = lambda hidden_states, *a, **k: hidden_states
            return type(model).forward(model, hidden_states=x, timestep=t, encoder_hidden_states=pe,
                                       encoder_hidden_states_image=image_embeds, return_dict=False)[0]
        finally:
            for i in skip:
                del blocks[i].forward

    for i, t in enumerate(timesteps):
        expert, scale = (pipe.transformer, lam) if boundary is None or t >= boundary else (pipe.transformer_2, lam_2)
        if image is not None and not expand:
            x = torch.cat([latents, condition], dim=1).to(dtype)
        elif image is not None:
            x = ((1 - first_frame_mask) * condition + first_frame_mask * latents).to(dtype)
        else:
            x = latents.to(dtype)
        if expand:
            timestep = (first_frame_mask[0][0][:, ::2, ::2] * t).flatten().unsqueeze(0).expand(b, -1)
        else:
            timestep = t.expand(b)
        u = run(expert, x, emb["negative_prompt_embeds"], timestep) if cfg else None
        c = run(expert, x, emb["prompt_embeds"], timestep)
        step = step_masks(masks, num_masks)[i]
        subs = lambda: [run(expert, x, emb["prompt_embeds"], timestep, m) for m in step]  # noqa: E731,B023
        d = guided(u, c, step, subs, scale, omega, reuse, key=id(expert))
        latents = sched.step(d, t, latents, return_dict=False)[0]
    if image is not None and expand:
        latents = (1 - first_frame_mask) * condition + first_frame_mask * latents
    return latents
