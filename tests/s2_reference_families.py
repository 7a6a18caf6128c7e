"""Plain three-pass S² loops for Qwen-Image and Flux.2, written for the tests independently of s2fast's engine.

Each step calls the stock transformer forward separately for uncond, cond and cond with the masked blocks skipped
(a skipped block returns (encoder, hidden) unchanged), combines Eq. 4 in the pipelines' op order, applies the
pipeline's own post-processing where it has one (Qwen-Image's norm rescale, with the true cond prediction), and
steps a fresh scheduler set up as the pipeline sets its own.
"""

import numpy as np
import torch
from s2_reference import combine, skipping, step_masks


def _flow_scheduler(pipe, steps, image_seq_len, calculate_shift):
    sched = pipe.scheduler.__class__.from_config(pipe.scheduler.config)
    c = sched.config
    mu = calculate_shift(image_seq_len, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                         c.get("base_shift", 0.5), c.get("max_shift", 1.15))
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    return sched


def qwen_rescale(d, cond):
    """QwenImagePipeline's rescale after its CFG line, in its op order."""
    return d * (torch.norm(cond, dim=-1, keepdim=True) / torch.norm(d, dim=-1, keepdim=True))


@torch.no_grad()
def qwen_three_pass(pipe, emb, masks, *, steps, lam, omega, height, width, seed=0, num_masks=1, cfg=True):
    """QwenImagePipeline's loop: D = Eq. 4, then (true CFG) D · ‖C‖/‖D‖ per token, then the Euler step."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    model = pipe.transformer
    blocks = list(model.transformer_blocks)
    dtype = emb["prompt_embeds"].dtype
    latents = pipe.prepare_latents(1, model.config.in_channels // 4, height, width, dtype, "cpu",
                                   torch.Generator().manual_seed(seed))
    img_shapes = [[(1, height // pipe.vae_scale_factor // 2, width // pipe.vae_scale_factor // 2)]]
    sched = _flow_scheduler(pipe, steps, latents.shape[1], calculate_shift)

    def mask_or_none(mask):  # the pipeline's encode_prompt drops an all-ones mask
        return None if mask is None or bool(mask.all()) else mask

    def run(x, pe, mask, t, skip=()):
        with skipping(blocks, skip):
            return model(hidden_states=x, timestep=t.expand(1).to(dtype) / 1000, encoder_hidden_states=pe,
                         encoder_hidden_states_mask=mask_or_none(mask), img_shapes=img_shapes,
                         return_dict=False)[0]

    for i, t in enumerate(sched.timesteps):
        u = run(latents, emb["negative_prompt_embeds"], emb["negative_prompt_embeds_mask"], t) if cfg else None
        c = run(latents, emb["prompt_embeds"], emb["prompt_embeds_mask"], t)
        subs = [run(latents, emb["prompt_embeds"], emb["prompt_embeds_mask"], t, m)
                for m in step_masks(masks, num_masks)[i]]
        d = combine(u, c, subs, lam, omega)
        if cfg:
            d = qwen_rescale(d, c)
        latents = sched.step(d, t, latents, return_dict=False)[0]
    return latents
