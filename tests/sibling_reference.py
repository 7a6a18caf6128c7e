"""Plain three-pass S² loops for the siblings of SD3 and Flux (image-to-image, inpainting, Fill, Kontext), written for
the tests independently of s2fast's engine.

What comes before each pipeline's loop (timesteps cut by strength, image and mask latents, noise) is taken from
the pipeline's own helpers on a scratch pipeline with the same models and a fresh scheduler, with the same
generator seed, so it matches a pipeline call. The loop itself is written here: every step calls the stock
transformer forward three times, uncond, cond, and cond with the masked blocks skipped (s2_reference.skipping),
on the input the pipeline builds (image latents on the channels or appended tokens), cuts each prediction as the
pipeline cuts its predictions (Kontext: the noise tokens), combines Eq. 4, steps the scheduler and blends the
image back where the pipeline does (inpainting).
"""

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from s2_reference import combine, skipping, step_masks


def _scratch(pipe):
    """The pipeline's class over the same models, with a fresh scheduler of the same config."""
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    return type(pipe)(**dict(pipe.components, scheduler=scheduler))


def _loop(sched, timesteps, latents, predict, masks, lam, omega, num_masks, cfg, after_step=None):
    """predict(latents, negative, skip) -> the prediction as the pipeline reads it; after_step(i, latents) -> latents."""
    for i, t in enumerate(timesteps):
        u = predict(latents, t, True, ()) if cfg else None
        c = predict(latents, t, False, ())
        subs = [predict(latents, t, False, m) for m in step_masks(masks, num_masks)[i]]
        latents = sched.step(combine(u, c, subs, lam, omega), t, latents, return_dict=False)[0]
        if after_step is not None:
            latents = after_step(i, latents)
    return latents


def _blend(sched, timesteps, image_latents, noise, mask):
    """The inpainting pipelines' step: the image, noised to the next timestep, where the mask is 0."""
    def after_step(i, latents):
        proper = image_latents
        if i < len(timesteps) - 1:
            proper = sched.scale_noise(image_latents, torch.tensor([timesteps[i + 1]]), noise)
        return (1 - mask) * proper + mask * latents
    return after_step


@torch.no_grad()
def sd3_sibling_three_pass(pipe, emb, masks, *, kind, steps, lam, omega, image, mask_image=None, strength=0.6,
                           seed=0, height, width, num_masks=1, cfg=True):
    """StableDiffusion3Img2ImgPipeline ("img2img") or StableDiffusion3InpaintPipeline ("inpaint", "inpaint33")."""
    scratch = _scratch(pipe)
    model = pipe.transformer
    blocks = list(model.transformer_blocks)
    dtype = emb["prompt_embeds"].dtype
    generator = torch.Generator().manual_seed(seed)
    sched = scratch.scheduler
    sched.set_timesteps(steps)
    timesteps, _ = scratch.get_timesteps(steps, strength, "cpu")
    latent_timestep = timesteps[:1].repeat(1)
    extra_channels, after_step = None, None
    if kind == "img2img":
        init = scratch.image_processor.preprocess(image, height=height, width=width)
        latents = scratch.prepare_latents(init, latent_timestep, 1, 1, dtype, "cpu", generator)
    else:
        init = scratch.image_processor.preprocess(image, height=height, width=width).to(torch.float32)
        blend = model.config.in_channels == 16
        out = scratch.prepare_latents(1, scratch.vae.config.latent_channels, height, width, dtype, "cpu", generator,
                                      image=init, timestep=latent_timestep, is_strength_max=strength == 1.0,
                                      return_noise=True, return_image_latents=blend)
        latents, noise = out[:2]
        mask_condition = scratch.mask_processor.preprocess(mask_image, height=height, width=width)
        mask, masked = scratch.prepare_mask_latents(mask_condition, init * (mask_condition < 0.5), 1, 1, height, width,
                                                    dtype, "cpu", generator, False)
        if blend:
            after_step = _blend(sched, timesteps, out[2], noise, mask)
        else:
            extra_channels = [mask, masked]

    def predict(x, t, negative, skip):
        if extra_channels is not None:
            x = torch.cat([x, *extra_channels], dim=1)
        prefix = "negative_" if negative else ""
        with skipping(blocks, skip):
            return model(hidden_states=x, timestep=t.expand(1), encoder_hidden_states=emb[prefix + "prompt_embeds"],
                         pooled_projections=emb[prefix + "pooled_prompt_embeds"], return_dict=False)[0]

    return _loop(sched, timesteps, latents, predict, masks, lam, omega, num_masks, cfg, after_step)


