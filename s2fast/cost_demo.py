"""The cost demo: S² on a small SD3-shaped pipeline built from a config, on the CPU (random weights).

Runs the same prompt three ways — stock CFG, naive three-pass S², s2fast S² (same masks) — and prints the median
per-step time of each, the ratios to CFG, the block-row floor for the masks drawn (the block calls per step the
masks require, relative to CFG's 2 × blocks), and the largest difference between the two S² results. Random
weights: this shows cost and exactness, not image quality. The methods run in interleaved rounds
(s2fast/timing.py): a ratio is the median over rounds of the ratio measured within one round, flagged when it
cannot be trusted (too few rounds, a spread over 20 %, or a ratio below the lowest its floor allows once the work
outside the blocks is counted).

    python -m s2fast.cost_demo            # the embedded default: 24 blocks, hidden 256, 32×32 latents, 77 text tokens
    python -m s2fast.cost_demo --help
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import time
from typing import Dict, List, Tuple

import torch
from tqdm.auto import tqdm

import s2fast
from s2fast import S2Config, tiny
from s2fast.engine import block_rows
from s2fast.reference import wrap_three_pass
from s2fast.timing import InterleavedRounds, block_share, step_floor, timing_warning


def parse_args(argv=None) -> argparse.Namespace:
    d = tiny.BENCH_SD3
    p = argparse.ArgumentParser(prog="python -m s2fast.cost_demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=10, help="denoising steps per run (default 10)")
    p.add_argument("--layers", type=int, default=d.num_layers, help=f"transformer blocks (default {d.num_layers})")
    p.add_argument("--heads", type=int, default=d.heads, help=f"attention heads (default {d.heads})")
    p.add_argument("--head-dim", type=int, default=d.head_dim, help=f"head width (default {d.head_dim})")
    p.add_argument("--latent", type=int, default=d.latent_size, help=f"latent side (default {d.latent_size})")
    p.add_argument("--tokens", type=int, default=d.text_tokens, help=f"text tokens (default {d.text_tokens})")
    p.add_argument("--omega", type=float, default=0.25, help="S² scale ω (default 0.25, the paper's)")
    p.add_argument("--guidance", type=float, default=7.5, help="CFG scale λ (default 7.5, the paper's for SD3)")
    p.add_argument("--seed", type=int, default=0, help="noise and mask seed (default 0)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the three methods (default 3)")
    args = p.parse_args(argv)
    for name in ("steps", "layers", "heads", "head_dim", "latent", "tokens", "rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.steps < 2:
        p.error("--steps must be at least 2 (the first step's time includes the call's set-up)")
    if args.latent % 2:
        p.error("--latent must be even (patch size 2)")
    if not math.isfinite(args.guidance) or args.guidance <= 1:
        p.error("--guidance must be a finite number > 1 (S² is compared with CFG)")
    try:
        S2Config(omega=args.omega, seed=args.seed)
    except ValueError as e:  # S2Config names the field; the demo names its option
        p.error(f"--omega/--seed: {e}")
    return args


def _timed_call(pipe, kwargs) -> Tuple[torch.Tensor, List[float]]:
    """One pipeline call; the time of each step from the pipeline's own step-end callback (the first step, which
    also pays for the call's set-up, is dropped)."""
    stamps: List[float] = []

    def on_step_end(_pipe, _i, _t, tensors):
        stamps.append(time.perf_counter())
        return tensors

    latents = pipe(**kwargs, callback_on_step_end=on_step_end).images
    return latents, [b - a for a, b in zip(stamps, stamps[1:])]


