"""Per-step cost of S² against CFG on a 24-block Wan-shaped transformer (4 heads × 48, 5 latent frames of 16×16 =
320 video tokens, 64 text tokens; random weights, fp32, CPU unless CUDA is there): the transformer work and the
Eq. 4 combination of one denoising step, without the scheduler or the VAE (the same for every method).

Wan's own loop calls the transformer twice per step, cond then uncond, at batch B each: that is the baseline
("cfg-stock"). The naive S² adds a third batch-B call with the masked blocks skipped; s2fast runs uncond and cond in
one batch-2B call and forks the sub-network off the cond rows at its first dropped block. The block-row floor (the
cost model of docs/PERFORMANCE.md) of each case is in extra_info and in the summary.

    .venv/bin/pytest benchmarks/test_step_cost_wan.py --benchmark-only
"""

import pytest
import torch
from s2fast.kernels import guided_prediction

from s2fast import tiny
from s2fast.adapters.base import BranchRows
from s2fast.adapters.wan import WanAdapter

SHAPE = tiny.BENCH_WAN
LAMBDA, OMEGA = 5.0, 0.25
# Two of the 23 droppable blocks, as drop_ratio 0.1 draws: first dropped block at E[k] = 8, at 1 (worst) and 20.
MASKS = {"k8": (8, 15), "k1": (1, 12), "k20": (20, 22)}
ROUNDS = 12


@pytest.fixture(scope="module")
def setup():
    torch.set_grad_enabled(False)
    torch.manual_seed(0)
    model, adapter = tiny.wan_transformer(SHAPE), WanAdapter()
    emb = tiny.wan_embeddings(SHAPE)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, SHAPE.latent_frames, SHAPE.latent_size, SHAPE.latent_size, generator=g)
    cond = dict(hidden_states=x, timestep=torch.tensor([500.0]), encoder_hidden_states=emb["prompt_embeds"],
                encoder_hidden_states_image=None, attention_kwargs=None)
    uncond = dict(cond, encoder_hidden_states=emb["negative_prompt_embeds"])
    rows = BranchRows(adapter.batched_inputs, 2, branches=[uncond, cond])
    yield model, adapter, rows
    torch.set_grad_enabled(True)


@pytest.mark.parametrize("mask_name", MASKS)
def test_wan_step(two_call_step, setup, mask_name):
    model, adapter, rows = setup
    two_call_step(f"wan-24x192 step, mask {MASKS[mask_name]}", model, adapter, rows, [MASKS[mask_name]], ROUNDS,
                  lambda c, u, subs: guided_prediction(c, u, subs, LAMBDA, OMEGA))
