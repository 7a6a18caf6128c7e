"""S2Config(fork_mode="auto"): after the fork, do the sub-network rows join the [uncond, cond] batch or run apart?

The two modes compute the same block-rows, so the block-row cost model cannot tell them apart. What differs:

- Calls. "join" makes one block call per block for all rows (batch 3B); "separate" makes one more call for every
  block the sub-network runs (batch B). When a block call is cheap (small latents, fast devices, graph replay), a
  step costs per *call*, and joining saves up to a third of it (on CPU, 24 blocks, 4×4 latents: S² at
  1.04–1.16 × CFG joined against 1.5–2.2 × separate). When a call is dear, joining saves nothing and costs a
  little: the fork copies the cond rows into a 3B batch, and a block the sub-network drops runs on a slice and is
  copied back (on CPU, 24 × 256, 32×32 latents: join 1.5–3 % slower than separate).
- Memory. "join" holds the working set of 3B rows inside one block call, where "separate" never holds more than
  stock CFG's 2B: on CPU, joining raised the activation peak by about 30 % against 7 % (12 blocks, 64×64 latents).

So "auto" decides per model and input shape, at the first step that can run a sub-network:
1. memory, from sizes: joining may hold at most ``MEMORY_SHARE`` of the transformer's weights more
   (``join_extra_bytes``: ``WORKING_SET`` times the hidden states of the sub-network rows). Stock CFG's peak holds
   at least the weights, so a join then stays within stock + 10 %. Over it: "separate", not timed.
2. time, measured on one block (``block_trial``): what the two modes differ in is the calls of every block the
   sub-network runs: one call at (2 + n)B rows ("join") against one at 2B and n at B ("separate"). So the first
   block any mask forks at is called that way, eagerly, before any block graph is captured, on the call's own
   embedded inputs: a warm-up and ``ROUNDS`` timed rounds per mode, interleaved, best kept. That is
   (1 + ROUNDS) · 2 · (2 + n) block-rows, about a third of one prediction of a 24-block model (it was
   (1 + ROUNDS) whole predictions per mode, and a 6-step call paid 2 × its steady-state time at its first step).
   "join" when it is at least ``JOIN_MARGIN`` faster, else "separate" (which keeps SD3's [uncond, cond] rows
   bit-identical to the stock batched forward). The fork's copies (a join copies the cond rows into the batch once
   per step) are left out: one copy of the hidden states against a block call of them.
The choice is logged once with its numbers and kept for the process, per architecture (class, config, device,
dtype) and input shape: every wrap of a model, and every copy of it, samples with the same choice, so a process
samples reproducibly. Another process may choose differently where the two modes time
within the margin of each other, and their results differ by batch-size rounding (~1e-6 relative in fp32):
force ``fork_mode`` where runs in different processes must agree bit for bit.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Dict, Optional, Tuple

import torch

from .adapters.base import lora_scale_context, split_lora_scale

logger = logging.getLogger("s2fast")

MEMORY_SHARE = 0.10  # the extra working set a join may hold, as a share of the weights
JOIN_MARGIN = 0.05   # "join" must be this much faster: within it, noise would pick a mode at random
ROUNDS = 2           # timed predictions per mode after one warm-up each; the best of them (the least disturbed)
# A block's live working set, in multiples of its input hidden states: attention's q, k, v and output (4×) and the
# MLP's hidden layer before and after its activation (2 × 4×), at MLP ratio 4 as SD3, Flux, DiT and Wan blocks use.
WORKING_SET = 12

Timer = Callable[[Callable[[], object], torch.device], float]

# (architecture, input key) -> mode, for the process: every wrap of a model, and every copy of it (deepcopy,
# pickle, the same checkpoint loaded twice), samples with the same choice
_CHOSEN: Dict[Tuple, str] = {}


def join_extra_bytes(row_bytes: int, rows_per_branch: int, num_masks: int) -> int:
    """Working set "join" holds beyond "separate": the sub-network rows inside each joined block call."""
    return WORKING_SET * row_bytes * rows_per_branch * num_masks


def join_fits(row_bytes: int, rows_per_branch: int, num_masks: int, weight_bytes: int) -> bool:
    return join_extra_bytes(row_bytes, rows_per_branch, num_masks) <= MEMORY_SHARE * weight_bytes


def wall_time(fn: Callable[[], object], device: torch.device) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def time_modes(run: Callable[[str], object], device: torch.device, timer: Timer = wall_time,
               rounds: int = ROUNDS) -> Dict[str, float]:
    """Best seconds of ``run(mode)`` per mode; the order alternates from round to round."""
    best = {"join": float("inf"), "separate": float("inf")}
    for mode in best:  # warm-up: first-call allocations stay out
        run(mode)
    for r in range(rounds):
        for mode in (("join", "separate") if r % 2 == 0 else ("separate", "join")):
            best[mode] = min(best[mode], timer(lambda m=mode: run(m), device))
    return best


def faster(times: Dict[str, float]) -> str:
    return "join" if times["join"] <= (1.0 - JOIN_MARGIN) * times["separate"] else "separate"


def fork_mode_for(model, key: Tuple, run: Callable[[str], object], row_bytes: int, rows_per_branch: int,
                  num_masks: int, timer: Optional[Timer] = None) -> str:
    """The mode "auto" runs ``model`` with at inputs ``key`` (``run(mode)``: what is timed in that mode,
    ``block_trial``)."""
    known = (architecture(model), key)
    if known in _CHOSEN:
        return _CHOSEN[known]
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    extra = join_extra_bytes(row_bytes, rows_per_branch, num_masks)
    if not join_fits(row_bytes, rows_per_branch, num_masks, weight_bytes):
        mode = "separate"
        why = (f"joining would hold ~{extra / 2**20:.1f} MiB more per block call, over {MEMORY_SHARE:.0%} of the "
               f"{weight_bytes / 2**20:.1f} MiB of weights; not timed")
    else:
        device = next(model.parameters()).device
        times = time_modes(run, device, timer or wall_time)
        mode = faster(times)
        why = (f"one block's calls: join {times['join'] * 1e3:.3g} ms, separate {times['separate'] * 1e3:.3g} ms; "
               f"join is chosen when {JOIN_MARGIN:.0%} faster")
    _CHOSEN[known] = mode
    logger.info("s2fast: fork_mode='auto' chose %r for %s at %s (%s)", mode, type(model).__name__,
                _describe(key), why)
    return mode


def block_trial(adapter, model, rows, block_index: int, num_masks: int) -> Callable[[str], object]:
    """``run(mode)``: block ``block_index`` called as the engine calls it after a fork in ``mode``, on the rows'
    embedded state: "join" once at the [uncond, cond] lane's rows plus ``num_masks`` cond copies, "separate" once
    at the lane's rows and ``num_masks`` times at the cond rows. No prediction is made. The blocks before it run
    once, untimed, so that the block sees the state it sees in sampling (under context parallelism a block before
    it may split the tokens). Nothing runs before the first ``run``: where the choice is already known (every call
    after the first), the trial costs nothing."""
    _, lora_scale = split_lora_scale(rows.branch(0).get(adapter.attention_kwargs_key))
    inputs = []  # filled once, at the first run

    def prepare():
        stacked = rows.stacked() if rows.count > 1 else None
        lane = adapter.embed(model, stacked if stacked is not None else rows.branch(rows.cond_branch))
        blocks = adapter.blocks(model)
        flow = lane.flow
        with lora_scale_context(model, lora_scale):
            for earlier in blocks[:block_index]:
                flow = list(adapter.run_block(earlier, flow, lane.row_consts, lane.shared))
        b = rows.rows_per_branch
        pos = rows.cond_branch if stacked is not None else 0
        take = lambda t: t.narrow(0, pos * b, b)  # noqa: E731
        joined = ([None if t is None else torch.cat([t] + [take(t)] * num_masks) for t in flow],
                  [torch.cat([t] + [take(t)] * num_masks) for t in lane.row_consts])
        cond = ([None if t is None else take(t) for t in flow], [take(t) for t in lane.row_consts])
        inputs.extend([blocks[block_index], lane, flow, joined, cond])

    def run(mode: str) -> None:
        if not inputs:
            prepare()
        block, lane, flow, (joined_flow, joined_consts), (cond_flow, cond_consts) = inputs
        with lora_scale_context(model, lora_scale):
            if mode == "join":
                adapter.run_block(block, joined_flow, joined_consts, lane.shared)
                return
            adapter.run_block(block, flow, lane.row_consts, lane.shared)
            for _ in range(num_masks):
                adapter.run_block(block, cond_flow, cond_consts, lane.shared)

    return run


def architecture(model) -> Tuple:
    """What the timing depends on: the model's class and config (diffusers' ``model.config``), and the device and
    dtype of its weights; not the weights' values. Copies of a model share it."""
    config = getattr(model, "config", None)
    items = tuple(sorted((str(k), repr(v)) for k, v in dict(config).items())) if config is not None else ()
    weight = next(model.parameters())
    return (type(model).__qualname__, items, str(weight.device), weight.dtype)


def _describe(key: Tuple) -> str:
    count, tensors = key
    return f"{count} branches, " + ", ".join(f"{name} {tuple(shape)}" for name, shape, _ in tensors)
