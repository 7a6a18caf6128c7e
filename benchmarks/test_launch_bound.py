"""Whole pipeline calls where a step costs per block *call* (tiny shape) and per block *row* (mid shape).

A 24-block SD3-shaped transformer, random weights, fp32, 8 steps, latents out (no VAE), prompt embeddings given:
- tiny: 1 head × 8, 4×4 latents (4 image tokens), 4 text tokens: a block call is a few dozen small ops, so the
  host's per-op cost dominates (the launch-bound regime of small images on fast GPUs);
- mid: 4 heads × 64, 32×32 latents (256 image tokens), 77 text tokens: arithmetic dominates.

Cases: stock CFG (its own copy of the transformer: no s2fast on it), s2fast's CFG path (ω = 0), and S² with
fork_mode "separate", "join" and "auto" (the default), all with the same seeded masks. Beside each ratio to stock
CFG, two floors from the masks the call drew (s2fast.trace): block rows (the cost model of docs/PERFORMANCE.md)
and block calls (what a step costs when every call costs the same, whatever its rows).

    .venv/bin/pytest benchmarks/test_launch_bound.py --benchmark-only
"""

import copy

import pytest
import torch

import s2fast
from s2fast import S2Config, tiny
from s2fast.engine import block_rows

STEPS = 8
SHAPES = {
    "tiny": (tiny.LAUNCH_SD3, 12),
    "mid": (tiny.BENCH_SD3, 5),
}
S2 = S2Config(omega=0.25, seed=0, fused_step=False)  # the fused step is the same in every case: kept out


def block_calls(num_blocks: int, subnets, fork_mode: str, reuse_prefix: bool = True) -> int:
    """Block calls one step makes: the [uncond, cond] lane's, plus, with "separate", one per block a
    sub-network lane runs (from its fork to the last block, less the blocks it drops)."""
    if fork_mode == "join":
        return num_blocks
    return num_blocks + sum(num_blocks - (min(m) if reuse_prefix else 0) - len(m) for m in subnets)


def call_counts(call) -> dict:
    """Counts that do not drift with the machine's load, for one (steady-state) call: aten ops (a dispatch mode),
    Python function calls and Python + C calls (sys.setprofile). A change in any between commits is a change in the
    work; wall time on a shared machine cannot show a 5 % regression, these can (docs/PERFORMANCE.md §15)."""
    import sys

    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Ops.count += 1
            return func(*args, **(kwargs or {}))

    with Ops():
        call()
    calls = {"call": 0, "c_call": 0}

    def profile(frame, event, arg):
        if event in calls:
            calls[event] += 1

    sys.setprofile(profile)
    try:
        call()
    finally:
        sys.setprofile(None)
    # Python + C calls also count builtins (list.extend, dict.get: what a module walk is made of)
    return {"aten_ops": float(Ops.count), "py_calls": float(calls["call"]),
            "py_c_calls": float(calls["call"] + calls["c_call"])}


def _floors(trace, num_blocks, fork_mode):
    steps = [(s,) if s and isinstance(s[0], int) else tuple(s) for s in trace]  # the public form of one mask
    rows = sum(block_rows(num_blocks, 2, s) for s in steps) / (len(steps) * 2 * num_blocks)
    calls = sum(block_calls(num_blocks, s, fork_mode) for s in steps) / (len(steps) * num_blocks)
    return {"floor_ratio": round(rows, 3), "call_floor": round(calls, 3)}


@pytest.mark.parametrize("shape_name", SHAPES)
def test_pipeline_steps(interleaved, shape_name):
    shape, rounds = SHAPES[shape_name]
    torch.set_grad_enabled(False)
    stock = tiny.sd3_pipeline(shape, with_vae=False)
    kw = dict(tiny.embeddings(shape), **tiny.image_size(stock, shape), output_type="latent",
              num_inference_steps=STEPS, guidance_scale=5.0)
    configs = {"cfg-s2fast": S2.replace(omega=0.0), "s2-separate": S2.replace(fork_mode="separate"),
               "s2-join": S2.replace(fork_mode="join"), "s2-auto": S2}
    shared = copy.deepcopy(stock.transformer)  # one transformer for the wrapped pipelines, another for stock
    pipes = {}
    for name, config in configs.items():
        pipe = tiny.sd3_pipeline(shape, with_vae=False)
        pipe.transformer = shared
        s2fast.wrap(pipe, config)
        pipes[name] = pipe
    pipes["cfg-stock"] = stock
    run = lambda pipe: pipe(**kw, generator=torch.Generator().manual_seed(0))  # noqa: E731
    extra = {"cfg-stock": {"floor_ratio": 1.0, "call_floor": 1.0}}
    for name, pipe in pipes.items():
        if name != "cfg-stock":
            run(pipe)
            mode = configs[name].fork_mode
            if mode == "auto":  # what the call ran: the controller notes it per call
                mode = s2fast.serving.controller_of(pipe)._run.memo.get(("fork_mode", id(shared)), "separate")
            extra[name] = _floors(s2fast.trace(pipe), shape.num_layers, mode)
            extra[name]["joined"] = float(mode == "join")
    for name, pipe in pipes.items():
        extra[name].update(call_counts(lambda p=pipe: run(p)))
    cases = {name: (lambda p=pipe: run(p)) for name, pipe in pipes.items()}
    try:
        interleaved(f"sd3-{shape_name} whole call, {STEPS} steps", cases, "cfg-stock", rounds, extra)
    finally:
        for pipe in pipes.values():
            s2fast.unwrap(pipe)
        torch.set_grad_enabled(True)
