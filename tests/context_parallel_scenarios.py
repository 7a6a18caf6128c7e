"""What each rank runs in tests/test_context_parallel.py (see tests/context_parallel_ranks.py): per family, on a
tiny pipeline with context parallelism enabled, the stock call, ω = 0, S² with ``seed=None``, and the stock call
again after unwrap; rank 0 also runs the same S² in one process (a second copy of the pipeline, no parallelism)
with the masks the ranks traced, which the test compares with."""

from __future__ import annotations

import torch
from context_parallel_ranks import enable_context_parallel

import s2fast
from s2fast import S2Config, binding, tiny
from s2fast import tiny_families as tf

STEPS = 3
S2 = dict(omega=0.5, drop_ratio=0.3)


def _rank() -> int:
    return torch.distributed.get_rank()


def _latents(result):
    for name in ("images", "frames"):
        if hasattr(result, name):
            return getattr(result, name)
    return result


class Family:
    """A tiny pipeline factory (same weights at every build), its call and its denoiser attributes."""

    def __init__(self, build, call, denoisers=("transformer",)):
        self.build, self._call, self.denoisers = build, call, denoisers

    def call(self, pipe):
        return _latents(pipe(**self._call(), num_inference_steps=STEPS, output_type="latent",
                             generator=torch.Generator().manual_seed(0)))

    def models(self, pipe):
        return [getattr(pipe, d) for d in self.denoisers if getattr(pipe, d, None) is not None]


def _flux(true_cfg: bool) -> Family:
    shape = tiny.FluxShape()
    emb = tiny.embeddings(shape)
    if not true_cfg:
        emb = {k: v for k, v in emb.items() if not k.startswith("negative")}

    def call():
        return dict(emb, height=shape.latent_size * 8, width=shape.latent_size * 8,
                    true_cfg_scale=4.0 if true_cfg else 1.0)
    return Family(lambda: tiny.flux_pipeline(shape, with_vae=False), call)


def _wan(experts: int) -> Family:
    shape = tiny.WanShape()
    extra = dict(experts=2, boundary_ratio=0.875) if experts == 2 else {}  # steps at t 999, 857 | 600

    def build():
        return tiny.wan_pipeline(shape, with_vae=False, **extra)

    def call():
        more = dict(guidance_scale_2=3.0) if experts == 2 else {}
        return dict(tiny.wan_embeddings(shape), height=shape.latent_size * 8, width=shape.width * 8,
                    num_frames=(shape.latent_frames - 1) * 4 + 1, guidance_scale=4.0, **more)
    return Family(build, call, ("transformer", "transformer_2"))


def _qwen() -> Family:
    shape = tf.QwenShape(text_tokens=8)  # context parallelism splits the text at block 0: an even length

    def call():
        return dict(tf.qwen_embeddings(shape), **tf.qwen_image_size(shape), true_cfg_scale=4.0)
    return Family(lambda: tf.qwen_pipeline(shape), call)


FAMILIES = {"flux": lambda: _flux(True), "flux_no_cfg": lambda: _flux(False), "wan21": lambda: _wan(1),
            "wan22": lambda: _wan(2), "qwen": _qwen}


def _family_run(family: Family) -> dict:
    """The per-family checks every rank runs (see the module docstring)."""
    out = {}
    pipe = family.build()
    for model in family.models(pipe):
        enable_context_parallel(model)
    out["stock"] = family.call(pipe)
    s2fast.wrap(pipe, S2Config(omega=0.0))
    out["omega0"] = family.call(pipe)
    s2fast.wrap(pipe, S2Config(**S2))  # seed=None: drawn on rank 0, broadcast
    out["s2"] = family.call(pipe)
    out["trace"] = s2fast.trace(pipe)
    out["trace_denoisers"] = s2fast.trace_denoisers(pipe)
    s2fast.unwrap(pipe)
    out["unwrapped"] = family.call(pipe)
    out["bound_after_unwrap"] = any(binding.find(m) is not None for m in family.models(pipe))
    if _rank() == 0:  # the same masks in one process, without parallelism
        single = s2fast.wrap(family.build(), S2Config(masks=out["trace"], **S2))
        out["one_process"] = family.call(single)
    return out


def families():
    return {name: _family_run(make()) for name, make in FAMILIES.items()}


def wan_extras():
    """Wan under context parallelism: its split block (0) protected even where the config protects nothing;
    explicit masks that drop it and cuda_graphs=True refused; wrap before enabling the parallelism."""
    out = {}
    family = _wan(1)
    pipe = family.build()
    s2fast.wrap(pipe, S2Config(seed=3, protected_blocks=(), **S2))  # wrap first, then the parallelism
    enable_context_parallel(pipe.transformer)
    out["unprotected"] = family.call(pipe)
    out["unprotected_trace"] = s2fast.trace(pipe)
    refused = {}
    for name, config in {"mask": S2Config(masks=((0,),) * STEPS, protected_blocks=(), omega=0.5),
                         "graphs": S2Config(cuda_graphs=True)}.items():
        try:
            s2fast.wrap(pipe, config)
            refused[name] = None
        except ValueError as e:
            refused[name] = str(e)
    out["refused"] = refused
    out["config_kept"] = s2fast.config_of(pipe).seed == 3  # a refused wrap changes nothing
    if _rank() == 0:
        single = s2fast.wrap(family.build(), S2Config(seed=3, protected_blocks=(0,), **S2))
        out["one_process"] = family.call(single)
        out["one_process_trace"] = s2fast.trace(single)
    return out


def guider():
    """S2Guidance in diffusers' modular Wan loop under context parallelism: ω = 0 equals diffusers' own CFG guider
    under the same parallelism; S² (seed=None) traces the same masks on both ranks and equals one process."""
    from diffusers.guiders import ClassifierFreeGuidance
    from diffusers.modular_pipelines.wan.modular_blocks_wan import WanCoreDenoiseStep

    shape = tiny.WanShape()

    def build():
        classic = tiny.wan_pipeline(shape, with_vae=False)
        pipe = WanCoreDenoiseStep().init_pipeline()
        pipe.update_components(transformer=classic.transformer, scheduler=classic.scheduler)
        return pipe

    latents = torch.randn(1, 16, shape.latent_frames, shape.latent_size, shape.width,
                          generator=torch.Generator().manual_seed(0))
    emb = tiny.wan_embeddings(shape)

    def run(pipe, guider):
        pipe.update_components(guider=guider)
        return pipe(**emb, latents=latents.clone(), num_inference_steps=STEPS, output="latents")

    out = {}
    pipe = build()
    enable_context_parallel(pipe.transformer)
    out["stock"] = run(pipe, ClassifierFreeGuidance(guidance_scale=4.0))
    out["omega0"] = run(pipe, s2fast.S2Guidance(4.0, S2Config(omega=0.0)))
    guider = s2fast.S2Guidance(4.0, S2Config(**S2))
    out["s2"] = run(pipe, guider)
    out["trace"] = guider.trace()
    if _rank() == 0:
        out["one_process"] = run(build(), s2fast.S2Guidance(4.0, S2Config(masks=out["trace"], **S2)))
    return out


def everything():
    """Every scenario in one group of ranks (spawning ranks and importing diffusers costs more than a case)."""
    return {"families": families(), "wan_extras": wan_extras(), "guider": guider()}
