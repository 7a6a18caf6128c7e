"""Block graphs on a CUDA device (marker gpu; skipped without CUDA): real CUDA graph replay equals eager for random
masks, nothing is recaptured after the warm-up, and the graphs' memory is reported and bounded."""

import pytest
import torch

import s2fast
from s2fast import S2Config, tiny

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_cuda_graphs_replay_equals_eager_with_no_recapture(name, dtype):
    shape = tiny.SD3Shape() if name == "sd3" else tiny.FluxShape()
    pipe = (tiny.sd3_pipeline if name == "sd3" else tiny.flux_pipeline)(shape, dtype=dtype, with_vae=False).to("cuda")
    kw = dict(tiny.embeddings(shape, dtype=dtype), **tiny.image_size(pipe, shape), output_type="latent",
              num_inference_steps=25, **{"guidance_scale" if name == "sd3" else "true_cfg_scale": 4.0})
    kw = {k: v.to("cuda") if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    config = S2Config(omega=0.5, drop_ratio=0.3, seed=None, step_mode="exact")  # fresh masks every call
    run = lambda seed: pipe(**kw, generator=torch.Generator("cuda").manual_seed(seed)).images  # noqa: E731
    graphed, traces = [], []
    s2fast.wrap(pipe, config.replace(cuda_graphs=True))
    try:
        for seed in range(4):  # 100 steps, 100 random masks
            graphed.append(run(seed))
            traces.append(s2fast.trace(pipe))
            if seed == 0:
                captured = s2fast.graph_stats(pipe)["captures"]
        stats = s2fast.graph_stats(pipe)
        for seed, masks in enumerate(traces):
            s2fast.wrap(pipe, config.replace(cuda_graphs=False, masks=masks))
            assert torch.equal(graphed[seed], run(seed))  # the same kernels replayed on the same shapes
    finally:
        s2fast.unwrap(pipe)
    assert stats["captures"] == captured and stats["eager_calls"] == 0
    n_blocks = len(pipe.transformer.transformer_blocks) + len(getattr(pipe.transformer, "single_transformer_blocks", []))
    assert captured <= 2 * n_blocks
    params = sum(p.numel() * p.element_size() for p in pipe.transformer.parameters())
    # bounded: static buffers hold a few activations per graph, far below the weights for these shapes
    assert 0 < stats["static_bytes"] < 4 * params + 64 * 2**20


def test_no_host_sync_from_s2fast_inside_the_loop():
    """With graphs and the fused step, s2fast's own code makes the host wait for the GPU nowhere in a call
    (torch's sync debug mode warns at every synchronising op; diffusers' own code is not judged here)."""
    import warnings

    shape = tiny.SD3Shape()
    pipe = tiny.sd3_pipeline(shape, with_vae=False).to("cuda")
    kw = dict(tiny.embeddings(shape), **tiny.image_size(pipe, shape), output_type="latent", num_inference_steps=6,
              guidance_scale=4.0)
    kw = {k: v.to("cuda") if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    s2fast.wrap(pipe, S2Config(omega=0.5, seed=0, cuda_graphs=True, fused_step=True))
    try:
        pipe(**kw)  # warm-up: graph capture may synchronise, sampling must not
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                pipe(**kw)
            finally:
                torch.cuda.set_sync_debug_mode("default")
    finally:
        s2fast.unwrap(pipe)
    ours = [f"{w.filename}:{w.lineno}" for w in caught
            if "synchroniz" in str(w.message).lower() and "/s2fast/" in w.filename.replace("\\", "/")]
    assert not ours, ours
