"""Branch parallelism: one step's passes (uncond U, cond C, the sub-network S) on different ranks of the default
torch.distributed process group, for the latency of one sample.

Every rank runs the same pipeline call with the same inputs. At each step the predictor below computes this rank's
share of the passes, the ranks exchange a pass's state where one continues what another began, and every rank
all-gathers the predictions [U, C, S]; Eq. 4 and the scheduler's step then run identically on every rank, so every
rank holds the same latents (as CFG-parallel systems do). Each pass runs at batch B, so the predictions are those
of ``batch_branches=False`` in one process, bit for bit on identical devices.

Schedules (L blocks, d dropped, S starts at block k: its first dropped block with reuse_prefix, else 0), in
block-rows on the critical path per step (one process: CFG 2L, S² 3L − k − d):

- 3 ranks: U on rank 0, C on rank 1, S on rank 2; critical path L. With reuse_prefix, rank 1 sends C's state at
  block k to rank 2, which runs S from there; without, rank 2 recomputes S's prefix and nothing moves mid-step.
- 2 ranks, a step with U, C and S (the balanced split): rank 1 runs C (sending C's state at block k to rank 0),
  then U's tail from block m; rank 0 runs U's head up to block m, sends it to rank 1, then S from block k. With
  m = (L + k + d) / 2 both ranks run (3L − k − d) / 2 block-rows.
- Steps with fewer passes (S² off, SGG outside a window, no CFG): U on rank 0, C on rank 1, S on rank 2 (on 2
  ranks, rank 0).

The ranks must agree on everything that decides which collectives run: the masks (a config without a seed draws
one on rank 0 and broadcasts it: s2fast/distributed.py) and any measured choice (``attention="fastest"`` is refused).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from .adapters.base import BranchRows, FamilyAdapter, LaneState, lora_scale_context, split_lora_scale

WORLD_SIZES = (2, 3)
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.bool)
_HEADER = 64  # int64 words: slot count, then per slot its dtype code (-1: None), ndim and sizes
_MAX_DIMS = 6


def refusal(config) -> Optional[str]:
    """Why ``config.branch_parallel`` cannot run here (None when it can): checked at wrap, before anything changes."""
    owner = type(config).__name__
    if not dist.is_available() or not dist.is_initialized():
        return (f"{owner}(branch_parallel=True) runs one step's branches on the ranks of the default torch.distributed "
                "process group, and none is initialised (launch with torchrun or accelerate launch and call "
                "torch.distributed.init_process_group, or accelerate's PartialState(), before s2fast.wrap)")
    world = dist.get_world_size()
    if world not in WORLD_SIZES:
        return (f"{owner}(branch_parallel=True) splits a step's passes over 2 or 3 ranks (U ‖ C ‖ S at most), and "
                f"the default process group has {world}; for more images than ranks use data parallelism (one "
                "process per image, s2fast generate under torchrun)")
    if getattr(config, "num_masks", 1) > 1:
        return (f"{owner}(branch_parallel=True) serves one sub-network per step, and num_masks is "
                f"{config.num_masks}")
    if config.cuda_graphs is True:
        return (f"{owner}(branch_parallel=True) runs its blocks eagerly (no block graphs yet): use cuda_graphs="
                "'auto' or False")
    if config.attention == "fastest":
        return (f"{owner}(branch_parallel=True) needs the same attention backend on every rank, and 'fastest' is "
                "measured per process: name a backend ('default', 'flash', 'efficient', 'cudnn', 'math')")
    return None


def _device() -> torch.device:
    """Where the default group's collectives take their tensors: the current GPU under nccl, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@dataclass
class _Pass:
    output: int          # index into the predictions
    branch: int          # the branch whose rows it runs (the cond branch for the sub-network)
    drops: frozenset     # blocks it skips


@dataclass(frozen=True)
class _Op:
    kind: str            # "run" (blocks start..stop), "send" / "recv" (the pass's flow, to or from peer), "head"
    pass_id: int
    start: int = 0
    stop: int = 0
    peer: int = -1


