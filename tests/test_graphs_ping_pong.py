"""Ping-pong graph outputs (S2Config.graph_outputs, s2fast/graphs.py): block j writes where block j − 2's output
was, so the graphs' static memory does not grow with the block count; results equal the eager engine bit for bit
(the same kernels on copies of the same inputs) for every mask, with no capture after the warm-up. CPU stand-in
backend (EagerBackend), as the other graph tests."""

import pytest
import torch

import s2fast
from s2fast import S2Config, tiny
from s2fast.graphs import BlockGraphs, EagerBackend

STEPS = 6


def _wide(layers: int) -> tiny.SD3Shape:
    # deep and wide for a CPU test: hidden 64, 8×8 latents (16 image + 6 text tokens)
    return tiny.SD3Shape(num_layers=layers, heads=2, head_dim=32, latent_size=8, text_tokens=6,
                         joint_attention_dim=32, pooled_dim=32)


def _graphed(layers, config, seed=0):
    pipe, kw = tiny.sd3_latent_call(STEPS, _wide(layers))
    s2fast.wrap(pipe, config, _graph_backend=EagerBackend())
    try:
        out = pipe(**kw, generator=torch.Generator().manual_seed(seed)).images
        return out, s2fast.graph_stats(pipe), s2fast.trace(pipe), pipe, kw
    finally:
        s2fast.unwrap(pipe)


@pytest.mark.parametrize("fork_mode", ["separate", "join"])
def test_static_bytes_do_not_grow_with_depth(fork_mode):
    config = S2Config(omega=0.5, drop_ratio=0.2, num_masks=2, seed=1, fork_mode=fork_mode)
    static = {}
    for outputs in ("ping_pong", "per_block"):
        for layers in (8, 24):
            static[outputs, layers] = _graphed(layers, config.replace(graph_outputs=outputs))[1]["static_bytes"]
    # ping-pong: two output buffers per lane and row count, plus one input buffer per lane start: the same at any
    # depth (both depths run the same lanes at the same shapes)
    assert static["ping_pong", 24] == static["ping_pong", 8]
    # per block: every graph keeps its outputs, so three times the blocks hold (nearly) three times the bytes
    assert static["per_block", 24] > 2.5 * static["per_block", 8]
    assert static["ping_pong", 24] < 0.25 * static["per_block", 24]


@pytest.mark.parametrize("fork_mode", ["separate", "join"])
@pytest.mark.parametrize("protected", [(0,), (0, 1, 2, 3)])
def test_ping_pong_equals_eager_for_every_mask_without_recapture(fork_mode, protected):
    """Random masks, several per step, drop neighbouring blocks too (a lane passes a dropped block's input on,
    and the next block must not read a buffer it writes); the separate sub-network lane forks off the cond lane's
    buffer, which the cond lane overwrites two blocks later. Every call equals the eager engine bit for bit, and
    calls after the first capture nothing."""
    pipe, kw = tiny.sd3_latent_call(STEPS, _wide(10))
    config = S2Config(omega=0.5, drop_ratio=0.4, num_masks=2, seed=None, fork_mode=fork_mode,
                      protected_blocks=protected)
    backend = EagerBackend()
    try:
        graphed, traces = [], []
        for seed in range(4):
            s2fast.wrap(pipe, config, _graph_backend=backend)
            graphed.append(pipe(**kw, generator=torch.Generator().manual_seed(seed)).images)
            traces.append(s2fast.trace(pipe))
            if seed == 0:
                captures = s2fast.graph_stats(pipe)["captures"]
        stats = s2fast.graph_stats(pipe)
        assert stats["captures"] == captures and stats["eager_calls"] == 0 and stats["replays"] > 0
        for seed, (out, masks) in enumerate(zip(graphed, traces)):
            s2fast.wrap(pipe, config.replace(masks=masks, cuda_graphs=False))
            eager = pipe(**kw, generator=torch.Generator().manual_seed(seed)).images
            assert torch.equal(out, eager)
    finally:
        s2fast.unwrap(pipe)


def test_a_separate_lane_forked_as_a_view_would_read_an_overwritten_buffer(monkeypatch):
    """Why the fork copies: with the copy off (a view of the cond lane's ping-pong buffer), the sub-network lane
    reads the cond lane's output of a later block, and the result is wrong."""
    from s2fast import engine

    config = S2Config(omega=0.5, seed=0, fork_mode="separate", masks=((3,),) * STEPS)
    eager_config = config.replace(cuda_graphs=False)
    pipe, kw = tiny.sd3_latent_call(STEPS, _wide(8))
    try:
        s2fast.wrap(pipe, eager_config)
        eager = pipe(**kw, generator=torch.Generator().manual_seed(0)).images
        s2fast.wrap(pipe, config, _graph_backend=EagerBackend())
        assert torch.equal(pipe(**kw, generator=torch.Generator().manual_seed(0)).images, eager)
        real_fork = engine._fork
        monkeypatch.setattr(engine, "_fork", lambda *a: real_fork(*a[:5], False))
        s2fast.wrap(pipe, config, _graph_backend=EagerBackend())
        assert not torch.equal(pipe(**kw, generator=torch.Generator().manual_seed(0)).images, eager)
    finally:
        s2fast.unwrap(pipe)


def test_a_block_reading_its_own_destination_gets_its_own_input_buffer():
    """Block 1 dropped at capture: block 2's input is block 0's output, in the buffer block 2 writes (parity 0).
    The graph then copies its input into a buffer of its own instead of reading and writing one buffer."""
    graphs = BlockGraphs(EagerBackend())
    plus_one = lambda ts: [ts[0] + 1]  # noqa: E731
    x = torch.zeros(4)
    out0 = graphs.run("block0", plus_one, [x], slot=("lane", 0))
    out2 = graphs.run("block2", plus_one, [out0[0]], slot=("lane", 0))  # block 1 dropped
    assert torch.equal(out2[0], torch.full((4,), 2.0)) and out2[0].data_ptr() == out0[0].data_ptr()
    assert graphs._graphs[next(k for k in graphs._graphs if k[0] == "block2")].static_in[0].data_ptr() != \
        out0[0].data_ptr()
    # replayed the same way: still right
    out0 = graphs.run("block0", plus_one, [torch.full((4,), 5.0)], slot=("lane", 0))
    assert torch.equal(graphs.run("block2", plus_one, [out0[0]], slot=("lane", 0))[0], torch.full((4,), 7.0))


def test_graph_outputs_is_checked():
    with pytest.raises(ValueError, match="graph_outputs"):
        S2Config(graph_outputs="ring")
