"""One denoising step's predictions: the branches (uncond, cond) and the sub-networks, with the shared prefix once.

Rows are grouped in *lanes*: a lane is one batch that goes through the blocks together, made of *groups* of B rows
(one group per branch or sub-network). With batch_branches on, uncond and cond share one lane; a sub-network is a
copy ("fork") of the cond group's state at its first dropped block (reuse_prefix) or at block 0, and then runs as
a lane of its own (fork_mode "separate", batch B) or joins the cond lane ("join", batch 3B). At a block that some
groups of a lane drop, the block runs on the other rows only and the dropped rows pass through unchanged.

Block-rows per step (the cost model, docs/PERFORMANCE.md), L blocks, d dropped, first dropped k: CFG 2L; three
passes 2L + (L − d); this engine 2L + (L − k − d). With a BlockCache (s2fast/step_cache.py) every lane runs the first
n blocks, and a step the cache skips ends there: each group adds its own residual from the last full step. The
engine never names a model family: the adapter does all model-specific work.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from .adapters.base import BranchRows, FamilyAdapter, LaneState, lora_scale_context, split_lora_scale
from .graphs import BlockGraphs
from .step_cache import Role, StepCache, role


@dataclass(frozen=True)
class EngineOptions:
    batch_branches: bool = True
    reuse_prefix: bool = True
    fork_mode: str = "separate"
    graphs: Optional[BlockGraphs] = None  # block graphs (s2fast/graphs.py); None runs every block eagerly
    cache: Optional[StepCache] = None     # this step's BlockCache state (s2fast/step_cache.py); None: no cache


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
    cache = options.cache
    probe = _Probe(lanes, rows, len(subnets), b) if cache is not None else None
    for j, block in enumerate(blocks):
        if probe is not None and j == cache.probe_blocks:
            pending = [output for _, output, _ in forks]  # sub-networks not forked yet: their rows are the cond rows
            if probe.decide(cache, lanes, pending):
                return _cached_predictions(adapter, model, blocks, lanes, rows, subnets, pending, options, probe)
            probe.snapshot(lanes, pending)
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
    if probe is not None:
        probe.keep(cache, lanes)
    return predictions


class _Probe:
    """A step under a BlockCache (s2fast/step_cache.py): the cond rows at block 0, the decision after the probe
    blocks, and each group's rows there (h_n, copied: graph outputs are overwritten before the step ends), from
    which a full step's residuals are taken."""

    def __init__(self, lanes: List[_Lane], rows: BranchRows, num_subnets: int, b: int):
        self.b, self.count, self.cond = b, rows.count, rows.cond_branch
        self.roles = [role(o, rows.count, rows.cond_branch) for o in range(rows.count + num_subnets)]
        self.start = self.cond_rows(lanes)[0].clone()  # h_0 of the cond rows (flow slot 0: the hidden states)
        self.at_probe: Dict[int, List[Optional[torch.Tensor]]] = {}
        self.residual: Optional[torch.Tensor] = None
        self.signature = None

    def cond_rows(self, lanes: List[_Lane]) -> List[Optional[torch.Tensor]]:
        return self.group_rows(lanes, self.cond)

    def group_rows(self, lanes: List[_Lane], output: int) -> List[Optional[torch.Tensor]]:
        lane, g = _locate(lanes, output)
        return [None if t is None else t.narrow(0, g * self.b, self.b) for t in lane.state.flow]

    def decide(self, cache: StepCache, lanes: List[_Lane], pending: List[int]) -> bool:
        cond = self.cond_rows(lanes)
        self.residual = cond[0] - self.start
        self.signature = tuple(None if t is None else (tuple(t.shape), t.dtype) for t in cond)
        # "recompute" runs the sub-networks on a cached step: only the branches need a stored residual
        needed = [r for o, r in enumerate(self.roles) if o < self.count or not cache.recompute_subnets]
        return cache.decide(self.residual, needed, self.signature)

    def rows_at_probe(self, lanes: List[_Lane], output: int, pending: List[int]) -> List[Optional[torch.Tensor]]:
        """Group ``output``'s rows at the probe: a sub-network that has not forked yet shares the cond rows'."""
        return self.group_rows(lanes, self.cond if output in pending else output)

    def snapshot(self, lanes: List[_Lane], pending: List[int]) -> None:
        for output in range(len(self.roles)):
            self.at_probe[output] = [None if t is None else t.clone()
                                     for t in self.rows_at_probe(lanes, output, pending)]

    def keep(self, cache: StepCache, lanes: List[_Lane]) -> None:
        """After a full step: each group's residual over the skippable blocks (output minus its rows at the probe;
        None for a flow slot no later block reads)."""
        residuals: Dict[Role, List[Optional[torch.Tensor]]] = {}
        for output, r in enumerate(self.roles):
            final = self.group_rows(lanes, output)
            residuals[r] = [None if new is None or old is None else new - old
                            for new, old in zip(final, self.at_probe[output])]
        cache.keep(self.residual, residuals, self.signature)


