"""s2fast.S2Guidance and s2fast.SGGGuidance in diffusers' stock modular denoise loops, per supported family.

Each family row (``ROWS``) says how to assemble a tiny modular pipeline from its blocks and tiny components (no
downloads), how its loop calls the transformer, and what a skipped block returns. A family joins the guiders with
a line in s2fast/guiders/families.py and a row here.

References are plain loops written here: per step separate batch-B forwards for uncond, cond and cond with the
step's blocks skipped (blocks made identity), Eq. 4 in the pipelines' op order, and a fresh scheduler of the
pipeline's class. Tolerances: the guider's engine runs uncond and cond as one batch-2B call and forks the
sub-network off it, where the references make batch-B calls; fp32 GEMMs of different row counts round differently
(~1e-7 relative per op), which the steps carry. ``TOL`` (1e-4 relative and absolute, on latents of magnitude ~1–5)
bounds that; the method moves the result by far more (each comparison checks a change above the row's ``moves``:
1e-2, and 1e-3 for the tiny Flux.2, whose predictions are small — still ten times TOL).
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from diffusers import ClassifierFreeGuidance
from sgg_reference import Settings, guided

import s2fast
from s2fast import binding, masks, tiny
from s2fast.config import public_step_form
from s2fast.guiders import hook

TOL = dict(rtol=1e-4, atol=1e-4)
STEPS = 4
LAM = 4.0


# --- the family table ---------------------------------------------------------------------------------------------
@dataclass
class Row:
    name: str
    build: Callable      # () -> (modular pipeline, classic pipeline sharing its transformer, embeddings, latents)
    forward: Callable    # (model, x, t, emb, cond) -> the prediction as the modular loop calls the transformer
    skipped: Callable    # a skipped block's forward: its inputs back in the block's return order
    blocks: str          # the transformer's block list
    # the scheduler's timesteps as the modular pipeline sets them (fresh scheduler of its class)
    schedule: Callable = lambda sched, case: sched.set_timesteps(STEPS)
    # what the loop does to D between the guider and the scheduler, as the classic pipeline does it with CFG at λ
    finish: Callable = lambda d, cond, lam: d
    output: Callable = lambda case, x: x  # the reference loop's latents in the modular pipeline's output form
    classic_scale: str = "guidance_scale"  # the classic pipeline's argument for λ
    pack: Callable = lambda case, x: x    # the pipeline's latents input as its loop steps them
    classic_output: Callable = None       # the classic pipeline's latents in the modular pipeline's output form
    skip_context: Callable = None         # (model, indices) -> context skipping those blocks as the forward calls them
    count_blocks: Callable = None         # the adapter's block count, where it is not len(blocks)
    moves: float = 1e-2                   # the least change S² (or SGG's skip term) makes to the latents here
    classic_lam: Callable = lambda lam: lam  # the classic pipeline's scale for the guider's λ


def _sd3():
    from diffusers.modular_pipelines.stable_diffusion_3.modular_blocks_stable_diffusion_3 import (
        StableDiffusion3T2ICoreDenoiseStep,
    )

    shape = tiny.SD3Shape()
    classic = tiny.sd3_pipeline(shape, with_vae=False)
    pipe = StableDiffusion3T2ICoreDenoiseStep().init_pipeline()
    pipe.update_components(transformer=classic.transformer, scheduler=classic.scheduler)
    latents = torch.randn(1, 16, shape.latent_size, shape.latent_size, generator=torch.Generator().manual_seed(0))
    return pipe, classic, tiny.embeddings(shape), latents


def _sd3_forward(model, x, t, emb, cond):
    pe, pooled = ("prompt_embeds", "pooled_prompt_embeds") if cond else \
        ("negative_prompt_embeds", "negative_pooled_prompt_embeds")
    return model(hidden_states=x, timestep=t.expand(x.shape[0]), encoder_hidden_states=emb[pe],
                 pooled_projections=emb[pooled], return_dict=False)[0]


def _wan():
    from diffusers.modular_pipelines.wan.modular_blocks_wan import WanCoreDenoiseStep

    shape = tiny.WanShape()
    classic = tiny.wan_pipeline(shape, with_vae=False)
    pipe = WanCoreDenoiseStep().init_pipeline()
    pipe.update_components(transformer=classic.transformer, scheduler=classic.scheduler)
    latents = torch.randn(1, 16, shape.latent_frames, shape.latent_size, shape.width,
                          generator=torch.Generator().manual_seed(0))
    return pipe, classic, tiny.wan_embeddings(shape), latents


def _wan_forward(model, x, t, emb, cond):
    pe = emb["prompt_embeds" if cond else "negative_prompt_embeds"]
    return model(hidden_states=x, timestep=t.expand(x.shape[0]), encoder_hidden_states=pe, return_dict=False)[0]


def _qwen():
    from diffusers.modular_pipelines.qwenimage.modular_blocks_qwenimage import QwenImageCoreDenoiseStep

    from s2fast import tiny_families

    shape = tiny_families.QwenShape()
    classic = tiny_families.qwen_pipeline(shape)
    pipe = QwenImageCoreDenoiseStep().init_pipeline()
    pipe.update_components(transformer=classic.transformer, scheduler=classic.scheduler)
    side = shape.latent_size // 2
    latents = torch.randn(1, side * side, shape.latent_channels * 4, generator=torch.Generator().manual_seed(0))
    emb = dict(tiny_families.qwen_embeddings(shape), **tiny_families.qwen_image_size(shape))
    return pipe, classic, emb, latents


def _qwen_forward(model, x, t, emb, cond):
    pe, mask = ("prompt_embeds", "prompt_embeds_mask") if cond else \
        ("negative_prompt_embeds", "negative_prompt_embeds_mask")
    side = emb["height"] // 16
    return model(hidden_states=x, timestep=t.expand(x.shape[0]).to(x.dtype) / 1000, encoder_hidden_states=emb[pe],
                 encoder_hidden_states_mask=emb[mask], img_shapes=[[(1, side, side)]] * x.shape[0],
                 attention_kwargs=None, return_dict=False)[0]


def _qwen_schedule(sched, case):
    """QwenImageSetTimestepsStep: sigmas 1 … 1/N and the resolution-dependent shift."""
    import numpy as np
    from diffusers.modular_pipelines.qwenimage.before_denoise import calculate_shift

    c = sched.config
    mu = calculate_shift(case.latents.shape[1], c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                         c.get("base_shift", 0.5), c.get("max_shift", 1.15))
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / STEPS, STEPS), mu=mu)


def _qwen_finish(d, cond, lam):
    """QwenImagePipeline rescales its CFG combination to the cond prediction's norm per token, where it runs CFG."""
    from s2fast.adapters.qwenimage import norm_rescale

    return d if lam == 1.0 else norm_rescale(d, cond)


