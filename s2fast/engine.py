"""One denoising step's predictions: the branches (uncond, cond) and the sub-networks, with the shared prefix once.

Rows are grouped in *lanes*: a lane is one batch that goes through the blocks together, made of *groups* of B rows
(one group per branch or sub-network). With batch_branches on, uncond and cond share one lane; a sub-network is a
copy ("fork") of the cond group's state at its first dropped block (reuse_prefix) or at block 0, and then runs as
a lane of its own (fork_mode "separate", batch B) or joins the cond lane ("join", batch 3B). At a block that some
groups of a lane drop, the block runs on the other rows only and the dropped rows pass through unchanged.

Block-rows per step (the cost model, docs/PERFORMANCE.md), L blocks, d dropped, first dropped k: CFG 2L; three
passes 2L + (L − d); this engine 2L + (L − k − d). The engine never names a model family: the adapter does all
model-specific work.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence, Tuple

import torch

from .adapters.base import BranchRows, FamilyAdapter, LaneState, lora_scale_context, split_lora_scale
from .graphs import BlockGraphs


@dataclass(frozen=True)
class EngineOptions:
    batch_branches: bool = True
    reuse_prefix: bool = True
    fork_mode: str = "separate"
    graphs: Optional[BlockGraphs] = None  # block graphs (s2fast/graphs.py); None runs every block eagerly


@dataclass
class _Group:
    output: int                # index into the list of predictions this group produces
    drops: frozenset = frozenset()


@dataclass
class _Lane:
    state: LaneState
    groups: List[_Group] = field(default_factory=list)
    drops: frozenset = frozenset()  # the blocks some group of the lane drops (none: every block runs on every row)


def predict(
    adapter: FamilyAdapter,
    model,
    rows: BranchRows,
    subnets: Sequence[Tuple[int, ...]],
    options: EngineOptions = EngineOptions(),
) -> List[torch.Tensor]:
    """Predictions for every branch of ``rows`` (in order), then one per mask in ``subnets`` (the cond branch with
    those blocks skipped)."""
    _, lora_scale = split_lora_scale(rows.branch(0).get(adapter.attention_kwargs_key))
    if options.graphs is not None:
        options.graphs.begin_prediction(graph_context(adapter, rows))
    with lora_scale_context(model, lora_scale):
        return _predict(adapter, model, rows, subnets, options)


def graph_context(adapter, rows: BranchRows) -> Tuple:
    """What a captured graph holds that its inputs do not show: the LoRA scale (applied to the layers in Python)
    and the autocast state of the rows' device (which kernels and dtypes the blocks ran). Part of every graph key
    and of the warm-up's."""
    first = rows.branch(0)
    _, lora_scale = split_lora_scale(first.get(adapter.attention_kwargs_key))
    device_type = next((v.device.type for v in first.values() if isinstance(v, torch.Tensor)), "cpu")
    autocast = (torch.get_autocast_dtype(device_type),) if torch.is_autocast_enabled(device_type) else None
    return ("lora_scale", lora_scale, "autocast", autocast)


def _predict(adapter, model, rows: BranchRows, subnets, options: EngineOptions) -> List[torch.Tensor]:
    blocks = adapter.blocks(model)
    b = rows.rows_per_branch
    stacked = rows.stacked() if options.batch_branches and rows.count > 1 else None
    if stacked is not None or rows.count == 1:
        lanes = [_Lane(adapter.embed(model, stacked or rows.branch(0)), [_Group(j) for j in range(rows.count)])]
    else:
        lanes = [_Lane(adapter.embed(model, rows.branch(j)), [_Group(j)]) for j in range(rows.count)]
    cond_output = rows.cond_branch
    forks = sorted(
        ((min(mask) if options.reuse_prefix else 0), rows.count + m, frozenset(mask)) for m, mask in enumerate(subnets)
    )
    joined = options.batch_branches and options.fork_mode == "join"
    # with ping-pong graph outputs the cond lane overwrites its block k−1 output two blocks later: a separate
    # sub-network lane must start from a copy, not a view (s2fast/graphs.py)
    copy_fork = options.graphs is not None and options.graphs.ping_pong
    for j, block in enumerate(blocks):
        while forks and forks[0][0] == j:
            _, output, drops = forks.pop(0)
            _fork(lanes, cond_output, b, _Group(output, drops), joined, copy_fork)
        for lane_id, lane in enumerate(lanes):
            _run_block(adapter, block, j, lane, b, options.graphs, lane_id)
    predictions: List[Optional[torch.Tensor]] = [None] * (rows.count + len(subnets))
    for lane in lanes:
        out = adapter.head(model, lane.state)
        for g, group in enumerate(lane.groups):
            predictions[group.output] = out.narrow(0, g * b, b)
    return predictions


