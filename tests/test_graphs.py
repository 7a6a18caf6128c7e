"""Block graphs (s2fast/graphs.py) on the CPU, through EagerBackend: the CUDA graph contract (static inputs copied
in, static outputs overwritten by the next replay) run eagerly. What is tested here is the bookkeeping a GPU relies
on: which calls share a graph, that every mask replays graphs captured at warm-up, that outputs equal the eager
engine's bit for bit, and that memory is counted. tests/test_graphs_gpu.py runs the same on real CUDA graphs."""

import pytest
import torch

import s2fast
from s2fast import S2Config, tiny
from s2fast.graphs import BlockGraphs, EagerBackend, flatten_shared
from s2fast.plan import warmup_subnets


def test_a_key_is_captured_once_and_replayed():
    graphs = BlockGraphs(EagerBackend())
    fn = lambda ts: [ts[0] * 2 + ts[1]]  # noqa: E731
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    out1 = graphs.run("k", fn, [a, b])
    assert torch.equal(out1[0], a * 2 + b)
    ptr = out1[0].data_ptr()
    c = torch.randn(3, 4)
    out2 = graphs.run("k", fn, [c, b])
    assert torch.equal(out2[0], c * 2 + b) and out2[0].data_ptr() == ptr  # the same static buffer, refilled
    assert torch.equal(out1[0], c * 2 + b)  # as on a GPU: a kept output is overwritten by the next replay
    graphs.run("k", fn, [torch.randn(5, 4), b[:1].expand(5, 4)])  # new shapes: a new graph
    graphs.run("other", fn, [a, b])                                # new key: a new graph
    assert (graphs.stats.captures, graphs.stats.replays, len(graphs)) == (3, 4, 3)
    assert graphs.stats.static_bytes == 4 * (3 * 12 + 3 * 20 + 3 * 12)  # inputs and output of each graph, fp32


def test_inputs_are_copied_not_aliased():
    graphs = BlockGraphs(EagerBackend())
    x = torch.ones(4)
    out = graphs.run("k", lambda ts: [ts[0] + 1], [x])
    x.fill_(100)  # the caller reuses its tensor: the graph's inputs are its own
    assert torch.equal(out[0], torch.full((4,), 2.0))


def test_beyond_max_graphs_new_keys_run_eagerly():
    graphs = BlockGraphs(EagerBackend(), max_graphs=1)
    fn = lambda ts: [ts[0] + 1]  # noqa: E731
    graphs.run("a", fn, [torch.zeros(2)])
    out = graphs.run("b", fn, [torch.zeros(2)])
    assert torch.equal(out[0], torch.ones(2))
    assert graphs.stats.as_dict()["graphs"] == 1 and graphs.stats.eager_calls == 1


def test_flatten_shared():
    rot = (torch.randn(4, 2), torch.randn(4, 2))
    tensors, rebuild, static = flatten_shared({"rotary": rot, "attention_kwargs": None, "size": (8, 8)})
    assert len(tensors) == 2
    rebuilt = rebuild([t + 1 for t in tensors])
    assert isinstance(rebuilt["rotary"], tuple) and torch.equal(rebuilt["rotary"][0], rot[0] + 1)
    assert rebuilt["size"] == (8, 8) and rebuilt["attention_kwargs"] is None
    _, _, other = flatten_shared({"rotary": rot, "attention_kwargs": None, "size": (16, 8)})
    assert static != other  # a different non-tensor value is a different graph
    assert flatten_shared({"attention_kwargs": {"mask": torch.ones(2)}}) is None  # a tensor inside a dict: eager
    assert flatten_shared({"attention_kwargs": {"scale": 0.5}}) is not None


def test_warmup_subnets_fork_at_the_first_droppable_block():
    assert warmup_subnets(S2Config(), 8) == ((1,),)
    assert warmup_subnets(S2Config(protected_blocks=(0, 1, 2), num_masks=3), 8) == ((3,),) * 3
    # s2fast's CFG baseline (ω = 0) and all-empty explicit masks never run a sub-network lane: no graphs for one
    assert warmup_subnets(S2Config(omega=0.0), 8) == ()
    assert warmup_subnets(S2Config(masks=[(), ()]), 8) == ()