def _qwen_output(case, x):
    return case.pipe.pachifier.unpack_latents(x, case.emb["height"], case.emb["width"])


def _flux2_klein():
    """Flux2KleinBaseCoreDenoiseStep: Klein's undistilled (true CFG) loop, the one Flux.2 loop with a guider."""
    from diffusers.modular_pipelines.flux2.modular_blocks_flux2_klein_base import Flux2KleinBaseCoreDenoiseStep

    from s2fast import tiny_families

    shape = tiny_families.Flux2Shape(guidance_embeds=False)
    classic = tiny_families.flux2_pipeline(shape, klein=True, is_distilled=False)
    pipe = Flux2KleinBaseCoreDenoiseStep().init_pipeline()
    pipe.update_components(transformer=classic.transformer, scheduler=classic.scheduler)
    side = shape.latent_size // 2
    latents = torch.randn(1, shape.latent_channels * 4, side, side, generator=torch.Generator().manual_seed(0))
    emb = dict(tiny_families.flux2_embeddings(shape), **tiny_families.flux2_image_size(shape))
    return pipe, classic, emb, latents


def _flux2_pack(case, x):
    from diffusers.modular_pipelines.flux2.before_denoise import Flux2PrepareLatentsStep

    case.latent_ids = Flux2PrepareLatentsStep._prepare_latent_ids(x)
    return Flux2PrepareLatentsStep._pack_latents(x)


def _flux2_forward(model, x, t, emb, cond):
    from diffusers.modular_pipelines.flux2.before_denoise import (
        Flux2KleinBaseRoPEInputsStep,
        Flux2PrepareLatentsStep,
    )

    pe = emb["prompt_embeds" if cond else "negative_prompt_embeds"]
    side = emb["height"] // 16
    ids = Flux2PrepareLatentsStep._prepare_latent_ids(torch.zeros(x.shape[0], 1, side, side))
    return model(hidden_states=x, timestep=t.expand(x.shape[0]).to(x.dtype) / 1000, guidance=None, img_ids=ids,
                 joint_attention_kwargs=None, encoder_hidden_states=pe,
                 txt_ids=Flux2KleinBaseRoPEInputsStep._prepare_text_ids(pe), return_dict=False)[0]


def _flux2_schedule(sched, case):
    """Flux2SetTimestepsStep: sigmas 1 … 1/N and the empirical shift."""
    import numpy as np
    from diffusers.modular_pipelines.flux2.before_denoise import compute_empirical_mu

    side = case.emb["height"] // 16
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / STEPS, STEPS), mu=compute_empirical_mu(side * side, STEPS))


