"""The engine on the new families: block graphs through the CPU stand-in backend (the CUDA graph buffer contract): Qwen-Image
(a text mask among the row constants, a rotary pair), Flux.2 (double and single blocks, four row constants) and
Z-Image (complex rotary tables, an attention mask) replay graphs captured at the warm-up, bit for bit equal to the
eager engine, with no eager fallback; and the library's naive three-pass baseline gives the engine's result."""

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


# Qwen's tiny prompt has a text mask and its negative none: the branches cannot share a batch, and the naive
# predictor runs them at batch 1 as the engine does apart: exact. Klein's branches stack: the naive predictor runs
# [uncond, cond] at batch 2 and the sub-network at batch 1 from the embedding on, the engine forks it off the batch-2
# cond rows: fp32 rounding of different GEMM shapes, atol 2e-5. (Z-Image is not served by the naive predictor: its
# rows are the adapter's stacked tensors, not the forward's per-sample lists.)
@pytest.mark.parametrize("build,tol", [(_qwen, 0.0), (_flux2_klein, 2e-5)], ids=["qwen", "flux2_klein"])
def test_the_library_three_pass_baseline_matches_the_engine(build, tol):
    """s2fast.reference's naive three-pass predictor (stock forwards with blocks skipped through the adapter's
    ``skipped_block_output``: Flux.2's single blocks as the forward calls them) gives the engine's result."""
    from s2fast.reference import wrap_three_pass

    pipe, call = build()
    masks = ((1,), (2, 3), (3,))
    try:
        s2fast.wrap(pipe, S2Config(omega=0.5, masks=masks, fork_mode="separate"))
        engine = call(0)
        wrap_three_pass(pipe, S2Config(omega=0.5, masks=masks))
        naive = call(0)
    finally:
        s2fast.unwrap(pipe)
    torch.testing.assert_close(naive, engine, atol=tol, rtol=tol)
