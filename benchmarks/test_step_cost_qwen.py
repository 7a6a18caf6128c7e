"""Per-step cost of S² against CFG on a 24-block Qwen-Image-shaped transformer (dual-stream blocks: separate image
and text weights, joint attention; 4 heads × 64, 32×32 latents packed 2×2 = 256 image tokens, 77 text tokens;
random weights, fp32, CPU unless CUDA is there): the transformer work, the Eq. 4 combination and the pipeline's norm
rescale of one denoising step, without the scheduler or the VAE (the same for every method).

QwenImagePipeline's loop calls the transformer twice per step, cond then uncond, at batch B each, then rescales
the combination to the cond prediction's norm: that is the baseline ("cfg-stock"). The naive S² adds a third
batch-B call with the masked blocks skipped; s2fast runs uncond and cond in one batch-2B call (equal-length, unmasked
embeddings here) and forks the sub-network off the cond rows at its first dropped block. The block-row floor (the
cost model of docs/PERFORMANCE.md) of each case is in extra_info and in the summary.

    .venv/bin/pytest benchmarks/test_step_cost_qwen.py --benchmark-only
"""

import pytest
import torch
from s2fast.kernels import guided_prediction

from s2fast import tiny_families
from s2fast.adapters.base import BranchRows
from s2fast.adapters.qwenimage import QwenImageAdapter, norm_rescale
from s2fast.engine import EngineOptions, block_rows, predict
from s2fast.reference import skipping

SHAPE = tiny_families.BENCH_QWEN
L = SHAPE.num_layers
LAMBDA, OMEGA = 5.0, 0.25
# Two of the 23 droppable blocks, as drop_ratio 0.1 draws: first dropped block at E[k] = 8, at 1 (worst) and 20.
MASKS = {"k8": (8, 15), "k1": (1, 12), "k20": (20, 22)}
ROUNDS = 6  # a round is about 12 batch-1 forwards of this model: seconds each on a loaded 2-core CPU


@pytest.fixture(scope="module")
def setup():
    torch.set_grad_enabled(False)
    torch.manual_seed(0)
    model, adapter = tiny_families.qwen_transformer(SHAPE), QwenImageAdapter()
    emb = tiny_families.qwen_embeddings(SHAPE, padding=0)
    cond = dict(tiny_families.qwen_step_inputs(SHAPE), attention_kwargs={})
    uncond = dict(cond, encoder_hidden_states=emb["negative_prompt_embeds"])
    rows = BranchRows(adapter.batched_inputs, 2, branches=[uncond, cond])
    yield model, adapter, rows
    torch.set_grad_enabled(True)


def _forward(model, inputs):
    return model(**inputs, return_dict=False)[0]


def _stock_cfg(model, rows):
    # the pipeline's loop: cond, then uncond, two batch-B calls
    c = _forward(model, rows.branch(1))
    u = _forward(model, rows.branch(0))
    return norm_rescale(guided_prediction(c, u, [], LAMBDA, OMEGA), c)


def _naive(model, adapter, rows, subnets):
    c = _forward(model, rows.branch(1))
    u = _forward(model, rows.branch(0))
    subs = []
    for mask in subnets:
        with skipping(adapter, adapter.blocks(model), mask):
            subs.append(_forward(model, rows.branch(1)))
    return norm_rescale(guided_prediction(c, u, subs, LAMBDA, OMEGA), c)


def _s2fast(model, adapter, rows, subnets, options=None):
    preds = predict(adapter, model, rows, subnets, options or EngineOptions())
    return norm_rescale(guided_prediction(preds[1], preds[0], preds[2:], LAMBDA, OMEGA), preds[1])


CASES = {
    # case: (function(model, adapter, rows, masks) -> D, block-row count of the case)
    "cfg-stock": (lambda m, a, r, s: _stock_cfg(m, r), lambda s: 2 * L),
    "cfg-s2fast": (lambda m, a, r, s: _s2fast(m, a, r, []), lambda s: 2 * L),
    "s2-naive-three-pass": (lambda m, a, r, s: _naive(m, a, r, s), lambda s: block_rows(L, 2, s, reuse_prefix=False)),
    "s2-s2fast-separate": (lambda m, a, r, s: _s2fast(m, a, r, s), lambda s: block_rows(L, 2, s)),
    "s2-s2fast-join": (lambda m, a, r, s: _s2fast(m, a, r, s, EngineOptions(fork_mode="join")),
                       lambda s: block_rows(L, 2, s)),
}


@pytest.mark.parametrize("mask_name", MASKS)
def test_qwen_step(interleaved, setup, mask_name):
    model, adapter, rows = setup
    subnets = [MASKS[mask_name]]
    cases = {name: (lambda fn=fn: fn(model, adapter, rows, subnets)) for name, (fn, _) in CASES.items()}
    floors = {name: {"floor_ratio": rows_of(subnets) / (2 * L)} for name, (_, rows_of) in CASES.items()}
    interleaved(f"qwen-image-24x256 step, mask {MASKS[mask_name]}", cases, "cfg-stock", ROUNDS, floors)
