"""One value for every rank of a process group: what keeps ranks that share a sample running the same plan.

Ranks that split one sample between them (diffusers' context parallelism shards its tokens; branch parallelism
puts its branches on different ranks) meet in collectives at every block. They must therefore run the same masks,
the same fork mode and the same attention backend: a rank that drops another block, or makes one more call than
its peers, waits in a collective nobody else joins, and the job hangs (seen: killed after 150 s). A choice that is
drawn (a fresh mask seed) or measured (fork_mode "auto", attention "fastest") is made on the group's first rank and
broadcast from there; every rank makes the same call at the same point, whatever its own draw was.

``group=None`` means "not distributed": the value is returned as it is, and nothing is communicated. Callers pass
the group of ranks that share the sample, never more: ranks that sample different prompts (data parallelism)
may make different numbers of calls, and a broadcast over all of them would wait forever.
"""

from __future__ import annotations

from typing import Any, Optional

import torch


def group_size(group) -> int:
    """The number of ranks of ``group`` (1 when ``group`` is None or torch.distributed is not initialised)."""
    if group is None or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return 1
    return torch.distributed.get_world_size(group)


def broadcast_object(value: Any, group) -> Any:
    """``value`` as the first rank of ``group`` holds it, on every rank of ``group`` (a picklable object; a
    collective: every rank of the group must call it at the same point). Without a group: ``value`` itself."""
    if group_size(group) == 1:
        return value
    dist = torch.distributed
    box = [value]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0), group=group, device=_object_device(group))
    return box[0]


def shared_seed(seed: Optional[int], draw, group) -> int:
    """``seed`` when given; else one ``draw()`` of the group's first rank, the same on every rank of ``group``.
    A given seed needs no communication: every rank holds it already."""
    if seed is not None:
        return seed
    return broadcast_object(draw(), group)


def _object_device(group) -> Optional[torch.device]:
    """Where broadcast_object_list stages its bytes: the current CUDA device for NCCL (which moves only CUDA
    tensors), the CPU otherwise."""
    if torch.distributed.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
