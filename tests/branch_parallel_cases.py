"""What each rank of the branch-parallel tests runs (tests/test_branch_parallel.py spawns the ranks).

Every case calls a tiny pipeline wrapped with ``branch_parallel=True`` on every rank of the group, then, in the same
process, the same call wrapped without it, with ``batch_branches=False`` and the masks the parallel call traced.
Each pass of the parallel predictor runs at batch B, as every pass of ``batch_branches=False`` does, so the two must
agree bit for bit; a digest of the output lets the parent check that every rank holds the same result.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import sys

import torch
import torch.distributed as dist

STEPS = 4


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().numpy().tobytes()).hexdigest()[:16]


def _sd3():
    from s2fast import tiny

    shape = tiny.SD3Shape()
    pipe = tiny.sd3_pipeline(shape, with_vae=False)
    kw = dict(tiny.embeddings(shape), **tiny.image_size(pipe, shape), output_type="latent", guidance_scale=4.0,
              num_inference_steps=STEPS)
    return pipe, kw, lambda out: out.images


def _flux_true_cfg():
    from s2fast import tiny

    shape = tiny.FluxShape()
    pipe = tiny.flux_pipeline(shape, with_vae=False)
    kw = dict(tiny.embeddings(shape), **tiny.image_size(pipe, shape), output_type="latent", true_cfg_scale=4.0,
              num_inference_steps=STEPS)
    return pipe, kw, lambda out: out.images


def _wan22():
    from s2fast import tiny

    shape = tiny.WanShape()
    pipe = tiny.wan_pipeline(shape, experts=2, boundary_ratio=0.85, seed=1, with_vae=False)
    kw = dict(tiny.wan_embeddings(shape), **tiny.wan_video_size(pipe, shape), output_type="latent",
              guidance_scale=4.0, guidance_scale_2=2.5, num_inference_steps=STEPS)
    return pipe, kw, lambda out: out.frames


def cases():
    """(name, pipeline builder, parallel config): S² with and without a seed, prefix sent or recomputed, steps
    without S² (interval), and SGG whose windows make steps of U+C, U+C+S and C+S (an idle rank on 3)."""
    from s2fast import S2Config, SGGConfig

    return [
        ("sd3-s2-seedless", _sd3, S2Config(omega=0.5, drop_ratio=0.3, interval=(0.25, 1.0), branch_parallel=True)),
        ("sd3-s2-recompute", _sd3, S2Config(omega=0.5, drop_ratio=0.3, seed=3, reuse_prefix=False,
                                            branch_parallel=True)),
        ("sd3-sgg", _sd3, SGGConfig(cfg_window=(0.0, 0.75), skip_window=(0.25, 1.0), skip_blocks=(2, 3),
                                    skip_scale=2.0, branch_parallel=True)),
        ("flux-true-cfg", _flux_true_cfg, S2Config(omega=0.5, drop_ratio=0.3, seed=1, branch_parallel=True)),
        ("wan22", _wan22, S2Config(omega=0.5, drop_ratio=0.3, seed=2, protected_blocks=(), branch_parallel=True)),
    ]


def run_cases(world: int) -> dict:
    import s2fast
    from s2fast import S2Config

    results = {}
    for name, build, config in cases():
        print(f"rank {dist.get_rank()} of {world}: {name}", file=sys.stderr, flush=True)
        pipe, kw, output = build()
        s2fast.wrap(pipe, config)
        got = output(pipe(**kw, generator=torch.Generator().manual_seed(0)))
        trace = s2fast.trace(pipe)
        if isinstance(config, S2Config):
            one = config.replace(branch_parallel=False, batch_branches=False, masks=trace, interval=(0.0, 1.0),
                                 seed=None)
        else:
            one = config.replace(branch_parallel=False, batch_branches=False)
        s2fast.wrap(pipe, one)
        expected = output(pipe(**kw, generator=torch.Generator().manual_seed(0)))
        s2fast.unwrap(pipe)
        results[name] = {"max_diff": float((got - expected).abs().max()), "digest": _digest(got),
                         "trace": [list(m) for m in trace], "finite": bool(torch.isfinite(got).all())}
    return results


def main(rank: int, world: int, store_dir: str, out_dir: str) -> None:
    """One rank: the cases on a group of 3, then (ranks 0 and 1) on a group of 2; results as JSON per rank."""
    torch.set_num_threads(1)
    timeout = datetime.timedelta(seconds=90)  # a collective that never matches fails rather than hangs
    results = {}
    for size in (3, 2) if world == 3 else (world,):
        if rank >= size:
            break
        store = dist.FileStore(os.path.join(store_dir, f"store{size}"), size)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=size, timeout=timeout)
        try:
            results[str(size)] = run_cases(size)
        finally:
            dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
