"""What the graph path must survive on the CPU stand-in (EagerBackend): a first call under torch.inference_mode,
a capture that fails, autocast, replaced weights (fresh pools), and Flux's rotary tensors read from one shared
buffer instead of a copy per graph. tests/test_graphs_gpu.py runs the GPU side of these."""

import logging

import pytest
import torch

import s2fast
from s2fast import S2Config, tiny
from s2fast.graphs import CaptureFailed, EagerBackend, RecordingBackend

STEPS = 3


@pytest.fixture(scope="module")
def sd3():
    return tiny.sd3_latent_call(STEPS)


def _call(pipe, kw, seed=0, **more):
    return pipe(**kw, **more, generator=torch.Generator().manual_seed(seed)).images


def _eager(pipe, kw, config, masks, seed=0, **more):
    """The same call without graphs, on the masks the graphed call drew."""
    s2fast.wrap(pipe, config.replace(masks=masks, cuda_graphs=False))
    try:
        return _call(pipe, kw, seed, **more)
    finally:
        s2fast.unwrap(pipe)


CONFIG = S2Config(omega=0.5, drop_ratio=0.3, seed=1)


@pytest.mark.parametrize("first_in_inference_mode", [True, False])
def test_inference_mode_then_a_normal_call_and_back(sd3, first_in_inference_mode):
    pipe, kw = sd3
    s2fast.wrap(pipe, CONFIG, _graph_backend=EagerBackend())
    try:
        results = []
        for inference in (first_in_inference_mode, not first_in_inference_mode, first_in_inference_mode):
            with torch.inference_mode(inference):
                results.append(_call(pipe, kw).clone())
        stats = s2fast.graph_stats(pipe)
    finally:
        s2fast.unwrap(pipe)
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])
    assert stats["replays"] > 0 and stats["eager_calls"] == 0


class FailingBackend(EagerBackend):
    """Captures ``ok`` graphs, then fails as a capture does on a GPU when a block synchronises with the host."""

    def __init__(self, ok):
        super().__init__()
        self.ok = ok

    def capture(self, fn, static_in, pool):
        if self.ok == 0:
            raise CaptureFailed("RuntimeError: operation not permitted when stream is capturing")
        self.ok -= 1
        return super().capture(fn, static_in, pool)


@pytest.mark.parametrize("ok", [0, 5])  # fails at the first capture, or in the middle of the warm-up
def test_a_failed_capture_falls_back_to_eager_logged_once_and_counted(sd3, ok, caplog):
    pipe, kw = sd3
    backend = FailingBackend(ok)
    s2fast.wrap(pipe, CONFIG, _graph_backend=backend)
    try:
        with caplog.at_level(logging.WARNING, logger="s2fast"):
            first = _call(pipe, kw)
            second = _call(pipe, kw)
        stats, masks = s2fast.graph_stats(pipe), s2fast.trace(pipe)
    finally:
        s2fast.unwrap(pipe)
    assert torch.equal(first, second) and torch.equal(first, _eager(pipe, kw, CONFIG, masks))
    assert stats["capture_failures"] == 1 and stats["graphs"] == 0 and stats["eager_calls"] > 0
    failures = [r for r in caplog.records if "capturing a block graph failed" in r.getMessage()]
    assert len(failures) <= 1  # once per process: an earlier parametrisation may have logged it already
    # a new wrap tries graphs again
    backend.ok = 10_000
    s2fast.wrap(pipe, CONFIG, _graph_backend=backend)
    try:
        _call(pipe, kw)
        assert s2fast.graph_stats(pipe)["captures"] > 0
    finally:
        s2fast.unwrap(pipe)


def test_autocast_is_part_of_the_key(sd3):
    pipe, kw = sd3
    s2fast.wrap(pipe, CONFIG, _graph_backend=EagerBackend())
    try:
        _call(pipe, kw)
        plain = s2fast.graph_stats(pipe)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = _call(pipe, kw)
        after, masks = s2fast.graph_stats(pipe), s2fast.trace(pipe)
        _call(pipe, kw)
        assert s2fast.graph_stats(pipe)["captures"] == after["captures"]  # back to the plain graphs
    finally:
        s2fast.unwrap(pipe)
    # graphs captured without autocast never serve a call under it (they would replay fp32 kernels)
    assert after["captures"] > plain["captures"] and after["pools"] == plain["pools"] + 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(autocast, _eager(pipe, kw, CONFIG, masks))


def test_replaced_weights_recapture_into_a_fresh_pool(sd3):
    pipe, kw = sd3
    backend = RecordingBackend()
    s2fast.wrap(pipe, CONFIG, _graph_backend=backend)
    block = pipe.transformer.transformer_blocks[1]
    weight = block.ff.net[2].weight
    try:
        _call(pipe, kw)
        before = {pool for event, pool, _ in backend.events if event == "capture"}
        block.ff.net[2].weight = torch.nn.Parameter(weight.detach().clone())
        _call(pipe, kw)
        after = {pool for event, pool, _ in backend.events if event == "capture"} - before
        assert s2fast.graph_stats(pipe)["invalidations"] == 1
        assert after and not after & before  # never a pool id that was released
        assert backend.order_violations() == []
    finally:
        block.ff.net[2].weight = weight
        s2fast.unwrap(pipe)


def test_flux_rotary_tensors_are_one_shared_buffer_read_in_place():
    shape = tiny.FluxShape()
    pipe = tiny.flux_pipeline(shape, with_vae=False)
    kw = dict(tiny.embeddings(shape), **tiny.image_size(pipe, shape), output_type="latent", true_cfg_scale=4.0,
              num_inference_steps=STEPS)
    s2fast.wrap(pipe, CONFIG, _graph_backend=EagerBackend())
    try:
        graphed, masks = _call(pipe, kw), s2fast.trace(pipe)
        graphs = s2fast.serving.controller_of(pipe).state(pipe.transformer).graphs
        shared = {ptr for ptr in graphs._shared_ptrs}
        per_graph = [{t.data_ptr() for t in g.static_in if t is not None} & shared for g in graphs._graphs.values()]
    finally:
        s2fast.unwrap(pipe)
    assert len(shared) == 2  # rotary (cos, sin): one buffer each for every graph of this shape
    assert all(ptrs == shared for ptrs in per_graph)
    assert torch.equal(graphed, _eager(pipe, kw, CONFIG, masks))
