"""Pipelines built from configs with random weights: for tests, the demo and timing. Nothing is downloaded.

Text encoders and tokenizers are None: callers pass prompt embeddings directly (``embeddings(...)``,
``wan_embeddings(...)``). Wan 2.1 image-to-video gets a tiny CLIP image encoder, since its pipeline encodes the image.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, Optional

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
# the launch-bound shape: a block call is a few dozen small ops, so the host's per-op cost dominates a step
LAUNCH_SD3 = SD3Shape(num_layers=24, heads=1, head_dim=8, latent_size=4, text_tokens=4, joint_attention_dim=8,
                      pooled_dim=8)
BENCH_SD3 = SD3Shape(num_layers=24, heads=4, head_dim=64, latent_size=32, text_tokens=77,
                     joint_attention_dim=256, pooled_dim=256)
# SD3-medium itself (GPU timing, random weights): 24 joint blocks, hidden 1536 (24 heads × 64), T5+CLIP context
# 333 tokens × 4096, 1024² = 128² latents.
SD3_MEDIUM = SD3Shape(num_layers=24, heads=24, head_dim=64, latent_size=128, text_tokens=333,
                      joint_attention_dim=4096, pooled_dim=2048)


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


def sd3_step_inputs(shape: SD3Shape, *, seed: int = 0, timestep: float = 500.0) -> Dict:
    """The keyword inputs of one batched [uncond, cond] SD3 transformer call for ``shape`` (random latents fixed by
    ``seed``, the embeddings of ``embeddings``): what the step benchmarks time the forward and the engine on."""
    emb = embeddings(shape)
    x = torch.randn(1, 16, shape.latent_size, shape.latent_size, generator=torch.Generator().manual_seed(seed))
    return dict(
        hidden_states=torch.cat([x, x]), timestep=torch.tensor([timestep]).expand(2),
        encoder_hidden_states=torch.cat([emb["negative_prompt_embeds"], emb["prompt_embeds"]]),
        pooled_projections=torch.cat([emb["negative_pooled_prompt_embeds"], emb["pooled_prompt_embeds"]]),
        joint_attention_kwargs=None,
    )


def image_size(pipe, shape) -> Dict[str, int]:
    """height and width arguments that give latents of ``shape.latent_size``."""
    side = shape.latent_size * pipe.vae_scale_factor
    return dict(height=side, width=side)


def sd3_latent_call(steps: int, shape=None):
    """A tiny SD3 pipeline without a VAE and the keyword arguments of a latent-output call of it (λ 4, ``steps``
    steps): what the graph tests run again and again."""
    shape = shape or SD3Shape()
    pipe = sd3_pipeline(shape, with_vae=False)
    kw = dict(embeddings(shape), **image_size(pipe, shape), output_type="latent", guidance_scale=4.0,
              num_inference_steps=steps)
    return pipe, kw


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


@dataclass(frozen=True)
class WanShape:
    """A Wan-shaped transformer (WanTransformer3DModel, patch (1, 2, 2)). The defaults are tiny (tests);
    ``BENCH_WAN`` is the CPU benchmark's 24-block shape. ``image_dim`` set: Wan 2.1 image-to-video (image
    embeddings, 36 input channels: latents, the 4-channel frame mask and the condition latents)."""

    num_layers: int = 4
    heads: int = 2
    head_dim: int = 12
    latent_frames: int = 3
    latent_size: int = 8        # latent height (and width unless latent_width is set); patches are 2 × 2
    text_tokens: int = 6
    text_dim: int = 32
    ffn_dim: int = 48
    image_dim: Optional[int] = None
    latent_width: Optional[int] = None

    @property
    def hidden(self) -> int:
        return self.heads * self.head_dim

    @property
    def width(self) -> int:
        return self.latent_size if self.latent_width is None else self.latent_width

    @property
    def tokens(self) -> int:
        return self.latent_frames * (self.latent_size // 2) * (self.width // 2)


# 24 blocks, 4 heads × 48, 5 latent frames of 16×16 (320 video tokens), 64 text tokens, FFN 6 × hidden.
BENCH_WAN = WanShape(num_layers=24, heads=4, head_dim=48, latent_frames=5, latent_size=16, text_tokens=64,
                     text_dim=256, ffn_dim=1152)


def wan_transformer(shape: WanShape = WanShape(), *, in_channels: Optional[int] = None):
    """A random WanTransformer3DModel of ``shape`` (call ``torch.manual_seed`` first for fixed weights)."""
    from diffusers import WanTransformer3DModel

    i2v = shape.image_dim is not None
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=shape.heads, attention_head_dim=shape.head_dim,
        in_channels=in_channels or (36 if i2v else 16), out_channels=16, text_dim=shape.text_dim, freq_dim=32,
        ffn_dim=shape.ffn_dim, num_layers=shape.num_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        image_dim=shape.image_dim, added_kv_proj_dim=shape.hidden if i2v else None,
        rope_max_seq_len=1024,
    ).eval()


def wan_vae():
    """A tiny AutoencoderKLWan: 16 latent channels, 8× spatial and 4× temporal compression like Wan 2.1's."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    return AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True]).eval()


