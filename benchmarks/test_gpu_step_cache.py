"""Cached S² end to end on a GPU: Wan 2.1 1.3B (480p, 81 frames) and Flux-dev (1024²) shaped transformers, random
weights, bf16, against stock CFG and uncached S², with s2fast's BlockCache (s2fast/step_cache.py).

Random weights decide nothing about where a trained model's steps change little, so the cached cases use a
threshold every step passes (``threshold=10``, ``warmup_steps=2``): every step but the first two and the last is
cached. What this measures is the cost of cached steps on the real shapes — the block-row floor of a cached
step is the probe's n·2 (n·3 with subnet "recompute" plus the sub-network's blocks after it) against 2L + (L − k −
d) — and whether the block graphs replay fewer blocks without recapture. Where a trained model's change would
cache some fraction f of the steps, the sample costs interpolate between the uncached and the all-cached case.

Cases (each one whole pipeline call, output_type="latent", timed with CUDA events, interleaved rounds after a warm-up
call that also captures the block graphs): stock-cfg (a sibling pipeline that is not wrapped), s2fast-s2,
s2fast-s2-cached (subnet "reuse"), s2fast-s2-cached-recompute, s2fast-cfg-cached (ω = 0 with the cache),
s2fast-s2-reuse-k2 (no cache; S2Config.correction_every=2: the sub-networks run every other S² step). Reported per
case: median seconds, ratio to stock CFG, peak memory, the block-row floor of the steps that ran (from
s2fast.trace and s2fast.trace_steps) and the cached steps.

    .venv/bin/pytest benchmarks/test_gpu_step_cache.py --benchmark-only      # skipped without CUDA
"""

import pytest
import torch

import s2fast
from s2fast import BlockCache, S2Config, tiny
from s2fast.engine import block_rows, cached_block_rows

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="times whole pipelines on a GPU: no CUDA here")

STEPS, ROUNDS = 20, 3
ALWAYS = BlockCache(threshold=10.0, warmup_steps=2)
FLUX_DEV = tiny.FluxShape(num_layers=19, num_single_layers=38, heads=24, head_dim=128, latent_size=128,
                          text_tokens=512, joint_attention_dim=4096, pooled_dim=768)
WAN_1_3B = tiny.WanShape(num_layers=30, heads=12, head_dim=128, latent_frames=21, latent_size=60, latent_width=104,
                         text_tokens=512, text_dim=4096, ffn_dim=8960)


def _build(name):
    torch.manual_seed(0)
    torch.set_default_device("cuda")  # random init on the GPU: seconds for a 1–12 B-parameter model
    try:
        if name == "flux-dev":
            pipe = tiny.flux_pipeline(FLUX_DEV, dtype=torch.bfloat16, with_vae=False)
            kw = {k: v.to("cuda") for k, v in tiny.embeddings(FLUX_DEV, dtype=torch.bfloat16).items()}
            kw.update(tiny.image_size(pipe, FLUX_DEV), true_cfg_scale=5.0)
        else:
            pipe = tiny.wan_pipeline(WAN_1_3B, dtype=torch.bfloat16, with_vae=False)
            kw = {k: v.to("cuda") for k, v in tiny.wan_embeddings(WAN_1_3B, dtype=torch.bfloat16).items()}
            kw.update(tiny.wan_video_size(pipe, WAN_1_3B), guidance_scale=5.0)
    finally:
        torch.set_default_device(None)
    pipe.to("cuda")
    pipe.set_progress_bar_config(disable=True)
    kw.update(num_inference_steps=STEPS, output_type="latent")
    return pipe, kw


def _timed_call(pipe, kw, setup, peak):
    def case():
        setup()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        pipe(**kw, generator=torch.Generator("cuda").manual_seed(0))
        end.record()
        end.synchronize()
        peak["MiB"] = max(peak.get("MiB", 0), torch.cuda.max_memory_allocated() / 2**20)
        return start.elapsed_time(end) / 1e3

    return case


def _floor(pipe, config, num_blocks: int) -> float:
    """Block-rows of the last call over stock CFG's, step by step from the traces (the cost model)."""
    total = 0
    for masks, record in zip(s2fast.trace(pipe), s2fast.trace_steps(pipe)):
        subnets = [masks] if masks else []
        if record.blocks == "full":
            if record.correction == "reused":  # correction_every: the stored Δ stood in, no sub-network ran
                subnets = []
            total += block_rows(num_blocks, 2, subnets)
        else:
            total += cached_block_rows(num_blocks, 2, subnets, config.cache.probe_blocks,
                                       config.cache.subnet == "recompute")
    return total / (2 * num_blocks * STEPS)


@pytest.mark.parametrize("name", ["wan2.1-1.3b", "flux-dev"])
def test_cached_s2_end_to_end(interleaved, name):
    torch.set_grad_enabled(False)
    pipe, kw = _build(name)
    model = pipe.transformer
    num_blocks = len(model.transformer_blocks) + len(getattr(model, "single_transformer_blocks", []))
    stock = type(pipe)(**pipe.components)  # not wrapped: its calls take the stock forward
    stock.set_progress_bar_config(disable=True)
    s2 = S2Config(omega=0.25, seed=0)
    configs = {
        "s2fast-s2": s2,
        "s2fast-s2-cached": s2.replace(cache=ALWAYS),
        "s2fast-s2-cached-recompute": s2.replace(cache=BlockCache(threshold=10.0, warmup_steps=2,
                                                                   subnet="recompute")),
        "s2fast-cfg-cached": s2.replace(omega=0.0, cache=ALWAYS),
        "s2fast-s2-reuse-k2": s2.replace(correction_every=2),   # the S² correction computed every other step
    }
    cases, peaks = {}, {name_: {} for name_ in ["stock-cfg", *configs]}
    cases["stock-cfg"] = _timed_call(stock, kw, lambda: None, peaks["stock-cfg"])
    for case_name, config in configs.items():
        cases[case_name] = _timed_call(pipe, kw, lambda c=config: s2fast.wrap(pipe, c), peaks[case_name])
    summary = interleaved(f"{name} cached S² {STEPS} steps bf16", cases, "stock-cfg", ROUNDS, self_timed=True)
    for case_name, config in configs.items():
        s2fast.wrap(pipe, config)
        pipe(**kw)
        summary[case_name]["floor_ratio"] = _floor(pipe, config, num_blocks)
        summary[case_name]["cached_steps"] = sum(r.blocks == "cached" for r in s2fast.trace_steps(pipe))
        stats = s2fast.graph_stats(pipe)
        if stats is not None:
            summary[case_name]["graph_pool_MiB"] = stats["pool_bytes"] / 2**20
    s2fast.unwrap(pipe)
    for case_name, r in summary.items():
        r["peak_MiB"] = peaks[case_name]["MiB"]
    summary["stock-cfg"]["floor_ratio"] = 1.0
