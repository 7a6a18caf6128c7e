"""Does the sub-network err the way the full model errs? The paper's premise, measured with exact scores.

    python -m s2fast_eval.quality.toy_alignment --out benchmarks/quality/toys/alignment --mixture 2d    (about 17 min, one thread)

S² subtracts ω (D_s − D_c). It corrects the full model when the sub-network's deviation D_s − D_c points along the
full model's own error D_c − D_exact, i.e. D_s − D_c ≈ β (D_c − D_exact) with β > 0: then −ω(D_s − D_c) =
−ωβ (D_c − D_exact) moves D_c toward the exact prediction. The toys' exact conditional velocity is known in closed
form (:func:`exact_velocity`), so the premise can be checked directly: along the sampling path, at every step
(noise level), regress y = D_s − D_c on x = D_c − D_exact through the origin (β = <x, y> / <x, x>) and report β,
R² = 1 − |y − βx|² / |y|² (the share of the sub-network's deviation that the model's error explains) and the two
sizes. D_s is pooled over several S² sub-networks per step (drop ratio 0.1, block 0 protected, as S² draws them).
The path is CFG's (λ = 4 by default, where CFG overshoots and the paper's correction should show) and the
conditional one (λ = 1).

S² adds its correction to the CFG prediction D_cfg = D_u + λ (D_c − D_u), not to D_c, so on a CFG path two more
targets are fitted: the CFG prediction's error against the exact conditional velocity (what the sample should
follow), and against the exact CFG velocity (the same combination of the exact conditional and unconditional
velocities: the model's own error inside CFG, without CFG's intended overshoot). Each training seed trains its own
models; the table gives β's mean ± standard error over the seeds.
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


def exact_unconditional_velocity(mixture: Mixture, x: torch.Tensor, sigma: float) -> torch.Tensor:
    """The equal-weight mixture's velocity: each class's :func:`exact_velocity` weighted by the class posterior
    p(c | x_σ) ∝ N(x; a μ_c, v I), the same v for every class (all classes share the standard deviation)."""
    a, s2 = 1.0 - sigma, mixture.std ** 2
    mu = mixture.mean_tensor().to(x)
    v = a * a * s2 + sigma * sigma
    weights = torch.softmax(-(x[:, None, :] - a * mu[None]).pow(2).sum(-1) / (2 * v), dim=1)  # (n, classes)
    per_class = torch.stack([exact_velocity(mixture, x, sigma, torch.full((len(x),), c, dtype=torch.long))
                             for c in range(mixture.num_classes)], dim=1)
    return (weights[..., None] * per_class).sum(1)


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


TARGETS = {"cond": "D_c − D_exact", "cfg": "D_cfg − D_exact", "cfg_exact": "D_cfg − exact CFG"}


@torch.no_grad()
def along_path(mixture: Mixture, model: ToyDenoiser, lam: float, samples: int, steps: int, masks_per_step: int,
               seed: int) -> Dict[str, List[Dict[str, float]]]:
    """Per target (:data:`TARGETS`; the CFG ones on a CFG path only), one row per step: σ and the fit of D_s − D_c
    on that error over the samples and sub-networks."""
    labels = mixture.balanced_labels(samples)
    x = torch.randn(samples, mixture.dim, generator=torch.Generator().manual_seed(seed))
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    null = torch.full_like(labels, model.null_class)
    cfg = S2Config(seed=seed)
    rows: Dict[str, List[Dict[str, float]]] = {name: [] for name in (TARGETS if lam != 1 else ["cond"])}
    for i in range(steps):
        s = float(sigmas[i])
        sigma = sigmas[i].expand(samples)
        cond = model(x, sigma, labels)
        exact_cond = exact_velocity(mixture, x, s, labels)
        deviations = []
        for k in range(masks_per_step):
            (mask,) = sample_step(seed * 1000 + k, i, cfg, len(model.blocks))
            deviations.append(subnetwork(model, x, sigma, labels, mask) - cond)
        deviation = torch.cat(deviations)
        errors = {"cond": cond - exact_cond}
        d = cond
        if lam != 1:
            uncond = model(x, sigma, null)
            d = uncond + lam * (cond - uncond)
            exact_uncond = exact_unconditional_velocity(mixture, x, s)
            errors["cfg"] = d - exact_cond
            errors["cfg_exact"] = d - (exact_uncond + lam * (exact_cond - exact_uncond))
        for name, error in errors.items():
            rows[name].append({"step": i, "sigma": s, **fit(error.repeat(masks_per_step, 1), deviation)})
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


def across_seeds(summaries: List[List[Dict[str, float]]]) -> List[Dict[str, float]]:
    """Per σ range: β's mean, standard error and sign count over the seeds' summaries, the R² and sizes averaged."""
    out = []
    for parts in zip(*summaries):
        betas = torch.tensor([p["beta_pooled"] for p in parts], dtype=torch.float64)
        n = len(betas)
        out.append({"sigma_from": parts[0]["sigma_from"], "sigma_to": parts[0]["sigma_to"], "n": n,
                    "beta_mean": float(betas.mean()),
                    "beta_se": float(betas.std() / n ** 0.5) if n > 1 else float("nan"),
                    "beta_positive": int((betas > 0).sum()),
                    **{key: sum(p[key] for p in parts) / n
                       for key in ("r2_mean", "rms_model_error", "rms_subnet_deviation")}})
    return out


def markdown(results: List[Dict]) -> str:
    lines = ["Fit of the sub-network's deviation D_s − D_c on an error of the model's prediction (exact closed-form "
             "velocities), through the origin, per run of steps. β > 0 with R² near 1 is the paper's premise "
             "(S² then corrects that error); β ≈ 0 or R² ≈ 0 means the sub-network's deviation is not that error. "
             "β: mean ± standard error over training seeds (n), and in how many seeds it is positive; R² and the RMS "
             "sizes (per coordinate) are seed means.", "",
             "| mixture | blocks | path | target | σ range | β | β > 0 | mean R² per step | RMS error | "
             "RMS D_s − D_c |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for target, rows in r["across_seeds"].items():
            for s in rows:
                se = f" ± {s['beta_se']:.3f}" if s["n"] > 1 else ""
                lines.append(f"| {r['mixture']} | {r['blocks']} | {r['path']} | {TARGETS[target]} | "
                             f"{s['sigma_from']:.2f}–{s['sigma_to']:.2f} | {s['beta_mean']:+.3f}{se} ({s['n']}) | "
                             f"{s['beta_positive']}/{s['n']} | {s['r2_mean']:.3f} | {s['rms_model_error']:.4f} | "
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
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="training seeds (each trains its own models; seed s also seeds its sampling path)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = list(MIXTURES) if args.mixture == "all" else [args.mixture]
    results, start = [], time.perf_counter()
    for name in names:
        for blocks in args.blocks:
            per_lam: Dict[float, List[Dict]] = {lam: [] for lam in args.lams}
            for seed in args.seeds:
                t0 = time.perf_counter()
                trained = train(MIXTURES[name], steps=args.train_steps, batch=args.batch, seed=seed, num_blocks=blocks)
                train_s = time.perf_counter() - t0
                for lam in tqdm(args.lams, desc=f"{name}, {blocks} blocks, seed {seed}", unit="path"):
                    rows = along_path(MIXTURES[name], trained.model, lam, args.samples, args.sampling_steps,
                                      args.masks_per_step, seed)
                    per_lam[lam].append({"seed": seed, "train_seconds": round(train_s, 1), "per_step": rows,
                                         "summary": {target: summary(r) for target, r in rows.items()}})
            for lam, seeds in per_lam.items():
                results.append({"mixture": name, "blocks": blocks, "lam": lam,
                                "path": "cond (λ=1)" if lam == 1 else f"CFG λ={lam:g}", "seeds": seeds,
                                "across_seeds": {target: across_seeds([s["summary"][target] for s in seeds])
                                                 for target in seeds[0]["summary"]}})
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
