"""Graphs that share a memory pool must replay in the order they were captured (s2fast/graphs.py says why). These
tests drive the sequences that once captured graphs mid-sampling into the warm-up's pool — a re-wrap from ω = 0 to
ω > 0, more masks, other protected blocks, a new LoRA scale, reuse_prefix=False, fork_mode="join" — through
RecordingBackend, which records every capture and replay and, as a shared pool may on a GPU, overwrites with NaN
the outputs of graphs captured after the one it replays. Each sequence must replay every pool in capture order and
give the eager engine's result bit for bit (the same kernels on copies of the same inputs)."""

import pytest
import torch

import s2fast
from s2fast import S2Config, tiny
from s2fast.graphs import BlockGraphs, RecordingBackend
from s2fast.plan import warmup_predictions

STEPS = 4


@pytest.fixture(scope="module")
def sd3():
    return tiny.sd3_latent_call(STEPS)


def _call(pipe, kw, seed, **more):
    return pipe(**kw, **more, generator=torch.Generator().manual_seed(seed)).images


BASE = S2Config(omega=0.5, drop_ratio=0.3, seed=None)
# (name, [(config, extra call kwargs), ...]): each entry is a wrap (same backend: the graphs are kept) and a call
SEQUENCES = [
    ("omega-0-then-s2", [(BASE.replace(omega=0.0), {}), (BASE, {})]),
    ("more-masks", [(BASE, {}), (BASE.replace(num_masks=3), {})]),
    ("fewer-protected-blocks", [(BASE.replace(protected_blocks=(0, 1, 2)), {}), (BASE, {})]),
    ("new-lora-scale", [(BASE, {}), (BASE, {"joint_attention_kwargs": {"scale": 0.5}})]),
    ("no-prefix-reuse", [(BASE.replace(reuse_prefix=False), {}), (BASE.replace(reuse_prefix=False), {})]),
    ("join", [(BASE.replace(fork_mode="join", num_masks=2), {}), (BASE.replace(fork_mode="join", num_masks=2), {})]),
]


def _run_sequence(pipe, kw, sequence, backend):
    """Graphed results and the masks each call drew."""
    results = []
    try:
        for seed, (config, more) in enumerate(sequence):
            s2fast.wrap(pipe, config, _graph_backend=backend)
            results.append((_call(pipe, kw, seed, **more), s2fast.trace(pipe), config, more))
        stats = s2fast.graph_stats(pipe)
    finally:
        s2fast.unwrap(pipe)
    return results, stats


def _eager(pipe, kw, seed, config, masks, more):
    s2fast.wrap(pipe, config.replace(masks=masks, cuda_graphs=False))
    try:
        return _call(pipe, kw, seed, **more)
    finally:
        s2fast.unwrap(pipe)


@pytest.mark.parametrize("name,sequence", SEQUENCES, ids=[s[0] for s in SEQUENCES])
def test_every_pool_replays_in_capture_order_and_equals_eager(sd3, name, sequence):
    pipe, kw = sd3
    backend = RecordingBackend()
    results, stats = _run_sequence(pipe, kw, sequence, backend)
    assert backend.order_violations() == []
    assert stats["order_fallbacks"] == 0 and stats["capture_failures"] == 0
    for seed, (graphed, masks, config, more) in enumerate(results):
        assert not torch.isnan(graphed).any()
        assert torch.equal(graphed, _eager(pipe, kw, seed, config, masks, more))


def test_one_shared_pool_would_break_the_order(sd3, monkeypatch):
    """The check can fail: with every capture in one pool and no backstop (the graphs of an earlier version),
    the ω = 0 → ω > 0 sequence replays sub-network graphs before older lane-0 graphs of their pool, and the
    clobbered outputs reach the result. Only where graphs keep their outputs in their pool (graph_outputs
    "per_block"): ping-pong outputs live outside every pool, so a pool's reuse cannot reach them."""
    pipe, kw = sd3
    monkeypatch.setattr(RecordingBackend, "new_pool", lambda self: "the one pool")
    monkeypatch.setattr(BlockGraphs, "_out_of_order", lambda self, graph: False)
    backend = RecordingBackend()
    sequence = [(config.replace(graph_outputs="per_block"), more) for config, more in SEQUENCES[0][1]]
    results, _ = _run_sequence(pipe, kw, sequence, backend)
    assert backend.order_violations()
    assert torch.isnan(results[1][0]).any()


def test_the_backstop_runs_out_of_order_calls_eagerly(sd3, monkeypatch):
    """With one shared pool but the backstop on, an out-of-order call runs eagerly instead of replaying: no
    violation, no corruption, counted."""
    pipe, kw = sd3
    monkeypatch.setattr(RecordingBackend, "new_pool", lambda self: "the one pool")
    backend = RecordingBackend()
    results, stats = _run_sequence(pipe, kw, SEQUENCES[0][1], backend)
    assert backend.order_violations() == [] and stats["order_fallbacks"] > 0
    graphed, masks, config, more = results[1]
    assert torch.equal(graphed, _eager(pipe, kw, 1, config, masks, more))


def test_new_sampling_captures_nothing_after_the_warm_up(sd3):
    """The warm-up covers what later masks need, for join and without prefix reuse too: calls after the first
    capture nothing, whatever masks they draw (every new pool is a warm-up's)."""
    pipe, kw = sd3
    for config in (BASE.replace(fork_mode="join", num_masks=2), BASE.replace(reuse_prefix=False, num_masks=2)):
        s2fast.wrap(pipe, config, _graph_backend=RecordingBackend())
        try:
            _call(pipe, kw, 0)
            first = s2fast.graph_stats(pipe)
            for seed in range(1, 4):
                _call(pipe, kw, seed)
            assert s2fast.graph_stats(pipe)["captures"] == first["captures"], config
            assert first["pools"] == len(warmup_predictions(config, tiny.SD3Shape().num_layers))
        finally:
            s2fast.unwrap(pipe)


def test_warmup_predictions():
    assert warmup_predictions(S2Config(), 8) == (((1,),),)
    assert warmup_predictions(S2Config(omega=0.0), 8) == ((),)
    assert warmup_predictions(S2Config(reuse_prefix=False, num_masks=2), 8) == (((), ()),)
    droppable = tuple(range(1, 8))
    assert warmup_predictions(S2Config(fork_mode="join", num_masks=2), 8) == (
        ((1,), (1,)), ((1,), droppable), (droppable, droppable))
    # without batched branches there is no joined lane: "join" behaves as "separate"
    assert warmup_predictions(S2Config(fork_mode="join", batch_branches=False), 8) == (((1,),),)