def _family(name):
    if name == "dit":
        pipe = tiny.dit_pipeline()
        kw = dict(class_labels=[3, 207], guidance_scale=4.0, output_type="pt")
    else:
        shape = tiny.SD3Shape() if name == "sd3" else tiny.FluxShape()
        pipe = (tiny.sd3_pipeline if name == "sd3" else tiny.flux_pipeline)(shape, with_vae=False)
        kw = dict(tiny.embeddings(shape), **tiny.image_size(pipe, shape), output_type="latent",
                  **{"guidance_scale" if name == "sd3" else "true_cfg_scale": 4.0})
    return pipe, kw


@pytest.mark.parametrize("num_masks", [1, 3])
@pytest.mark.parametrize("name", ["sd3", "flux", "dit"])
def test_graphs_replay_every_mask_with_no_recapture_and_equal_eager(name, num_masks):
    pipe, kw = _family(name)
    config = S2Config(omega=0.5, drop_ratio=0.3, num_masks=num_masks, seed=None)  # fresh masks every call
    run = lambda seed: pipe(**kw, num_inference_steps=25, generator=torch.Generator().manual_seed(seed)).images  # noqa: E731
    graphed, traces = [], []
    s2fast.wrap(pipe, config, _graph_backend=EagerBackend())
    try:
        for seed in range(4):  # 100 steps, 100 random masks
            graphed.append(run(seed))
            traces.append(s2fast.trace(pipe))
            if seed == 0:
                captured = s2fast.graph_stats(pipe)["captures"]  # the warm-up and the first call
        stats = s2fast.graph_stats(pipe)
        for seed, masks in enumerate(traces):  # the same masks, eagerly
            s2fast.wrap(pipe, config.replace(masks=masks))
            assert torch.equal(graphed[seed], run(seed))  # same kernels on copies of the same inputs: bit for bit
    finally:
        s2fast.unwrap(pipe)
    assert len(set(traces)) == 4  # the calls drew different masks
    assert stats["captures"] == captured  # no capture after the warm-up, whatever the masks
    blocks = len(pipe.transformer.transformer_blocks) + len(getattr(pipe.transformer, "single_transformer_blocks", []))
    assert captured <= blocks * (1 + num_masks)  # at most one graph per (block, lane): the bound memory rests on
    assert stats["replays"] > 100 * blocks and stats["eager_calls"] == 0 and stats["static_bytes"] > 0


def test_auto_is_off_on_the_cpu_and_true_is_refused_there():
    pipe, kw = _family("sd3")
    s2fast.wrap(pipe, S2Config(seed=0))
    pipe(**kw, num_inference_steps=2)
    assert s2fast.graph_stats(pipe) is None
    with pytest.raises(ValueError, match="cuda_graphs=True needs the transformer on a CUDA device"):
        s2fast.wrap(pipe, S2Config(cuda_graphs=True))
    assert s2fast.config_of(pipe) == S2Config(seed=0)  # the refused wrap changed nothing
    s2fast.unwrap(pipe)
    with pytest.raises(ValueError, match="cuda_graphs"):
        S2Config(cuda_graphs="yes")


def test_replaced_weights_or_a_new_lora_scale_are_never_served_by_old_graphs():
    pipe, kw = _family("sd3")
    s2fast.wrap(pipe, S2Config(omega=0.5, seed=0), _graph_backend=EagerBackend())
    try:
        pipe(**kw, num_inference_steps=3)
        first = s2fast.graph_stats(pipe)
        pipe(**kw, num_inference_steps=3)
        assert s2fast.graph_stats(pipe)["captures"] == first["captures"]  # same weights, same scale: replays
        # a LoRA scale is applied to the layers in Python: graphs captured under another scale must not serve it
        pipe(**kw, num_inference_steps=3, joint_attention_kwargs={"scale": 0.5})
        scaled = s2fast.graph_stats(pipe)
        assert scaled["captures"] > first["captures"]
        # replaced parameter tensors (a LoRA fused, weights loaded): a graph reads the storage it captured
        block = pipe.transformer.transformer_blocks[1]
        block.ff.net[2].weight = torch.nn.Parameter(block.ff.net[2].weight.detach() * 2)
        pipe(**kw, num_inference_steps=3)
        after = s2fast.graph_stats(pipe)
        assert after["invalidations"] == 1 and after["captures"] > scaled["captures"]
        assert after["graphs"] <= first["graphs"]  # the old graphs were dropped, not kept beside the new ones
    finally:
        s2fast.unwrap(pipe)


