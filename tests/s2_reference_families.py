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
def qwen_three_pass(pipe, emb, masks, *, steps, lam, omega, height, width, seed=0, num_masks=1, cfg=True, image=None):
    """QwenImagePipeline's loop: D = Eq. 4, then (true CFG) D · ‖C‖/‖D‖ per token, then the Euler step.
    ``image``: QwenImageEditPlusPipeline's loop, the reference image's latent tokens appended to the latents (from
    the pipeline's own preprocessing and prepare_latents) and the prediction cut to the latents' tokens."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    model = pipe.transformer
    blocks = list(model.transformer_blocks)
    dtype = emb["prompt_embeds"].dtype
    generator = torch.Generator().manual_seed(seed)
    f = pipe.vae_scale_factor * 2
    img_shapes = [[(1, height // f, width // f)]]
    image_latents = None
    if image is None:
        latents = pipe.prepare_latents(1, model.config.in_channels // 4, height, width, dtype, "cpu", generator)
    else:
        from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as edit_plus

        vae_w, vae_h = edit_plus.calculate_dimensions(edit_plus.VAE_IMAGE_SIZE, image.size[0] / image.size[1])
        pixels = [pipe.image_processor.preprocess(image, vae_h, vae_w).unsqueeze(2)]
        latents, image_latents = pipe.prepare_latents(pixels, 1, model.config.in_channels // 4, height, width, dtype,
                                                      "cpu", generator)
        img_shapes = [[img_shapes[0][0], (1, vae_h // f, vae_w // f)]]
    sched = _flow_scheduler(pipe, steps, latents.shape[1], calculate_shift)

    def mask_or_none(mask):  # the pipeline's encode_prompt drops an all-ones mask
        return None if mask is None or bool(mask.all()) else mask

    def run(x, pe, mask, t, skip=()):
        tokens = x.shape[1]
        if image_latents is not None:
            x = torch.cat([x, image_latents], dim=1)
        with skipping(blocks, skip):
            return model(hidden_states=x, timestep=t.expand(1).to(dtype) / 1000, encoder_hidden_states=pe,
                         encoder_hidden_states_mask=mask_or_none(mask), img_shapes=img_shapes,
                         return_dict=False)[0][:, :tokens]

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


def _flux2_skipping(model, indices):
    """Skip Flux.2 blocks as the forward calls them: a double block returns (encoder, hidden) unchanged, a single
    block (one joint stream in, one out) its hidden states."""
    double = len(model.transformer_blocks)
    blocks = [*model.transformer_blocks, *model.single_transformer_blocks]

    def skip_double(*args, hidden_states=None, encoder_hidden_states=None, **kwargs):
        return encoder_hidden_states, hidden_states

    def skip_single(*args, hidden_states=None, **kwargs):
        return hidden_states

    class _Skipping:
        def __enter__(self):
            for i in indices:
                blocks[i].forward = skip_double if i < double else skip_single

        def __exit__(self, *exc):
            for i in indices:
                del blocks[i].forward

    return _Skipping()


@torch.no_grad()
def flux2_three_pass(pipe, emb, masks, *, steps, lam, omega, height, width, seed=0, num_masks=1, cfg=False,
                     guidance=None, image=None):
    """Flux2Pipeline's / Flux2KleinPipeline's loop: uncond (Klein with CFG), cond and cond with the masked blocks
    skipped, Eq. 4 (D = C − ω(S − C) without CFG), the Euler step. Returns the packed latents after the last step.
    ``image`` (a PIL image whose sides are multiples of 16): its latent tokens, from the pipeline's own preprocessing
    and prepare_image_latents, are appended to the latents and the prediction is cut to the latents' tokens."""
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

    model = pipe.transformer
    dtype = emb["prompt_embeds"].dtype
    generator = torch.Generator().manual_seed(seed)
    latents, latent_ids = pipe.prepare_latents(1, model.config.in_channels // 4, height, width, dtype, "cpu",
                                               generator)
    image_latents = image_ids = None
    if image is not None:
        pixels = pipe.image_processor.preprocess(image, height=image.size[1], width=image.size[0], resize_mode="crop")
        image_latents, image_ids = pipe.prepare_image_latents(images=[pixels], batch_size=1, generator=generator,
                                                              device="cpu", dtype=pipe.vae.dtype)
    sched = pipe.scheduler.__class__.from_config(pipe.scheduler.config)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=compute_empirical_mu(latents.shape[1], steps))
    g = None if guidance is None else torch.full([1], guidance, dtype=torch.float32)

    def run(x, pe, t, skip=()):
        tokens, ids = x.shape[1], latent_ids
        if image_latents is not None:
            x, ids = torch.cat([x, image_latents], dim=1).to(model.dtype), torch.cat([latent_ids, image_ids], dim=1)
        with _flux2_skipping(model, skip):
            return model(hidden_states=x, timestep=t.expand(1).to(dtype) / 1000, guidance=g, encoder_hidden_states=pe,
                         txt_ids=pipe._prepare_text_ids(pe), img_ids=ids, return_dict=False)[0][:, :tokens]

    for i, t in enumerate(sched.timesteps):
        u = run(latents, emb["negative_prompt_embeds"], t) if cfg else None
        c = run(latents, emb["prompt_embeds"], t)
        subs = [run(latents, emb["prompt_embeds"], t, m) for m in step_masks(masks, num_masks)[i]]
        latents = sched.step(combine(u, c, subs, lam, omega), t, latents, return_dict=False)[0]
    return latents