def wan_scheduler(kind: str = "unipc", flow_shift: float = 3.0):
    """The hub default of Wan (UniPC on flow sigmas), or FlowMatchEuler ("euler") with the same shift."""
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    if kind == "unipc":
        return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                       num_train_timesteps=1000, flow_shift=flow_shift)
    if kind == "euler":
        return FlowMatchEulerDiscreteScheduler(shift=flow_shift)
    raise ValueError(f"wan_scheduler: kind must be 'unipc' or 'euler', got {kind!r}")


def wan_pipeline(shape: WanShape = WanShape(), *, seed: int = 0, dtype=torch.float32, with_vae: bool = True,
                 image_to_video: bool = False, experts: int = 1, boundary_ratio: Optional[float] = None,
                 expand_timesteps: bool = False, scheduler: str = "unipc", expert_2_layers: Optional[int] = None,
                 video_to_video: bool = False):
    """A WanPipeline (or WanImageToVideoPipeline, WanVideoToVideoPipeline) with random WanTransformer3DModel(s) of
    ``shape``.

    ``experts=2`` adds ``transformer_2`` (``expert_2_layers`` blocks, default the same) with ``boundary_ratio``
    (Wan 2.2 A14B); ``expand_timesteps`` is Wan 2.2 TI2V's one timestep per token. Image-to-video needs the VAE
    (the pipeline encodes the image); with ``shape.image_dim`` set (Wan 2.1) it has a tiny CLIP image encoder too.
    ``video_to_video``: a WanVideoToVideoPipeline (one transformer)."""
    from diffusers import WanImageToVideoPipeline, WanPipeline, WanVideoToVideoPipeline

    if experts not in (1, 2):
        raise ValueError(f"wan_pipeline: experts must be 1 or 2, got {experts}")
    torch.manual_seed(seed)
    in_channels = 36 if image_to_video and not expand_timesteps else 16
    transformer = _cast(wan_transformer(shape, in_channels=in_channels), dtype)
    transformer_2 = None
    if experts == 2:
        shape_2 = shape if expert_2_layers is None else dataclasses.replace(shape, num_layers=expert_2_layers)
        transformer_2 = _cast(wan_transformer(shape_2, in_channels=in_channels), dtype)
    parts = dict(tokenizer=None, text_encoder=None, vae=wan_vae() if with_vae or image_to_video else None,
                 scheduler=wan_scheduler(scheduler), transformer=transformer, transformer_2=transformer_2,
                 boundary_ratio=boundary_ratio, expand_timesteps=expand_timesteps)
    if video_to_video:
        parts = {k: parts[k] for k in ("tokenizer", "text_encoder", "vae", "scheduler", "transformer")}
        pipe = WanVideoToVideoPipeline(**parts)
    elif image_to_video:
        encoder, processor = _clip_image_encoder(shape.image_dim) if shape.image_dim is not None else (None, None)
        pipe = WanImageToVideoPipeline(image_processor=processor, image_encoder=encoder, **parts)
    else:
        pipe = WanPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _clip_image_encoder(hidden: int):
    """A tiny CLIP vision tower (32 × 32 input, 8 × 8 patches: 17 image tokens of width ``hidden``) and its image
    processor, built from configs: Wan 2.1 image-to-video encodes the image itself (diffusers 0.42 refuses an
    ``image`` passed together with ``image_embeds``, and it needs the image for the condition latents)."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                              num_attention_heads=2, image_size=32, patch_size=8, projection_dim=hidden)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return CLIPVisionModel(config).eval(), processor


def wan_embeddings(shape: WanShape, batch: int = 1, *, seed: int = 1, dtype=torch.float32) -> Dict:
    """prompt / negative embeddings for ``shape``."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    emb = dict(prompt_embeds=r(batch, shape.text_tokens, shape.text_dim),
               negative_prompt_embeds=r(batch, shape.text_tokens, shape.text_dim))
    return emb


