"""Block graphs on the new families through the CPU stand-in backend (the CUDA graph buffer contract): Qwen-Image
(a text mask among the row constants, a rotary pair), Flux.2 (double and single blocks, four row constants) and
Z-Image (complex rotary tables, an attention mask) replay graphs captured at the warm-up, bit for bit equal to the
eager engine, with no eager fallback."""

import pytest
import torch

import s2fast
from s2fast import S2Config
from s2fast import tiny_families as tf
from s2fast.graphs import EagerBackend


def _qwen():
    shape = tf.QwenShape()
    pipe = tf.qwen_pipeline(shape)
    emb = tf.qwen_embeddings(shape)
    return pipe, lambda seed: pipe(**emb, **tf.qwen_image_size(shape), num_inference_steps=3, true_cfg_scale=4.0,
                                   output_type="latent", generator=torch.Generator().manual_seed(seed)).images


def _flux2_klein():
    shape = tf.Flux2Shape(guidance_embeds=False)
    pipe = tf.flux2_pipeline(shape, klein=True)
    emb = tf.flux2_embeddings(shape)
    return pipe, lambda seed: pipe(**emb, **tf.flux2_image_size(shape), num_inference_steps=3, guidance_scale=4.0,
                                   output_type="latent", generator=torch.Generator().manual_seed(seed)).images


def _zimage():
    shape = tf.ZImageShape()
    pipe = tf.zimage_pipeline(shape)
    emb = tf.zimage_embeddings(shape, negative_tokens=11)
    return pipe, lambda seed: pipe(**emb, height=64, width=64, num_inference_steps=3, guidance_scale=4.0,
                                   output_type="latent", generator=torch.Generator().manual_seed(seed)).images


@pytest.mark.parametrize("build", [_qwen, _flux2_klein, _zimage], ids=["qwen", "flux2_klein", "zimage"])
def test_block_graphs_serve_the_new_families_and_equal_eager(build):
    pipe, call = build()
    config = S2Config(omega=0.5, drop_ratio=0.5, seed=None)  # fresh masks every call
    graphed, traces = [], []
    s2fast.wrap(pipe, config, _graph_backend=EagerBackend())
    try:
        for seed in range(2):
            graphed.append(call(seed))
            traces.append(s2fast.trace(pipe))
        stats = s2fast.graph_stats(pipe)
        for seed, masks in enumerate(traces):
            s2fast.wrap(pipe, config.replace(masks=masks))
            assert torch.equal(graphed[seed], call(seed))
    finally:
        s2fast.unwrap(pipe)
    assert stats["replays"] > 0 and stats["eager_calls"] == 0
