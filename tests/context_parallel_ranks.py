"""Run a scenario on 2 gloo ranks with diffusers' context parallelism (Ulysses degree 2), never longer than a
hard deadline: ranks whose collectives do not pair up wait forever, and a test must fail then, not hang.

``enable_parallelism`` cannot run on a CPU-only torch (it divides by the accelerator count, 0), so
:func:`enable_context_parallel` does its steps by hand: ``ParallelConfig.setup`` with a CPU mesh, each attention
processor's ``_parallel_config``, ``apply_context_parallel`` with the model's plan. Ring attention needs SDPA with
its log-sum-exp, which CPU SDPA lacks: Ulysses only here.

A scenario is a function named ``"module:function"`` (importable from tests/), run by every rank; it returns a
dict of tensors and plain values, saved per rank and handed back to the test. Each rank runs with one thread.
"""

from __future__ import annotations

import importlib
import os
import socket
import tempfile
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import List

import torch

WORLD = 2


def enable_context_parallel(model, ulysses_degree: int = WORLD):
    """``model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=...))``, step by step on CPU."""
    from diffusers import ContextParallelConfig, ParallelConfig
    from diffusers.hooks.context_parallel import apply_context_parallel
    from torch.distributed.device_mesh import init_device_mesh

    cp = ContextParallelConfig(ulysses_degree=ulysses_degree)
    config = ParallelConfig(context_parallel_config=cp)
    mesh = init_device_mesh("cpu", mesh_shape=cp.mesh_shape, mesh_dim_names=cp.mesh_dim_names)
    config.setup(torch.distributed.get_rank(), torch.distributed.get_world_size(), torch.device("cpu"), mesh=mesh)
    model._parallel_config = config
    for module in model.modules():
        processor = getattr(module, "processor", None)
        if processor is not None and hasattr(processor, "_parallel_config"):
            processor._parallel_config = config
    apply_context_parallel(model, cp, model._cp_plan)
    return model


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out: str, name: str) -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("TRITON_INTERPRET", "1")
    try:
        torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                             world_size=WORLD, timeout=timedelta(seconds=120))
        module, function = name.split(":")
        result = getattr(importlib.import_module(module), function)()
        torch.save(result, Path(out) / f"rank{rank}.pt")
        torch.distributed.destroy_process_group()
    except BaseException:
        (Path(out) / f"rank{rank}.err").write_text(traceback.format_exc())
        os._exit(1)  # without waiting for a peer that may sit in a collective


def run_ranks(name: str, timeout: float) -> List[dict]:
    """Every rank's result of scenario ``name``; AssertionError when a rank fails or the ranks outlive
    ``timeout`` seconds (then they are killed: a hang)."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as out:
        port = _free_port()
        procs = [ctx.Process(target=_worker, args=(r, port, out, name), daemon=True) for r in range(WORLD)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        errors = {r: (Path(out) / f"rank{r}.err").read_text() for r in range(WORLD)
                  if (Path(out) / f"rank{r}.err").exists()}
        if errors:
            raise AssertionError("ranks failed:\n" + "\n".join(f"rank {r}:\n{e}" for r, e in errors.items()))
        if hung:
            raise AssertionError(f"ranks {hung} still running after {timeout:.0f} s (a hang: collectives that do not "
                                 "pair up); killed")
        bad = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode != 0]
        if bad:
            raise AssertionError(f"ranks exited with {bad}")
        return [torch.load(Path(out) / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def hang_on_purpose():
    """Rank 0 joins a collective that rank 1 never makes: what run_ranks must turn into a failure."""
    if torch.distributed.get_rank() == 0:
        torch.distributed.barrier()
    else:
        time.sleep(600)
    return {}
