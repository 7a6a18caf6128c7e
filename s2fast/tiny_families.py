"""Tiny Qwen-Image and Flux.2 pipelines built from configs with random weights (tests, benchmarks). Nothing is
downloaded.

Text encoders, tokenizers and VAEs are None: callers pass prompt embeddings directly (``qwen_embeddings``,
``flux2_embeddings``) and ask for ``output_type="latent"``. Without a VAE the pipelines use their default scale
factor of 8, so an image of ``latent_size · 8`` pixels gives ``(latent_size / 2)²`` packed tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

import torch


@dataclass(frozen=True)
class QwenShape:
    """A QwenImageTransformer2DModel shape. The defaults are tiny (tests); ``BENCH_QWEN`` is the benchmarks'."""

    num_layers: int = 5
    heads: int = 2
    head_dim: int = 16
    axes_dims_rope: tuple = (4, 6, 6)  # sums to head_dim
    latent_size: int = 8             # latent height = width (before 2×2 packing)
    latent_channels: int = 4
    text_tokens: int = 7
    joint_attention_dim: int = 32
    guidance_embeds: bool = False

    @property
    def hidden(self) -> int:
        return self.heads * self.head_dim


# 24 dual-stream blocks, hidden 256, 32×32 latents (256 image tokens), 77 text tokens: the SD3 CPU benchmark's
# scale, so the per-step costs of the two block structures read side by side.
BENCH_QWEN = QwenShape(num_layers=24, heads=4, head_dim=64, axes_dims_rope=(16, 24, 24), latent_size=32,
                       latent_channels=16, text_tokens=77, joint_attention_dim=256)


def qwen_transformer(shape: QwenShape = QwenShape(), *, seed: int = 0, zero_cond_t: bool = False):
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(seed)
    return QwenImageTransformer2DModel(
        patch_size=2, in_channels=shape.latent_channels * 4, out_channels=shape.latent_channels,
        num_layers=shape.num_layers, attention_head_dim=shape.head_dim, num_attention_heads=shape.heads,
        joint_attention_dim=shape.joint_attention_dim, guidance_embeds=shape.guidance_embeds,
        axes_dims_rope=shape.axes_dims_rope, zero_cond_t=zero_cond_t,
    ).eval()


