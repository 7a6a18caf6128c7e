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

SHAPE = tiny_families.BENCH_QWEN
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


@pytest.mark.parametrize("mask_name", MASKS)
def test_qwen_step(two_call_step, setup, mask_name):
    model, adapter, rows = setup
    two_call_step(f"qwen-image-24x256 step, mask {MASKS[mask_name]}", model, adapter, rows, [MASKS[mask_name]], ROUNDS,
                  lambda c, u, subs: norm_rescale(guided_prediction(c, u, subs, LAMBDA, OMEGA), c))