def test_chained_inputs_read_the_previous_output_in_place():
    graphs = BlockGraphs(EagerBackend())
    double = lambda ts: [ts[0] * 2]  # noqa: E731
    x = torch.ones(4)
    first = graphs.run("block0", double, [x])
    second = graphs.run("block1", double, [first[0]])  # block 1 reads block 0's static output
    assert torch.equal(second[0], torch.full((4,), 4.0))
    assert graphs.stats.static_bytes == 3 * 16  # x's buffer and two outputs: block 1 owns no input buffer
    # a later step whose block-1 input comes from elsewhere refills the shared buffer, and the result is right
    out = graphs.run("block1", double, [torch.full((4,), 5.0)])
    assert torch.equal(out[0], torch.full((4,), 10.0))


@pytest.mark.parametrize("fork_mode", ["separate", "join"])
@pytest.mark.parametrize("name", ["sd3", "flux", "dit"])
def test_chained_and_unchained_graphs_equal_eager_and_chaining_saves_memory(name, fork_mode):
    pipe, kw = _family(name)
    # chaining decides the memory where each graph keeps its outputs (ping-pong outputs: tests/test_graphs_ping_pong.py)
    config = S2Config(omega=0.5, drop_ratio=0.3, num_masks=2, seed=3, fork_mode=fork_mode, graph_outputs="per_block")
    run = lambda: pipe(**kw, num_inference_steps=8, generator=torch.Generator().manual_seed(0)).images  # noqa: E731
    s2fast.wrap(pipe, config)
    eager = run()
    results, static = {}, {}
    try:
        for chain in (True, False):
            s2fast.wrap(pipe, config, _graph_backend=EagerBackend())
            controller = s2fast.serving.controller_of(pipe)
            state = controller.state(pipe.transformer)
            controller._decide_graphs(pipe.transformer, state)
            state.graphs.chain = chain
            results[chain] = run()
            static[chain] = s2fast.graph_stats(pipe)["static_bytes"]
    finally:
        s2fast.unwrap(pipe)
    assert torch.equal(results[True], eager) and torch.equal(results[False], eager)
    # separate lanes chain every input but a lane's first; join's partial-row calls (views, cat) chain less
    assert static[True] < (0.75 if fork_mode == "separate" else 1.0) * static[False]


def test_a_rewrap_keeps_the_graphs_and_unwrap_releases_them():
    pipe, kw = _family("dit")
    backend = EagerBackend()  # the same backend on every wrap: the CPU stand-in for "the GPU of this model"
    run = lambda: pipe(**kw, num_inference_steps=4)  # noqa: E731
    s2fast.wrap(pipe, S2Config(omega=0.5, seed=0), _graph_backend=backend)
    run()
    captured = s2fast.graph_stats(pipe)["captures"]
    # another ω, another seed: the same (block, lane) calls, already captured
    s2fast.wrap(pipe, S2Config(omega=0.25, seed=7), _graph_backend=backend)
    run()
    assert s2fast.graph_stats(pipe)["captures"] == captured
    # another attention backend: graphs captured under the old one must not serve it
    s2fast.wrap(pipe, S2Config(omega=0.25, seed=7, attention="math"), _graph_backend=backend)
    run()
    assert s2fast.graph_stats(pipe)["captures"] > captured
    s2fast.unwrap(pipe)  # releases them: a later wrap captures afresh
    s2fast.wrap(pipe, S2Config(omega=0.5, seed=0), _graph_backend=backend)
    run()
    assert s2fast.graph_stats(pipe)["captures"] == captured
    s2fast.unwrap(pipe)