def _fork(lanes: List[_Lane], cond_output: int, b: int, group: _Group, joined: bool, copy: bool = False) -> None:
    """Copy the cond group's current state into a new group: appended to the cond lane, or as a lane of its own
    (a view of the cond rows, or with ``copy`` a copy of them)."""
    lane = next(lane for lane in lanes if any(g.output == cond_output for g in lane.groups))
    pos = next(i for i, g in enumerate(lane.groups) if g.output == cond_output)
    take = lambda t: t.narrow(0, pos * b, b)  # noqa: E731
    state = lane.state
    if joined:
        state.flow = [None if t is None else torch.cat([t, take(t)]) for t in state.flow]
        state.row_consts = [torch.cat([t, take(t)]) for t in state.row_consts]
        lane.groups.append(group)
        lane.drops = lane.drops | group.drops
    else:
        flow = [None if t is None else (take(t).clone() if copy else take(t)) for t in state.flow]
        lanes.append(_Lane(LaneState(flow, [take(t) for t in state.row_consts], state.shared), [group], group.drops))


def _run_block(adapter, block, j: int, lane: _Lane, b: int, graphs: Optional[BlockGraphs] = None,
               lane_id: int = 0) -> None:
    state = lane.state
    if not lane.drops:  # no group of this lane drops any block (the [uncond, cond] lane): one call, no bookkeeping
        if graphs is None:  # what _call_block does without graphs, one Python call fewer per block (launch-bound)
            state.flow = adapter.run_block(block, state.flow, state.row_consts, state.shared)
        else:
            state.flow = _call_block(adapter, block, j, lane_id, state.flow, state.row_consts, state.shared, graphs)
        return
    active = [i for i, g in enumerate(lane.groups) if j not in g.drops]
    call = lambda flow, consts: _call_block(adapter, block, j, lane_id, flow, consts, state.shared, graphs)  # noqa: E731
    if len(active) == len(lane.groups):
        state.flow = call(state.flow, state.row_consts)
        return
    if not active:
        return
    if active == list(range(len(active))):  # the common case: the dropping rows are the last ones
        n = len(active) * b
        part = call([_rows(t, n) for t in state.flow], [t[:n] for t in state.row_consts])
        state.flow = [None if new is None else torch.cat([new, old[n:]]) for new, old in zip(part, state.flow)]
        return
    index = _row_index(tuple(active), b, state.row_consts[0].device)
    part = call([None if t is None else t.index_select(0, index) for t in state.flow],
                [t.index_select(0, index) for t in state.row_consts])
    state.flow = [None if new is None else old.index_copy(0, index, new) for new, old in zip(part, state.flow)]


def _call_block(adapter, block, j: int, lane_id: int, flow, row_consts, shared, graphs: Optional[BlockGraphs]):
    """adapter.run_block, through block j's graph for this lane when graphs are on (one graph per (block, lane,
    shapes) serves every mask: the mask only decides which of these calls happen)."""
    if graphs is None:
        return adapter.run_block(block, flow, row_consts, shared)
    flat = graphs.flat_shared(shared)
    if flat is None:  # a shared value that cannot be part of a graph's key: run eagerly, counted
        graphs.stats.eager_calls += 1
        return adapter.run_block(block, flow, row_consts, shared)
    shared_tensors, rebuild, static = flat
    nf, nr = len(flow), len(row_consts)

    def fn(tensors: List[Any]):
        return list(adapter.run_block(block, tensors[:nf], tensors[nf:nf + nr], rebuild(tensors[nf + nr:])))

    # slot: block j's outputs on this lane go where block j − 2's were (ping-pong, s2fast/graphs.py)
    return graphs.run((j, lane_id, nf, nr), fn, [*flow, *row_consts, *shared_tensors], static, slot=(lane_id, j % 2))


@functools.lru_cache(maxsize=64)
def _row_index(active: Tuple[int, ...], b: int, device: torch.device) -> torch.Tensor:
    """The rows of the active groups, built once per (groups, B, device): a host-to-device copy every step would
    make the host wait for the GPU inside the denoising loop."""
    return torch.cat([torch.arange(i * b, (i + 1) * b) for i in active]).to(device)


def _rows(t: Optional[torch.Tensor], n: int) -> Optional[torch.Tensor]:
    return None if t is None else t[:n]


def block_rows(num_blocks: int, branches: int, subnets: Sequence[Tuple[int, ...]], reuse_prefix: bool = True) -> int:
    """Block-rows (per row of batch) one step needs: the cost model of docs/PERFORMANCE.md, for benchmarks and notes."""
    total = branches * num_blocks
    for mask in subnets:
        start = min(mask) if reuse_prefix else 0
        total += num_blocks - start - len(mask)
    return total
