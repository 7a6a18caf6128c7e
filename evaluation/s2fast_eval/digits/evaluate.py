"""What guidance does to the digits model's samples: accuracy for the requested class and Fréchet distance in the
classifier's features, for none / CFG / S² / naive S² / fixed-block skip over grids of λ and ω, several seeds.

    python -m s2fast_eval.digits.evaluate          # the table of benchmarks/quality/README.md (about 20 min, 2 cores)

Every method samples from the same initial noise for a given seed (common random numbers, so differences between
methods are not drowned in sampling noise), with balanced labels (the same count of every class). S², naive S² and
the fixed skip run through ``s2fast.wrap`` on the stock pipeline; none and CFG are the unwrapped pipeline.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence

import torch
from tqdm.auto import tqdm

import s2fast
from s2fast.config import S2Config
from s2fast.digits.classifier import DigitJudge, load_judge
from s2fast.digits.pipeline import DigitsFlowPipeline, balanced_labels, load_default_pipeline


@dataclass(frozen=True)
class Method:
    """kind: "none" (conditional only), "cfg", "s2" (Eq. 4, random masks), "naive" (Eq. 3, num_masks sub-networks),
    "skip" (``block`` dropped at every step, skip-layer style, same combination as Eq. 4)."""

    kind: str
    lam: float = 1.0
    omega: float = 0.0
    block: Optional[int] = None
    num_masks: int = 1

    @property
    def name(self) -> str:
        return {"none": "none", "cfg": "CFG", "s2": "S²", "naive": f"naive S² (N={self.num_masks})",
                "skip": f"skip block {self.block}"}[self.kind]

    def config(self, seed: int, steps: int) -> Optional[S2Config]:
        if self.kind in ("none", "cfg"):
            return None
        if self.kind == "skip":
            return S2Config(omega=self.omega, masks=[(self.block,)] * steps, protected_blocks=())
        return S2Config(omega=self.omega, num_masks=self.num_masks, seed=seed)


def grid(lams: Sequence[float], omegas: Sequence[float], skip_block: int, naive_masks: int = 4,
         extras_omegas: Optional[Sequence[float]] = None) -> List[Method]:
    """none; CFG per λ; S² per (λ, ω); naive S² and the fixed skip per (λ, ω') with ω' in ``extras_omegas``
    (default: all of ``omegas``)."""
    extras = omegas if extras_omegas is None else extras_omegas
    out = [Method("none")]
    for lam in lams:
        out.append(Method("cfg", lam))
        out += [Method("s2", lam, w) for w in omegas]
        out += [Method("naive", lam, w, num_masks=naive_masks) for w in extras]
        out += [Method("skip", lam, w, block=skip_block) for w in extras]
    return out


@torch.no_grad()
def generate(pipe: DigitsFlowPipeline, method: Method, labels: torch.Tensor, seed: int, steps: int,
             batch: int, on_chunk=None) -> torch.Tensor:
    """Images in [-1, 1], (len(labels), 1, 28, 28), one generator per call seeded with ``seed``."""
    config = method.config(seed, steps)
    s2fast.wrap(pipe, config) if config is not None else s2fast.unwrap(pipe)
    generator = torch.Generator().manual_seed(seed)
    out = []
    try:
        for i in range(0, len(labels), batch):
            images = pipe(labels[i:i + batch], guidance_scale=method.lam, generator=generator,
                          num_inference_steps=steps, output_type="pt").images
            out.append(images * 2 - 1)
            if on_chunk:
                on_chunk()
    finally:
        s2fast.unwrap(pipe)
    return torch.cat(out)


def evaluate(pipe: DigitsFlowPipeline, judge: DigitJudge, methods: Sequence[Method], samples: int,
             seeds: Sequence[int], steps: int, batch: int = 500) -> List[Dict]:
    labels = balanced_labels(samples)
    chunks = -(-samples // batch)
    rows = []
    with tqdm(total=len(methods) * len(seeds) * chunks, desc="digits evaluation", unit="batch") as bar:
        for method in methods:
            per_seed, seconds = [], 0.0
            for seed in seeds:
                start = time.perf_counter()
                images = generate(pipe, method, labels, seed, steps, batch, on_chunk=bar.update)
                seconds += time.perf_counter() - start
                per_seed.append(judge.score(images, labels))
            row = {**asdict(method), "name": method.name, "seconds": round(seconds, 1), "per_seed": per_seed}
            for key in ("accuracy", "frechet"):
                values = [s[key] for s in per_seed]
                row[key] = sum(values) / len(values)
                row[key + "_spread"] = max(values) - min(values)  # the range over seeds, as the toys report it
            rows.append(row)
    return rows


def markdown(rows: List[Dict], header: Dict) -> str:
    lines = [f"Digits model: {header['model']}; {header['samples']} samples per seed × seeds {header['seeds']}, "
             f"{header['steps']} Euler steps; accuracy of the classifier for the requested class, Fréchet distance in its "
             f"features to the 4500 training images (mean over seeds ± their range, max − min). {header['device']}.", "",
             "| method | λ | ω | accuracy % | Fréchet | time s |", "|---|---|---|---|---|---|"]
    for r in rows:
        omega = f"{r['omega']:g}" if r["kind"] not in ("none", "cfg") else "–"
        lam = f"{r['lam']:g}" if r["kind"] != "none" else "–"
        lines.append(f"| {r['name']} | {lam} | {omega} | {100 * r['accuracy']:.2f} ± {100 * r['accuracy_spread']:.2f} | "
                     f"{r['frechet']:.2f} ± {r['frechet_spread']:.2f} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m s2fast_eval.digits.evaluate", description=__doc__.split("\n\n")[0])
    floats = lambda s: [float(v) for v in s.split(",")]  # noqa: E731
    p.add_argument("--out", default="benchmarks/quality/digits", help="folder for results.json and results.md")
    p.add_argument("--weights", default=None, help="trained pipeline folder (default: the embedded one)")
    p.add_argument("--samples", type=int, default=500, help="samples per seed and method, a multiple of 10 (default 500)")
    p.add_argument("--seeds", default="0,1", help="comma-separated seeds (default 0,1)")
    p.add_argument("--steps", type=int, default=8, help="Euler steps (default 8: the grid fits 20 min on 2 cores)")
    p.add_argument("--lams", type=floats, default=[1.5, 2.0, 3.0, 4.0], help="CFG scales λ (default 1.5,2,3,4)")
    p.add_argument("--omegas", type=floats, default=[0.1, 0.25, 0.5], help="S² scales ω (default 0.1,0.25,0.5)")
    p.add_argument("--extras-omegas", type=floats, default=[0.25],
                   help="ω for naive S² and the fixed skip (default 0.25: the paper's ω; the full grid costs 3× more)")
    p.add_argument("--skip-block", type=int, default=3, help="the block the fixed skip drops (default 3, a middle one)")
    p.add_argument("--batch", type=int, default=500, help="images per pipeline call (default 500)")
    p.add_argument("--kinds", default="none,cfg,s2,naive,skip",
                   help="methods to run, comma-separated from none,cfg,s2,naive,skip (default all)")
    args = p.parse_args(argv)
    args.kinds = [k for k in args.kinds.split(",") if k]
    unknown = set(args.kinds) - {"none", "cfg", "s2", "naive", "skip"}
    if unknown or not args.kinds:
        p.error(f"--kinds: unknown or empty {sorted(unknown)}; choose from none,cfg,s2,naive,skip")
    try:
        args.seeds = [int(s) for s in args.seeds.split(",")]
        balanced_labels(args.samples)
    except ValueError as e:
        p.error(str(e))
    if args.steps < 1 or args.batch < 1:
        p.error("--steps and --batch must be at least 1")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    pipe = load_default_pipeline(args.weights) if args.weights else load_default_pipeline()
    if not 0 <= args.skip_block < pipe.transformer.config.num_layers:
        raise SystemExit(f"--skip-block must lie in 0..{pipe.transformer.config.num_layers - 1}")
    judge = load_judge(args.weights) if args.weights else load_judge()
    methods = [m for m in grid(args.lams, args.omegas, args.skip_block, extras_omegas=args.extras_omegas)
               if m.kind in args.kinds]
    start = time.perf_counter()
    rows = evaluate(pipe, judge, methods, args.samples, args.seeds, args.steps, args.batch)
    cfg = pipe.transformer.config
    header = {"model": f"DiT {cfg.num_layers} blocks, hidden {cfg.num_attention_heads * cfg.attention_head_dim}, "
                       f"patch {cfg.patch_size}", "samples": args.samples, "seeds": args.seeds, "steps": args.steps,
              "device": f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
                        f"{torch.get_num_threads()} threads", "seconds": round(time.perf_counter() - start, 1),
              "classifier": judge.meta}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"header": header, "rows": rows}, f, indent=1)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(markdown(rows, header))
    print(markdown(rows, header))
    print(f"{header['seconds']:.0f} s; wrote {args.out}/results.json and results.md")


if __name__ == "__main__":
    main()