def _plus(rows: List[Optional[torch.Tensor]], residual: List[Optional[torch.Tensor]]) -> List[Optional[torch.Tensor]]:
    return [None if r is None or t is None else t + r for t, r in zip(rows, residual)]


def _locate(lanes: List[_Lane], output: int) -> Tuple[_Lane, int]:
    """The lane holding the group of prediction ``output``, and the group's position in it."""
    for lane in lanes:
        for g, group in enumerate(lane.groups):
            if group.output == output:
                return lane, g
    raise LookupError(output)


def _cached_predictions(adapter, model, blocks, lanes: List[_Lane], rows: BranchRows, subnets, pending: List[int],
                        options: EngineOptions, probe: _Probe) -> List[torch.Tensor]:
    """A cached step: every group takes its rows at the probe plus its own stored residual and the head runs per
    lane as in a full step; a sub-network not forked yet takes the cond rows plus its residual. With
    BlockCache.subnet "recompute" each sub-network instead runs alone, on its own mask, over the blocks after the
    probe, from its rows there."""
    cache, b = options.cache, probe.b
    store = cache.store.residuals
    predictions: List[Optional[torch.Tensor]] = [None] * len(probe.roles)
    recompute = list(range(rows.count, len(probe.roles))) if cache.recompute_subnets else []
    for lane in lanes:
        keep = [(g, group) for g, group in enumerate(lane.groups) if group.output not in recompute]
        if not keep:
            continue
        parts = [_plus(probe.group_rows(lanes, group.output), store[probe.roles[group.output]]) for _, group in keep]
        flow = [None if any(p[s] is None for p in parts) else torch.cat([p[s] for p in parts])
                for s in range(len(lane.state.flow))]
        consts = [torch.cat([t.narrow(0, g * b, b) for g, _ in keep]) for t in lane.state.row_consts]
        out = adapter.head(model, LaneState(flow, consts, lane.state.shared))
        for i, (_, group) in enumerate(keep):
            predictions[group.output] = out.narrow(0, i * b, b)
    copy = options.graphs is not None and options.graphs.ping_pong  # as _fork: a lane of its own starts from a copy
    for output in pending + recompute:
        if predictions[output] is not None:  # a pending sub-network under "recompute" is listed twice
            continue
        lane, g = _locate(lanes, probe.cond if output in pending else output)
        consts = [t.narrow(0, g * b, b) for t in lane.state.row_consts]
        at_probe = probe.rows_at_probe(lanes, output, pending)
        if output not in recompute:
            state = LaneState(_plus(at_probe, store[probe.roles[output]]), consts, lane.state.shared)
        else:  # the sub-network alone, as a lane of its own forked at the probe
            drops = frozenset(subnets[output - rows.count])
            flow = [None if t is None else (t.clone() if copy else t) for t in at_probe]
            sub = _Lane(LaneState(flow, consts, lane.state.shared), [_Group(output, drops)], drops)
            for j in range(cache.probe_blocks, len(blocks)):
                _run_block(adapter, blocks[j], j, sub, b, options.graphs, 1 + output - rows.count)
            state = sub.state
        predictions[output] = adapter.head(model, state)
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


def cached_block_rows(num_blocks: int, branches: int, subnets: Sequence[Tuple[int, ...]], probe_blocks: int,
                      recompute_subnets: bool = False, reuse_prefix: bool = True) -> int:
    """Block-rows (per row of batch) of a step a BlockCache skipped (s2fast/step_cache.py): the n probe blocks on
    every branch (and on a sub-network lane forked at block 0, without reuse_prefix), plus, with subnet
    "recompute", each sub-network's blocks after the probe that its mask keeps."""
    total = branches * probe_blocks
    for mask in subnets:
        if not reuse_prefix:
            total += probe_blocks
        if recompute_subnets:
            total += num_blocks - probe_blocks - len(mask)
    return total
