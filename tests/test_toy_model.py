"""The toy denoiser runs through s2fast's engine: predictions and samples equal a plain loop written here."""

import pytest
import torch
from s2fast_eval.quality.toy_model import Guidance, ToyAdapter, ToyDenoiser, Trained, sample, subnet_schedule, train
from s2fast_eval.quality.toys import MIXTURE_2D

from s2fast.adapters.base import BranchRows
from s2fast.engine import EngineOptions, predict

# The engine batches [uncond, cond] where this file's loop runs them apart: fp32 GEMMs at different batch sizes
# may round differently (~1e-7 relative); 1e-5 leaves room over 16 steps and fails on any real difference
# (each guidance term moves samples by > 1e-2).
TOL = dict(atol=1e-5, rtol=1e-5)


def tiny_trained(seed=0):
    torch.manual_seed(seed)
    model = ToyDenoiser(2, 4, hidden=16, num_blocks=8).eval()
    torch.manual_seed(seed + 1)
    weak = ToyDenoiser(2, 4, hidden=16, num_blocks=8).eval()
    return Trained(model, weak, [])


def plain_forward(model, x, sigma, labels, dropped=()):
    h, c = model.embed(x, sigma, labels)
    for j, block in enumerate(model.blocks):
        if j not in dropped:
            h = block(h, c)
    return model.head(h)


@torch.no_grad()
def test_engine_predictions_equal_plain_forwards():
    model = tiny_trained().model
    x, sigma, labels = torch.randn(6, 2), torch.rand(6), torch.arange(6) % 4
    null = torch.full_like(labels, 4)
    rows = BranchRows(ToyAdapter.batched_inputs, 2, branches=[dict(hidden_states=x, timestep=sigma, labels=null),
                                                               dict(hidden_states=x, timestep=sigma, labels=labels)])
    u, c, s1, s2 = predict(ToyAdapter(), model, rows, [(2, 5), (1,)], EngineOptions())
    torch.testing.assert_close(u, model(x, sigma, null), **TOL)
    torch.testing.assert_close(c, model(x, sigma, labels), **TOL)
    torch.testing.assert_close(s1, plain_forward(model, x, sigma, labels, (2, 5)), **TOL)
    torch.testing.assert_close(s2, plain_forward(model, x, sigma, labels, (1,)), **TOL)
    assert (s1 - c).abs().max() > 1e-3  # the skip changes the prediction: the comparison is not vacuous


@pytest.mark.parametrize("guidance", [Guidance("cfg", 3.0), Guidance("s2", 3.0, 0.5, drop_ratio=0.3),
                                      Guidance("s2", 3.0, 0.5, num_masks=3, drop_ratio=0.3),
                                      Guidance("skip", 3.0, 0.5, block=3), Guidance("auto", 2.0), Guidance("none")],
                         ids=lambda g: g.label)
@torch.no_grad()
def test_sampling_equals_a_plain_guidance_loop(guidance):
    trained, steps = tiny_trained(), 16
    model, labels = trained.model, torch.arange(8) % 4
    got = sample(trained, labels, guidance, steps=steps, seed=3)["samples"]
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(3))
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    null = torch.full_like(labels, 4)
    masks = subnet_schedule(guidance, steps, 8)
    for i in range(steps):
        sigma = sigmas[i].expand(8)
        c = model(x, sigma, labels)
        if guidance.kind == "none":
            d = c
        elif guidance.kind == "auto":
            w = trained.weak(x, sigma, labels)
            d = w + guidance.lam * (c - w)
        else:
            u = model(x, sigma, null)
            d = u + guidance.lam * (c - u)
            if masks[i]:
                s = torch.stack([plain_forward(model, x, sigma, labels, m) for m in masks[i]]).mean(0)
                d = d - guidance.omega * (s - c)
        x = x + (sigmas[i + 1] - sigmas[i]) * d
    torch.testing.assert_close(got, x, **TOL)


def test_guidance_kinds_are_checked():
    with pytest.raises(ValueError, match="Guidance.kind"):
        sample(tiny_trained(), torch.zeros(2, dtype=torch.long), Guidance("pag"), steps=2)


def test_training_lowers_the_loss_and_keeps_an_earlier_checkpoint():
    trained = train(MIXTURE_2D, steps=80, batch=256, hidden=32, seed=0)
    first, last = sum(trained.losses[:10]) / 10, sum(trained.losses[-10:]) / 10
    assert last < 0.8 * first
    weak_params = torch.cat([p.flatten() for p in trained.weak.parameters()])
    params = torch.cat([p.flatten() for p in trained.model.parameters()])
    assert not torch.equal(weak_params, params)  # the weak model is the step-8 checkpoint, not the final one


def test_toy_evaluation_runs_end_to_end(tmp_path):
    import json

    from PIL import Image
    from s2fast_eval.quality import toy_eval

    toy_eval.main(["--mixture", "2d", "--out", str(tmp_path), "--train-steps", "20", "--samples", "64",
                   "--seeds", "2", "--sampling-steps", "4", "--lams", "3", "--omegas", "0.5"])
    result = json.loads((tmp_path / "results.json").read_text())["results"][0]
    methods = [row["method"] for row in result["rows"]]
    # none, CFG, AutoGuidance, S², naive S², and a fixed skip of each of the 8 blocks
    assert len(methods) == 5 + 8 and methods[0] == "none" and methods[-1].startswith("skip[7]")
    assert all(len(row["sliced_w1"]) == 2 for row in result["rows"])  # one value per seed
    assert "| S² λ=3.0 ω=0.5 |" in (tmp_path / "results.md").read_text()
    assert Image.open(tmp_path / "toy_2d.png").size == (5 * 360, 384)