def schedule(count: int, cond: int, mask: Optional[Tuple[int, ...]], num_blocks: int, world: int,
             reuse_prefix: bool) -> Tuple[List[_Pass], List[List[_Op]]]:
    """The passes of one step and each rank's program of operations (a pure function: every rank builds the same).
    ``count``: branches (1: cond only; 2: uncond and cond); ``mask``: the sub-network's dropped blocks or None."""
    passes: List[_Pass] = []
    ids: Dict[str, int] = {}
    if count == 2:
        ids["U"] = len(passes)
        passes.append(_Pass(1 - cond, 1 - cond, frozenset()))
    ids["C"] = len(passes)
    passes.append(_Pass(cond, cond, frozenset()))
    if mask is not None:
        ids["S"] = len(passes)
        passes.append(_Pass(count, cond, frozenset(mask)))
    L = num_blocks
    k = min(mask) if mask is not None and reuse_prefix else 0
    programs: List[List[_Op]] = [[] for _ in range(world)]
    C, U, S = ids["C"], ids.get("U"), ids.get("S")

    def run_from(rank, p, start):
        programs[rank] += [_Op("run", p, start, L), _Op("head", p)]

    def fork_s(c_rank, s_rank):
        """C from block 0 on c_rank, S from block k on s_rank (C's state sent at k, or S's prefix recomputed)."""
        if k > 0:
            programs[c_rank] += [_Op("run", C, 0, k), _Op("send", C, peer=s_rank)]
            programs[s_rank] += [_Op("recv", S, peer=c_rank)]
            run_from(c_rank, C, k)
        else:
            run_from(c_rank, C, 0)
        run_from(s_rank, S, k)

    if world == 2 and U is not None and S is not None:
        d = len(mask)
        m = min(L, (L + k + d + 1) // 2)  # rank 0: m + (L − k − d); rank 1: L + (L − m)
        programs[0] += [_Op("run", U, 0, m), _Op("send", U, peer=1)]
        fork_s(1, 0)
        programs[1] += [_Op("recv", U, peer=0)]
        run_from(1, U, m)
        return passes, programs
    if U is not None:
        run_from(0, U, 0)
    if S is not None:
        fork_s(1, 2 if world == 3 else 0)  # on 2 ranks a step without U: C ‖ S
    else:
        run_from(1, C, 0)
    return passes, programs


def predict(adapter: FamilyAdapter, model, rows: BranchRows, subnets: Sequence[Tuple[int, ...]],
            options=None, group=None) -> List[torch.Tensor]:
    """The controller's predictor under ``branch_parallel``: every branch of ``rows``, then the sub-network, as
    the engine returns them with ``batch_branches=False``; this rank computes its share and all-gathers the rest.
    ``options``: the engine's (reuse_prefix decides where S starts; graphs and fork modes do not apply).
    ``group``: the process group of 2 or 3 ranks that share the step (None: the default group; the benchmarks
    pass a sub-group, and a 2-D mesh would pass the branch dimension's)."""
    if len(subnets) > 1:
        raise ValueError(f"branch_parallel serves one sub-network per step, got {len(subnets)}")
    reuse_prefix = True if options is None else options.reuse_prefix
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    blocks = adapter.blocks(model)
    passes, programs = schedule(rows.count, rows.cond_branch, subnets[0] if subnets else None, len(blocks), world,
                                reuse_prefix)
    _, lora_scale = split_lora_scale(rows.branch(0).get(adapter.attention_kwargs_key))
    with lora_scale_context(model, lora_scale):
        mine = _execute(adapter, model, rows, blocks, passes, programs[rank], group)
    return _gather(passes, programs, mine, rows.count + len(subnets), group)


def _execute(adapter, model, rows, blocks, passes: List[_Pass], program: List[_Op], group) -> Dict[int, torch.Tensor]:
    states: Dict[int, LaneState] = {}
    sends: List = []
    heads: Dict[int, torch.Tensor] = {}

    def state(p: int) -> LaneState:
        if p not in states:
            states[p] = adapter.embed(model, rows.branch(passes[p].branch))
        return states[p]

    for op in program:
        s = state(op.pass_id)
        if op.kind == "run":
            drops = passes[op.pass_id].drops
            for j in range(op.start, op.stop):
                if j not in drops:  # a dropped block passes its input through: nothing to compute
                    s.flow = adapter.run_block(blocks[j], s.flow, s.row_consts, s.shared)
        elif op.kind == "send":
            sends += _send_flow(s.flow, _global(group, op.peer))
        elif op.kind == "recv":
            s.flow = _recv_flow(_global(group, op.peer), s.flow)
        else:
            heads[passes[op.pass_id].output] = adapter.head(model, s)
    for work in sends:  # the state sent must stay alive until the peer has it
        work.wait()
    return heads


def _global(group, rank: int) -> int:
    """The default group's rank of ``group``'s ``rank`` (point-to-point calls and broadcast sources take those)."""
    return rank if group is None else dist.get_global_rank(group, rank)


def _send_flow(flow, peer: int) -> List:
    """Send a lane's flow to ``peer``: a header (dtype and shape of each slot), then each tensor, asynchronously."""
    header = [len(flow)]
    for t in flow:
        if t is None:
            header += [-1, 0]
        else:
            if t.ndim > _MAX_DIMS:
                raise ValueError(f"branch_parallel: a flow tensor of {t.ndim} dimensions (at most {_MAX_DIMS})")
            header += [_DTYPES.index(t.dtype), t.ndim, *t.shape]
    if len(header) > _HEADER:
        raise ValueError(f"branch_parallel: a flow of {len(flow)} slots does not fit the message header")
    ref = next((t for t in flow if t is not None), None)
    device = ref.device if ref is not None else _device()
    head = torch.tensor(header + [0] * (_HEADER - len(header)), dtype=torch.int64, device=device)
    tensors = [head] + [t.contiguous() for t in flow if t is not None]
    return [_Keep(dist.isend(t, peer), t) for t in tensors]


class _Keep:
    """An isend's work with the tensors it reads, kept alive until it has completed."""

    def __init__(self, work, *tensors):
        self.work, self.tensors = work, tensors

    def wait(self):
        self.work.wait()


def _recv_flow(peer: int, own_flow) -> List[Optional[torch.Tensor]]:
    ref = next((t for t in own_flow if t is not None), None)
    device = ref.device if ref is not None else _device()
    head = torch.empty(_HEADER, dtype=torch.int64, device=device)
    dist.recv(head, peer)
    words = head.tolist()
    flow, i = [], 1
    for _ in range(words[0]):
        code, ndim = words[i], words[i + 1]
        if code < 0:
            flow.append(None)
            i += 2
            continue
        shape = words[i + 2:i + 2 + ndim]
        i += 2 + ndim
        t = torch.empty(shape, dtype=_DTYPES[code], device=device)
        dist.recv(t, peer)
        flow.append(t)
    return flow


def _gather(passes: List[_Pass], programs: List[List[_Op]], mine: Dict[int, torch.Tensor],
            total: int, group=None) -> List[torch.Tensor]:
    """Every prediction on every rank: one all_gather of each rank's predictions stacked (padded to the most any
    rank holds). A rank with none this step learns their shape from the owner of the cond prediction first."""
    owned = [[passes[op.pass_id].output for op in program if op.kind == "head"] for program in programs]
    per_rank = max(len(o) for o in owned)
    rank = dist.get_rank(group)
    if all(owned):
        like = next(iter(mine.values()))
        shape, dtype, device = like.shape, like.dtype, like.device
    else:  # an idle rank: broadcast the shape from the first rank that holds a prediction
        src = next(r for r, o in enumerate(owned) if o)
        like = next(iter(mine.values())) if mine else None
        device = like.device if like is not None else _device()
        head = torch.zeros(_HEADER, dtype=torch.int64, device=device)
        if like is not None:
            head[:2 + like.ndim] = torch.tensor([_DTYPES.index(like.dtype), like.ndim, *like.shape])
        dist.broadcast(head, src=_global(group, src), group=group)
        words = head.tolist()
        dtype, shape = _DTYPES[words[0]], tuple(words[2:2 + words[1]])
    local = torch.zeros((per_rank, *shape), dtype=dtype, device=device)
    for slot, output in enumerate(owned[rank]):
        local[slot] = mine[output]
    gathered = [torch.empty_like(local) for _ in programs]
    dist.all_gather(gathered, local, group=group)
    predictions: List[Optional[torch.Tensor]] = [None] * total
    for r, outputs in enumerate(owned):
        for slot, output in enumerate(outputs):
            predictions[output] = gathered[r][slot]
    return predictions
