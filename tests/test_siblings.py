"""The siblings of SD3 and Flux under wrap: StableDiffusion3Img2ImgPipeline, StableDiffusion3InpaintPipeline (16-channel
transformer, blending after the step, and 33-channel, mask on the input channels), FluxImg2ImgPipeline,
FluxInpaintPipeline, FluxFillPipeline and FluxKontextPipeline, on tiny random models in fp32.

Each against a plain three-pass loop (tests/sibling_reference.py), ω = 0 against the stock pipeline, unwrap, one
refused input, and the fused step against the unfused one. Tolerances are those of tests/test_guidance.py:
- EXACT (0): the paths that run each branch at the batch size of the comparison (batch_branches off against the
  three-pass loop; against stock, the path that batches as the stock loop does: SD3's one [uncond, cond] call,
  Flux's separate batch-B calls).
- BATCHED (atol 2e-5, rtol 1e-5): the other paths, whose batched GEMMs round fp32 differently (~1e-7 relative per
  op; measured up to 3e-6 over 4 steps on latents of magnitude ~4).
- EFFECT (1e-3): S² must move the result by more than this, so that each comparison can fail.
"""

from dataclasses import dataclass, field

import pytest
import sibling_reference
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

import s2fast
from s2fast import S2Config, tiny

EXACT = dict(atol=0.0, rtol=0.0)
BATCHED = dict(atol=2e-5, rtol=1e-5)
EFFECT = 1e-3
MASKS_4 = ((2,), (1, 3), (), (4,))  # 4 loop steps: a late fork, two drops, an S²-off step, the last Flux block

CASES = ["sd3-img2img", "sd3-inpaint", "sd3-inpaint33", "flux-img2img", "flux-inpaint", "flux-fill", "flux-kontext"]


@dataclass
class Sibling:
    """One sibling pipeline with its inputs; ``__call__`` runs it (latents out), ``reference`` the three-pass loop."""

    name: str
    pipe: object
    emb: dict
    size: dict
    call: dict                       # the pipeline's other arguments (image, mask, strength, ...)
    reference_args: dict
    scale_key: str                   # the argument that is λ (None: the loop has no CFG)
    reference_loop: object = None
    memo: dict = field(default_factory=dict)  # results that tests share: references and the stock output

    @property
    def family(self):
        return self.name.split("-")[0]

    @property
    def has_cfg(self):
        return self.scale_key is not None

    def kwargs(self, lam=4.0, seed=0, cfg=True, **more):
        kw = dict(self.emb, **self.size, **self.call, output_type="latent",
                  generator=torch.Generator().manual_seed(seed))
        if self.has_cfg:
            kw[self.scale_key] = lam if cfg else 1.0
        if not (cfg and self.has_cfg):
            kw.pop("negative_prompt_embeds", None)
            kw.pop("negative_pooled_prompt_embeds", None)
        kw.update(more)
        return kw

    def __call__(self, **kw):
        return self.pipe(**self.kwargs(**kw)).images

    def reference(self, masks, *, omega, lam=4.0, cfg=True, seed=0):
        key = (masks, omega, lam, cfg, seed)
        if key not in self.memo:  # computed once per session: the loops are deterministic
            self.memo[key] = self.reference_loop(self.pipe, self.emb, masks, lam=lam, omega=omega, seed=seed,
                                                 cfg=cfg and self.has_cfg, **self.size, **self.reference_args)
        return self.memo[key]

    def stock(self):
        """The unwrapped pipeline's output with the default arguments (computed once per session)."""
        if "stock" not in self.memo:
            assert s2fast.config_of(self.pipe) is None
            self.memo["stock"] = self()
        return self.memo["stock"]


def _build(name):
    family, kind = name.split("-")
    if family == "sd3":
        shape = tiny.SD3Shape()
        pipe = tiny.sd3_sibling_pipeline(kind, shape)
        loop, scale_key = sibling_reference.sd3_sibling_three_pass, "guidance_scale"
    else:
        shape = tiny.FluxShape()
        pipe = tiny.flux_sibling_pipeline(kind, shape)
        loop = sibling_reference.flux_sibling_three_pass
        scale_key = None if kind == "fill" else "true_cfg_scale"
    emb = tiny.embeddings(shape)
    images = tiny.sibling_images(pipe, shape)
    size = tiny.image_size(pipe, shape)
    # 4 loop steps each: 5 steps at strength 0.8 (the last 4), or the whole schedule
    call = dict(image=images["image"], num_inference_steps=5, strength=0.8)
    ref = dict(kind=kind, steps=5, strength=0.8, image=images["image"])
    if kind in ("inpaint", "inpaint33", "fill"):
        call["mask_image"] = ref["mask_image"] = images["mask_image"]
    if kind == "fill":  # no negative prompt, guidance-distilled
        emb = {k: v for k, v in emb.items() if not k.startswith("negative_")}
        call.update(num_inference_steps=4, strength=1.0, guidance_scale=3.5)
        ref.update(steps=4, strength=1.0)
    if kind == "kontext":  # the full schedule; the image kept at its size (no resize to Kontext's resolutions)
        call = dict(image=images["image"], num_inference_steps=4, guidance_scale=3.5, _auto_resize=False,
                    max_area=size["height"] * size["width"])
        ref = dict(kind=kind, steps=4, image=images["image"])
    return Sibling(name, pipe, emb, size, call, ref, scale_key, loop)


_BUILT = {}


@pytest.fixture(params=CASES)
def sibling(request):
    """Each sibling pipeline, built once per session, unwrapped after each test."""
    if request.param not in _BUILT:
        _BUILT[request.param] = _build(request.param)
    yield _BUILT[request.param]
    s2fast.unwrap(_BUILT[request.param].pipe)


