"""SGGConfig (segmented guidance and skip-layer guidance) through wrap(), against plain loops written from the formula
(tests/sgg_reference.py), per family; rows computed per step against the plan; SD3's own skip_guidance_layers.

Tolerances (as in test_guidance.py):
- EXACT (0): with batch_branches off every branch runs at batch B like the reference's separate forwards, and a
  forked skip pass is the very state a recompute would produce; the combination is the formula's ops
  (D − s(S − C) and D + s(C − S) round identically: negation is exact).
- BATCHED (atol 2e-5, rtol 1e-5): batched rows change the CPU GEMM blocking, ~1e-7 relative per op; measured
  up to ~3e-6 over a few steps of tiny models. 2e-5 leaves margin and stays far below EFFECT.
- EFFECT (1e-3): each guidance term must move the result by more than this, so every comparison can fail.
"""

import math

import pytest
import torch
from sgg_reference import Settings, dit_sgg, flux_sgg, in_window, planned_rows, sd3_sgg

import s2fast
from s2fast import S2Config, SGGConfig, tiny
from s2fast.digits.model import build_scheduler, build_transformer
from s2fast.digits.pipeline import DigitsFlowPipeline

EXACT = dict(atol=0.0, rtol=0.0)
BATCHED = dict(atol=2e-5, rtol=1e-5)
EFFECT = 1e-3
STEPS = 6
LAM = 4.0

# The cases of the formula: SGG's split, SD3.5's SLG window, overlapping windows, linear schedules on both.
CASES = {
    "sgg-split": dict(cfg_window=(0.0, 0.5), skip_window=(0.5, 1.0)),
    "slg-window": dict(cfg_window=(0.0, 1.0), skip_window=(0.01, 0.2), skip_scale=2.8),
    "overlap": dict(cfg_window=(0.0, 0.7), skip_window=(0.3, 1.0), skip_scale=1.5),
    "linear": dict(cfg_window=(0.0, 0.67), skip_window=(0.34, 1.0), cfg_schedule="linear", cfg_delta=1.5,
                   skip_schedule="linear", skip_delta=2.0),
}


# --- the families -------------------------------------------------------------------------------------------------
class Family:
    """A tiny pipeline, how to call it, its SGG reference loop, and skip blocks that fit its block list."""

    def __init__(self, name, pipe, call, reference, skip_blocks, num_blocks, rows_per_branch):
        self.name, self.pipe, self._call, self._reference = name, pipe, call, reference
        self.skip_blocks, self.num_blocks, self.rows_per_branch = skip_blocks, num_blocks, rows_per_branch

    def settings(self, **case):
        return Settings(skip_blocks=self.skip_blocks, **case)

    def __call__(self, steps=STEPS, lam=LAM, cfg=True):
        return self._call(steps, lam, cfg)

    def reference(self, settings, steps=STEPS, lam=LAM, cfg=True):
        return self._reference(settings, steps, lam, cfg)


def _sd3_like(name, shape, builder, reference, scale_key, skip_blocks, num_blocks):
    pipe = builder(shape)
    emb, size = tiny.embeddings(shape), tiny.image_size(pipe, shape)

    def call(steps, lam, cfg):
        kw = dict(emb, **size, num_inference_steps=steps, output_type="latent", generator=torch.Generator().manual_seed(0))
        kw[scale_key] = lam if cfg else 1.0
        if not cfg:
            kw.pop("negative_prompt_embeds")
            kw.pop("negative_pooled_prompt_embeds")
        return pipe(**kw).images

    def ref(settings, steps, lam, cfg):
        return reference(pipe, emb, settings, steps=steps, lam=lam, cfg=cfg, **size)

    return Family(name, pipe, call, ref, skip_blocks, num_blocks, 1)


LABELS = {"dit": [3, 207], "digits": [3, 7, 0]}


def _dit_like(name, pipe, null_class, skip_blocks, num_blocks, decode):
    labels = LABELS[name]

    def call(steps, lam, cfg):
        return pipe(labels, guidance_scale=lam if cfg else 1.0, num_inference_steps=steps, output_type="pt",
                    generator=torch.Generator().manual_seed(0)).images

    def ref(settings, steps, lam, cfg):
        latents = dit_sgg(pipe, labels, settings, steps=steps, lam=lam if cfg else 1.0, null_class=null_class)
        return decode(latents)

    return Family(name, pipe, call, ref, skip_blocks, num_blocks, len(labels))


