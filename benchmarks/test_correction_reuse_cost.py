"""S² with correction reuse (S2Config(correction_every=k)) against stock CFG and S² at k = 1.

1. test_reuse_sample: per-sample cost on the 24-block SD3-shaped transformer of test_step_cost.py (hidden 256,
   32×32 latents, 77 text tokens; random weights, fp32, CPU unless CUDA is there). A "sample" is the transformer
   work and the guidance combination of every step (no scheduler, no VAE: the same for every method), with the
   masks S2Config(seed=0) draws, run as the controller runs them: s2fast's plan on its engine, the reuse steps
   with the uncond/cond rows only and the stored Δ. Cases cfg-stock (the stock forward on [uncond, cond], the
   baseline), s2-k1, s2-k2, s2-k3. Exact block-rows per sample (and their ratio to CFG's, the floor) go to
   extra_info and the summary:

       CFG: 2L·n        S², k: 2L·n + Σ over the computed S² steps of (L − k_i − d)

   (k_i: the first dropped block of step i, d: the blocks it drops; s2fast/engine.py's block_rows).

2. test_digits_output_shift: how far k = 2, 3 move the trained digits pipeline's output from k = 1, relative to how
   far S² moves it from CFG: mean |x_k − x_1| / mean |x_1 − x_CFG| over a batch (same seeds and masks), and the
   share of S²'s effect x_k keeps, ⟨x_k − x_CFG, x_1 − x_CFG⟩ / |x_1 − x_CFG|². Not a timing; the numbers are
   printed and written to .benchmarks/correction_reuse_shift.json.

    OMP_NUM_THREADS=1 .venv/bin/pytest benchmarks/test_correction_reuse_cost.py --benchmark-only -s
"""

import json
from pathlib import Path

import pytest
import torch
from s2fast.kernels import correction_of, guided_prediction

import s2fast
from s2fast import S2Config, plan, tiny
from s2fast.adapters.base import BranchRows
from s2fast.adapters.sd3 import SD3Adapter
from s2fast.engine import block_rows, predict

SHAPE = tiny.BENCH_SD3
L = SHAPE.num_layers
LAMBDA = 4.5      # SD3-medium's usual guidance scale
STEPS = 6         # k = 2 and k = 3 both divide it: the per-sample ratio is that of any multiple of 6 steps
ROUNDS = 10
EVERY = (1, 2, 3)
SEED = 0


@pytest.fixture(scope="module")
def setup():
    torch.set_grad_enabled(False)
    torch.set_num_threads(1)
    pipe = tiny.sd3_pipeline(SHAPE, with_vae=False)
    model, adapter = pipe.transformer, SD3Adapter()
    rows = BranchRows(adapter.batched_inputs, 2, stacked=tiny.sd3_step_inputs(SHAPE))
    yield model, adapter, rows
    torch.set_grad_enabled(True)


def reuse_plan(every):
    """The steps as the controller runs them for one denoiser: plan.guidance_steps, then with_correction_reuse."""
    config = S2Config(seed=SEED, correction_every=every)
    steps, reused = [], None
    for step in plan.guidance_steps(config, STEPS, L, seed=SEED):
        step = plan.with_correction_reuse(config, step, reused)
        if step.correction == "computed":
            reused = 0
        elif step.correction == "reused":
            reused += 1
        steps.append(step)
    return steps


def _stock_cfg(model, rows):
    out = []
    for _ in range(STEPS):
        u, c = model(**rows.stacked(), return_dict=False)[0].chunk(2)
        out.append(guided_prediction(c, u, [], LAMBDA, 0.0))
    return out


def _s2fast(model, adapter, rows, steps):
    out, delta = [], None
    for step in steps:
        preds = predict(adapter, model, rows, step.subnets if step.computes_subnets else ())
        uncond, cond, subs = preds[0], preds[1], preds[2:]
        if step.reuse_correction:
            out.append(guided_prediction(cond, uncond, [], LAMBDA, step.omega, correction=delta))
        else:
            if step.correction == "computed":
                delta = correction_of(cond, subs)
            out.append(guided_prediction(cond, uncond, subs, LAMBDA, step.omega))
    return out


def block_rows_per_sample(steps):
    return sum(block_rows(L, 2, step.subnets if step.computes_subnets else ()) for step in steps)


def test_reuse_sample(interleaved, setup):
    model, adapter, rows = setup
    plans = {k: reuse_plan(k) for k in EVERY}
    assert [s.subnets for s in plans[2]] == [s.subnets for s in plans[1]]  # the masks do not depend on k
    cases = {"cfg-stock": lambda: _stock_cfg(model, rows)}
    for k in EVERY:
        cases[f"s2-k{k}"] = lambda k=k: _s2fast(model, adapter, rows, plans[k])
    stock_rows = 2 * L * STEPS
    extra = {"cfg-stock": {"floor_ratio": 1.0, "block_rows": stock_rows}}
    for k in EVERY:
        rows_k = block_rows_per_sample(plans[k])
        extra[f"s2-k{k}"] = {"floor_ratio": rows_k / stock_rows, "block_rows": rows_k,
                             "computed_steps": sum(s.correction == "computed" for s in plans[k])}
    for k in EVERY:
        print(f"s2-k{k}: {extra[f's2-k{k}']['block_rows']} block-rows per sample, CFG {stock_rows}, masks "
              f"{[s.subnets for s in plans[k]]}, {[s.correction for s in plans[k]]}")
    interleaved(f"sd3-24x256 sample of {STEPS} steps, S² with correction reuse (seed {SEED})", cases, "cfg-stock",
                ROUNDS, extra)


def test_digits_output_shift():
    from s2fast.digits.pipeline import load_default_pipeline

    torch.set_num_threads(1)
    pipe = load_default_pipeline()
    labels = [d for d in range(10) for _ in range(10)]
    steps = 28

    def sample(config):
        s2fast.wrap(pipe, config)
        try:
            return pipe(labels, guidance_scale=4.0, num_inference_steps=steps, output_type="pt",
                        generator=torch.Generator().manual_seed(0)).images
        finally:
            s2fast.unwrap(pipe)

    cfg = sample(S2Config(omega=0.0))
    results = {}
    for omega in (0.25, 1.0):
        s2 = sample(S2Config(omega=omega, seed=SEED))
        base = (s2 - cfg).abs().mean().item()
        results[f"omega={omega}"] = {"mean|S2-CFG|": base}
        for k in (2, 3):
            shifted = sample(S2Config(omega=omega, seed=SEED, correction_every=k))
            diff = (shifted - s2).abs().mean().item()
            # the share of S²'s effect (x_1 − x_CFG) that x_k keeps: its projection onto that direction
            effect = (s2 - cfg).flatten()
            kept = torch.dot((shifted - cfg).flatten(), effect).item() / torch.dot(effect, effect).item()
            results[f"omega={omega}"][f"k={k}"] = {"mean|x_k-x_1|": diff, "relative": diff / base, "kept": kept}
    print(json.dumps(results, indent=1))
    out = Path(".benchmarks")
    out.mkdir(exist_ok=True)
    (out / "correction_reuse_shift.json").write_text(json.dumps(results, indent=1))
