"""Quality of S² with step caching against CFG with the same cache, on one digits checkpoint, per block-row.

    python -m s2fast_eval.digits.cache_quality run --checkpoint C --out DIR --tag NAME --settings SPEC,...
    python -m s2fast_eval.digits.cache_quality report --out DIR     # DIR/results.md (+ results.json)
    python -m s2fast_eval.digits.cache_quality fbc --checkpoint C --out DIR   # diffusers' FirstBlockCache beside it

A setting is ``METHOD@λ`` or ``METHOD@λ:P``:

- ``none@1`` (the cond branch alone) and ``cfg@λ``: the plain, unwrapped pipeline;
- ``cfgcache@λ:t``: s2fast at ω = 0 (CFG) with ``BlockCache(threshold=t)``: diffusers' FirstBlockCache rule (the
  relative L1 change of the first block's residual against the last full step) on the cond rows;
- ``s2@λ``: S² at ``--omega`` on every step; ``s2cache@λ:t``: the same with ``BlockCache(threshold=t)``
  (subnet "reuse"); ``s2reuse@λ:k``: the same with ``correction_every=k`` (Δ = S̄ − D_c computed every k-th step).

Every setting samples from the same initial noise per seed (and S² from the same seeded masks), so settings are
compared seed by seed. Per seed the run records the frontier's metrics (s2fast_eval.digits.frontier.Scorer) and the
block-rows per sample, counted twice: by a hook on every block's attention (the rows it ran) and from the cost
model (s2fast.engine.block_rows for full steps, cached_block_rows for cached ones, step by step from s2fast.trace
and s2fast.trace_steps); the two are stored side by side and the report refuses a file where they differ. The
output, ``DIR/<tag>.json`` and ``<tag>.npz``, has the frontier's format, so the frontier's ``paired`` command
reads it too.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

import s2fast
from s2fast import BlockCache, S2Config
from s2fast.digits.classifier import load_judge
from s2fast.digits.pipeline import balanced_labels, load_default_pipeline
from s2fast.engine import block_rows, cached_block_rows

from .frontier import Scorer, _training_step, save_images, summarise

COMMAND = "PYTHONPATH=evaluation python -m s2fast_eval.digits.cache_quality"
METHODS = ("none", "cfg", "cfgcache", "s2", "s2cache", "s2reuse")


@dataclass(frozen=True)
class CacheSetting:
    """One point: ``method`` from METHODS, λ, S²'s ω (0 for none / cfg / cfgcache), the cache threshold t
    (cfgcache, s2cache) and the correction period k (s2reuse)."""

    method: str
    lam: float
    omega: float = 0.0
    threshold: Optional[float] = None
    every: int = 1

    @property
    def name(self) -> str:
        text = {"none": "none", "cfg": "CFG", "cfgcache": "CFG + cache", "s2": "S²", "s2cache": "S² + cache",
                "s2reuse": "S² reuse"}[self.method] + f" λ={self.lam:g}"
        if self.omega:
            text += f" ω={self.omega:g}"
        if self.threshold is not None:
            text += f" t={self.threshold:g}"
        if self.every > 1:
            text += f" k={self.every}"
        return text

    def config(self, seed: int) -> Optional[S2Config]:
        """The S2Config (None: the unwrapped pipeline). fork_mode is fixed so that the lanes, hence the block-rows,
        do not depend on a timing trial."""
        if self.method in ("none", "cfg"):
            return None
        cache = BlockCache(threshold=self.threshold) if self.threshold is not None else None
        return S2Config(omega=self.omega, seed=seed, cache=cache, correction_every=self.every,
                        fork_mode="separate")


def parse_setting(spec: str, omega: float) -> CacheSetting:
    """``METHOD@λ`` or ``METHOD@λ:P`` (see the module docstring); ValueError naming the spec otherwise."""
    try:
        method, rest = spec.split("@")
        lam_text, _, param = rest.partition(":")
        lam = float(lam_text)
    except ValueError:
        raise ValueError(f"setting {spec!r}: expected METHOD@λ or METHOD@λ:P") from None
    if method not in METHODS:
        raise ValueError(f"setting {spec!r}: unknown method {method!r}; choose from {', '.join(METHODS)}")
    needs = {"cfgcache": "threshold", "s2cache": "threshold", "s2reuse": "k"}.get(method)
    if bool(param) != bool(needs):
        raise ValueError(f"setting {spec!r}: {method} " + (f"needs :{needs}" if needs else "takes no :P"))
    if method == "none" and lam != 1:
        raise ValueError(f"setting {spec!r}: none is the cond branch alone, λ = 1")
    w = omega if method.startswith("s2") else 0.0
    if method in ("cfgcache", "s2cache"):
        setting = CacheSetting(method, lam, w, threshold=float(param))
    elif method == "s2reuse":
        if not param.isdigit() or int(param) < 2:
            raise ValueError(f"setting {spec!r}: k must be an integer >= 2")
        setting = CacheSetting(method, lam, w, every=int(param))
    else:
        setting = CacheSetting(method, lam, w)
    setting.config(0)  # BlockCache / S2Config reject bad values here, before any sampling
    return setting


def model_rows(pipe, config: S2Config) -> int:
    """Block-rows per row of batch of the last call of a wrapped pipeline, from the cost model, step by step. A step
    whose correction was reused ran no sub-network (s2fast.trace still names the mask it drew)."""
    L, total = len(pipe.transformer.transformer_blocks), 0
    for masks, record in zip(s2fast.trace(pipe), s2fast.trace_steps(pipe)):
        subnets = [masks] if masks and record.correction == "computed" else []
        if record.blocks == "full":
            total += block_rows(L, 2, subnets)
        else:
            cache = config.cache
            total += cached_block_rows(L, 2, subnets, cache.probe_blocks, cache.subnet == "recompute")
    return total


@torch.no_grad()
def sample(pipe, setting: CacheSetting, labels: torch.Tensor, seed: int, steps: int) -> Tuple[torch.Tensor, dict]:
    """Images in [-1, 1] and the call's cost: block-rows per sample (counted and modelled), cached steps and
    reused corrections."""
    config = setting.config(seed)
    rows = [0]

    def count(module, args, kwargs):
        rows[0] += (args[0] if args else kwargs["hidden_states"]).shape[0]

    handles = [b.attn1.register_forward_pre_hook(count, with_kwargs=True) for b in pipe.transformer.transformer_blocks]
    s2fast.wrap(pipe, config) if config is not None else s2fast.unwrap(pipe)
    try:
        images = pipe(labels, guidance_scale=setting.lam, generator=torch.Generator().manual_seed(seed),
                      num_inference_steps=steps, output_type="pt").images
        cost = {"block_rows": rows[0] / len(labels)}
        if config is not None:
            records = s2fast.trace_steps(pipe)
            cost.update(model_block_rows=float(model_rows(pipe, config)),
                        cached_steps=float(sum(r.blocks == "cached" for r in records)),
                        reused_corrections=float(sum(r.correction == "reused" for r in records)))
        else:
            cost.update(model_block_rows=cost["block_rows"], cached_steps=0.0, reused_corrections=0.0)
    finally:
        s2fast.unwrap(pipe)
        for h in handles:
            h.remove()
    return images * 2 - 1, cost


def run(args) -> None:
    pipe = load_default_pipeline(args.checkpoint)
    pipe.set_progress_bar_config(disable=True)
    scorer = Scorer(load_judge(), args.samples)
    labels = balanced_labels(args.samples)
    os.makedirs(args.out, exist_ok=True)
    meta = {"checkpoint": args.checkpoint, "step": _training_step(args.checkpoint),
            "samples": args.samples, "seeds": args.seeds, "steps": args.steps,
            "omega": args.omega, "command": f"{COMMAND} " + " ".join(args.argv),
            "device": f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
                      f"{torch.get_num_threads()} threads"}
    start, rows, images = time.perf_counter(), [], []
    for setting in args.settings:
        per_seed, per_image, t0 = [], [], time.perf_counter()
        for seed in args.seeds:
            pictures, cost = sample(pipe, setting, labels, seed, args.steps)
            measured = scorer.measure(pictures)
            per_image.append(measured)
            per_seed.append({**scorer.score_features(*measured, labels), **cost})
            print(f"{setting.name} seed {seed}: {per_seed[-1]}", flush=True)
        images.append(per_image)
        family = {"none": "none", "cfg": "cfg"}.get(setting.method, "s2")  # the frontier's families
        rows.append({"family": family, "method": setting.method, "name": setting.name, "lam": setting.lam,
                     "omega": setting.omega, "threshold": setting.threshold, "every": setting.every,
                     "sigma_interval": None, "seconds": round(time.perf_counter() - t0, 1), "per_seed": per_seed,
                     **summarise(per_seed)})
        save_images(os.path.join(args.out, f"{args.tag}.npz"), [r["name"] for r in rows], args.seeds, labels, images)
        # written after every setting, so a run stopped early keeps the settings it finished
        with open(os.path.join(args.out, f"{args.tag}.json"), "w") as f:
            json.dump({"meta": {**meta, "seconds": round(time.perf_counter() - start, 1),
                                "settings_planned": len(args.settings)}, "rows": rows}, f, indent=1)


@torch.no_grad()
def fbc_check(args) -> None:
    """diffusers' FirstBlockCache on the unwrapped pipeline (on a copy of the transformer, as
    benchmarks/test_step_cache_cost.py runs it) beside ``cfgcache`` at the same threshold, λ and seed: block-rows,
    cached steps and the largest pixel difference, to ``DIR/fbc_check.json``. FirstBlockCache measures the change on
    the whole [cond, null] batch, BlockCache on the cond rows: they may cache different steps."""
    from diffusers.hooks import FirstBlockCacheConfig, HookRegistry, apply_first_block_cache
    from diffusers.hooks.hooks import CacheContext, _set_cache_context

    from s2fast.digits.pipeline import DigitsFlowPipeline

    base = load_default_pipeline(args.checkpoint)
    base.set_progress_bar_config(disable=True)
    labels, seed = balanced_labels(args.samples), args.seeds[0]
    ours, ours_cost = sample(base, CacheSetting("cfgcache", args.lam, threshold=args.threshold), labels, seed,
                             args.steps)
    model = copy.deepcopy(base.transformer)
    apply_first_block_cache(model, FirstBlockCacheConfig(threshold=args.threshold))
    pipe = DigitsFlowPipeline(model, copy.deepcopy(base.scheduler))
    pipe.set_progress_bar_config(disable=True)
    _set_cache_context(model, CacheContext("cond"))  # what a diffusers pipeline with cache support does
    try:
        theirs, cost = sample(pipe, CacheSetting("cfg", args.lam), labels, seed, args.steps)
    finally:
        _set_cache_context(model, None)
        HookRegistry.check_if_exists_or_initialize(model).reset_stateful_hooks(recurse=True)
    L = len(model.transformer_blocks)
    full = 2 * L * args.steps
    record = {"checkpoint": args.checkpoint, "lam": args.lam, "threshold": args.threshold, "seed": seed,
              "samples": args.samples, "steps": args.steps,
              "blockcache": {"block_rows": ours_cost["block_rows"], "cached_steps": ours_cost["cached_steps"]},
              # a FirstBlockCache cached step runs block 0 on both rows: its cached steps follow from the rows
              "firstblockcache": {"block_rows": cost["block_rows"],
                                  "cached_steps": (full - cost["block_rows"]) / (2 * (L - 1))},
              "max_abs_pixel_diff": float((ours - theirs).abs().max()) / 2}
    print(json.dumps(record))
    with open(os.path.join(args.out, "fbc_check.json"), "w") as f:
        json.dump(record, f, indent=1)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m s2fast_eval.digits.cache_quality",
                                description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="sample and score some settings on one checkpoint")
    r.add_argument("--checkpoint", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--tag", required=True, help="output file name: DIR/<tag>.json and .npz")
    r.add_argument("--settings", required=True, help="comma-separated METHOD@λ[:P] (see the module docstring)")
    r.add_argument("--omega", type=float, default=0.5, help="S²'s ω (default 0.5)")
    r.add_argument("--samples", type=int, default=100, help="samples per seed, a multiple of 10 (default 100)")
    r.add_argument("--seeds", default="0,1,2,3,4,5", help="comma-separated seeds (default 0 to 5)")
    r.add_argument("--steps", type=int, default=50, help="Euler steps (default 50)")
    fbc = sub.add_parser("fbc", help="diffusers' FirstBlockCache beside cfgcache: block-rows and cached steps")
    fbc.add_argument("--checkpoint", required=True)
    fbc.add_argument("--out", required=True)
    fbc.add_argument("--lam", type=float, default=2.0)
    fbc.add_argument("--threshold", type=float, default=0.1)
    fbc.add_argument("--samples", type=int, default=100)
    fbc.add_argument("--seeds", default="0", help="the first is used")
    fbc.add_argument("--steps", type=int, default=50)
    rep = sub.add_parser("report", help="results.md and results.json from every run file of --out")
    rep.add_argument("--out", required=True)
    args = p.parse_args(argv)
    args.argv = list(argv) if argv is not None else __import__("sys").argv[1:]
    if args.command == "fbc":
        args.seeds = [int(s) for s in args.seeds.split(",") if s]
    if args.command == "run":
        try:
            args.settings = [parse_setting(s, args.omega) for s in args.settings.split(",") if s]
            args.seeds = [int(s) for s in args.seeds.split(",") if s]
            balanced_labels(args.samples)
        except ValueError as e:
            p.error(str(e))
        if not args.settings or not args.seeds or args.steps < 1:
            p.error("need at least one setting, one seed and one step")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.command == "run":
        run(args)
    elif args.command == "fbc":
        fbc_check(args)
    else:
        from .cache_report import write_report

        write_report(args.out)


if __name__ == "__main__":
    main()
