"""Does the sub-network err the way the full model errs? The paper's premise, measured with exact scores.

    python -m s2fast_eval.quality.toy_alignment --out benchmarks/quality/toys/alignment    (about 6 min on 2 CPU cores)

S² subtracts ω (D_s − D_c). It corrects the full model when the sub-network's deviation D_s − D_c points along the
full model's own error D_c − D_exact, i.e. D_s − D_c ≈ β (D_c − D_exact) with β > 0: then −ω(D_s − D_c) =
−ωβ (D_c − D_exact) moves D_c toward the exact prediction. The toys' exact conditional velocity is known in closed
form (:func:`exact_velocity`), so the premise can be checked directly: along the sampling path, at every step
(noise level), regress y = D_s − D_c on x = D_c − D_exact through the origin (β = <x, y> / <x, x>) and report β,
R² = 1 − |y − βx|² / |y|² (the share of the sub-network's deviation that the model's error explains) and the two
sizes. D_s is pooled over several S² sub-networks per step (drop ratio 0.1, block 0 protected, as S² draws them).
The path is CFG's (λ = 4 by default, where CFG overshoots and the paper's correction should show) and the
conditional one (λ = 1).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Dict, List, Sequence

import torch
from tqdm import tqdm

from s2fast.config import S2Config
from s2fast.masks import sample_step

from .toy_model import ToyDenoiser, train
from .toys import MIXTURES, Mixture


def exact_velocity(mixture: Mixture, x: torch.Tensor, sigma: float, labels: torch.Tensor) -> torch.Tensor:
    """E[ε − x_0 | x_σ = x, class] for x_σ = (1 − σ) x_0 + σ ε, x_0 ~ N(μ_c, s² I): Gaussian conditioning gives
    E[x_0 | x] = μ + a s² (x − aμ) / v and E[ε | x] = σ (x − aμ) / v, with a = 1 − σ and v = a² s² + σ²."""
    a, s2 = 1.0 - sigma, mixture.std ** 2
    mu = mixture.mean_tensor().to(x)[labels]
    v = a * a * s2 + sigma * sigma
    return (sigma - a * s2) / v * (x - a * mu) - mu


def subnetwork(model: ToyDenoiser, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor,
               dropped: Sequence[int]) -> torch.Tensor:
    """The model with the ``dropped`` blocks skipped (a skipped block passes its input through), as S² runs it."""
    h, c = model.embed(x, sigma, labels)
    for j, block in enumerate(model.blocks):
        if j not in dropped:
            h = block(h, c)
    return model.head(h)


def fit(x: torch.Tensor, y: torch.Tensor) -> Dict[str, float]:
    """Least squares y ≈ β x through the origin over every entry; R² against the zero predictor (uncentred)."""
    x, y = x.double().flatten(), y.double().flatten()
    xx = float(x @ x)
    beta = float(x @ y) / xx if xx > 0 else float("nan")
    yy = float(y @ y)
    r2 = 1.0 - float((y - beta * x).pow(2).sum()) / yy if yy > 0 else float("nan")
    n = len(x)
    return {"beta": beta, "r2": r2, "rms_model_error": (xx / n) ** 0.5, "rms_subnet_deviation": (yy / n) ** 0.5}


@torch.no_grad()
def along_path(mixture: Mixture, model: ToyDenoiser, lam: float, samples: int, steps: int, masks_per_step: int,
               seed: int) -> List[Dict[str, float]]:
    """One row per step: σ, the fit of D_s − D_c on D_c − D_exact over the samples and sub-networks."""
    labels = mixture.balanced_labels(samples)
    x = torch.randn(samples, mixture.dim, generator=torch.Generator().manual_seed(seed))
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    null = torch.full_like(labels, model.null_class)
    cfg = S2Config(seed=seed)
    rows = []
    for i in range(steps):
        sigma = sigmas[i].expand(samples)
        cond = model(x, sigma, labels)
        error = cond - exact_velocity(mixture, x, float(sigmas[i]), labels)
        deviations = []
        for k in range(masks_per_step):
            (mask,) = sample_step(seed * 1000 + k, i, cfg, len(model.blocks))
            deviations.append(subnetwork(model, x, sigma, labels, mask) - cond)
        rows.append({"step": i, "sigma": float(sigmas[i]),
                     **fit(error.repeat(masks_per_step, 1), torch.cat(deviations))})
        d = cond if lam == 1 else model(x, sigma, null) + lam * (cond - model(x, sigma, null))
        x = x + (sigmas[i + 1] - sigmas[i]) * d
    return rows


def summary(rows: List[Dict[str, float]], bins: int = 4) -> List[Dict[str, float]]:
    """The per-step fits pooled into ``bins`` equal runs of steps (σ ranges), weighted by sum of squares."""
    out, size = [], len(rows) // bins
    for b in range(bins):
        part = rows[b * size:(b + 1) * size] if b < bins - 1 else rows[b * size:]
        xx = sum(r["rms_model_error"] ** 2 for r in part)
        yy = sum(r["rms_subnet_deviation"] ** 2 for r in part)
        xy = sum(r["beta"] * r["rms_model_error"] ** 2 for r in part)
        beta = xy / xx if xx > 0 else float("nan")
        resid = sum((1 - r["r2"]) * r["rms_subnet_deviation"] ** 2 for r in part)  # per-step residuals, own β
        out.append({"sigma_from": part[0]["sigma"], "sigma_to": part[-1]["sigma"], "beta_pooled": beta,
                    "r2_mean": sum(r["r2"] for r in part) / len(part),
                    "rms_model_error": (xx / len(part)) ** 0.5, "rms_subnet_deviation": (yy / len(part)) ** 0.5,
                    "unexplained_share": resid / yy if yy > 0 else float("nan")})
    return out


def markdown(results: List[Dict]) -> str:
    lines = ["Fit of the sub-network's deviation D_s − D_c on the full model's error D_c − D_exact (exact closed-form "
             "velocity), through the origin, per run of steps. β > 0 with R² near 1 is the paper's premise "
             "(S² then corrects the model's error); β ≈ 0 or R² ≈ 0 means the sub-network's deviation is not the "
             "model's error. RMS sizes per coordinate.", "",
             "| mixture | blocks | path | σ range | β | mean R² per step | RMS D_c − D_exact | RMS D_s − D_c |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        for s in r["summary"]:
            lines.append(f"| {r['mixture']} | {r['blocks']} | {r['path']} | {s['sigma_from']:.2f}–{s['sigma_to']:.2f} "
                         f"| {s['beta_pooled']:+.3f} | {s['r2_mean']:.3f} | {s['rms_model_error']:.4f} | "
                         f"{s['rms_subnet_deviation']:.4f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="benchmarks/quality/toys/alignment")
    p.add_argument("--mixture", choices=[*MIXTURES, "all"], default="all")
    p.add_argument("--blocks", type=int, nargs="+", default=[8, 24])
    p.add_argument("--train-steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--sampling-steps", type=int, default=32)
    p.add_argument("--masks-per-step", type=int, default=8)
    p.add_argument("--lams", type=float, nargs="+", default=[1.0, 4.0])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = list(MIXTURES) if args.mixture == "all" else [args.mixture]
    results, start = [], time.perf_counter()
    for name in names:
        for blocks in args.blocks:
            t0 = time.perf_counter()
            trained = train(MIXTURES[name], steps=args.train_steps, batch=args.batch, seed=args.seed, num_blocks=blocks)
            train_s = time.perf_counter() - t0
            for lam in tqdm(args.lams, desc=f"{name}, {blocks} blocks", unit="path"):
                rows = along_path(MIXTURES[name], trained.model, lam, args.samples, args.sampling_steps,
                                  args.masks_per_step, args.seed)
                results.append({"mixture": name, "blocks": blocks, "path": "cond (λ=1)" if lam == 1 else f"CFG λ={lam:g}",
                                "lam": lam, "train_seconds": round(train_s, 1), "per_step": rows,
                                "summary": summary(rows)})
    seconds = time.perf_counter() - start
    (out / "results.json").write_text(json.dumps({"args": vars(args), "seconds": round(seconds, 1),
                                                  "results": results}, indent=1))
    text = markdown(results)
    (out / "results.md").write_text(text + f"\nCommand: `PYTHONPATH=evaluation python -m s2fast_eval.quality.toy_alignment "
                                    f"{' '.join(argv or __import__('sys').argv[1:])}`, {seconds / 60:.1f} min.\n")
    print(text)
    print(f"{seconds:.0f} s; written to {out}/")


if __name__ == "__main__":
    main()
