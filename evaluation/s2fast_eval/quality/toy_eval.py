"""Train the toy denoisers and measure every guidance method against the closed-form truth.

    python -m s2fast_eval.quality.toy_eval --out benchmarks/quality/toys        (about 8 minutes on 2 CPU cores)

For each mixture (1-D modes at ±4, 2-D modes at (±4, ±4)): train one model (seeded), then sample a balanced set of
labels with none / CFG / AutoGuidance (the 10 % checkpoint) per λ, S² and naive S² (N = 4) per (λ, ω), and a fixed
skip of each block at the largest (λ, ω), over several sampling seeds. Writes results.json, results.md (mean and
spread over seeds) and PNGs of samples and denoising trajectories.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Dict, List

import torch
from tqdm import tqdm

from .metrics import all_metrics
from .plots import one_d_as_two_d, panels_png
from .toy_model import Guidance, sample, train
from .toys import MIXTURES, Mixture

METRICS = ("mode_mean_error", "sliced_w1", "mmd2")


def grid(lams, omegas, num_blocks: int) -> List[Guidance]:
    out = [Guidance("none")]
    for lam in lams:
        out += [Guidance("cfg", lam), Guidance("auto", lam)]
        for omega in omegas:
            out += [Guidance("s2", lam, omega), Guidance("s2", lam, omega, num_masks=4)]
    out += [Guidance("skip", max(lams), max(omegas), block=b) for b in range(num_blocks)]
    return out


def evaluate(mixture: Mixture, args) -> Dict:
    start = time.perf_counter()
    trained = train(mixture, steps=args.train_steps, batch=args.batch, seed=args.seed)
    train_s = time.perf_counter() - start
    labels = mixture.balanced_labels(args.samples)
    truth = mixture.sample(labels, torch.Generator().manual_seed(10_000 + args.seed))
    rows = []
    methods = grid(args.lams, args.omegas, len(trained.model.blocks))
    for guidance in tqdm(methods, desc=f"{mixture.name} mixture", unit="method"):
        per_seed = []
        for seed in range(args.seeds):
            g = Guidance(**{**guidance.__dict__, "seed": seed})
            samples = sample(trained, labels, g, steps=args.sampling_steps, seed=seed)["samples"]
            per_seed.append(all_metrics(samples, labels, truth, mixture.mean_tensor()))
        rows.append({"method": guidance.label, "kind": guidance.kind, "lam": guidance.lam, "omega": guidance.omega,
                     "num_masks": guidance.num_masks, "block": guidance.block,
                     **{m: [r[m] for r in per_seed] for m in METRICS}})
    plot(mixture, trained, labels, truth, args, Path(args.out))
    return {"mixture": mixture.name, "train_seconds": train_s, "final_loss": statistics.mean(trained.losses[-100:]),
            "rows": rows}


def plot(mixture: Mixture, trained, labels, truth, args, out: Path) -> None:
    lam, omega = max(args.lams), max(args.omegas)
    shown = [Guidance("none"), Guidance("cfg", lam), Guidance("s2", lam, omega), Guidance("auto", lam)]
    keep = torch.arange(len(labels)) < 600
    panels = [("truth", truth[keep], labels[keep], None)]
    for g in shown:
        out_ = sample(trained, labels[keep], g, steps=args.sampling_steps, seed=0, keep_trajectory=True)
        samples, traj = out_["samples"], out_["trajectory"][:, :48]
        if mixture.dim == 1:
            samples, traj = one_d_as_two_d(samples, traj, args.sampling_steps, 8.0)
        panels.append((g.label, samples, labels[keep], traj))
    if mixture.dim == 1:
        panels[0] = ("truth",) + one_d_as_two_d(truth[keep], None, 0, 8.0)[:1] + (labels[keep], None)
    marks = mixture.mean_tensor() if mixture.dim == 2 else torch.cat(
        [mixture.mean_tensor(), torch.full((mixture.num_classes, 1), -7.6)], dim=1)
    panels_png(panels, str(out / f"toy_{mixture.name}.png"), marks=marks)


def markdown(result: Dict) -> str:
    lines = [f"### {result['mixture']} mixture (train {result['train_seconds']:.0f} s, final loss "
             f"{result['final_loss']:.3f}); mean ± spread (max − min) over seeds", "",
             "| method | mode-mean error | sliced W1 | MMD² |", "|---|---|---|---|"]
    for row in result["rows"]:
        cells = [f"{statistics.mean(row[m]):.4f} ± {max(row[m]) - min(row[m]):.4f}" for m in METRICS]
        lines.append(f"| {row['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mixture", choices=[*MIXTURES, "all"], default="all")
    p.add_argument("--out", default="benchmarks/quality/toys")
    p.add_argument("--train-steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--samples", type=int, default=2000, help="samples per method and seed (balanced over classes)")
    p.add_argument("--seeds", type=int, default=2, help="sampling seeds (noise and masks) per method")
    p.add_argument("--sampling-steps", type=int, default=32)
    p.add_argument("--lams", type=float, nargs="+", default=[2.0, 4.0])
    p.add_argument("--omegas", type=float, nargs="+", default=[0.25, 0.5])
    p.add_argument("--seed", type=int, default=0, help="training seed")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = list(MIXTURES) if args.mixture == "all" else [args.mixture]
    results = [evaluate(MIXTURES[name], args) for name in names]
    (out / "results.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    (out / "results.md").write_text("\n".join(markdown(r) for r in results))
    print("\n".join(markdown(r) for r in results))
    print(f"written to {out}/ (results.json, results.md, toy_*.png)")


if __name__ == "__main__":
    main()