@torch.no_grad()
def flux_sibling_three_pass(pipe, emb, masks, *, kind, steps, lam, omega, image, mask_image=None, strength=0.6,
                            seed=0, height, width, num_masks=1, cfg=True, guidance_scale=3.5):
    """FluxImg2ImgPipeline ("img2img"), FluxInpaintPipeline ("inpaint"), FluxFillPipeline ("fill", strength 1 and
    no true CFG) or FluxKontextPipeline ("kontext", the full schedule; called with _auto_resize=False)."""
    scratch = _scratch(pipe)
    model = pipe.transformer
    blocks = [*model.transformer_blocks, *model.single_transformer_blocks]
    dtype = emb["prompt_embeds"].dtype
    generator = torch.Generator().manual_seed(seed)
    sched = scratch.scheduler
    channels = scratch.vae.config.latent_channels
    sigmas = np.linspace(1.0, 1 / steps, steps)
    c = sched.config
    image_tokens, after_step, slice_to = None, None, None
    extra = None
    if kind == "kontext":
        init = scratch.image_processor.preprocess(scratch.image_processor.resize(image, height, width), height, width)
        latents, image_latents, img_ids, image_ids = scratch.prepare_latents(init, 1, channels, height, width, dtype,
                                                                             "cpu", generator)
        img_ids = torch.cat([img_ids, image_ids], dim=0)
        image_tokens, slice_to = image_latents, latents.shape[1]
        sched.set_timesteps(sigmas=sigmas, mu=calculate_shift(latents.shape[1], c.base_image_seq_len,
                                                              c.max_image_seq_len, c.base_shift, c.max_shift))
        timesteps = sched.timesteps
        sched.set_begin_index(0)
    else:
        seq = (height // scratch.vae_scale_factor // 2) * (width // scratch.vae_scale_factor // 2)
        sched.set_timesteps(sigmas=sigmas, mu=calculate_shift(seq, c.base_image_seq_len, c.max_image_seq_len,
                                                              c.base_shift, c.max_shift))
        timesteps, _ = scratch.get_timesteps(steps, strength, "cpu")
        latent_timestep = timesteps[:1].repeat(1)
        init = scratch.image_processor.preprocess(image, height=height, width=width).to(torch.float32)
        if kind == "inpaint":
            latents, noise, image_latents, img_ids = scratch.prepare_latents(init, latent_timestep, 1, channels, height,
                                                                             width, dtype, "cpu", generator)
            mask_condition = scratch.mask_processor.preprocess(mask_image, height=height, width=width)
            mask, _ = scratch.prepare_mask_latents(mask_condition, init * (mask_condition < 0.5), 1, channels, 1,
                                                   height, width, dtype, "cpu", generator)
            after_step = _blend(sched, timesteps, image_latents, noise, mask)
        else:
            latents, img_ids = scratch.prepare_latents(init, latent_timestep, 1, channels, height, width, dtype, "cpu",
                                                       generator)
        if kind == "fill":
            mask_condition = scratch.mask_processor.preprocess(mask_image, height=height, width=width)
            masked_image = (init * (1 - mask_condition)).to(dtype)
            mask, masked = scratch.prepare_mask_latents(mask_condition, masked_image, 1, channels, 1, height, width,
                                                        dtype, "cpu", generator)
            extra = torch.cat((masked, mask), dim=-1)
    txt_ids = torch.zeros(emb["prompt_embeds"].shape[1], 3, dtype=dtype)
    guidance = torch.full([1], guidance_scale) if model.config.guidance_embeds else None

    def predict(x, t, negative, skip):
        if image_tokens is not None:
            x = torch.cat([x, image_tokens], dim=1)
        if extra is not None:
            x = torch.cat((x, extra), dim=2)
        prefix = "negative_" if negative else ""
        with skipping(blocks, skip):
            out = model(hidden_states=x, timestep=t.expand(1).to(dtype) / 1000, guidance=guidance,
                        pooled_projections=emb[prefix + "pooled_prompt_embeds"],
                        encoder_hidden_states=emb[prefix + "prompt_embeds"], txt_ids=txt_ids, img_ids=img_ids,
                        return_dict=False)[0]
        return out if slice_to is None else out[:, :slice_to]

    return _loop(sched, timesteps, latents, predict, masks, lam, omega, num_masks, cfg, after_step)
