"""The engine on its own: which rows stay bit-identical to the stock forward, and the cost model it is judged by."""

import pytest
import torch

from s2fast.adapters.base import BranchRows
from s2fast.adapters.sd3 import SD3Adapter
from s2fast.engine import EngineOptions, block_rows, predict
from s2fast.reference import skipping


@pytest.fixture
def step_inputs(sd3):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, sd3.shape.latent_size, sd3.shape.latent_size, generator=g)
    e = sd3.emb
    stacked = dict(
        hidden_states=torch.cat([x, x]), timestep=torch.tensor([700.0]).expand(2),
        encoder_hidden_states=torch.cat([e["negative_prompt_embeds"], e["prompt_embeds"]]),
        pooled_projections=torch.cat([e["negative_pooled_prompt_embeds"], e["pooled_prompt_embeds"]]),
        joint_attention_kwargs=None,
    )
    return sd3.pipe.transformer, SD3Adapter(), stacked


def test_separate_fork_keeps_uncond_cond_bit_identical_to_the_stock_batched_forward(step_inputs):
    model, adapter, stacked = step_inputs
    stock_u, stock_c = model(**stacked, return_dict=False)[0].chunk(2)
    rows = BranchRows(adapter.batched_inputs, 2, stacked=stacked)
    u, c, s = predict(adapter, model, rows, [(2, 5)], EngineOptions(fork_mode="separate"))
    assert torch.equal(u, stock_u) and torch.equal(c, stock_c)
    # The sub-network, forked from the cond rows of a batch-2 call, equals a batch-1 forward with the blocks skipped
    # up to batch-size rounding (~1e-7 relative per op in fp32; 1e-5 over 6 blocks leaves a wide margin).
    with skipping(adapter, adapter.blocks(model), (2, 5)):
        expected = model(**rows.branch(1), return_dict=False)[0]
    torch.testing.assert_close(s, expected, atol=1e-5, rtol=1e-5)
    assert (s - c).abs().max() > 1e-3  # skipping two blocks does change the prediction


def test_last_block_skipped_while_the_others_run_it(step_inputs):
    # SD3's last block returns no text stream: the engine must merge a dead slot with the skipping rows' live one.
    model, adapter, stacked = step_inputs
    rows = BranchRows(adapter.batched_inputs, 2, stacked=stacked)
    joined = predict(adapter, model, rows, [(5,)], EngineOptions(fork_mode="join"))
    separate = predict(adapter, model, rows, [(5,)], EngineOptions(fork_mode="separate"))
    for a, b in zip(joined, separate):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mask, reuse, expected", [
    ((8, 15), True, 48 + 24 - 8 - 2),    # SD3-medium at E[k] = 8: the 1.29x floor of docs/PERFORMANCE.md's cost model
    ((8, 15), False, 48 + 24 - 2),       # three passes: 1.46x
    ((1, 12), True, 48 + 24 - 1 - 2),
])
def test_block_rows_cost_model(mask, reuse, expected):
    assert block_rows(24, 2, [mask], reuse_prefix=reuse) == expected
    assert block_rows(24, 2, []) == 48


def test_branches_that_cannot_share_a_call_run_apart(step_inputs):
    # Flux-style shared inputs (position ids) that differ between branches: no stacking, one lane per branch.
    model, adapter, stacked = step_inputs
    rows = BranchRows(adapter.batched_inputs, 2, stacked=stacked)
    branches = [dict(rows.branch(0), extra=torch.zeros(3)), dict(rows.branch(1), extra=torch.ones(3))]
    apart = BranchRows(adapter.batched_inputs, 2, branches=branches)
    assert apart.stacked() is None and apart.rows_per_branch == 1
    with_dicts = [dict(b, extra={"t": torch.zeros(2)}) for b in branches]  # unequal-by-value dicts of tensors
    assert BranchRows(adapter.batched_inputs, 2, branches=with_dicts).stacked() is None
    same = [dict(rows.branch(0), extra=torch.zeros(3)), dict(rows.branch(1), extra=torch.zeros(3))]
    assert BranchRows(adapter.batched_inputs, 2, branches=same).stacked()["extra"].shape == (3,)


def test_unstackable_branches_still_give_the_same_predictions(step_inputs):
    model, adapter, stacked = step_inputs
    rows = BranchRows(adapter.batched_inputs, 2, stacked=stacked)
    apart = BranchRows(adapter.batched_inputs, 2,
                       branches=[dict(rows.branch(0), extra=torch.zeros(3)), dict(rows.branch(1), extra=torch.ones(3))])
    expected = predict(adapter, model, rows, [(2, 4)])
    got = predict(adapter, model, apart, [(2, 4)])  # one lane per branch: batch-size rounding only
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
