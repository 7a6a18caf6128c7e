"""The cases of benchmarks/test_branch_parallel_cost.py, run by every rank of a 3-rank group: gloo on CPU (one
thread each), or, with S2FAST_BRANCH_BACKEND=nccl, nccl with rank r on GPU r (bf16, SD3-medium at 1024²: the GPU
suite's branch-parallel-nccl step, on a machine with 3 GPUs).

Rank 0 is the benchmark's own process and times the cases; ranks 1 and 2 run this file as a program and wait for
rank 0 to broadcast which case to run next (-1: stop). Every case computes one S² (or CFG) step's predictions and
Eq. 4 on a 24-block SD3-shaped transformer, B = 1, drops (8, 15) (k = 8, d = 2, L = 24).
"""

from __future__ import annotations

import datetime
import os
import sys

import torch
import torch.distributed as dist
from s2fast.kernels import guided_prediction

from s2fast import tiny
from s2fast.adapters.base import BranchRows
from s2fast.adapters.sd3 import SD3Adapter
from s2fast.branch_parallel import predict as parallel_predict
from s2fast.engine import EngineOptions, predict

BACKEND = os.environ.get("S2FAST_BRANCH_BACKEND", "gloo")  # "nccl": one GPU per rank
NCCL = BACKEND == "nccl"
SHAPE = tiny.SD3_MEDIUM if NCCL else tiny.BENCH_SD3
L = SHAPE.num_layers
MASK = (8, 15)
K, D = min(MASK), len(MASK)
LAMBDA, OMEGA = 7.5, 0.25

# case -> (ranks it runs on, critical-path block-rows per step of the cost model)
CASES = {
    "s2-one-process": (1, 3 * L - K - D),
    "cfg-one-process": (1, 2 * L),
    "cfg-parallel-2": (2, L),
    "s2-balanced-2": (2, -(-(3 * L - K - D) // 2)),
    "s2-3-ranks-send": (3, L),
    "s2-3-ranks-recompute": (3, L),
}
NAMES = list(CASES)


class Ranks:
    """This rank's model, rows and groups (every rank builds the same random model from the same seed)."""

    def __init__(self):
        torch.set_grad_enabled(False)
        pipe = tiny.sd3_pipeline(SHAPE, with_vae=False, dtype=torch.bfloat16 if NCCL else torch.float32)
        self.model, self.adapter = pipe.transformer.to(_device()), SD3Adapter()
        inputs = {k: _placed(v, self.model.dtype if k != "timestep" else None)
                  for k, v in tiny.sd3_step_inputs(SHAPE).items()}
        self.rows = BranchRows(self.adapter.batched_inputs, 2, stacked=inputs)
        self.pair = dist.new_group([0, 1])  # every rank of the default group takes part in creating it
        self.rank = dist.get_rank()

    def run(self, name: str):
        ranks = CASES[name][0]
        if self.rank >= ranks:
            return None
        a, m, r = self.adapter, self.model, self.rows
        if name == "s2-one-process":
            preds = predict(a, m, r, [MASK])
        elif name == "cfg-one-process":
            preds = list(m(**r.stacked(), return_dict=False)[0].chunk(2))
        elif name == "cfg-parallel-2":  # stock rows: each rank the stock forward of one branch, then all_gather
            mine = m(**r.branch(self.rank), return_dict=False)[0]
            preds = [torch.empty_like(mine) for _ in range(2)]
            dist.all_gather(preds, mine, group=self.pair)
        elif name == "s2-balanced-2":
            preds = parallel_predict(a, m, r, [MASK], EngineOptions(), group=self.pair)
        else:
            reuse = name == "s2-3-ranks-send"
            preds = parallel_predict(a, m, r, [MASK], EngineOptions(reuse_prefix=reuse))
        out = guided_prediction(preds[1], preds[0], preds[2:], LAMBDA, OMEGA)
        if NCCL:
            torch.cuda.synchronize()  # the time of the step, not of its launch
        return out


def _placed(value, dtype):
    """``value`` on this rank's device, floating tensors in ``dtype`` (the pipeline passes the timestep in fp32)."""
    if not isinstance(value, torch.Tensor):
        return value
    return value.to(_device(), dtype if dtype is not None and value.is_floating_point() else value.dtype)


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if NCCL else torch.device("cpu")


def command(index: int) -> int:
    """Rank 0: tell the other ranks the next case (-1: stop); every rank: the case to run."""
    value = torch.tensor([index], dtype=torch.int64, device=_device())
    dist.broadcast(value, src=0)
    return int(value.item())


def init(rank: int, store_path: str) -> None:
    if NCCL:
        torch.cuda.set_device(rank)
    else:
        torch.set_num_threads(1)
    store = dist.FileStore(store_path, 3)
    dist.init_process_group(BACKEND, store=store, rank=rank, world_size=3, timeout=datetime.timedelta(seconds=300))


def serve(rank: int, store_path: str) -> None:
    init(rank, store_path)
    ranks = Ranks()
    while True:
        index = command(0)
        if index < 0:
            break
        ranks.run(NAMES[index])
    dist.destroy_process_group()


if __name__ == "__main__":
    serve(int(sys.argv[1]), sys.argv[2])