@torch.no_grad()
def zimage_three_pass(pipe, emb, masks, *, steps, lam, omega, height, width, seed=0, num_masks=1, cfg=True,
                      cfg_normalization=False, cfg_truncation=1.0):
    """ZImagePipeline's loop with separate batch-1 forwards: cond, uncond (where CFG is not truncated) and cond with
    the masked layers skipped; D = C + λ(C − U) − ω(S − C) in fp32 (the pipeline's CFG form), the pipeline's
    renormalisation with the true C, then the negated prediction to the Euler step."""
    from diffusers.pipelines.z_image.pipeline_z_image import calculate_shift, get_default_z_image_sigmas

    model = pipe.transformer
    latents = pipe.prepare_latents(1, model.in_channels, height, width, torch.float32, "cpu",
                                   torch.Generator().manual_seed(seed))
    sched = pipe.scheduler.__class__.from_config(pipe.scheduler.config)
    c = sched.config
    seq_len = (latents.shape[2] // 2) * (latents.shape[3] // 2)
    mu = calculate_shift(seq_len, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                         c.get("base_shift", 0.5), c.get("max_shift", 1.15))
    sched.set_timesteps(sigmas=get_default_z_image_sigmas(steps), mu=mu)
    t_norms = ((1000 - sched.timesteps.float()) / 1000).tolist()
    layers = model.layers

    def run(x, cap, t, skip=()):
        try:
            for i in skip:
                layers[i].forward = lambda x, *a, **k: x
            return model([x[0].unsqueeze(1)], t, [cap], return_dict=False)[0][0].float()
        finally:
            for i in skip:
                del layers[i].forward

    for i, t in enumerate(sched.timesteps):
        timestep = (1000 - t.expand(1)) / 1000
        scale = 0.0 if cfg and t_norms[i] > cfg_truncation else lam
        apply_cfg = cfg and scale > 0
        cond = run(latents, emb["prompt_embeds"][0], timestep)
        uncond = run(latents, emb["negative_prompt_embeds"][0], timestep) if apply_cfg else None
        subs = [run(latents, emb["prompt_embeds"][0], timestep, m) for m in step_masks(masks, num_masks)[i]]
        d = cond if uncond is None else cond + scale * (cond - uncond)
        if subs:
            s = subs[0] if len(subs) == 1 else sum(subs) * (1.0 / len(subs))
            d = d - omega * (s - cond)
        if apply_cfg and cfg_normalization:
            max_norm = torch.linalg.vector_norm(cond) * float(cfg_normalization)
            norm = torch.linalg.vector_norm(d)
            if norm > max_norm:
                d = d * (max_norm / norm)
        latents = sched.step(-d.unsqueeze(0).squeeze(2), t, latents, return_dict=False)[0]
    return latents