def _flux2_output(case, x):
    from diffusers.modular_pipelines.flux2.decoders import Flux2UnpackLatentsStep

    return Flux2UnpackLatentsStep._unpack_latents_with_ids(x, case.latent_ids)


def _flux2_classic_output(case, latents):
    """Flux2KleinPipeline's latent output is de-normalised by the VAE's batch-norm statistics and unpatchified:
    undone here (a rounding of ~1e-7 relative)."""
    vae = case.classic.vae
    mean = vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    return (case.classic._patchify_latents(latents) - mean) / std


def _flux2_skipping(model, indices):
    from s2_reference_families import _flux2_skipping

    return _flux2_skipping(model, indices)


def _zimage():
    from diffusers.modular_pipelines.z_image.modular_blocks_z_image import ZImageCoreDenoiseStep

    from s2fast import tiny_families

    shape = tiny_families.ZImageShape()
    classic = tiny_families.zimage_pipeline(shape)
    pipe = ZImageCoreDenoiseStep().init_pipeline()
    pipe.update_components(transformer=classic.transformer, scheduler=classic.scheduler)
    latents = torch.randn(1, shape.latent_channels, shape.latent_size, shape.latent_size,
                          generator=torch.Generator().manual_seed(0))
    emb = dict(tiny_families.zimage_embeddings(shape), height=shape.latent_size * 8, width=shape.latent_size * 8)
    return pipe, classic, emb, latents


def _zimage_forward(model, x, t, emb, cond):
    """ZImageLoopBeforeDenoiser / ZImageLoopDenoiser: per-sample lists in, the stacked prediction negated."""
    caps = emb["prompt_embeds" if cond else "negative_prompt_embeds"]
    timestep = (1000 - t.expand(x.shape[0]).to(x.dtype)) / 1000
    out = model(x=list(x.unsqueeze(2).unbind(0)), t=timestep, cap_feats=list(caps), return_dict=False)[0]
    return -torch.stack(out, dim=0).squeeze(2)


