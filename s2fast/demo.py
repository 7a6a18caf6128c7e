"""The main job: CFG and S² side by side on the embedded digits model (a DiT the project trained on real MNIST).

Samples the same digits (same classes, same initial noise) with stock CFG and with ``s2fast.wrap``'s S², then
writes a PNG grid per class (CFG left, S² right), scores both sets with the embedded classifier (accuracy for the
requested class, Fréchet distance in its features to the training images) and reports the time per denoising step
of each and the block-row floor of the masks drawn (the block calls per step that the masks require, relative to
CFG's), with the lowest ratio that floor allows once the work outside the blocks (the same for both) is counted.
The timing is flagged when it cannot be trusted (too few rounds, rounds that spread by more than 20 %, or a ratio
below that lowest one: a busy machine). Nothing is downloaded: the model, its
scheduler and the classifier ship in the package (s2fast/digits/weights).

    python -m s2fast.demo              # 500 digits per method, 20 steps, λ = 4, ω = 0.25 (about 2 min on 2 cores)
    python -m s2fast.demo --help
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from typing import Dict, List, Tuple

import s2fast
from s2fast import S2Config

# torch and the model code are imported by the functions that use them, so that `--help` (and `s2fast demo --help`)
# answers without loading torch.


def parse_args(argv=None, prog: str = "python -m s2fast.demo") -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--guidance", type=float, default=4.0, help="CFG scale λ (default 4)")
    p.add_argument("--omega", type=float, default=0.25, help="S² scale ω (default 0.25, the paper's)")
    p.add_argument("--steps", type=int, default=20, help="Euler steps (default 20)")
    p.add_argument("--samples", type=int, default=500, help="digits per method, a multiple of 10 (default 500)")
    p.add_argument("--per-class", type=int, default=8, help="digits per class in the grid (default 8)")
    p.add_argument("--seed", type=int, default=0, help="noise and mask seed (default 0)")
    p.add_argument("--batch", type=int, default=100, help="digits per pipeline call, one timing round (default 100)")
    p.add_argument("--out", default="s2fast-demo", help="folder for grid.png and metrics.json (default ./s2fast-demo)")
    p.add_argument("--weights", default=None, help="a trained digits pipeline folder (default: the embedded one)")
    args = p.parse_args(argv)
    from s2fast.digits.pipeline import balanced_labels

    if args.steps < 2:
        p.error("--steps must be at least 2 (the first step's time includes the call's set-up)")
    if args.per_class < 1 or args.batch < 1:
        p.error("--per-class and --batch must be at least 1")
    if args.guidance <= 1:
        p.error("--guidance must be > 1 (S² is compared with CFG)")
    try:
        balanced_labels(args.samples)
    except ValueError as e:
        p.error(f"--samples: {e}")
    if args.samples < 10 * args.per_class:
        p.error(f"--samples must be at least 10 × --per-class = {10 * args.per_class}")
    if not math.isfinite(args.guidance):
        p.error("--guidance must be a finite number")
    try:
        S2Config(omega=args.omega, seed=args.seed)
    except ValueError as e:  # S2Config names the field; the demo names its option
        p.error(f"--omega/--seed: {e}")
    return args


class _Method:
    """One method's state across the interleaved calls: its own generator (so both methods draw the same noise
    call by call), its images, and the median step time of each of its calls."""

    def __init__(self, name: str, seed: int, setup):
        import torch

        self.name, self.setup = name, setup
        self.generator = torch.Generator().manual_seed(seed)
        self.images: List[torch.Tensor] = []
        self.call_medians: List[float] = []
        self.trace: Tuple = ()


def _call(pipe, method: _Method, chunk, args, bar) -> None:
    """One timed call: the time of every step but the first (which pays the call's set-up)."""
    stamps: List[float] = []

    def on_step_end(_pipe, _i, _t, tensors):
        stamps.append(time.perf_counter())
        bar.update()
        return tensors

    method.setup()
    stamps.append(time.perf_counter())
    method.images.append(pipe(chunk, guidance_scale=args.guidance, generator=method.generator,
                              num_inference_steps=args.steps, output_type="pt", callback_on_step_end=on_step_end).images)
    method.call_medians.append(statistics.median(b - a for a, b in zip(stamps[1:], stamps[2:])))
    method.trace = s2fast.trace(pipe) if s2fast.config_of(pipe) is not None else ()


def run(args: argparse.Namespace) -> Dict[str, object]:
    import torch
    from tqdm.auto import tqdm

    from s2fast.digits.classifier import load_judge
    from s2fast.digits.grid import digit_grid_png
    from s2fast.digits.pipeline import balanced_labels, load_default_pipeline
    from s2fast.engine import block_rows
    from s2fast.timing import block_share, step_floor, timing_warning

    pipe = load_default_pipeline(args.weights) if args.weights else load_default_pipeline()
    judge = load_judge(args.weights) if args.weights else load_judge()
    labels = balanced_labels(args.samples)
    config = S2Config(omega=args.omega, seed=args.seed)
    methods = [_Method("CFG", args.seed, lambda: s2fast.unwrap(pipe)),
               _Method("S²", args.seed, lambda: s2fast.wrap(pipe, config))]
    chunks = [labels[i:i + args.batch] for i in range(0, len(labels), args.batch)]
    # Warm-up: a short call of each method, so no timed call carries the process's cold start. Then the methods
    # alternate call by call (the order flipping every round), so a shared machine's drifting load falls on both
    # alike: the reported ratio is the median over rounds of the ratio within a round.
    warm = dict(guidance_scale=args.guidance, num_inference_steps=2, output_type="pt")
    try:
        for method in methods:
            method.setup()
            pipe(chunks[0], **warm)
        # the share of a CFG step spent in the blocks: only that part grows with S²'s rows (timing.step_floor)
        share = block_share(pipe.transformer.transformer_blocks,
                            lambda: pipe(chunks[0], **dict(warm, num_inference_steps=min(args.steps, 5))))
        with tqdm(total=2 * len(chunks) * args.steps, desc="demo (CFG and S², alternating)", unit="step") as bar:
            for r, chunk in enumerate(chunks):
                for method in (methods if r % 2 == 0 else methods[::-1]):
                    _call(pipe, method, chunk, args, bar)
        masks = methods[1].trace  # the same masks every call: the config's seed fixes them
    finally:
        s2fast.unwrap(pipe)
    results = {m.name: m for m in methods}
    ratios = [s / c for s, c in zip(results["S²"].call_medians, results["CFG"].call_medians)]
    layers = pipe.transformer.config.num_layers
    floor = sum(block_rows(layers, 2, (m,) if m else ()) for m in masks) / (2 * layers * args.steps)
    report = {"guidance": args.guidance, "omega": args.omega, "steps": args.steps, "samples": args.samples,
              "seed": args.seed, "masks": [list(m) for m in masks], "block_row_floor": floor,
              "block_share_of_cfg_step": share, "step_floor": step_floor(floor, share),
              "torch": torch.__version__, "device": f"{platform.processor() or platform.machine()}, "
                                                    f"{torch.get_num_threads()} threads"}
    for name, m in results.items():
        scores = judge.score(torch.cat(m.images) * 2 - 1, labels)
        report[name] = {**scores, "ms_per_step": 1e3 * statistics.median(m.call_medians)}
    report["S² / CFG step time"] = statistics.median(ratios)
    report["S² / CFG step time per round"] = ratios
    report["timing warning"] = timing_warning(ratios, report["step_floor"])
    os.makedirs(args.out, exist_ok=True)
    per_class = lambda m: torch.stack([torch.cat(m.images)[labels == c][:args.per_class, 0] for c in range(10)])  # noqa: E731
    digit_grid_png([(f"CFG lam={args.guidance:g}", per_class(results["CFG"])),
                    (f"S2 lam={args.guidance:g} w={args.omega:g}", per_class(results["S²"]))],
                   os.path.join(args.out, "grid.png"))
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump(report, f, indent=1, ensure_ascii=False)
    return report


def format_report(args, r) -> str:
    lines = [
        f"s2fast demo: digits DiT (embedded, trained on MNIST), λ={args.guidance:g}, ω={args.omega:g}, "
        f"{args.steps} Euler steps, {args.samples} digits per method (same classes and noise), seed {args.seed}",
        f"torch {r['torch']} on {r['device']}",
        "",
        f"{'method':<8}{'accuracy':>10}{'Fréchet':>10}{'ms/step':>10}",
        *(f"{name:<8}{100 * r[name]['accuracy']:>9.1f}%{r[name]['frechet']:>10.2f}{r[name]['ms_per_step']:>10.1f}"
          for name in ("CFG", "S²")),
        "",
        f"S² step time / CFG step time: {r['S² / CFG step time']:.3f}, median over {len(r['S² / CFG step time per round'])} "
        f"alternating rounds (range {min(r['S² / CFG step time per round']):.2f}–{max(r['S² / CFG step time per round']):.2f}); "
        f"block-row floor for these masks: {r['block_row_floor']:.3f}; the blocks take "
        f"{100 * r['block_share_of_cfg_step']:.0f} % of a CFG step, so S²/CFG cannot go below {r['step_floor']:.3f}",
        *([f"  !! this timing is {r['timing warning']}"] if r["timing warning"] else []),
        f"masks dropped per step: {[tuple(m) for m in r['masks']]}",
        f"accuracy: the embedded classifier's class equals the requested one; Fréchet: in its features, to the "
        f"training images (lower is better; {args.samples} digits make it noisy, see benchmarks/quality/README.md)",
        f"wrote {os.path.join(args.out, 'grid.png')} (CFG left, S² right, one row per class) and metrics.json",
    ]
    return "\n".join(lines)


def main(argv=None, prog: str = "python -m s2fast.demo") -> None:
    args = parse_args(argv, prog)
    import torch

    torch.set_grad_enabled(False)
    print(format_report(args, run(args)))


if __name__ == "__main__":
    main()
