"""Branch parallelism on CPU gloo ranks, one thread each: one S² step of the 24-block SD3 shape (hidden 256, 32×32
latents, 77 text tokens, B = 1, drops (8, 15): k = 8, d = 2) on 1, 2 and 3 ranks, timed side by side.

Cases (benchmarks/branch_parallel_ranks.py): S² in one process (s2fast's engine, the baseline of every ratio), CFG
in one process (stock batched forward), CFG-parallel on 2 ranks (the stock forward of one branch per rank, then
all_gather), the balanced 2-rank split, and 3 ranks with S's prefix sent from C or recomputed. Beside each:
the cost model's critical path in block-rows over S²'s one-process 3L − k − d = 62 (floor_ratio), and the ratio
to CFG-parallel. Rank 0 is this process (it times the cases and broadcasts which one runs next); ranks 1 and 2
are spawned. On a machine with fewer free cores than ranks the ranks share cores: the 3-rank cases then cannot
reach the model, and the 2-rank ones only on two idle cores.

    .venv/bin/pytest benchmarks/test_branch_parallel_cost.py --benchmark-only -s
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # the ranks' program, imported here as rank 0

import branch_parallel_ranks as bp  # noqa: E402

ROUNDS = 10


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    if bp.NCCL and torch.cuda.device_count() < 3:
        pytest.skip(f"S2FAST_BRANCH_BACKEND=nccl runs one rank per GPU and needs 3 CUDA devices; this machine has "
                    f"{torch.cuda.device_count()}")
    store = str(tmp_path_factory.mktemp("branch_parallel") / "store")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "benchmarks")]))
    procs = [subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "branch_parallel_ranks.py"), str(r), store],
                              env=env) for r in (1, 2)]
    threads = torch.get_num_threads()
    bp.init(0, store)
    try:
        yield bp.Ranks()
    finally:
        bp.command(-1)
        dist.destroy_process_group()
        torch.set_num_threads(threads)
        for p in procs:
            p.wait(timeout=60)


def test_branch_parallel_step(interleaved, ranks):
    def case(name):
        index = bp.NAMES.index(name)

        def run():
            bp.command(index)
            return ranks.run(name)
        return run

    cases = {name: case(name) for name in bp.NAMES}
    s2_rows = bp.CASES["s2-one-process"][1]
    extra = {name: {"floor_ratio": rows / s2_rows, "block_rows": rows} for name, (_, rows) in bp.CASES.items()}
    summary = interleaved(f"sd3-24x256 S² step on gloo ranks, mask {bp.MASK}", cases, "s2-one-process", ROUNDS,
                          extra)
    cfg_parallel = summary["cfg-parallel-2"]["median_s"]
    for name, row in summary.items():
        row["speedup"] = 1 / row["ratio"]
        print(f"{name:22s} {row['median_s'] * 1e3:8.1f} ms  ×{row['speedup']:.2f} over S² in one process "
              f"(model ×{1 / row['floor_ratio']:.2f}); {row['median_s'] / cfg_parallel:.2f} × CFG-parallel "
              f"(model {row['block_rows'] / bp.CASES['cfg-parallel-2'][1]:.2f})")