def _build(name):
    if name == "sd3":
        shape = tiny.SD3Shape()
        return _sd3_like(name, shape, tiny.sd3_pipeline, sd3_sgg, "guidance_scale", (2, 3), shape.num_layers)
    if name == "flux":
        shape = tiny.FluxShape()
        # blocks 1 (double-stream) and 3 (single-stream): the skip pass crosses the two kinds of block
        return _sd3_like(name, shape, tiny.flux_pipeline, flux_sgg, "true_cfg_scale", (1, 3),
                         shape.num_layers + shape.num_single_layers)
    if name == "dit":
        pipe = tiny.dit_pipeline()

        def decode(latents):  # DiTPipeline's own decode, for the reference's latents
            return (pipe.vae.decode(1 / pipe.vae.config.scaling_factor * latents).sample / 2 + 0.5).clamp(0, 1)

        return _dit_like(name, pipe, 1000, (2, 3), tiny.DiTShape().num_layers, decode)
    torch.manual_seed(0)  # random weights at a quarter of the real width: what is tested does not depend on training
    pipe = DigitsFlowPipeline(build_transformer(num_layers=4, attention_head_dim=8).eval(), build_scheduler())
    pipe.set_progress_bar_config(disable=True)
    return _dit_like(name, pipe, 10, (1, 2), 4, lambda latents: (latents / 2 + 0.5).clamp(0, 1))


FAMILIES = ("sd3", "flux", "dit", "digits")


@pytest.fixture(scope="module")
def built():
    return {}


@pytest.fixture(params=FAMILIES)
def fam(request, built):
    if request.param not in built:
        built[request.param] = _build(request.param)
    family = built[request.param]
    yield family
    s2fast.unwrap(family.pipe)


@pytest.fixture
def sd3(built):
    if "sd3" not in built:
        built["sd3"] = _build("sd3")
    yield built["sd3"]
    s2fast.unwrap(built["sd3"].pipe)


# --- results against the formula ------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES)
def test_matches_the_formula_loop(fam, case):
    settings = fam.settings(**CASES[case])
    expected = fam.reference(settings)
    s2fast.wrap(fam.pipe, settings.as_config())
    got = fam()
    torch.testing.assert_close(got, expected, **BATCHED)
    # each term matters: without the skip term, or without CFG, the result moves by more than EFFECT
    no_skip = fam.reference(Settings(**{**vars(settings), "skip_scale": 0.0, "skip_delta": 0.0}))
    no_cfg = fam.reference(Settings(**{**vars(settings), "cfg_window": (0.99, 1.0)}))
    assert (got - no_skip).abs().max() > EFFECT and (got - no_cfg).abs().max() > EFFECT


@pytest.mark.parametrize("case", ["sgg-split", "linear"])
def test_unbatched_rows_are_bit_identical_to_the_formula_loop(fam, case):
    settings = fam.settings(**CASES[case])
    s2fast.wrap(fam.pipe, settings.as_config(batch_branches=False))
    torch.testing.assert_close(fam(), fam.reference(settings), **EXACT)


def test_without_cfg_the_skip_term_still_applies(fam):
    """A pipeline call without CFG (λ = 1, Flux without true CFG) has no uncond rows: D = D_c + s(D_c − D_skip)."""
    settings = fam.settings(**CASES["overlap"])
    s2fast.wrap(fam.pipe, settings.as_config())
    got = fam(cfg=False)
    torch.testing.assert_close(got, fam.reference(settings, cfg=False), **BATCHED)
    s2fast.unwrap(fam.pipe)
    assert (got - fam(cfg=False)).abs().max() > EFFECT  # the stock call without guidance differs


# --- the plan: rows computed per step ------------------------------------------------------------------------------
class BlockCalls:
    """Rows each block call computes, grouped by step: block 0 runs exactly once per step (the skip rows fork
    later), so each of its calls starts a step."""

    def __init__(self, blocks):
        self.steps = []
        self.handles = [b.register_forward_pre_hook(self._hook(j), with_kwargs=True) for j, b in enumerate(blocks)]

    def _hook(self, j):
        def hook(module, args, kwargs):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            if j == 0:
                self.steps.append([])
            self.steps[-1].append((j, hidden.shape[0]))
        return hook

    def rows_per_step(self):
        return [sum(rows for _, rows in step) for step in self.steps]

    def close(self):
        for h in self.handles:
            h.remove()


def _blocks(pipe):
    t = pipe.transformer
    return [*t.transformer_blocks, *getattr(t, "single_transformer_blocks", [])]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("cfg", [True, False], ids=["cfg", "no-cfg"])
