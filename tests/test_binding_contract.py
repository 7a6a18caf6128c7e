"""The binding is explicit: what each adapter reads, what it implements, who registers it, and pipelines whose
loop switches between two denoisers (tests/two_experts.py, registered like any project's own pipeline)."""

import ast
import inspect
import pathlib

import pytest
import torch
import two_experts

import s2fast
from s2fast import S2Config, binding
from s2fast.adapters import _FAMILIES, _REGISTERED, adapter_class_for, register_adapter
from s2fast.adapters.base import FamilyAdapter, PipelineLocals
from s2fast.adapters.dit import DiTAdapter
from s2fast.digits.pipeline import DigitsFlowPipeline
from s2fast.masks import sample_step

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _registered_pipelines():
    import diffusers

    return [getattr(diffusers, name) for name in _FAMILIES] + list(_REGISTERED)


@pytest.mark.parametrize("pipeline", _registered_pipelines(), ids=lambda p: p.__name__)
def test_every_registered_adapter_is_complete_and_reads_only_what_its_pipeline_has(pipeline):
    import diffusers

    adapter = adapter_class_for(pipeline)()  # an abstract method left out would make this a TypeError
    for model_name in adapter.model_classes:
        assert hasattr(diffusers, model_name), model_name
    call = inspect.unwrap(pipeline.__call__)  # under torch.no_grad's wrapper
    names = set(call.__code__.co_varnames) | set(call.__code__.co_cellvars)
    for name in (*adapter.pipeline_locals, *adapter.optional_locals):
        assert name in names, f"{pipeline.__name__}.__call__ has no local {name!r}"
    init = inspect.signature(pipeline.__init__).parameters
    for name in adapter.denoisers:
        assert name in init, f"{pipeline.__name__} has no component {name!r}"


def test_the_library_registry_names_only_diffusers_pipelines():
    import diffusers

    assert all(hasattr(diffusers, name) for name in _FAMILIES)
    assert DigitsFlowPipeline.__name__ not in _FAMILIES
    assert _REGISTERED[DigitsFlowPipeline].__module__ == "s2fast.digits.adapter"  # registered itself, publicly


def test_an_adapter_reading_an_undeclared_local_fails_loudly(sd3):
    s2fast.wrap(sd3.pipe, S2Config(omega=0.5, seed=0))
    adapter = s2fast.serving.controller_of(sd3.pipe).adapter
    original = type(adapter).request

    def sneaky(self, pipe, call_locals, inputs, memo):
        call_locals["prompt_embeds"]  # a local the SD3 adapter does not declare
        return original(self, pipe, call_locals, inputs, memo)

    type(adapter).request = sneaky
    try:
        with pytest.raises(RuntimeError, match="reads the pipeline local 'prompt_embeds' without declaring it"):
            sd3()
    finally:
        type(adapter).request = original


def test_pipeline_locals_name_a_missing_local_clearly():
    class Fake:
        pass

    with pytest.raises(RuntimeError, match=r"cannot read \['timesteps'\] in Fake.__call__"):
        PipelineLocals({"i": 0, "t": 1, "latents": 2}, type("A", (DiTAdapter,), {
            "pipeline_locals": ("i", "t", "timesteps", "latents")})(), Fake())


def test_naive_three_pass_runs_on_dit():
    from s2_reference import dit_three_pass
    from test_dit import LABELS as DIT_LABELS
    from test_dit import decoded
    from test_dit import run as dit_run

    from s2fast import tiny
    from s2fast.reference import wrap_three_pass

    pipe = tiny.dit_pipeline()
    masks = ((2,), (1, 3), (), (4,))
    wrap_three_pass(pipe, S2Config(omega=0.5, masks=masks))
    expected = decoded(pipe, dit_three_pass(pipe, DIT_LABELS, masks, steps=4, lam=4.0, omega=0.5))
    # the baseline's batched [cond, null] call against the reference's batch-B calls: fp32 batch-size rounding only
    torch.testing.assert_close(dit_run(pipe), expected, atol=2e-5, rtol=1e-5)


