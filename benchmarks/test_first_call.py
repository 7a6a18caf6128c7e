"""A wrapped pipeline's first call against its steady state: what `s2fast generate` of one image pays.

fork_mode "auto" decides "join" or "separate" at the first step that can run a sub-network, by timing one block's
calls in each mode (s2fast/fork_choice.py); that cost, and whatever else a first call does once (wrapping, mask
sampling, allocations), falls on the first call only. Each round here makes a fresh first call per case: wrap,
call, unwrap, with the process-wide "auto" choice forgotten, so every round pays the decision again.

Cases, all S² (ω 0.25, one mask per step, masks from seed 0) on a 24-block SD3-shaped transformer, random
weights, latents out:
- steady: a pipeline wrapped once with fork_mode "auto", called after its first call (the baseline);
- first-auto: a fresh wrap with fork_mode "auto" (the default), its first call;
- steady-separate: the same with fork_mode "separate" (where "auto" chose "join", the two steady states differ);
- first-separate: a fresh wrap with fork_mode "separate", its first call (the first-call cost without the decision:
  compare it with steady-separate);
- stock-cfg: stock CFG on its own copy of the transformer, for scale.

Beside each ratio, the block-rows the call ran (forward pre-hooks on the blocks add each call's batch size): a
count that does not drift with the machine's load. first-auto less first-separate is the decision's own count.

    .venv/bin/pytest benchmarks/test_first_call.py --benchmark-only
"""

import copy

import pytest
import torch

import s2fast
from s2fast import S2Config, fork_choice, tiny

STEPS = 6
SHAPES = {
    "tiny": (tiny.LAUNCH_SD3, 9),
    "mid": (tiny.BENCH_SD3, 5),
}
S2 = S2Config(omega=0.25, seed=0)


class BlockRows:
    """Block-rows run through ``blocks`` while counting: each block call adds its hidden states' batch size."""

    def __init__(self, blocks):
        self.count = 0
        self._handles = [b.register_forward_pre_hook(self._add, with_kwargs=True) for b in blocks]

    def _add(self, module, args, kwargs):
        hidden = args[0] if args else kwargs.get("hidden_states")
        self.count += hidden.shape[0]

    def measure(self, call) -> float:
        self.count = 0
        call()
        return float(self.count)

    def remove(self):
        for h in self._handles:
            h.remove()


def first_call(pipe, config, run):
    """A fresh wrap of ``pipe`` with ``config``, its first call, then unwrap; "auto" forgets its earlier choices."""
    fork_choice._CHOSEN.clear()
    s2fast.wrap(pipe, config)
    try:
        run(pipe)
    finally:
        s2fast.unwrap(pipe)


@pytest.mark.parametrize("shape_name", SHAPES)
def test_first_call(interleaved, shape_name):
    shape, rounds = SHAPES[shape_name]
    torch.set_grad_enabled(False)
    stock = tiny.sd3_pipeline(shape, with_vae=False)
    kw = dict(tiny.embeddings(shape), **tiny.image_size(stock, shape), output_type="latent",
              num_inference_steps=STEPS, guidance_scale=5.0)
    run = lambda pipe: pipe(**kw, generator=torch.Generator().manual_seed(0))  # noqa: E731
    shared = copy.deepcopy(stock.transformer)  # the wrapped pipelines' transformer; stock keeps its own
    pipes = {}
    for name in ("steady", "steady-separate", "first-auto", "first-separate"):
        pipe = tiny.sd3_pipeline(shape, with_vae=False)
        pipe.transformer = shared
        pipes[name] = pipe
    s2fast.wrap(pipes["steady"], S2)
    s2fast.wrap(pipes["steady-separate"], S2.replace(fork_mode="separate"))
    for name in ("steady", "steady-separate"):
        run(pipes[name])  # its first call: what follows is steady state
    cases = {
        "steady": lambda: run(pipes["steady"]),
        "steady-separate": lambda: run(pipes["steady-separate"]),
        "first-auto": lambda: first_call(pipes["first-auto"], S2, run),
        "first-separate": lambda: first_call(pipes["first-separate"], S2.replace(fork_mode="separate"), run),
        "stock-cfg": lambda: run(stock),
    }
    counters = {"stock-cfg": BlockRows(stock.transformer.transformer_blocks)}
    wrapped_rows = BlockRows(shared.transformer_blocks)
    extra = {}
    try:
        for name, case in cases.items():
            counter = counters.get(name, wrapped_rows)
            extra[name] = {"block_rows": counter.measure(case)}
        wrapped_rows.remove()
        counters["stock-cfg"].remove()
        interleaved(f"sd3-{shape_name} first call vs steady state, {STEPS} steps", cases, "steady", rounds, extra)
    finally:
        wrapped_rows.remove()
        counters["stock-cfg"].remove()
        s2fast.unwrap(pipes["steady"])
        s2fast.unwrap(pipes["steady-separate"])
        torch.set_grad_enabled(True)
