"""Paired statistics of a guidance method against CFG on the same seeds and the same images.

Every frontier setting samples from the same initial noise per seed (common random numbers), so a method and CFG
are compared seed by seed, and image by image, rather than through their separate seed ranges:

- per seed: Δ_s = metric(method, seed s) − metric(CFG, seed s), either at the same λ or at matched accuracy (CFG's
  value read off *that seed's* CFG λ curve at the method's accuracy on that seed, linear between neighbouring λ,
  λ = 1 being the unguided model), summarised as mean ± standard error over the seeds, with their number;
- over images: a paired bootstrap. Each resample draws, within every (seed, class) cell, that cell's images with
  replacement, the same draw for every setting; pooled metrics (all seeds' images together) are recomputed per
  draw, and the 2.5 and 97.5 percentiles of a difference give its 95 % interval.

The pooled metrics are computed from multiplicities (how often each image was drawn) instead of copies of the
rows: ``PooledImages.metrics`` with all multiplicities 1 is the plain computation, which the tests check, and with
multiplicities c it equals the plain computation on the rows repeated c times.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from ..quality.metrics import frechet_distance, polynomial_kernel


def mean_se(values: Sequence[float]) -> Tuple[Optional[float], Optional[float], int]:
    """(mean, standard error of the mean = sample standard deviation / √n, n); the SE is None below 2 values and
    both are None for none."""
    n = len(values)
    if n == 0:
        return None, None, 0
    mean = sum(values) / n
    if n == 1:
        return mean, None, 1
    return mean, (sum((v - mean) ** 2 for v in values) / (n - 1) / n) ** 0.5, n


def on_curve(curve: Sequence[Tuple[float, float, float]], accuracy: float) -> Optional[float]:
    """The value at ``accuracy`` on a λ curve of (λ, accuracy, value) points: the points in λ order, linear in
    accuracy between neighbours, the first segment (in λ) that spans ``accuracy``; None where none does (no
    extrapolation). A flat segment (equal accuracies) gives the smaller value."""
    points = sorted(curve)
    for (_, a0, v0), (_, a1, v1) in zip(points, points[1:]):
        if min(a0, a1) <= accuracy <= max(a0, a1):
            if a0 == a1:
                return min(v0, v1)
            return v0 + (accuracy - a0) / (a1 - a0) * (v1 - v0)
    return None


SeedValues = Mapping[int, Mapping[str, float]]  # seed → that seed's metrics


def seed_differences(method: SeedValues, cfg: Mapping[float, SeedValues], key: str,
                     lam: Optional[float] = None) -> Dict[int, float]:
    """Δ_s = method − CFG for every seed both have: at CFG's λ = ``lam`` when given, else at matched accuracy on
    that seed's CFG curve (``cfg``: λ → seed → metrics; include λ = 1, the unguided model). Seeds where CFG lacks
    that λ or the seed's curve does not span the method's accuracy are left out."""
    out = {}
    for seed, values in method.items():
        if key not in values:
            continue
        if lam is not None:
            ref = cfg.get(lam, {}).get(seed, {}).get(key)
        else:
            curve = [(lam_, by_seed[seed]["accuracy"], by_seed[seed][key]) for lam_, by_seed in cfg.items()
                     if seed in by_seed and key in by_seed[seed]]
            ref = on_curve(curve, values["accuracy"])
        if ref is not None:
            out[seed] = values[key] - ref
    return out


class PooledImages:
    """One setting's images, every seed pooled: accuracy, Fréchet distances against fixed Gaussians and KID against
    a fixed reference set, for any multiplicity of each image (a bootstrap draw)."""

    def __init__(self, features: torch.Tensor, correct: torch.Tensor, references: Mapping[str, tuple],
                 kid_reference: torch.Tensor, kid_scale: float = 1.0):
        """features (N, d), correct (N,) bool; references: name → (mean, cov) for a Fréchet distance each;
        kid_reference (M, d): the real set of the KID, which divides both sets by ``kid_scale``."""
        self.features = features.double()
        self.correct = correct.double()
        self.references = references
        scaled, kid_reference = self.features / kid_scale, kid_reference.double() / kid_scale
        self.kxx = polynomial_kernel(scaled, scaled)
        self.kxx_diagonal = self.kxx.diagonal().clone()
        self.kxy_rows = polynomial_kernel(scaled, kid_reference).sum(1)
        m = len(kid_reference)
        kyy = polynomial_kernel(kid_reference, kid_reference)
        self.kid_real_term = float((kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1)))
        self.kid_reference_size = m

    def metrics(self, counts: Optional[torch.Tensor] = None) -> Dict[str, float]:
        """``counts`` (N,): how often each image is taken (default once each)."""
        c = torch.ones(len(self.features), dtype=torch.float64) if counts is None else counts.double()
        m = float(c.sum())
        mean = c @ self.features / m
        centred = self.features - mean
        cov = (centred.T * c) @ centred / (m - 1)
        out = {"accuracy": float(c @ self.correct / m)}
        for name, (ref_mean, ref_cov) in self.references.items():
            out[name] = frechet_distance(mean, cov, ref_mean, ref_cov)
        # Σ over ordered pairs of distinct draws: c_i c_j K_ij summed, less the c_i draws of i paired with themselves
        generated = (c @ self.kxx @ c - c @ self.kxx_diagonal) / (m * (m - 1))
        out["kid"] = float(generated + self.kid_real_term - 2 * (c @ self.kxy_rows) / (m * self.kid_reference_size))
        return out


def cell_draws(cells: torch.Tensor, draws: int, seed: int = 0):
    """Multiplicity vectors of ``draws`` stratified bootstrap resamples: ``cells`` (N,) names each row's stratum
    (seed × class); each stratum's rows are drawn with replacement, as many as it has. Seeded: reproducible."""
    g = torch.Generator().manual_seed(seed)
    groups = [torch.nonzero(cells == v).flatten() for v in torch.unique(cells)]
    for _ in range(draws):
        counts = torch.zeros(len(cells), dtype=torch.float64)
        for rows in groups:
            picked = rows[torch.randint(0, len(rows), (len(rows),), generator=g)]
            counts.index_add_(0, picked, torch.ones(len(picked), dtype=torch.float64))
        yield counts


def percentile_interval(values: Sequence[float], level: float = 0.95) -> Tuple[Optional[float], Optional[float]]:
    """The central ``level`` percentile interval of the draws that gave a value (None: none did)."""
    if not values:
        return None, None
    t = torch.tensor(sorted(values), dtype=torch.float64)
    lo, hi = torch.quantile(t, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64))
    return float(lo), float(hi)


def bootstrap(settings: Mapping[str, PooledImages], cells: torch.Tensor,
              statistics: Mapping[str, Callable[[Dict[str, Dict[str, float]]], Optional[float]]],
              draws: int, seed: int = 0) -> Dict[str, dict]:
    """Each statistic (a function of every setting's pooled metrics, None where undefined) on all images and on
    ``draws`` paired resamples: {name: {"value", "low", "high", "defined": draws that gave a value, "draws"}}."""
    point = {name: s.metrics() for name, s in settings.items()}
    samples: Dict[str, List[float]] = {k: [] for k in statistics}
    for counts in cell_draws(cells, draws, seed):
        metrics = {name: s.metrics(counts) for name, s in settings.items()}
        for key, f in statistics.items():
            v = f(metrics)
            if v is not None:
                samples[key].append(v)
    out = {}
    for key, f in statistics.items():
        low, high = percentile_interval(samples[key])
        out[key] = {"value": f(point), "low": low, "high": high, "defined": len(samples[key]), "draws": draws}
    return out