def test_register_adapter_refuses_what_it_cannot_use():
    class MyPipeline:
        pass

    class Incomplete(FamilyAdapter):
        def blocks(self, model):
            return []

    with pytest.raises(TypeError, match="must be a class"):
        register_adapter("MyPipeline", DiTAdapter)
    with pytest.raises(TypeError, match="FamilyAdapter subclass"):
        register_adapter(MyPipeline, object)
    with pytest.raises(TypeError, match="does not implement embed, head, request, run_block, skipped_block_output"):
        register_adapter(MyPipeline, Incomplete)
    from diffusers import FluxPipeline

    with pytest.raises(ValueError, match="supports FluxPipeline itself"):
        register_adapter(FluxPipeline, DiTAdapter)
    register_adapter(MyPipeline, DiTAdapter)
    try:
        with pytest.raises(ValueError, match="already has the adapter DiTAdapter"):
            register_adapter(MyPipeline, two_experts.TwoExpertAdapter)
        register_adapter(MyPipeline, two_experts.TwoExpertAdapter, replace=True)
        assert adapter_class_for(MyPipeline) is two_experts.TwoExpertAdapter
        with pytest.raises(ValueError, match=r"MyPipeline\.transformer is a NoneType"):
            s2fast.wrap(MyPipeline())
    finally:
        _REGISTERED.pop(MyPipeline)


def test_kernels_import_nothing_from_s2fast():
    for path in (ROOT / "kernels").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                assert not (node.module or "").startswith("s2fast"), f"{path.name} imports {node.module}"
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("s2fast") for a in node.names), path.name


# --- two denoisers --------------------------------------------------------------------------------------------
LABELS = [3, 7]


@pytest.fixture(scope="module")
def experts():
    return two_experts.build()


def run(pipe, lam=4.0, steps=6):
    return pipe(LABELS, guidance_scale=lam, generator=torch.Generator().manual_seed(0), num_inference_steps=steps)


def test_two_experts_omega_zero_is_stock_and_unwrap_restores_both(experts):
    stock = run(experts)
    s2fast.wrap(experts, S2Config(omega=0.0))
    assert binding.find(experts.transformer) is not None and binding.find(experts.transformer_2) is not None
    torch.testing.assert_close(run(experts), stock, atol=0, rtol=0)  # DiT rows [cond, null]: the stock batch
    s2fast.unwrap(experts)
    assert "forward" not in experts.transformer.__dict__ and "forward" not in experts.transformer_2.__dict__
    torch.testing.assert_close(run(experts), stock, atol=0, rtol=0)


@pytest.mark.parametrize("lam", [4.0, 1.0], ids=["cfg", "no-cfg"])
def test_two_experts_match_a_plain_three_pass_loop(experts, lam):
    masks = ((1,), (2,), (), (1, 2), (2,), (1,))  # valid on both experts (6 and 3 blocks)
    expected = two_experts.three_pass(experts, LABELS, masks, steps=6, lam=lam, omega=0.5)
    s2fast.wrap(experts, S2Config(omega=0.5, masks=masks))
    try:
        got = run(experts, lam=lam)
        # batched rows against batch-B forwards: fp32 batch-size rounding (~1e-6); S² moves the result by > 1e-3
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)
        assert s2fast.trace(experts) == masks
        assert s2fast.serving.controller_of(experts)._run.denoisers == ["transformer"] * 3 + ["transformer_2"] * 3
        s2fast.wrap(experts, S2Config(omega=0.0))
        assert (run(experts, lam=lam) - got).abs().max() > 1e-3
    finally:
        s2fast.unwrap(experts)


def test_two_experts_masks_follow_the_block_count_of_the_expert_that_runs(experts):
    config = S2Config(omega=0.5, seed=4, drop_ratio=0.3)
    s2fast.wrap(experts, config)
    try:
        run(experts, steps=8)
        controller = s2fast.serving.controller_of(experts)
        blocks = {"transformer": 6, "transformer_2": 3}
        for i, (mask, name) in enumerate(zip(s2fast.trace(experts), controller._run.denoisers)):
            # 6 blocks, block 0 protected: round(0.3 · 5) = 2 dropped; 3 blocks: round(0.3 · 2) = 1
            assert mask == sample_step(4, i, config, blocks[name])[0]
            assert len(mask) == (2 if name == "transformer" else 1) and max(mask) < blocks[name]
        assert set(controller._run.denoisers) == set(blocks)
        with pytest.raises(ValueError, match="drops block 4, but the model has 3 blocks"):
            s2fast.wrap(experts, S2Config(omega=0.5, masks=((4,),) * 8))
        assert s2fast.config_of(experts) is config
    finally:
        s2fast.unwrap(experts)
