"""The attachment of s2fast to a pipeline, tried the ways users break it: hooks added and removed around wrap,
copies and pickles, calls a callback makes, caches, batch shapes the stock forward broadcasts, shared and
replaced transformers.

Tolerances as in test_guidance.py: EXACT where the same ops run at the same batch sizes, BATCHED (atol 2e-5) where
batching changes fp32 GEMM blocking (measured up to 3e-6 on latents of magnitude ~4 after 4 steps of tiny models).
"""

import copy
import pickle

import pytest
import torch
from diffusers.hooks import HookRegistry, ModelHook

import s2fast
from s2fast import S2Config, binding, tiny

EXACT = dict(atol=0.0, rtol=0.0)
BATCHED = dict(atol=2e-5, rtol=1e-5)
EFFECT = 1e-3
MASKS_4 = ((2,), (1, 3), (), (4,))


class CountingHook(ModelHook):
    """A model-level diffusers hook that changes nothing and counts the calls it sees."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def pre_forward(self, module, *args, **kwargs):
        self.calls += 1
        return args, kwargs


def test_hook_added_after_wrap_runs_around_s2_and_unwrap_leaves_it_stock(family):
    stock = family()
    s2fast.wrap(family.pipe, S2Config(omega=0.5, masks=MASKS_4))
    s2 = family()
    registry = HookRegistry.check_if_exists_or_initialize(family.pipe.transformer)
    hook = CountingHook()
    registry.register_hook(hook, "user")
    try:
        torch.testing.assert_close(family(), s2, **EXACT)  # S² beneath the hook: it sees the pipeline's calls
        assert hook.calls == 4 * (2 if family.name == "flux" else 1)
        s2fast.unwrap(family.pipe)
        assert s2fast.config_of(family.pipe) is None
        torch.testing.assert_close(family(), stock, **EXACT)  # stock under the hook, not half-wrapped
        assert hook.calls == 8 * (2 if family.name == "flux" else 1)
        s2fast.wrap(family.pipe, S2Config(omega=0.5, masks=MASKS_4))  # wrap again, under the hook
        torch.testing.assert_close(family(), s2, **EXACT)
    finally:
        registry.remove_hook("user")
    torch.testing.assert_close(family(), s2, **EXACT)  # the hook removed: still S²
    s2fast.unwrap(family.pipe)
    torch.testing.assert_close(family(), stock, **EXACT)


def test_the_model_own_forward_left_by_a_removed_hook_is_accepted_and_restored(family):
    stock = family()
    model = family.pipe.transformer
    registry = HookRegistry.check_if_exists_or_initialize(model)
    registry.register_hook(ModelHook(), "gone")
    registry.remove_hook("gone")
    leftover = model.__dict__["forward"]  # diffusers leaves the bound forward as an instance attribute
    try:
        s2fast.wrap(family.pipe, S2Config(omega=0.5, masks=MASKS_4))
        torch.testing.assert_close(family(), family.reference(MASKS_4, omega=0.5), **BATCHED)
        s2fast.unwrap(family.pipe)
        assert model.__dict__["forward"] is leftover  # put back exactly
        torch.testing.assert_close(family(), stock, **EXACT)
    finally:
        model.__dict__.pop("forward", None)


@pytest.mark.parametrize("cache", ["TextKVCache", "FasterCache"])  # caches with a hook on the model itself
def test_a_cache_enabled_and_disabled_leaves_flux_wrappable(flux, cache):
    model = flux.pipe.transformer
    model.enable_cache(_caches()[cache]())
    model.disable_cache()
    assert "forward" in model.__dict__  # what diffusers leaves behind
    s2fast.wrap(flux.pipe, S2Config(omega=0.5, masks=MASKS_4))
    torch.testing.assert_close(flux(), flux.reference(MASKS_4, omega=0.5), **BATCHED)


def _caches():
    import diffusers

    return {
        "FirstBlockCache": lambda: diffusers.FirstBlockCacheConfig(threshold=0.2),
        "FasterCache": lambda: diffusers.FasterCacheConfig(current_timestep_callback=lambda: 500),
        "TaylorSeerCache": lambda: diffusers.TaylorSeerCacheConfig(),
        "SeaCache": lambda: diffusers.SeaCacheConfig(),
        "TextKVCache": lambda: diffusers.TextKVCacheConfig(),
        "MagCache": lambda: diffusers.MagCacheConfig(mag_ratios=[1.0] * 4, num_inference_steps=4),
        "PyramidAttentionBroadcast": lambda: diffusers.PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=2, current_timestep_callback=lambda: 500),
    }


@pytest.mark.parametrize("cache", list(_caches()))
def test_caches_are_refused_by_name_before_and_after_wrap(flux, cache):
    model = flux.pipe.transformer
    stock = flux()
    model.enable_cache(_caches()[cache]())
    try:
        with pytest.raises(ValueError, match=cache):
            s2fast.wrap(flux.pipe, S2Config(omega=0.5, seed=1))
        assert s2fast.config_of(flux.pipe) is None and binding.find(model) is None
    finally:
        model.disable_cache()
    s2fast.wrap(flux.pipe, S2Config(omega=0.5, seed=1))
    model.enable_cache(_caches()[cache]())  # after wrap: refused at the next call, before any step runs
    try:
        with pytest.raises(ValueError, match=f"added after s2fast.wrap.*{cache}"):
            flux()
    finally:
        model.disable_cache()
    s2fast.wrap(flux.pipe, S2Config(omega=0.0))
    torch.testing.assert_close(flux(), stock, **BATCHED)  # ω = 0 batched against stock's two calls


# FasterCache is left out: the stock pipeline itself fails under it here (its default config expects CFG as one
# batch, Flux's true CFG makes two calls)
@pytest.mark.parametrize("cache", [c for c in _caches() if c != "FasterCache"])
def test_a_call_that_needs_no_subnetwork_runs_under_a_cache_as_stock(flux, cache):
    """ω = 0, a sigma_interval no step falls in, SGG without skip steps: no step needs a sub-network, so the call
    is stock's, cache included (wrap accepts it, the call runs the stock forward: bit for bit); where a step does
    need one, the call is refused naming the cache, before any step runs."""
    model = flux.pipe.transformer
    model.enable_cache(_caches()[cache]())
    try:
        cached = flux()
        configs = [S2Config(omega=0.0), S2Config(omega=0.5, sigma_interval=(5.0, 6.0)),
                   s2fast.SGGConfig(cfg_window=(0.0, 1.0), skip_blocks=(1,), skip_scale=0.0)]
        for config in configs:
            s2fast.wrap(flux.pipe, config)
            torch.testing.assert_close(flux(), cached, **EXACT)
            assert s2fast.trace(flux.pipe) == ((),) * 4
        s2fast.unwrap(flux.pipe)
        s2fast.wrap(flux.pipe, S2Config(omega=0.0))  # enabled after wrap: the same
        torch.testing.assert_close(flux(), cached, **EXACT)
        s2fast.wrap(flux.pipe, S2Config(omega=0.5, seed=1, sigma_interval=(0.0, 1.0)))  # every step needs one
        with pytest.raises(ValueError, match=cache):
            flux()
    finally:
        model.disable_cache()
        s2fast.unwrap(flux.pipe)


def test_a_bad_compile_backend_changes_nothing(sd3):
    good = S2Config(omega=0.5, seed=1)
    s2fast.wrap(sd3.pipe, good)
    before = sd3()
    with pytest.raises(ValueError, match="compile_blocks: 'no_such_backend' is not a torch.compile backend"):
        s2fast.wrap(sd3.pipe, S2Config(compile_blocks="no_such_backend"))
    assert s2fast.config_of(sd3.pipe) is good
    assert all(getattr(b, "_compiled_call_impl", None) is None for b in sd3.pipe.transformer.transformer_blocks)
    torch.testing.assert_close(sd3(), before, **EXACT)
    s2fast.unwrap(sd3.pipe)
    assert "forward" not in sd3.pipe.transformer.__dict__


def test_copies_and_pickles_of_a_wrapped_pipeline_sample_s2(family):
    stock = family()
    config = S2Config(omega=0.5, seed=3)
    s2fast.wrap(family.pipe, config)
    s2 = family()
    assert (s2 - stock).abs().max() > EFFECT
    deep = copy.deepcopy(family.pipe)
    shallow = copy.copy(family.pipe)
    pickled = pickle.loads(pickle.dumps(family.pipe))
    for other in (deep, shallow, pickled):
        assert s2fast.config_of(other) == config
        torch.testing.assert_close(other(**family.kwargs()).images, s2, **EXACT)
        assert s2fast.trace(other) == s2fast.trace(family.pipe)
    # Each copy is a pipeline of its own: unwrapping one leaves the others as they are.
    s2fast.unwrap(shallow)  # shares the original's transformer
    torch.testing.assert_close(shallow(**family.kwargs()).images, stock, **EXACT)
    torch.testing.assert_close(family(), s2, **EXACT)
    s2fast.unwrap(deep)
    assert binding.find(deep.transformer) is None
    torch.testing.assert_close(deep(**family.kwargs()).images, stock, **EXACT)
    torch.testing.assert_close(pickled(**family.kwargs()).images, s2, **EXACT)


def test_a_copy_of_a_pipeline_unwrapped_since_is_unwrapped(sd3):
    stock = sd3()
    s2fast.wrap(sd3.pipe, S2Config(omega=0.5, seed=3))
    shallow = copy.copy(sd3.pipe)
    s2fast.unwrap(sd3.pipe)
    assert s2fast.config_of(shallow) is None
    torch.testing.assert_close(shallow(**sd3.kwargs()).images, stock, **EXACT)


def _preview(pipe, family, latents, t):
    """What a user's callback might do: run the transformer on the cond inputs to preview the current sample."""
    emb = family.emb
    if family.name == "sd3":
        return dict(hidden_states=latents, timestep=t.expand(latents.shape[0]), encoder_hidden_states=emb["prompt_embeds"],
                    pooled_projections=emb["pooled_prompt_embeds"], return_dict=False)
    dtype = latents.dtype
    height = family.size["height"] // pipe.vae_scale_factor
    img_ids = pipe._prepare_latent_image_ids(1, height // 2, height // 2, latents.device, dtype)
    txt_ids = torch.zeros(emb["prompt_embeds"].shape[1], 3, dtype=dtype)
    return dict(hidden_states=latents, timestep=t.expand(1).to(dtype) / 1000, guidance=None,
                pooled_projections=emb["pooled_prompt_embeds"], encoder_hidden_states=emb["prompt_embeds"],
                txt_ids=txt_ids, img_ids=img_ids, return_dict=False)


@pytest.mark.parametrize("omega", [0.0, 0.5])
def test_a_transformer_call_inside_a_callback_runs_the_stock_forward(family, omega):
    s2fast.wrap(family.pipe, S2Config(omega=omega, masks=MASKS_4 if omega else None))
    expected = family()
    model = family.pipe.transformer
    previews = []

    def on_step(pipe, i, t, tensors):
        inputs = _preview(pipe, family, tensors["latents"], t)
        got = pipe.transformer(**inputs)[0]
        previews.append((got, type(model).forward(model, **inputs)[0]))
        return tensors

    got = family(callback_on_step_end=on_step)
    torch.testing.assert_close(got, expected, **EXACT)  # the pipeline's own result did not change
    assert len(previews) == 4
    for preview, stock_forward in previews:
        torch.testing.assert_close(preview, stock_forward, **EXACT)
    assert s2fast.trace(family.pipe) == (MASKS_4 if omega else ((),) * 4)


def test_flux_with_num_images_per_prompt_and_batch_one_embeddings(flux):
    stock = flux(num_images_per_prompt=2)
    for batch_branches in (True, False):
        s2fast.wrap(flux.pipe, S2Config(omega=0.0, batch_branches=batch_branches))
        torch.testing.assert_close(flux(num_images_per_prompt=2), stock, **BATCHED)
    s2fast.wrap(flux.pipe, S2Config(omega=0.5, masks=MASKS_4))
    got = flux(num_images_per_prompt=2)
    doubled = {k: torch.cat([v, v]) for k, v in flux.emb.items()}  # the same prompt, given twice
    expected = flux(**doubled)
    torch.testing.assert_close(got, expected, **BATCHED)
    assert got.shape[0] == 2 and (got - stock).abs().max() > EFFECT


def test_flux_negative_prompt_given_as_the_prompt_tensor_itself(flux):
    same = dict(negative_prompt_embeds=flux.emb["prompt_embeds"],
                negative_pooled_prompt_embeds=flux.emb["pooled_prompt_embeds"])
    s2fast.wrap(flux.pipe, S2Config(omega=0.5, masks=MASKS_4))
    got = flux(**same)
    emb = dict(flux.emb, **same)
    expected = flux.reference_loop(flux.pipe, emb, MASKS_4, steps=4, lam=4.0, omega=0.5, **flux.size)
    torch.testing.assert_close(got, expected, **BATCHED)


def test_one_transformer_shared_by_two_pipelines_serves_each_as_wrapped(sd3):
    from diffusers import StableDiffusion3Pipeline

    other = StableDiffusion3Pipeline(**sd3.pipe.components)
    other.set_progress_bar_config(disable=True)
    stock = sd3()
    masks_b = ((1,), (), (3, 4), (2,))
    s2fast.wrap(sd3.pipe, S2Config(omega=0.5, masks=MASKS_4))
    torch.testing.assert_close(other(**sd3.kwargs()).images, stock, **EXACT)  # not wrapped: stock
    s2fast.wrap(other, S2Config(omega=0.5, masks=masks_b))
    try:
        torch.testing.assert_close(sd3(), sd3.reference(MASKS_4, omega=0.5), **BATCHED)
        torch.testing.assert_close(other(**sd3.kwargs()).images, sd3.reference(masks_b, omega=0.5), **BATCHED)
        s2fast.unwrap(sd3.pipe)
        torch.testing.assert_close(sd3(), stock, **EXACT)
        torch.testing.assert_close(other(**sd3.kwargs()).images, sd3.reference(masks_b, omega=0.5), **BATCHED)
    finally:
        s2fast.unwrap(other)
    assert "forward" not in sd3.pipe.transformer.__dict__


def test_a_transformer_replaced_after_wrap_is_served_or_refused(sd3):
    original = sd3.pipe.transformer
    replacement = tiny.sd3_pipeline(sd3.shape, seed=5, with_vae=False).transformer
    s2fast.wrap(sd3.pipe, S2Config(omega=0.5, masks=MASKS_4))
    try:
        sd3.pipe.transformer = replacement
        got = sd3()
        assert binding.find(replacement) is not None and binding.find(original) is None
        torch.testing.assert_close(got, sd3.reference(MASKS_4, omega=0.5), **BATCHED)  # the new weights, S²
        sd3.pipe.transformer = tiny.flux_pipeline(with_vae=False).transformer  # a model SD3's loop cannot drive
        with pytest.raises(ValueError, match="transformer is a FluxTransformer2DModel"):
            sd3()
        assert s2fast.config_of(sd3.pipe) is not None
    finally:
        sd3.pipe.transformer = original
        s2fast.unwrap(sd3.pipe)
    assert binding.find(replacement) is None and "forward" not in original.__dict__


def test_progress_bar_stand_in_is_the_pipeline_own_and_removed_by_unwrap(sd3):
    s2fast.wrap(sd3.pipe, S2Config(omega=0.5, seed=0))
    assert "progress_bar" in sd3.pipe.__dict__
    with sd3.pipe.progress_bar(total=3) as bar:  # called from outside a pipeline call: the pipeline's own bar
        bar.update()
    s2fast.unwrap(sd3.pipe)
    assert "progress_bar" not in sd3.pipe.__dict__


@pytest.mark.parametrize("omega", [0.0, 0.5])
def test_one_walk_of_the_modules_per_pipeline_call_looks_for_hooks(omega, monkeypatch):
    """The hook check (refused hooks) and the context-parallel lookup both ask whether the transformer carries a
    hook: one walk of its modules per pipeline call answers both (at a launch-bound shape a walk is ~0.2 ms of a
    ~80 ms call), with or without a step that needs a sub-network. A pipeline of its own: a model that carries a
    hook registry is walked again, with module names, to say which hooks it holds."""
    shape = tiny.SD3Shape(num_layers=4, latent_size=8)
    pipe = tiny.sd3_pipeline(shape, with_vae=False)
    kw = dict(tiny.embeddings(shape), **tiny.image_size(pipe, shape), num_inference_steps=2, output_type="latent")
    s2fast.wrap(pipe, S2Config(omega=omega, seed=0))
    pipe(**kw)
    walks = []
    walk = binding._any_hook
    monkeypatch.setattr(binding, "_any_hook", lambda model: walks.append(model) or walk(model))
    pipe(**kw)
    assert walks == [pipe.transformer]