def run(args: argparse.Namespace) -> Dict[str, object]:
    shape = tiny.SD3Shape(num_layers=args.layers, heads=args.heads, head_dim=args.head_dim,
                          latent_size=args.latent, text_tokens=args.tokens,
                          joint_attention_dim=args.heads * args.head_dim, pooled_dim=args.heads * args.head_dim)
    pipe = tiny.sd3_pipeline(shape, with_vae=False)
    emb = tiny.embeddings(shape)
    params = sum(p.numel() for p in pipe.transformer.parameters())

    def kwargs(steps):
        return dict(emb, **tiny.image_size(pipe, shape), num_inference_steps=steps, guidance_scale=args.guidance,
                    output_type="latent", generator=torch.Generator().manual_seed(args.seed))

    config = S2Config(omega=args.omega, seed=args.seed)
    methods = {
        "stock CFG": lambda: s2fast.unwrap(pipe),
        "naive three-pass S²": lambda: wrap_three_pass(pipe, config),
        "s2fast S²": lambda: s2fast.wrap(pipe, config),
    }
    results: Dict[str, torch.Tensor] = {}
    traces = {}

    def timed(name):
        def case():
            methods[name]()
            results[name], times = _timed_call(pipe, kwargs(args.steps))
            if name != "stock CFG":
                traces[name] = s2fast.trace(pipe)
            bar.update()
            return statistics.median(times)  # the case's time: its median step, not the whole call
        return case

    timer = InterleavedRounds({name: timed(name) for name in methods}, seed=args.seed)
    with tqdm(total=len(methods) * (args.rounds + 1), desc="cost demo", unit="run") as bar:
        for setup in methods.values():
            setup()
            pipe(**kwargs(2))  # warm-up: first-call allocations and lazy imports stay out of the timings
            bar.update()
        s2fast.unwrap(pipe)  # the share of a stock CFG step spent in the blocks (timing.step_floor)
        share = block_share(pipe.transformer.transformer_blocks, lambda: pipe(**kwargs(3)))
        for _ in range(args.rounds):
            timer.run_round()
    s2fast.unwrap(pipe)
    if traces["naive three-pass S²"] != traces["s2fast S²"]:
        raise RuntimeError("s2fast demo: the two S² runs drew different masks; their results are not comparable")
    step_masks = [(m,) if m else () for m in traces["s2fast S²"]]
    cfg_rows = 2 * shape.num_layers * args.steps
    return dict(
        shape=shape, params=params, times={m: timer.median(m) for m in methods},
        ratios={m: timer.ratios(m, "stock CFG") for m in methods},
        floor=sum(block_rows(shape.num_layers, 2, s) for s in step_masks) / cfg_rows,
        naive_floor=sum(block_rows(shape.num_layers, 2, s, reuse_prefix=False) for s in step_masks) / cfg_rows,
        share=share,
        s2_difference=(results["s2fast S²"] - results["naive three-pass S²"]).abs().max().item(),
        s2_effect=(results["s2fast S²"] - results["stock CFG"]).abs().max().item(),
        masks=traces["s2fast S²"],
    )


def report(args, r) -> str:
    shape, times, ratios = r["shape"], r["times"], r["ratios"]
    floors = (("stock CFG", 1.0), ("naive three-pass S²", r["naive_floor"]), ("s2fast S²", r["floor"]))
    warnings = [(name, timing_warning(ratios[name], step_floor(floor, r["share"]))) for name, floor in floors[1:]]
    lines = [
        f"s2fast demo: SD3-shaped transformer, {shape.num_layers} blocks, hidden {shape.hidden}, "
        f"{shape.latent_size}×{shape.latent_size} latents, {shape.text_tokens} text tokens, "
        f"{r['params'] / 1e6:.1f} M parameters (random weights), fp32",
        f"{args.steps} steps, λ={args.guidance}, ω={args.omega}, seed {args.seed}, {args.rounds} interleaved rounds; "
        f"masks: {r['masks']}",
        f"torch {torch.__version__} on {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads",
        "",
        f"{'method':<22}{'ms/step':>10}{'vs CFG':>9}{'(range over rounds)':>21}{'block-row floor':>17}",
        *(f"{name:<22}{times[name] * 1e3:>10.1f}{statistics.median(ratios[name]):>9.3f}"
          f"{f'({min(ratios[name]):.2f}–{max(ratios[name]):.2f})':>21}{floor:>17.3f}"
          for name, floor in floors),
        f"the blocks take {100 * r['share']:.0f} % of a stock CFG step: the lowest ratio a floor f allows is "
        f"1 + (f − 1) · {r['share']:.2f}",
        *(f"  !! {name}: this ratio is {warning}" for name, warning in warnings if warning),
        "",
        f"largest |s2fast S² − naive S²| over the final latents: {r['s2_difference']:.3g} "
        f"(batch-size rounding; S² itself moved them by up to {r['s2_effect']:.3g} from CFG)",
        "Timings on a shared CPU drift by ±10 % between runs; BENCHMARKS.md has 12-round interleaved numbers (make bench).",
    ]
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_grad_enabled(False)
    print(report(args, run(args)))


if __name__ == "__main__":
    main()