def qwen_pipeline(shape: QwenShape = QwenShape(), *, seed: int = 0, dtype=torch.float32, edit_plus: bool = False,
                  zero_cond_t: bool = False):
    """A QwenImagePipeline (or QwenImageEditPlusPipeline, with a tiny VAE for its reference images) with a random
    transformer of ``shape`` and no text encoder: see ``qwen_embeddings``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageEditPlusPipeline, QwenImagePipeline

    cls = QwenImageEditPlusPipeline if edit_plus else QwenImagePipeline
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9, shift=1.0,
        use_dynamic_shifting=True, time_shift_type="exponential")
    transformer = qwen_transformer(shape, seed=seed, zero_cond_t=zero_cond_t)
    if dtype != torch.float32:
        transformer = transformer.to(dtype)
    vae = _qwen_vae(shape) if edit_plus else None  # Edit-Plus encodes its reference images
    extra = dict(processor=None) if edit_plus else {}  # Edit-Plus's prompt processor: unused with given embeddings
    pipe = cls(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None, transformer=transformer, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _qwen_vae(shape: QwenShape):
    """A tiny AutoencoderKLQwenImage: three temporal-downsample levels (scale factor 8, as without a VAE)."""
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(0)
    c = shape.latent_channels
    return AutoencoderKLQwenImage(base_dim=4, z_dim=c, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                  latents_mean=[0.1 * i for i in range(c)], latents_std=[1.0 + 0.1 * i for i in range(c)]
                                  ).eval()


def qwen_embeddings(shape: QwenShape = QwenShape(), batch: int = 1, *, seed: int = 1, dtype=torch.float32,
                    negative_tokens: int = None, padding: int = 2) -> Dict:
    """Prompt and negative embeddings with their masks. The prompt's last ``padding`` tokens are masked out (as a
    padded batch of prompts would be), so the transformer's text mask is exercised; the negative has
    ``negative_tokens`` tokens (default: as many as the prompt) and no padding."""
    g = torch.Generator().manual_seed(seed)
    neg_tokens = negative_tokens or shape.text_tokens
    mask = torch.ones(batch, shape.text_tokens, dtype=torch.long)
    if padding:
        mask[:, -padding:] = 0
    return dict(
        prompt_embeds=torch.randn(batch, shape.text_tokens, shape.joint_attention_dim, generator=g).to(dtype),
        prompt_embeds_mask=mask,
        negative_prompt_embeds=torch.randn(batch, neg_tokens, shape.joint_attention_dim, generator=g).to(dtype),
        negative_prompt_embeds_mask=torch.ones(batch, neg_tokens, dtype=torch.long),
    )


def qwen_image_size(shape: QwenShape) -> Dict[str, int]:
    return dict(height=shape.latent_size * 8, width=shape.latent_size * 8)


def qwen_step_inputs(shape: QwenShape, *, seed: int = 0, timestep: float = 0.5) -> Dict:
    """One transformer call's inputs at batch 1 (benchmarks): packed latents, text embeddings, img_shapes."""
    g = torch.Generator().manual_seed(seed)
    tokens = (shape.latent_size // 2) ** 2
    return dict(
        hidden_states=torch.randn(1, tokens, shape.latent_channels * 4, generator=g),
        encoder_hidden_states=torch.randn(1, shape.text_tokens, shape.joint_attention_dim, generator=g),
        timestep=torch.tensor([timestep]),
        img_shapes=[[(1, shape.latent_size // 2, shape.latent_size // 2)]],
    )


@dataclass(frozen=True)
class Flux2Shape:
    """A Flux2Transformer2DModel shape: ``num_layers`` double-stream then ``num_single_layers`` single-stream blocks.
    The defaults are tiny (tests)."""

    num_layers: int = 2
    num_single_layers: int = 3
    heads: int = 2
    head_dim: int = 16
    axes_dims_rope: tuple = (4, 4, 4, 4)  # sums to head_dim; four position axes (t, h, w, l)
    latent_size: int = 8                  # latent height = width (before 2×2 packing)
    latent_channels: int = 4
    text_tokens: int = 7
    joint_attention_dim: int = 32
    guidance_embeds: bool = True          # Flux.2 dev is guidance-distilled; Klein is not

    @property
    def hidden(self) -> int:
        return self.heads * self.head_dim


def flux2_transformer(shape: Flux2Shape = Flux2Shape(), *, seed: int = 0):
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(seed)
    return Flux2Transformer2DModel(
        patch_size=1, in_channels=shape.latent_channels * 4, num_layers=shape.num_layers,
        num_single_layers=shape.num_single_layers, attention_head_dim=shape.head_dim,
        num_attention_heads=shape.heads, joint_attention_dim=shape.joint_attention_dim,
        timestep_guidance_channels=32, axes_dims_rope=shape.axes_dims_rope, guidance_embeds=shape.guidance_embeds,
    ).eval()


def _flux2_vae(shape: Flux2Shape):
    """A tiny AutoencoderKLFlux2 (four levels: scale factor 8, as without a VAE); its batch-norm statistics are set to
    values away from the identity so that the Klein pipeline's de-normalisation is visible."""
    from diffusers import AutoencoderKLFlux2

    torch.manual_seed(0)
    vae = AutoencoderKLFlux2(block_out_channels=(8, 8, 8, 8), layers_per_block=1, latent_channels=shape.latent_channels,
                             norm_num_groups=4, mid_block_add_attention=False)
    vae.bn.running_mean.uniform_(-0.5, 0.5)
    vae.bn.running_var.uniform_(0.5, 2.0)
    return vae.eval()


def flux2_pipeline(shape: Flux2Shape = Flux2Shape(), *, seed: int = 0, klein: bool = False,
                   is_distilled: bool = False):
    """A Flux2Pipeline (or Flux2KleinPipeline, ``is_distilled`` as its config flag) with a random transformer of
    ``shape``, no VAE and no text encoder: see ``flux2_embeddings``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Pipeline

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, time_shift_type="exponential")
    transformer = flux2_transformer(shape, seed=seed)
    if klein:  # Klein reads the VAE's latent batch-norm statistics even for output_type="latent"
        pipe = Flux2KleinPipeline(scheduler=scheduler, vae=_flux2_vae(shape), text_encoder=None, tokenizer=None,
                                  transformer=transformer, is_distilled=is_distilled)
    else:
        pipe = Flux2Pipeline(scheduler=scheduler, vae=None, text_encoder=None, tokenizer=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flux2_embeddings(shape: Flux2Shape = Flux2Shape(), batch: int = 1, *, seed: int = 1, negative_tokens: int = None,
                     dtype=torch.float32) -> Dict:
    """Prompt and negative embeddings (the negative is read by Flux2KleinPipeline under CFG only)."""
    g = torch.Generator().manual_seed(seed)
    return dict(
        prompt_embeds=torch.randn(batch, shape.text_tokens, shape.joint_attention_dim, generator=g).to(dtype),
        negative_prompt_embeds=torch.randn(batch, negative_tokens or shape.text_tokens, shape.joint_attention_dim,
                                           generator=g).to(dtype),
    )


def flux2_image_size(shape: Flux2Shape) -> Dict[str, int]:
    return dict(height=shape.latent_size * 8, width=shape.latent_size * 8)


@dataclass(frozen=True)
class ZImageShape:
    """A ZImageTransformer2DModel shape (tiny: tests)."""

    num_layers: int = 4
    refiner_layers: int = 1
    heads: int = 2
    head_dim: int = 16
    axes_dims: tuple = (4, 6, 6)   # sums to head_dim
    latent_size: int = 8           # latent height = width
    latent_channels: int = 4
    text_tokens: int = 7
    cap_feat_dim: int = 24

    @property
    def hidden(self) -> int:
        return self.heads * self.head_dim


def zimage_transformer(shape: ZImageShape = ZImageShape(), *, seed: int = 0):
    from diffusers import ZImageTransformer2DModel

    torch.manual_seed(seed)
    return ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=shape.latent_channels, dim=shape.hidden,
        n_layers=shape.num_layers, n_refiner_layers=shape.refiner_layers, n_heads=shape.heads, n_kv_heads=shape.heads,
        cap_feat_dim=shape.cap_feat_dim, axes_dims=list(shape.axes_dims), axes_lens=[64, 32, 32],
    ).eval()


def zimage_pipeline(shape: ZImageShape = ZImageShape(), *, seed: int = 0):
    """A ZImagePipeline with a random transformer of ``shape``, no VAE and no text encoder: see ``zimage_embeddings``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

    pipe = ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=None, text_encoder=None,
                          tokenizer=None, transformer=zimage_transformer(shape, seed=seed))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def zimage_embeddings(shape: ZImageShape = ZImageShape(), batch: int = 1, *, seed: int = 1,
                      negative_tokens: int = None) -> Dict:
    """Per-sample lists of caption features, as ZImagePipeline takes them (the negative ``negative_tokens`` long)."""
    g = torch.Generator().manual_seed(seed)
    return dict(
        prompt_embeds=[torch.randn(shape.text_tokens, shape.cap_feat_dim, generator=g) for _ in range(batch)],
        negative_prompt_embeds=[torch.randn(negative_tokens or shape.text_tokens, shape.cap_feat_dim, generator=g)
                                for _ in range(batch)],
    )