def test_rows_per_step_follow_the_plan(fam, case, cfg):
    """No uncond rows outside cfg_window; the skip rows start at min(skip_blocks) and skip skip_blocks."""
    settings = fam.settings(**CASES[case])
    s2fast.wrap(fam.pipe, settings.as_config(fork_mode="separate"))  # the lanes counted below are separate ones
    calls = BlockCalls(_blocks(fam.pipe))
    try:
        fam(cfg=cfg)
    finally:
        calls.close()
    b, k = fam.rows_per_branch, min(settings.skip_blocks)
    assert calls.rows_per_step() == [r * b for r in planned_rows(settings, STEPS, fam.num_blocks, cfg)]
    for i, step in enumerate(calls.steps):
        # block by block: the cond rows (with the uncond rows, in one call, inside cfg_window), then the skip rows
        # from min(skip_blocks) on, except at the skipped blocks (fork_mode "separate": a lane of their own)
        main = 2 * b if cfg and in_window(i, STEPS, settings.cfg_window) else b
        skip = in_window(i, STEPS, settings.skip_window)
        expected = [(j, rows) for j in range(fam.num_blocks)
                    for rows in [main] + ([b] if skip and j >= k and j not in settings.skip_blocks else [])]
        assert step == expected, f"step {i}"


def test_trace_config_of_and_unwrap(sd3):
    stock = sd3()
    config = sd3.settings(**CASES["sgg-split"]).as_config()
    s2fast.wrap(sd3.pipe, config)
    guided = sd3()
    assert s2fast.config_of(sd3.pipe) is config
    assert s2fast.trace(sd3.pipe) == tuple((2, 3) if i >= STEPS // 2 else () for i in range(STEPS))
    assert (guided - stock).abs().max() > EFFECT
    s2fast.unwrap(sd3.pipe)
    assert s2fast.config_of(sd3.pipe) is None
    assert torch.equal(sd3(), stock)


def test_fused_exact_step_is_bit_identical_to_the_unfused_step(sd3):
    """The fused guidance + scheduler step (torch reference on CPU) with cond-only steps and scheduled scales."""
    settings = sd3.settings(**CASES["linear"])
    s2fast.wrap(sd3.pipe, settings.as_config(fused_step=False))
    unfused = sd3()
    s2fast.wrap(sd3.pipe, settings.as_config(fused_step=True, step_mode="exact"))
    assert torch.equal(sd3(), unfused)


# --- skip-layer guidance against SD3's own skip_guidance_layers -------------------------------------------------------
def _stock_slg(sd3, steps, start, stop, scale):
    return sd3.pipe(**dict(tiny.embeddings(tiny.SD3Shape()), **tiny.image_size(sd3.pipe, tiny.SD3Shape())),
                    num_inference_steps=steps, guidance_scale=LAM, output_type="latent",
                    generator=torch.Generator().manual_seed(0), skip_guidance_layers=list(sd3.skip_blocks),
                    skip_layer_guidance_scale=scale, skip_layer_guidance_start=start,
                    skip_layer_guidance_stop=stop).images


def test_slg_matches_sd3s_own_skip_guidance_layers(sd3):
    """diffusers' SD3 runs the skip pass where num_inference_steps·start < i < num_inference_steps·stop (strict at
    both ends), SGG where start·N ≤ i < stop·N. With SD3.5's start 0.01 and N < 100, start·N is not an integer, so
    both pick the same steps (stop is strict in both): here, N = 10, start 0.01, stop 0.2 → step 1 in both; and
    N = 10, stop 0.45 → steps 1–4. The rest is the same formula: diffusers adds (C − C_skip)·scale to its CFG
    result, with C from the batched [uncond, cond] call and C_skip from a separate batch-1 forward with skip_layers
    (s2fast forks C_skip off the batched cond rows: batch rounding only)."""
    for stop in (0.2, 0.45):
        stock = _stock_slg(sd3, 10, 0.01, stop, 2.8)
        config = SGGConfig(cfg_window=(0.0, 1.0), skip_window=(0.01, stop), skip_blocks=sd3.skip_blocks,
                           skip_scale=2.8)
        s2fast.wrap(sd3.pipe, config)
        got = sd3(steps=10)
        s2fast.unwrap(sd3.pipe)
        torch.testing.assert_close(got, stock, **BATCHED)
        assert (got - sd3(steps=10)).abs().max() > EFFECT  # the skip term is there: plain CFG differs


def test_where_sd3s_window_differs_sgg_follows_its_formula(sd3):
    """skip_window (0.25, 0.75) over 4 steps: SGG takes steps 1 and 2 (0.25·4 = 1 ≤ i), diffusers step 2 only
    (strict 1 < i). s2fast follows the formula, so it matches the formula loop and not diffusers there."""
    settings = sd3.settings(cfg_window=(0.0, 1.0), skip_window=(0.25, 0.75), skip_scale=2.8)
    s2fast.wrap(sd3.pipe, settings.as_config())
    got = sd3(steps=4)
    s2fast.unwrap(sd3.pipe)
    torch.testing.assert_close(got, sd3.reference(settings, steps=4), **BATCHED)
    assert (got - _stock_slg(sd3, 4, 0.25, 0.75, 2.8)).abs().max() > EFFECT


# --- bad values ---------------------------------------------------------------------------------------------------------
BAD = {
    "cfg_window reversed": (dict(cfg_window=(0.6, 0.4)), "cfg_window"),
    "cfg_window empty": (dict(cfg_window=(0.5, 0.5)), "cfg_window"),
    "cfg_window above 1": (dict(cfg_window=(0.0, 1.5)), "cfg_window"),
    "skip_window below 0": (dict(skip_window=(-0.1, 0.5)), "skip_window"),
    "skip_window one number": (dict(skip_window=(0.5,)), "skip_window"),
    "skip_window nan": (dict(skip_window=(math.nan, 0.5)), "skip_window"),
    "skip_window string": (dict(skip_window="0.5"), "skip_window"),
    "skip_blocks empty": (dict(skip_blocks=()), "skip_blocks"),
    "skip_blocks negative": (dict(skip_blocks=(-1,)), "skip_blocks"),
    "skip_blocks repeated": (dict(skip_blocks=(2, 2)), "skip_blocks"),
    "skip_blocks float": (dict(skip_blocks=(2.0,)), "skip_blocks"),
    "skip_scale inf": (dict(skip_scale=math.inf), "skip_scale"),
    "skip_scale nan": (dict(skip_scale=math.nan), "skip_scale"),
    "skip_scale string": (dict(skip_scale="3"), "skip_scale"),
    "cfg_delta inf": (dict(cfg_delta=-math.inf), "cfg_delta"),
    "skip_delta too large": (dict(skip_delta=10**400), "skip_delta"),
    "cfg_schedule unknown": (dict(cfg_schedule="cosine"), "cfg_schedule"),
    "skip_schedule not a string": (dict(skip_schedule=1), "skip_schedule"),
    "fork_mode unknown": (dict(fork_mode="fused"), "SGGConfig.fork_mode"),
    "batch_branches not bool": (dict(batch_branches=1), "SGGConfig.batch_branches"),
    "attention unknown": (dict(attention="fast"), "SGGConfig.attention"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_values_name_the_field(case):
    kwargs, words = BAD[case]
    with pytest.raises(ValueError, match=words):
        SGGConfig(**kwargs)


@pytest.mark.parametrize("blocks, words", [((2, 6), "block 6"), (tuple(range(6)), "covers all 6 blocks")])
def test_blocks_the_model_lacks_are_refused_at_wrap_and_change_nothing(sd3, blocks, words):
    before = S2Config(omega=0.5, seed=0)
    s2fast.wrap(sd3.pipe, before)
    expected = sd3()
    with pytest.raises(ValueError, match=f"SGGConfig.skip_blocks.*{words}"):
        s2fast.wrap(sd3.pipe, SGGConfig(skip_blocks=blocks))
    assert s2fast.config_of(sd3.pipe) is before
    assert torch.equal(sd3(), expected)


def test_config_normalises_and_replaces():
    import numpy as np

    c = SGGConfig(cfg_window=[0, np.float32(0.5)], skip_blocks=[9, 7, 8], skip_scale=np.int64(3))
    assert c.cfg_window == (0.0, 0.5) and c.skip_blocks == (7, 8, 9) and type(c.skip_scale) is float
    assert c == SGGConfig() and hash(c) == hash(SGGConfig())
    assert c.replace(skip_scale=1.0).skip_scale == 1.0
    with pytest.raises(ValueError, match="skip_scale"):
        c.replace(skip_scale=math.nan)
    with pytest.raises(TypeError, match="S2Config or an SGGConfig"):
        s2fast.wrap(object(), dict(skip_scale=1.0))


def test_block_graphs_serve_both_row_shapes_and_equal_eager(sd3):
    """Block graphs (EagerBackend: the CUDA graph contract on the CPU): the [uncond, cond] steps and the cond-only
    steps each warm up once (the first call), later calls only replay, and the result is the eager one bit for
    bit."""
    from s2fast.graphs import EagerBackend

    config = sd3.settings(**CASES["overlap"]).as_config()
    s2fast.wrap(sd3.pipe, config)
    eager = sd3()
    s2fast.wrap(sd3.pipe, config, _graph_backend=EagerBackend())
    first = sd3()
    captured = s2fast.graph_stats(sd3.pipe)["captures"]
    again = sd3()
    stats = s2fast.graph_stats(sd3.pipe)
    assert torch.equal(first, eager) and torch.equal(again, eager)
    assert stats["captures"] == captured and stats["replays"] > 0 and stats["eager_calls"] == 0