OPTIONS = {"default": ({}, BATCHED), "unbatched": ({"batch_branches": False}, EXACT)}


@pytest.mark.parametrize("option", OPTIONS)
def test_matches_three_pass_reference(sibling, option):
    extra, tol = OPTIONS[option]
    expected = sibling.reference(MASKS_4, omega=0.5)
    s2fast.wrap(sibling.pipe, S2Config(omega=0.5, masks=MASKS_4, **extra))
    torch.testing.assert_close(sibling(), expected, **tol)
    assert s2fast.trace(sibling.pipe) == MASKS_4
    if option == "unbatched":
        assert (expected - sibling.reference(((),) * 4, omega=0.5)).abs().max() > EFFECT  # S² changed something


@pytest.mark.parametrize("sibling", ["sd3-img2img", "flux-kontext"], indirect=True)
def test_without_cfg_subtracts_from_cond(sibling):
    # One per adapter family (the others share its request; FluxFillPipeline, which never has CFG, is covered by
    # test_matches_three_pass_reference). Kontext without true CFG is how FLUX.1-Kontext-dev is used.
    expected = sibling.reference(MASKS_4, omega=0.5, cfg=False)
    s2fast.wrap(sibling.pipe, S2Config(omega=0.5, masks=MASKS_4))
    torch.testing.assert_close(sibling(cfg=False), expected, **BATCHED)


def test_omega_zero_is_stock(sibling):
    stock = sibling.stock()
    # SD3's loops make one batched [uncond, cond] call, Flux's true CFG two batch-B calls; Fill runs cond only.
    stock_batched = sibling.family == "sd3"
    for batch_branches in (True, False):
        s2fast.wrap(sibling.pipe, S2Config(omega=0.0, batch_branches=batch_branches))
        exact = batch_branches == stock_batched or not sibling.has_cfg
        torch.testing.assert_close(sibling(), stock, **(EXACT if exact else BATCHED))
        assert s2fast.trace(sibling.pipe) == ((),) * 4


@pytest.mark.parametrize("sibling", ["sd3-inpaint33", "flux-kontext"], indirect=True)
def test_two_prompts_line_up_with_their_image_rows(sibling):
    # The rows that carry image channels (SD3's mask and masked image, repeated per prompt and doubled for CFG) or
    # appended image tokens (Kontext, repeated per prompt) line up with the latents' rows at B = 2 too: ω = 0 is the
    # stock result (batched as the stock loop: exact), and S² moves both images.
    twice = {k: torch.cat([v, v]) for k, v in sibling.emb.items()}  # the same prompt, given twice
    stock = sibling(**twice)
    assert stock.shape[0] == 2
    s2fast.wrap(sibling.pipe, S2Config(omega=0.0, batch_branches=sibling.family == "sd3"))
    torch.testing.assert_close(sibling(**twice), stock, **EXACT)
    s2fast.wrap(sibling.pipe, S2Config(omega=0.5, masks=MASKS_4))
    moved = (sibling(**twice) - stock).flatten(1).abs().amax(dim=1)
    assert moved.min() > EFFECT


def test_unwrap_restores_bit_identical_outputs(sibling):
    stock = sibling.stock()
    s2fast.wrap(sibling.pipe, S2Config(omega=0.5, seed=1))
    assert (sibling() - stock).abs().max() > EFFECT
    s2fast.unwrap(sibling.pipe)
    assert "forward" not in sibling.pipe.transformer.__dict__
    torch.testing.assert_close(sibling(), stock, **EXACT)


def test_ip_adapter_is_refused_and_changes_nothing(sibling):
    s2fast.wrap(sibling.pipe, S2Config(omega=0.5, masks=MASKS_4))
    before = sibling()
    embeds = [torch.zeros(1, 1, 8)]
    with pytest.raises(ValueError, match="IP-Adapter"):
        sibling(joint_attention_kwargs={"ip_adapter_image_embeds": embeds})
    torch.testing.assert_close(sibling(), before, **EXACT)  # still wrapped, with the same config
    s2fast.unwrap(sibling.pipe)
    assert "forward" not in sibling.pipe.transformer.__dict__


def test_fused_step_matches_the_unfused_step(sibling, monkeypatch):
    # Inpainting blends the image back after scheduler.step, on the step's x_{t−1}: the fused step, which serves
    # that x_{t−1} from scheduler.step, must leave the blend's input exactly as the stock step does.
    s2fast.wrap(sibling.pipe, S2Config(omega=0.5, masks=MASKS_4, fused_step=False))
    unfused = sibling()
    stock_step = FlowMatchEulerDiscreteScheduler.step
    calls = []
    monkeypatch.setattr(FlowMatchEulerDiscreteScheduler, "step", lambda *a, **k: calls.append(1) or stock_step(*a, **k))
    s2fast.wrap(sibling.pipe, S2Config(omega=0.5, masks=MASKS_4, fused_step=True, step_mode="exact"))
    fused = sibling()
    assert calls == []  # every step was the fused one
    assert torch.equal(fused, unfused)


def test_sgg_skip_pass_matches_the_reference(sibling):
    # SGGConfig's skip pass is S²'s sub-network under another name: with CFG at every step and skip_blocks (1, 3)
    # at steps 2 and 3 (skip_window (0.5, 1) of 4), D + s(C − C_skip) is Eq. 4 with those masks and ω = s.
    expected = sibling.reference(((), (), (1, 3), (1, 3)), omega=0.5)
    s2fast.wrap(sibling.pipe, s2fast.SGGConfig(cfg_window=(0.0, 1.0), skip_window=(0.5, 1.0), skip_blocks=(1, 3),
                                               skip_scale=0.5))
    torch.testing.assert_close(sibling(), expected, **BATCHED)
