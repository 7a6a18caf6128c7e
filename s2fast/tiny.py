"""Pipelines built from configs with random weights: for tests, the demo and timing. Nothing is downloaded.

Text encoders and tokenizers are None: callers pass prompt embeddings directly (``embeddings(...)``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

import torch


@dataclass(frozen=True)
class SD3Shape:
    """An SD3-shaped transformer. The defaults are tiny (tests); ``BENCH_SD3`` is the benchmark's 24-block shape."""

    num_layers: int = 6
    heads: int = 4
    head_dim: int = 8
    latent_size: int = 16       # latent height = width
    text_tokens: int = 7
    joint_attention_dim: int = 32
    pooled_dim: int = 64

    @property
    def hidden(self) -> int:
        return self.heads * self.head_dim


# 24 blocks like SD3-medium, hidden 256, 32×32 latents (256 image tokens), 77 text tokens.
BENCH_SD3 = SD3Shape(num_layers=24, heads=4, head_dim=64, latent_size=32, text_tokens=77,
                     joint_attention_dim=256, pooled_dim=256)


def _vae(latent_channels: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=4, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=0.0609, scaling_factor=1.5035,
    )


def sd3_pipeline(shape: SD3Shape = SD3Shape(), *, seed: int = 0, dtype=torch.float32, with_vae: bool = True):
    """A StableDiffusion3Pipeline with a random SD3Transformer2DModel of ``shape``; see ``embeddings``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=shape.latent_size, patch_size=2, in_channels=16, out_channels=16, num_layers=shape.num_layers,
        attention_head_dim=shape.head_dim, num_attention_heads=shape.heads,
        joint_attention_dim=shape.joint_attention_dim, caption_projection_dim=shape.hidden,
        pooled_projection_dim=shape.pooled_dim, pos_embed_max_size=max(32, shape.latent_size),
    )
    pipe = StableDiffusion3Pipeline(
        transformer=_cast(transformer, dtype).eval(), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_cast(_vae(16), dtype) if with_vae else None,
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def embeddings(shape, batch: int = 1, *, seed: int = 1, dtype=torch.float32) -> Dict:
    """prompt / negative embeddings for a pipeline of ``shape`` (random, fixed by ``seed``)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    return dict(
        prompt_embeds=r(batch, shape.text_tokens, shape.joint_attention_dim),
        pooled_prompt_embeds=r(batch, shape.pooled_dim),
        negative_prompt_embeds=r(batch, shape.text_tokens, shape.joint_attention_dim),
        negative_pooled_prompt_embeds=r(batch, shape.pooled_dim),
    )


def image_size(pipe, shape) -> Dict[str, int]:
    """height and width arguments that give latents of ``shape.latent_size``."""
    side = shape.latent_size * pipe.vae_scale_factor
    return dict(height=side, width=side)


@dataclass(frozen=True)
class FluxShape:
    num_layers: int = 2          # double-stream blocks
    num_single_layers: int = 3
    heads: int = 2
    head_dim: int = 16
    latent_size: int = 8         # packed latent side: (latent_size/2)² tokens
    text_tokens: int = 6
    joint_attention_dim: int = 32
    pooled_dim: int = 32


def flux_pipeline(shape: FluxShape = FluxShape(), *, seed: int = 0, dtype=torch.float32, with_vae: bool = True,
                  guidance_embeds: bool = False):
    """A FluxPipeline with a random FluxTransformer2DModel of ``shape``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    rope = shape.head_dim // 4
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=shape.num_layers, num_single_layers=shape.num_single_layers,
        attention_head_dim=shape.head_dim, num_attention_heads=shape.heads,
        joint_attention_dim=shape.joint_attention_dim, pooled_projection_dim=shape.pooled_dim,
        guidance_embeds=guidance_embeds, axes_dims_rope=(rope, rope, shape.head_dim - 2 * rope),
    )
    pipe = FluxPipeline(
        transformer=_cast(transformer, dtype).eval(), scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True),
        vae=_cast(_vae(4), dtype) if with_vae else None,
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@dataclass(frozen=True)
class DiTShape:
    num_layers: int = 6
    heads: int = 2
    head_dim: int = 8
    latent_size: int = 8
    latent_channels: int = 4
    learned_sigma: bool = True   # out_channels = 2 × latent channels, as the ImageNet DiT checkpoints


def dit_pipeline(shape: DiTShape = DiTShape(), *, seed: int = 0, scheduler: str = "ddim"):
    """A DiTPipeline with a random class-conditional DiTTransformer2DModel of ``shape`` (1000 classes + null)."""
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel, DPMSolverMultistepScheduler

    torch.manual_seed(seed)
    c = shape.latent_channels
    transformer = DiTTransformer2DModel(
        num_attention_heads=shape.heads, attention_head_dim=shape.head_dim, in_channels=c,
        out_channels=2 * c if shape.learned_sigma else c, num_layers=shape.num_layers, sample_size=shape.latent_size,
        patch_size=2, norm_type="ada_norm_zero", num_embeds_ada_norm=1000,
    )
    schedulers = {"ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler}
    pipe = DiTPipeline(transformer=transformer.eval(), vae=_vae(c), scheduler=schedulers[scheduler]())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _cast(model, dtype):
    # .to(float32) on a float32 model only prints a diffusers warning about modules to keep in float32.
    return model if dtype == torch.float32 else model.to(dtype)