def wan_video_size(pipe, shape: WanShape) -> Dict[str, int]:
    """height, width and num_frames arguments that give latents of ``shape``."""
    scale = pipe.vae_scale_factor_spatial
    return dict(height=shape.latent_size * scale, width=shape.width * scale,
                num_frames=(shape.latent_frames - 1) * pipe.vae_scale_factor_temporal + 1)


# --- siblings of the SD3 and Flux pipelines (image-to-image, inpainting, Fill, Kontext) ---------------------------
SD3_SIBLINGS = ("img2img", "inpaint", "inpaint33")
FLUX_SIBLINGS = ("img2img", "inpaint", "fill", "kontext")


def sd3_sibling_pipeline(kind: str, shape: SD3Shape = SD3Shape(), *, seed: int = 0, dtype=torch.float32):
    """StableDiffusion3Img2ImgPipeline ("img2img") or StableDiffusion3InpaintPipeline ("inpaint": the 16-channel
    transformer, which blends the image back after each step; "inpaint33": a 33-channel one, which takes the mask
    and the masked image latents on its input channels) with a random SD3Transformer2DModel of ``shape``. Both
    encode the image, so they have the tiny VAE."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Img2ImgPipeline,
        StableDiffusion3InpaintPipeline,
    )

    if kind not in SD3_SIBLINGS:
        raise ValueError(f"sd3_sibling_pipeline: kind must be one of {SD3_SIBLINGS}, got {kind!r}")
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=shape.latent_size, patch_size=2, in_channels=33 if kind == "inpaint33" else 16, out_channels=16,
        num_layers=shape.num_layers, attention_head_dim=shape.head_dim, num_attention_heads=shape.heads,
        joint_attention_dim=shape.joint_attention_dim, caption_projection_dim=shape.hidden,
        pooled_projection_dim=shape.pooled_dim, pos_embed_max_size=max(32, shape.latent_size),
    )
    cls = StableDiffusion3Img2ImgPipeline if kind == "img2img" else StableDiffusion3InpaintPipeline
    pipe = cls(transformer=_cast(transformer, dtype).eval(), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
               vae=_cast(_vae(16), dtype), text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
               text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flux_sibling_pipeline(kind: str, shape: FluxShape = FluxShape(), *, seed: int = 0, dtype=torch.float32):
    """FluxImg2ImgPipeline ("img2img"), FluxInpaintPipeline ("inpaint"), FluxFillPipeline ("fill": a transformer
    taking latents, masked image latents and the packed mask on its input channels, guidance-distilled like
    FLUX.1-Fill-dev) or FluxKontextPipeline ("kontext": guidance-distilled like FLUX.1-Kontext-dev) with a random
    FluxTransformer2DModel of ``shape`` and the tiny VAE (all of them encode an image)."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        FluxFillPipeline,
        FluxImg2ImgPipeline,
        FluxInpaintPipeline,
        FluxKontextPipeline,
        FluxTransformer2DModel,
    )

    classes = dict(img2img=FluxImg2ImgPipeline, inpaint=FluxInpaintPipeline, fill=FluxFillPipeline,
                   kontext=FluxKontextPipeline)
    if kind not in classes:
        raise ValueError(f"flux_sibling_pipeline: kind must be one of {FLUX_SIBLINGS}, got {kind!r}")
    torch.manual_seed(seed)
    vae = _cast(_vae(4), dtype)
    packed = 4 * vae.config.latent_channels  # 2 × 2 patches of the latents
    mask_channels = 4 * (2 ** (len(vae.config.block_out_channels) - 1)) ** 2  # the pixel mask, packed per latent patch
    rope = shape.head_dim // 4
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=2 * packed + mask_channels if kind == "fill" else packed, out_channels=packed,
        num_layers=shape.num_layers, num_single_layers=shape.num_single_layers, attention_head_dim=shape.head_dim,
        num_attention_heads=shape.heads, joint_attention_dim=shape.joint_attention_dim,
        pooled_projection_dim=shape.pooled_dim, guidance_embeds=kind in ("fill", "kontext"),
        axes_dims_rope=(rope, rope, shape.head_dim - 2 * rope),
    )
    pipe = classes[kind](
        transformer=_cast(transformer, dtype).eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), vae=vae,
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sibling_images(pipe, shape, *, seed: int = 2) -> Dict[str, torch.Tensor]:
    """An input image (values in [0, 1]) and an inpainting mask (1: repaint; the right half) at the pixel size that
    gives latents of ``shape``, fixed by ``seed``."""
    side = image_size(pipe, shape)["height"]
    image = torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(seed))
    mask = torch.zeros(1, 1, side, side)
    mask[..., side // 2:] = 1.0
    return dict(image=image, mask_image=mask)
