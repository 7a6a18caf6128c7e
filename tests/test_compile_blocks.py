"""S2Config(compile_blocks=...): regional torch.compile of the blocks. Tested with torch.compile's "eager" backend
(dynamo traces the blocks, no code generation), which must leave results bit for bit unchanged; inductor's own
numerics are a GPU measurement (docs/PERFORMANCE.md §6)."""

import pytest
import torch
from torch._dynamo.utils import counters

import s2fast
from s2fast import S2Config


def unique_graphs():
    return counters["stats"]["unique_graphs"]


def test_compiled_blocks_serve_every_mask_and_unwrap_restores(sd3):
    pipe = sd3.pipe
    blocks = list(pipe.transformer.transformer_blocks)
    config = S2Config(omega=0.5, drop_ratio=0.3, seed=None)
    s2fast.wrap(pipe, config.replace(compile_blocks="eager"))
    try:
        assert all(b._compiled_call_impl is not None for b in blocks)
        for seed in range(3):
            sd3(steps=6, seed=seed)
        traces = []
        graphs_after_first = None
        for seed in range(3, 6):  # fresh masks each call: no new dynamo graph after the first calls
            sd3(steps=6, seed=seed)
            traces.append(s2fast.trace(pipe))
            graphs_after_first = graphs_after_first or unique_graphs()
        assert unique_graphs() == graphs_after_first and len(set(traces)) == 3
        masks = s2fast.trace(pipe)
    finally:
        s2fast.unwrap(pipe)
    assert all(b._compiled_call_impl is None for b in blocks)  # unwrap: the blocks' own forward again
    s2fast.wrap(pipe, config.replace(masks=masks))
    eager_last = sd3(steps=6, seed=5)
    s2fast.unwrap(pipe)
    s2fast.wrap(pipe, config.replace(masks=masks, compile_blocks="eager"))
    assert torch.equal(sd3(steps=6, seed=5), eager_last)  # dynamo's eager backend runs the same ops
    s2fast.unwrap(pipe)


def test_a_block_the_user_compiled_is_left_alone(sd3):
    block = sd3.pipe.transformer.transformer_blocks[0]
    block.compile(backend="eager")
    mine = block._compiled_call_impl
    try:
        s2fast.wrap(sd3.pipe, S2Config(compile_blocks="eager"))
        s2fast.unwrap(sd3.pipe)
        assert block._compiled_call_impl is mine
    finally:
        block._compiled_call_impl = None


@pytest.mark.parametrize("bad", ["", 3, True])
def test_bad_compile_backend_is_refused(bad):
    with pytest.raises(ValueError, match="compile_blocks"):
        S2Config(compile_blocks=bad)
