"""The naive three-pass S² that public implementations run, as a baseline for the demo and the benchmarks.

Per step: the stock forward on the stacked [uncond, cond] rows (one batched call, as SD3's pipeline does), then one
more stock forward per sub-network on the cond rows with the masked blocks skipped. Block-rows per step:
2L + (L − d) against s2fast's 2L + (L − k − d) (the cost model of docs/PERFORMANCE.md). It plugs into the same
controller as the engine, so it samples the same masks and hands the pipeline the same kind of value.
"""

from __future__ import annotations

import contextlib
from typing import List, Sequence, Tuple

import torch

from .adapters.base import BranchRows, FamilyAdapter
from .api import wrap
from .config import S2Config


def three_pass(adapter: FamilyAdapter, model, rows: BranchRows, subnets: Sequence[Tuple[int, ...]],
               options=None) -> List[torch.Tensor]:
    """Predictions for each branch of ``rows``, then one per mask; ``options`` is ignored (nothing is shared)."""

    def forward(inputs):
        # The class's forward: the instance forward is s2fast's own and would route back here.
        return type(model).forward(model, **inputs, return_dict=False)[0]

    stacked = rows.stacked() if rows.count > 1 else rows.branch(0)
    if stacked is None:
        preds = [forward(rows.branch(j)) for j in range(rows.count)]
    else:
        preds = list(forward(stacked).chunk(rows.count))
    cond = rows.branch(rows.cond_branch)
    blocks = adapter.blocks(model)
    for mask in subnets:
        with skipping(adapter, blocks, mask):
            preds.append(forward(cond))
    return preds


@contextlib.contextmanager
def skipping(adapter: FamilyAdapter, blocks, indices):
    """Make the blocks at ``indices`` return their inputs (in the block's own return order) for the duration."""
    saved = {i: blocks[i].__dict__.get("forward") for i in indices}
    try:
        for i in indices:
            blocks[i].forward = lambda *args, **kwargs: adapter.skipped_block_output(args, kwargs)
        yield
    finally:
        for i, previous in saved.items():
            if previous is None:
                blocks[i].__dict__.pop("forward", None)
            else:
                blocks[i].forward = previous


def wrap_three_pass(pipe, config: S2Config):
    """Like :func:`s2fast.wrap`, with the naive three-pass computation (for comparisons; unwrap as usual)."""
    return wrap(pipe, config, _predictor=three_pass)
