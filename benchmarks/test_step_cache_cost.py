"""Per-sample cost of step caches under CFG and S², on the trained digits model (s2fast/digits: a 6-block DiT,
49 tokens of width 128, [cond, null] rows in one call, FlowMatch Euler), 10 labels, 20 steps, fp32 on the CPU.

A "sample" is one whole pipeline call (transformer, guidance, scheduler; pixels out). The caches decide from the
trajectory, so the cases run the real pipeline, not a fixed plan. Cases, all at the same threshold T:
- cfg-stock: the unwrapped pipeline (the baseline of every ratio);
- cfg-fbc: the unwrapped pipeline with diffusers' FirstBlockCache at T on its transformer (a copy of the same
  weights): it measures the first block's residual on the whole [cond, null] batch;
- cfg-blockcache: s2fast with ω = 0 and BlockCache(T): CFG, cached by the cond rows' first-block residual;
- s2: S² (ω = 0.25, seeded masks);
- s2-blockcache: S² with BlockCache(T) (subnet "reuse": a cached step adds the last full step's sub-network
  residual);
- s2-blockcache-recompute: the same with subnet "recompute" (a cached step runs the sub-network's blocks after the
  probe on the step's own mask).
Block-rows per sample are counted exactly (a hook on every block's attention counts the rows it runs) and, for the
s2fast cases, checked against the cost model (engine.block_rows for full steps, engine.cached_block_rows for cached
ones, from s2fast.trace and s2fast.trace_steps). ``mean_abs_diff`` is the mean absolute pixel difference (pixels in
[0, 1]) from the same method without its cache; ``floor_ratio`` is the block-rows over cfg-stock's.

    OMP_NUM_THREADS=1 .venv/bin/pytest benchmarks/test_step_cache_cost.py --benchmark-only
"""

import copy

import pytest
import torch
from diffusers.hooks import FirstBlockCacheConfig, HookRegistry, apply_first_block_cache
from diffusers.hooks.hooks import CacheContext, _set_cache_context

import s2fast
from s2fast import BlockCache, S2Config
from s2fast.digits.pipeline import DigitsFlowPipeline, balanced_labels, load_default_pipeline
from s2fast.engine import block_rows, cached_block_rows

STEPS = 20
THRESHOLD = 0.2  # the digits model's first-block change runs 0.08–0.28 a step at 20 steps: T = 0.2 caches ~half
LAMBDA, OMEGA = 4.0, 0.25
ROUNDS = 7
LABELS = balanced_labels(10)


def _pipeline(model, scheduler):
    pipe = DigitsFlowPipeline(model, copy.deepcopy(scheduler))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipes():
    torch.set_grad_enabled(False)
    base = load_default_pipeline()
    model, scheduler = base.transformer, base.scheduler
    fbc_model = copy.deepcopy(model)
    apply_first_block_cache(fbc_model, FirstBlockCacheConfig(threshold=THRESHOLD))
    # fork_mode "separate": "auto" times its choice at the first call of a shape (block-rows outside any sample)
    # and may choose differently from one process to the next; fixed, every round runs the same lanes
    s2 = S2Config(omega=OMEGA, seed=1, fork_mode="separate")
    configs = {
        "cfg-blockcache": S2Config(omega=0.0, fork_mode="separate", cache=BlockCache(threshold=THRESHOLD)),
        "s2": s2,
        "s2-blockcache": s2.replace(cache=BlockCache(threshold=THRESHOLD)),
        "s2-blockcache-recompute": s2.replace(cache=BlockCache(threshold=THRESHOLD, subnet="recompute")),
    }
    out = {"cfg-stock": _pipeline(model, scheduler), "cfg-fbc": _pipeline(fbc_model, scheduler)}
    for name, config in configs.items():
        out[name] = s2fast.wrap(_pipeline(model, scheduler), config)
    yield out
    for name in configs:
        s2fast.unwrap(out[name])
    torch.set_grad_enabled(True)


def _sample(name, pipe):
    def run():
        if name == "cfg-fbc":  # what a diffusers pipeline with cache support does around its loop
            _set_cache_context(pipe.transformer, CacheContext("cond"))
        try:
            return pipe(LABELS, guidance_scale=LAMBDA, num_inference_steps=STEPS, output_type="pt",
                        generator=torch.Generator().manual_seed(0)).images
        finally:
            if name == "cfg-fbc":
                _set_cache_context(pipe.transformer, None)
                HookRegistry.check_if_exists_or_initialize(pipe.transformer).reset_stateful_hooks(recurse=True)

    return run


def _counted(pipe, run):
    """The output of one call and the block-rows it ran (rows through each block's attention)."""
    rows = [0]

    def count(module, args, kwargs):
        rows[0] += (args[0] if args else kwargs["hidden_states"]).shape[0]

    handles = [block.attn1.register_forward_pre_hook(count, with_kwargs=True)
               for block in pipe.transformer.transformer_blocks]
    try:
        return run(), rows[0]
    finally:
        for h in handles:
            h.remove()


def _model_rows(pipe, config) -> int:
    """The block-rows the cost model gives the last call of a wrapped pipeline, step by step."""
    L, total = len(pipe.transformer.transformer_blocks), 0
    for masks, record in zip(s2fast.trace(pipe), s2fast.trace_steps(pipe)):
        subnets = [masks] if masks else []
        if record.blocks == "full":
            total += block_rows(L, 2, subnets)
        else:
            c = config.cache
            total += cached_block_rows(L, 2, subnets, c.probe_blocks, c.subnet == "recompute")
    return total * len(LABELS)


def test_step_cache_sample(interleaved, pipes):
    cases = {name: _sample(name, pipe) for name, pipe in pipes.items()}
    outputs, extra = {}, {}
    for name, run in cases.items():
        outputs[name], rows = _counted(pipes[name], run)
        extra[name] = {"block_rows": rows / len(LABELS)}
        config = s2fast.config_of(pipes[name])
        if config is not None:
            assert rows == _model_rows(pipes[name], config), name  # counted = the cost model, step by step
            extra[name]["cached_steps"] = sum(r.blocks == "cached" for r in s2fast.trace_steps(pipes[name]))
    stock_rows = extra["cfg-stock"]["block_rows"]
    assert stock_rows == 2 * 6 * STEPS
    uncached = {"cfg-fbc": "cfg-stock", "cfg-blockcache": "cfg-stock", "s2-blockcache": "s2",
                "s2-blockcache-recompute": "s2"}
    for name in cases:
        extra[name]["floor_ratio"] = extra[name]["block_rows"] / stock_rows
        if name in uncached:
            extra[name]["mean_abs_diff"] = (outputs[name] - outputs[uncached[name]]).abs().mean().item()
    # FirstBlockCache runs block 0 on both rows at a cached step: its cached steps follow from the rows it ran
    extra["cfg-fbc"]["cached_steps"] = (stock_rows - extra["cfg-fbc"]["block_rows"]) / (2 * 5)
    interleaved(f"digits 6x128 sample of {STEPS} steps, 10 labels, step caches at threshold {THRESHOLD}", cases,
                "cfg-stock", ROUNDS, extra)