def _zimage_schedule(sched, case):
    """ZImageSetTimestepsStep: its default sigmas and the resolution-dependent shift."""
    from diffusers.modular_pipelines.z_image.before_denoise import calculate_shift, get_default_z_image_sigmas

    c = sched.config
    mu = calculate_shift((case.latents.shape[2] // 2) * (case.latents.shape[3] // 2),
                         base_seq_len=c.get("base_image_seq_len", 256), max_seq_len=c.get("max_image_seq_len", 4096),
                         base_shift=c.get("base_shift", 0.5), max_shift=c.get("max_shift", 1.15))
    sched.set_timesteps(sigmas=get_default_z_image_sigmas(STEPS), mu=mu)


ROWS = {
    "sd3": Row("sd3", _sd3, _sd3_forward,
               lambda *a, hidden_states=None, encoder_hidden_states=None, **k: (encoder_hidden_states, hidden_states),
               "transformer_blocks"),
    "wan": Row("wan", _wan, _wan_forward, lambda hidden_states, *a, **k: hidden_states, "blocks"),
    "qwenimage": Row("qwenimage", _qwen, _qwen_forward,
                     lambda *a, hidden_states=None, encoder_hidden_states=None, **k: (encoder_hidden_states,
                                                                                      hidden_states),
                     "transformer_blocks", _qwen_schedule, _qwen_finish, _qwen_output, "true_cfg_scale",
                     classic_output=_qwen_output),
    "flux2_klein": Row("flux2_klein", _flux2_klein, _flux2_forward, None, "transformer_blocks", _flux2_schedule,
                       output=_flux2_output, pack=_flux2_pack, classic_output=_flux2_classic_output,
                       skip_context=_flux2_skipping,
                       count_blocks=lambda m: len(m.transformer_blocks) + len(m.single_transformer_blocks),
                       moves=1e-3),
    "zimage": Row("zimage", _zimage, _zimage_forward, lambda x, *a, **k: x, "layers", _zimage_schedule,
                  classic_lam=lambda lam: lam - 1),  # ZImagePipeline's line is C + λ'(C − U)
}


class Case:
    """One family's tiny modular pipeline, how to run it with a guider, and the plain reference loop."""

    def __init__(self, row: Row):
        self.row = row
        self.pipe, self.classic, self.emb, self.latents = row.build()
        self.model = self.pipe.transformer
        self.num_blocks = row.count_blocks(self.model) if row.count_blocks else len(getattr(self.model, row.blocks))

    def __call__(self, guider):
        self.pipe.update_components(guider=guider)
        return self.pipe(**self.emb, latents=self.latents.clone(), num_inference_steps=STEPS, output="latents")

    @contextlib.contextmanager
    def skipping(self, indices):
        if self.row.skip_context is not None:
            with self.row.skip_context(self.model, indices):
                yield
            return
        blocks = getattr(self.model, self.row.blocks)
        try:
            for i in indices:
                blocks[i].forward = self.row.skipped
            yield
        finally:
            for i in indices:
                del blocks[i].forward

    def loop(self, guide: Callable, lam: float = LAM):
        """The plain loop: ``guide(i, uncond(), cond(), skip(blocks))`` -> D per step, the family's finish of D
        (the classic pipeline's, with CFG at ``lam``), then the scheduler."""
        sched = type(self.pipe.scheduler).from_config(self.pipe.scheduler.config)
        self.row.schedule(sched, self)
        x = self.row.pack(self, self.latents.clone())
        for i, t in enumerate(sched.timesteps):
            kept = {}

            def run(cond, skip=(), x=x, t=t):
                with self.skipping(skip):
                    return self.row.forward(self.model, x, t, self.emb, cond)

            def cond(kept=kept):
                if "c" not in kept:
                    kept["c"] = run(True)
                return kept["c"]
            d = guide(i, lambda: run(False), cond, lambda blocks: run(True, blocks))
            d = self.row.finish(d, cond(), lam)
            x = sched.step(d, t, x, return_dict=False)[0]
        return self.row.output(self, x)

    def three_pass(self, trace, lam=LAM, omega=0.5, cfg=True):
        def guide(i, uncond, cond, skip):
            c = cond()
            d = c
            if cfg:
                u = uncond()
                d = u + lam * (c - u)
            if trace[i]:
                d = d - omega * (skip(trace[i]) - c)
            return d
        return self.loop(guide, lam if cfg else 1.0)


@pytest.fixture(scope="module", params=list(ROWS))
def case(request):
    case = Case(ROWS[request.param])
    yield case
    assert not hook.installed(case.model)


def _clean(model):
    """Nothing of the guider's on the transformer, and s2fast.wrap's checks would accept it."""
    assert not hook.installed(model)
    assert "forward" not in model.__dict__
    assert binding.find(model) is None and binding.base_slot(model) is not None
    assert binding.incompatible_hooks(model) == []


def _s2(omega=0.5, seed=0, lam=LAM, **more):
    return s2fast.S2Guidance(lam, s2fast.S2Config(omega=omega, seed=seed, fork_mode="separate", **more))


# --- S2Guidance -----------------------------------------------------------------------------------------------------
def test_reference_loop_is_stock_cfg(case):
    """The references' loop with ω = 0 is the stock modular loop under ClassifierFreeGuidance (the same batch-B
    calls and op order), so the comparisons below test the guider, not the loop."""
    stock = case(ClassifierFreeGuidance(guidance_scale=LAM))
    torch.testing.assert_close(case.three_pass([()] * STEPS, omega=0.0), stock, rtol=0, atol=1e-6)


@pytest.mark.parametrize("cfg", [True, False], ids=["cfg", "cond-only"])
def test_s2_guidance_matches_three_pass(case, cfg):
    """Without CFG (λ = 1, as ClassifierFreeGuidance decides) D = D_c − ω(D_s − D_c), with no uncond batch."""
    guider = _s2(lam=LAM if cfg else 1.0)
    out = case(guider)
    trace = guider.trace()
    assert all(trace), "every step runs a sub-network with the default interval"
    expected = case.three_pass(trace, cfg=cfg)
    assert (case.three_pass([()] * STEPS, cfg=cfg) - expected).abs().max() > case.row.moves  # S² moves the result
    torch.testing.assert_close(out, expected, **TOL)
    _clean(case.model)


def test_s2_guidance_masks_are_the_configs(case):
    """Each step's masks are the config's, drawn from its seed as s2fast.wrap draws them; outside the interval
    no sub-network runs (and no third batch is made)."""
    config = s2fast.S2Config(omega=0.5, seed=7, interval=(0.25, 0.75), fork_mode="separate")
    guider = s2fast.S2Guidance(LAM, config)
    calls = []
    handle = case.model.register_forward_pre_hook(lambda *a: calls.append(guider._step))
    try:
        case(guider)
    finally:
        handle.remove()
    expected = tuple(public_step_form(m, 1) for m in masks.schedule(config, STEPS, case.num_blocks))
    assert guider.trace() == expected
    assert [calls.count(i) for i in range(STEPS)] == [2 + bool(m) for m in expected]
    assert not guider.trace()[0] and guider.trace()[1]


def test_num_masks_matches_three_pass(case):
    """num_masks > 1 (naive S²): one sub batch holding the masks' mean."""
    guider = _s2(num_masks=2)
    out = case(guider)

    def guide(i, uncond, cond, skip):
        u, c = uncond(), cond()
        subs = [skip(m) for m in guider.trace()[i]]
        s = (sum(x.float() for x in subs) * 0.5).to(subs[0].dtype)
        return u + LAM * (c - u) - 0.5 * (s - c)

    torch.testing.assert_close(out, case.loop(guide), **TOL)


def test_omega_zero_matches_cfg(case):
    """ω = 0 against ClassifierFreeGuidance in the same loop: equal up to the batch-2B rounding of TOL."""
    stock = case(ClassifierFreeGuidance(guidance_scale=LAM))
    out = case(_s2(omega=0.0))
    torch.testing.assert_close(out, stock, **TOL)
    assert (case(_s2()) - stock).abs().max() > case.row.moves


def test_cfg_start_stop_as_classifier_free_guidance(case):
    """start/stop gate the CFG term exactly as ClassifierFreeGuidance counts them."""
    stock = case(ClassifierFreeGuidance(guidance_scale=LAM, start=0.25, stop=0.75))
    out = case(s2fast.S2Guidance(LAM, s2fast.S2Config(omega=0.0), start=0.25, stop=0.75))
    torch.testing.assert_close(out, stock, **TOL)


def test_swap_back_to_cfg_is_stock(case):
    """After S2Guidance, ClassifierFreeGuidance gives the stock result bit for bit, nothing is left on the
    transformer, and s2fast.wrap accepts it (then unwrap)."""
    before = case(ClassifierFreeGuidance(guidance_scale=LAM))
    case(_s2())
    _clean(case.model)
    after = case(ClassifierFreeGuidance(guidance_scale=LAM))
    assert torch.equal(before, after)
    s2fast.wrap(case.classic, s2fast.S2Config(omega=0.5, seed=0))
    s2fast.unwrap(case.classic)
    _clean(case.model)


def test_equals_wrap_on_the_classic_pipeline(case):
    """The modular loop under S2Guidance and the family's classic pipeline under s2fast.wrap run the same engine
    on the same rows with the same masks: the same latents (the classic loop's CFG line and the guider's kernel
    round alike)."""
    config = s2fast.S2Config(omega=0.5, seed=3, fork_mode="separate", fused_step=False)
    out = case(s2fast.S2Guidance(LAM, config))
    s2fast.wrap(case.classic, config)
    try:
        classic = case.classic(**case.emb, latents=case.latents.clone(), num_inference_steps=STEPS,
                               output_type="latent",
                               **{case.row.classic_scale: case.row.classic_lam(LAM)})
        classic = classic.images if hasattr(classic, "images") else classic.frames
        classic = case.row.classic_output(case, classic) if case.row.classic_output else classic
        trace = s2fast.trace(case.classic)
    finally:
        s2fast.unwrap(case.classic)
    assert trace == case.pipe.guider.trace()
    torch.testing.assert_close(out, classic, **TOL)


def test_config_round_trip(case, tmp_path):
    guider = _s2(num_masks=2, protected_blocks=(0, 1), interval=(0.0, 0.75))
    guider.save_pretrained(tmp_path)
    loaded = s2fast.S2Guidance.from_pretrained(tmp_path)
    assert type(loaded) is s2fast.S2Guidance
    assert loaded.s2fast_config == guider.s2fast_config and loaded.guidance_scale == guider.guidance_scale
    assert torch.equal(case(guider), case(loaded))
    assert loaded.trace() == guider.trace()
    # the modular pipeline keeps a from_config component as its spec's config: created again from it
    again = case.pipe.get_component_spec("guider").create()
    assert type(again) is s2fast.S2Guidance and again.s2fast_config == guider.s2fast_config
    assert torch.equal(case(again), case(guider))
    copy = guider.new(config=guider.s2fast_config.replace(omega=0.25))
    assert copy.s2fast_config.omega == 0.25 and copy.s2fast_config.num_masks == 2


def test_unsupported_family_refused(case):
    """A transformer whose class s2fast serves no modular family for is refused by name, and left untouched."""
    model = case.model
    own = type(model)
    model.__class__ = type("UnknownTransformer", (own,), {})
    try:
        with pytest.raises(ValueError, match="UnknownTransformer.*no adapter for its family"):
            case(_s2())
        assert not hook.installed(model) and "forward" not in model.__dict__
    finally:
        model.__class__ = own


def test_bad_config_changes_nothing(case):
    with pytest.raises(ValueError, match="protected_blocks names block 99"):
        case(_s2(protected_blocks=(99,)))
    _clean(case.model)
    with pytest.raises(ValueError, match="fused_step=True"):
        s2fast.S2Guidance(LAM, s2fast.S2Config(fused_step=True))
    with pytest.raises(TypeError, match="S2Config"):
        s2fast.S2Guidance(LAM, s2fast.SGGConfig())
    with pytest.raises(ValueError, match="sigma_interval"):
        s2fast.S2Guidance(LAM, s2fast.S2Config(sigma_interval=(0.1, 0.9)))


# --- SGGGuidance ----------------------------------------------------------------------------------------------------
SGG = Settings(cfg_window=(0.0, 0.5), skip_window=(0.25, 1.0), skip_blocks=(1, 2), skip_scale=3.0,
               cfg_schedule="linear", cfg_delta=1.0)


def test_sgg_guidance_matches_reference(case):
    """SGGGuidance against the formula (tests/sgg_reference.py), with no uncond batch outside cfg_window and the
    skip batch only inside skip_window."""
    guider = s2fast.SGGGuidance(LAM, SGG.as_config(fork_mode="separate"))
    calls = []
    handle = case.model.register_forward_pre_hook(lambda *a: calls.append(guider._step))
    try:
        out = case(guider)
    finally:
        handle.remove()
    expected = case.loop(lambda i, u, c, s: guided(i, STEPS, SGG, LAM, True, u, c, lambda: s(SGG.skip_blocks)))
    torch.testing.assert_close(out, expected, **TOL)
    # cond always; uncond in steps 0-1 (cfg_window); skip in steps 1-3 (skip_window)
    assert [calls.count(i) for i in range(STEPS)] == [2, 3, 2, 2]
    assert guider.trace() == ((), (1, 2), (1, 2), (1, 2))
    no_skip = dataclasses.replace(SGG, skip_scale=0.0)
    plain = case.loop(lambda i, u, c, s: guided(i, STEPS, no_skip, LAM, True, u, c, lambda: c()))
    assert (plain - expected).abs().max() > case.row.moves
    _clean(case.model)


def test_sgg_round_trip_and_swap_back(case, tmp_path):
    guider = s2fast.SGGGuidance(LAM, SGG.as_config(fork_mode="separate"))
    guider.save_pretrained(tmp_path)
    loaded = s2fast.SGGGuidance.from_pretrained(tmp_path)
    assert loaded.s2fast_config == guider.s2fast_config
    assert torch.equal(case(guider), case(loaded))
    stock = case(ClassifierFreeGuidance(guidance_scale=LAM))
    _clean(case.model)
    assert torch.equal(stock, case(ClassifierFreeGuidance(guidance_scale=LAM)))


# --- a loop that casts every batch ----------------------------------------------------------------------------------
def test_wan_loop_casts_every_batch():
    """Wan's modular loop casts each batch's fields, the latents and the timestep to the transformer's dtype before
    the call, so no argument is the tensor the guider prepared. With a bf16 transformer, bf16 prompt and fp32
    negative embeddings (cast per batch), S2Guidance at ω = 0 equals ClassifierFreeGuidance to bf16 rounding
    (atol 5e-2: an ulp of bf16 at the latents' magnitude ~5 is 3e-2; the batched rows may round one ulp apart),
    and S² (ω = 0.5) moves the result by far more."""
    from diffusers.modular_pipelines.wan.modular_blocks_wan import WanCoreDenoiseStep

    shape = tiny.WanShape()
    classic = tiny.wan_pipeline(shape, with_vae=False, dtype=torch.bfloat16)
    pipe = WanCoreDenoiseStep().init_pipeline()
    pipe.update_components(transformer=classic.transformer, scheduler=classic.scheduler)
    emb = tiny.wan_embeddings(shape)
    emb["prompt_embeds"] = emb["prompt_embeds"].to(torch.bfloat16)
    latents = torch.randn(1, 16, shape.latent_frames, shape.latent_size, shape.width,
                          generator=torch.Generator().manual_seed(0))

    def run(guider):
        pipe.update_components(guider=guider)
        return pipe(**emb, latents=latents.clone(), num_inference_steps=STEPS, output="latents")

    stock = run(ClassifierFreeGuidance(guidance_scale=LAM))
    torch.testing.assert_close(run(_s2(omega=0.0)), stock, rtol=0, atol=5e-2)
    assert (run(_s2()) - stock).abs().max() > 0.2
    _clean(classic.transformer)


def test_wan22_one_guider_per_expert():
    """Wan 2.2's modular loop switches expert and guider at the boundary: each S2Guidance serves its own
    expert (masks drawn at that expert's block count), and together they equal s2fast.wrap on the classic
    two-expert pipeline with the same config (λ per expert)."""
    from diffusers.modular_pipelines.wan.modular_blocks_wan22 import Wan22CoreDenoiseStep

    shape = tiny.WanShape()
    classic = tiny.wan_pipeline(shape, with_vae=False, experts=2, boundary_ratio=0.85, expert_2_layers=3)
    pipe = Wan22CoreDenoiseStep().init_pipeline()
    pipe.update_components(transformer=classic.transformer, transformer_2=classic.transformer_2,
                           scheduler=classic.scheduler)
    pipe.register_to_config(boundary_ratio=0.85)
    config = s2fast.S2Config(omega=0.5, seed=3, fork_mode="separate", fused_step=False)
    high, low = s2fast.S2Guidance(LAM, config), s2fast.S2Guidance(3.0, config)
    pipe.update_components(guider=high, guider_2=low)
    emb = tiny.wan_embeddings(shape)
    latents = torch.randn(1, 16, shape.latent_frames, shape.latent_size, shape.width,
                          generator=torch.Generator().manual_seed(0))
    out = pipe(**emb, latents=latents.clone(), num_inference_steps=STEPS, output="latents")
    s2fast.wrap(classic, config)
    try:
        expected = classic(**emb, latents=latents.clone(), num_inference_steps=STEPS, guidance_scale=LAM,
                           guidance_scale_2=3.0, output_type="latent").frames
        experts = s2fast.trace_denoisers(classic)
        trace = s2fast.trace(classic)
    finally:
        s2fast.unwrap(classic)
    assert experts == ("transformer", "transformer", "transformer_2", "transformer_2")
    assert high.trace()[:2] == trace[:2] and low.trace()[2:] == trace[2:]
    assert high.trace()[2:] == ((), ()) and low.trace()[:2] == ((), ())
    torch.testing.assert_close(out, expected, **TOL)
    _clean(classic.transformer)
    _clean(classic.transformer_2)


def test_disabled_is_cond_alone(case):
    """enabled=False: one batch, D = D_c, as ClassifierFreeGuidance(enabled=False)."""
    stock = case(ClassifierFreeGuidance(guidance_scale=LAM, enabled=False))
    torch.testing.assert_close(case(s2fast.S2Guidance(LAM, s2fast.S2Config(omega=0.5), enabled=False)), stock, **TOL)


def test_error_at_the_call_leaves_nothing():
    """An input the engine cannot serve fails at the cond batch's call, naming it, and the hook is gone."""
    case = Case(ROWS["sd3"])
    case.pipe.update_components(guider=_s2())
    with pytest.raises(ValueError, match="IP-Adapter"):
        case.pipe(**case.emb, latents=case.latents.clone(), num_inference_steps=STEPS, output="latents",
                  joint_attention_kwargs={"ip_adapter_image_embeds": [torch.zeros(1)]})
    _clean(case.model)


def test_qwen_zero_cond_t_refused():
    """A Qwen-Image model with zero_cond_t (2B-row modulation) is refused at the guider's first batch, as at wrap,
    and nothing is left on it."""
    from s2fast import tiny_families

    case = Case(ROWS["qwenimage"])
    model = tiny_families.qwen_transformer(tiny_families.QwenShape(), zero_cond_t=True)
    case.pipe.update_components(transformer=model)
    with pytest.raises(ValueError, match="zero_cond_t"):
        case(_s2())
    _clean(model)


def test_zimage_omni_mode_refused():
    """Z-Image's omni mode (a nested list per sample) is refused by name before the engine runs."""
    from s2fast.guiders.guidance import _from_sample_lists

    with pytest.raises(ValueError, match="omni mode"):
        _from_sample_lists({"x": [[torch.zeros(4, 1, 8, 8)]], "t": torch.zeros(1)})


def test_block_graphs_under_the_guider():
    """The guider's engine runs through block graphs as wrap's does (CPU stand-in: graphs.EagerBackend): every
    mask replays the graphs captured at the first step, bit-equal to the eager blocks; release_graphs frees them."""
    from s2fast import graphs

    case = Case(ROWS["sd3"])
    config = s2fast.S2Config(omega=0.5, drop_ratio=0.3, seed=5, fork_mode="separate")
    guider = s2fast.S2Guidance(LAM, config)
    guider._graph_backend = graphs.EagerBackend()
    graphed = case(guider)
    first = guider.graph_stats()
    again = case(guider)
    stats = guider.graph_stats()
    assert torch.equal(graphed, again) and stats["captures"] == first["captures"] and stats["replays"] > 0
    eager = case(s2fast.S2Guidance(LAM, config.replace(masks=guider.trace())))
    assert torch.equal(graphed, eager)  # same kernels on copies of the same inputs
    assert graphs._KEPT.get(case.model)
    guider.release_graphs()
    assert not graphs._KEPT.get(case.model) and guider.graph_stats() is None
    _clean(case.model)


def test_after_a_removed_diffusers_hook():
    """A model-level diffusers hook added and removed leaves its registry and the model's own forward as an
    instance attribute: the guider serves the model, and leaves that slot as it found it."""
    from diffusers.hooks import HookRegistry, ModelHook

    case = Case(ROWS["sd3"])
    stock = case(ClassifierFreeGuidance(guidance_scale=LAM))
    registry = HookRegistry.check_if_exists_or_initialize(case.model)
    registry.register_hook(ModelHook(), "gone")
    registry.remove_hook("gone")
    before = case.model.__dict__.get("forward")
    out = case(_s2(omega=0.0))
    torch.testing.assert_close(out, stock, **TOL)
    assert case.model.__dict__.get("forward") is before and not hook.installed(case.model)
    assert binding.incompatible_hooks(case.model) == []


def test_a_call_that_fails_before_the_forward_leaves_the_transformer_stock():
    """A forward pre-hook that raises at the cond batch's call (the guider's forward never runs) must not leave
    the guider's one-call forward answering later calls: a stock ClassifierFreeGuidance run (prompts of another
    length too) and a direct transformer call are then stock, bit for bit."""
    case = Case(ROWS["sd3"])
    model = case.model
    stock = case(ClassifierFreeGuidance(guidance_scale=LAM))
    x = case.latents.clone()
    direct = _sd3_forward(model, x, torch.tensor([500.0]), case.emb, True)

    def refuse(*args):
        raise RuntimeError("a pre-hook refuses the call")

    handle = model.register_forward_pre_hook(refuse)
    try:
        with pytest.raises(RuntimeError, match="a pre-hook refuses"):
            case(_s2())
    finally:
        handle.remove()
    assert torch.equal(_sd3_forward(model, x, torch.tensor([500.0]), case.emb, True), direct)
    _clean(model)  # the direct call found the failed loop's forward and took it out
    assert torch.equal(case(ClassifierFreeGuidance(guidance_scale=LAM)), stock)
    with pytest.raises(RuntimeError, match="a pre-hook refuses"):  # again, now answered by the stock run
        handle = model.register_forward_pre_hook(refuse)
        try:
            case(_s2())
        finally:
            handle.remove()
    assert torch.equal(case(ClassifierFreeGuidance(guidance_scale=LAM)), stock)
    _clean(model)
    with pytest.raises(RuntimeError, match="a pre-hook refuses"):  # and once more, then s2fast.wrap accepts the model
        handle = model.register_forward_pre_hook(refuse)
        try:
            case(_s2())
        finally:
            handle.remove()
    s2fast.wrap(case.classic, s2fast.S2Config(omega=0.5, seed=0))
    s2fast.unwrap(case.classic)
    _clean(model)
    with pytest.raises(RuntimeError, match="a pre-hook refuses"):
        handle = model.register_forward_pre_hook(refuse)
        try:
            case(_s2())
        finally:
            handle.remove()
    shorter = {k: (v[:, :3] if k.endswith("prompt_embeds") and "pooled" not in k else v) for k, v in case.emb.items()}
    case.pipe.update_components(guider=ClassifierFreeGuidance(guidance_scale=LAM))
    case.pipe(**shorter, latents=case.latents.clone(), num_inference_steps=STEPS, output="latents")


def test_an_error_in_the_loop_before_the_call_leaves_nothing_that_answers():
    """An exception between prepare_models and the transformer call (here: raised by the guider's own
    prepare_models caller before it calls the model) leaves a one-call forward that never answers another
    caller: the next direct call runs stock and takes it out."""
    case = Case(ROWS["sd3"])
    model = case.model
    x = case.latents.clone()
    direct = _sd3_forward(model, x, torch.tensor([500.0]), case.emb, True)
    guider = _s2()
    guider.set_state(step=0, num_inference_steps=STEPS, timestep=torch.tensor(1000.0))
    guider.prepare_inputs({"hidden_states": (x, x),
                           "encoder_hidden_states": (case.emb["prompt_embeds"], case.emb["negative_prompt_embeds"]),
                           "text_embeds": (case.emb["pooled_prompt_embeds"], case.emb["negative_pooled_prompt_embeds"])})

    def loop_that_fails():
        guider.prepare_models(model)
        raise KeyError("the loop fails before its transformer call")

    with pytest.raises(KeyError):
        loop_that_fails()
    assert torch.equal(_sd3_forward(model, x, torch.tensor([500.0]), case.emb, True), direct)
    _clean(model)
