"""A pipeline with two denoisers, for the tests: the digits pipeline's rows and CFG line, with the expert switch of
Wan 2.2 (``transformer`` while t ≥ boundary_ratio · 1000, ``transformer_2`` below it), registered with s2fast the
way any project registers its own pipeline (``s2fast.register_adapter``)."""

import torch
from diffusers import DiffusionPipeline
from diffusers.utils.torch_utils import randn_tensor

import s2fast
from s2fast.digits.adapter import DigitsAdapter
from s2fast.digits.model import build_scheduler, build_transformer


class TwoExpertDigitsPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "transformer->transformer_2"

    def __init__(self, transformer, transformer_2, scheduler, boundary_ratio: float = 0.5):
        super().__init__()
        self.register_modules(transformer=transformer, transformer_2=transformer_2, scheduler=scheduler)
        self.register_to_config(boundary_ratio=boundary_ratio)

    @torch.no_grad()
    def __call__(self, class_labels, guidance_scale=4.0, generator=None, num_inference_steps=8):
        labels = torch.as_tensor(class_labels)
        latent_channels = self.transformer.config.in_channels
        size = self.transformer.config.sample_size
        latents = randn_tensor((len(labels), latent_channels, size, size), generator=generator)
        do_cfg = guidance_scale > 1
        labels_input = torch.cat([labels, torch.full_like(labels, 10)]) if do_cfg else labels
        self.scheduler.set_timesteps(num_inference_steps)
        timesteps = self.scheduler.timesteps
        boundary = self.config.boundary_ratio * self.scheduler.config.num_train_timesteps
        with self.progress_bar(total=len(timesteps)) as progress_bar:
            for t in timesteps:
                current_model = self.transformer if t >= boundary else self.transformer_2
                model_input = torch.cat([latents] * 2) if do_cfg else latents
                noise_pred = current_model(model_input, timestep=t.expand(model_input.shape[0]),
                                           class_labels=labels_input).sample
                if do_cfg:
                    cond, uncond = noise_pred.chunk(2)
                    noise_pred = uncond + guidance_scale * (cond - uncond)
                latents = self.scheduler.step(noise_pred, t, latents, return_dict=False)[0]
                progress_bar.update()
        return latents


class TwoExpertAdapter(DigitsAdapter):
    denoisers = ("transformer", "transformer_2")


s2fast.register_adapter(TwoExpertDigitsPipeline, TwoExpertAdapter)


def build(blocks=(6, 3), seed=0) -> TwoExpertDigitsPipeline:
    torch.manual_seed(seed)
    experts = [build_transformer(num_layers=n, attention_head_dim=8, sample_size=8).eval() for n in blocks]
    pipe = TwoExpertDigitsPipeline(*experts, build_scheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def three_pass(pipe, class_labels, masks, *, steps, lam, omega, seed=0):
    """The pipeline's loop with three separate forwards per step on the expert the step uses (cond, null, cond
    with that expert's masked blocks skipped), Eq. 4, and a fresh scheduler."""
    from s2_reference import combine, step_masks

    labels = torch.as_tensor(class_labels)
    size = pipe.transformer.config.sample_size
    latents = torch.randn(len(labels), 1, size, size, generator=torch.Generator().manual_seed(seed))
    sched = pipe.scheduler.__class__.from_config(pipe.scheduler.config)
    sched.set_timesteps(steps)
    boundary = pipe.config.boundary_ratio * sched.config.num_train_timesteps

    def run(model, x, y, t, skip=()):
        blocks = model.transformer_blocks
        try:
            for i in skip:
                blocks[i].forward = lambda hidden_states, *a, **k: hidden_states
            return type(model).forward(model, x, timestep=t[None].expand(len(y)), class_labels=y).sample
        finally:
            for i in skip:
                del blocks[i].forward

    for i, t in enumerate(sched.timesteps):
        model = pipe.transformer if t >= boundary else pipe.transformer_2
        u = run(model, latents, torch.full_like(labels, 10), t) if lam > 1 else None
        c = run(model, latents, labels, t)
        subs = [run(model, latents, labels, t, m) for m in step_masks(masks)[i]]
        latents = sched.step(combine(u, c, subs, lam, omega), t, latents).prev_sample
    return latents
