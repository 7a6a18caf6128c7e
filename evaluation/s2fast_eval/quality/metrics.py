"""Distances between generated samples and the truth: per-mode mean error, sliced Wasserstein, MMD, Fréchet (from
s2fast.digits.metrics, where the demo finds it), precision and recall.

Each is checked in tests/test_quality_metrics.py against cases with known answers (the truth against itself
scores near zero; a shifted copy scores its shift).
"""

from __future__ import annotations

from typing import Dict, Sequence

import torch

from s2fast.digits.metrics import frechet_distance, gaussian_stats  # noqa: F401  (the Fréchet distance lives with the demo)


def mode_mean_errors(samples: torch.Tensor, labels: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """||mean of class c's samples − μ_c|| for every class c (the paper's mode-mean correction)."""
    return torch.stack([(samples[labels == c].mean(0) - means[c]).norm() for c in range(len(means))])


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, projections: int = 256, seed: int = 0) -> float:
    """Sliced 1-Wasserstein distance: W1 between the 1-D projections, averaged over random unit directions.

    In 1-D it is W1 itself. Unequal sample sizes are compared through 512 matched quantiles.
    """
    g = torch.Generator().manual_seed(seed)
    d = a.shape[1]
    directions = torch.randn(d, projections, generator=g, dtype=torch.float64) if d > 1 else torch.ones(1, 1, dtype=torch.float64)
    directions = directions / directions.norm(dim=0, keepdim=True)
    pa, pb = a.double() @ directions, b.double() @ directions
    if len(a) != len(b):
        q = (torch.arange(512, dtype=torch.float64) + 0.5) / 512
        pa, pb = torch.quantile(pa, q, dim=0), torch.quantile(pb, q, dim=0)
    return float((pa.sort(0).values - pb.sort(0).values).abs().mean())


def mmd2(a: torch.Tensor, b: torch.Tensor, bandwidths: Sequence[float] = (0.5, 1.0, 2.0, 4.0)) -> float:
    """Unbiased squared MMD with a sum of Gaussian kernels (zero in expectation when a and b share a distribution,
    so small negative values happen)."""
    a, b = a.double(), b.double()

    def k(x, y):
        d2 = torch.cdist(x, y).pow(2)
        return sum(torch.exp(-d2 / (2 * h * h)) for h in bandwidths)

    n, m = len(a), len(b)
    kaa, kbb = k(a, a), k(b, b)
    saa = (kaa.sum() - kaa.diagonal().sum()) / (n * (n - 1))
    sbb = (kbb.sum() - kbb.diagonal().sum()) / (m * (m - 1))
    return float(saa + sbb - 2 * k(a, b).mean())


def all_metrics(samples: torch.Tensor, labels: torch.Tensor, truth: torch.Tensor, means: torch.Tensor) -> Dict[str, float]:
    """The report's metrics for samples of the given labels against truth samples of the same labels."""
    errors = mode_mean_errors(samples, labels, means)
    return {
        "mode_mean_error": float(errors.mean()),
        "sliced_w1": sliced_wasserstein(samples, truth),
        "mmd2": mmd2(samples[:2000], truth[:2000]),
    }


def knn_radii(features: torch.Tensor, k: int) -> torch.Tensor:
    """Distance from each row of ``features`` to its k-th nearest other row (float64): the radius of its ball in
    the k-NN estimate of the set's manifold (Kynkäänniemi et al. 2019)."""
    if not 1 <= k < len(features):
        raise ValueError(f"k must lie in 1..{len(features) - 1} for {len(features)} points, got {k}")
    d = torch.cdist(features.double(), features.double())
    d.fill_diagonal_(float("inf"))  # a point is not its own neighbour, even when duplicates sit at distance 0
    return d.kthvalue(k, dim=1).values


def manifold_coverage(query: torch.Tensor, reference: torch.Tensor, k: int = 3) -> float:
    """Fraction of ``query`` rows inside the union of the reference rows' k-NN balls (closed balls)."""
    radii = knn_radii(reference, k)
    d = torch.cdist(query.double(), reference.double())
    return float((d <= radii.unsqueeze(0)).any(dim=1).double().mean())


def precision_recall(generated: torch.Tensor, real: torch.Tensor, k: int = 3) -> Dict[str, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019): precision = the share of generated samples inside
    the real set's k-NN manifold (fidelity), recall = the share of real samples inside the generated set's (coverage
    of the data). Both depend on the set sizes, so compare only sets of equal size; k = 3 is the paper's choice."""
    return {"precision": manifold_coverage(generated, real, k), "recall": manifold_coverage(real, generated, k)}


def polynomial_kernel(x: torch.Tensor, y: torch.Tensor, degree: int = 3, coef0: float = 1.0) -> torch.Tensor:
    """KID's kernel (Bińkowski et al. 2018): k(x, y) = (x·y / d + coef0)^degree, d the feature dimension (float64)."""
    return (x.double() @ y.double().T / x.shape[1] + coef0) ** degree


def kid(generated: torch.Tensor, real: torch.Tensor, degree: int = 3, coef0: float = 1.0) -> float:
    """Kernel Inception Distance (Bińkowski et al. 2018): the unbiased estimate of the squared MMD with the
    polynomial kernel above, on all rows at once (the paper averages it over subsets; the estimate is unbiased either
    way, so its expectation does not depend on the set sizes, unlike the Fréchet distance's). Zero in expectation
    when both sets share a distribution, so small negative values happen. Needs at least 2 rows in each set."""
    m, n = len(generated), len(real)
    if m < 2 or n < 2 or generated.shape[1] != real.shape[1]:
        raise ValueError(f"kid needs two sets of ≥ 2 rows of one width, got {tuple(generated.shape)} and "
                         f"{tuple(real.shape)}")
    kxx, kyy = polynomial_kernel(generated, generated, degree, coef0), polynomial_kernel(real, real, degree, coef0)
    kxy = polynomial_kernel(generated, real, degree, coef0)
    sxx = (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
    syy = (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
    return float(sxx + syy - 2 * kxy.mean())


def rms_coordinate(reference: torch.Tensor) -> float:
    """The root-mean-square coordinate of ``reference`` (float64). KID's kernel is not scale-free: features in
    units far from 1 make (x·y / d + 1)³ a pure cubic of huge values. Dividing both sets by this one number, fixed
    by the reference, puts x·y / d near 1 as for the Inception features KID was made for."""
    return float(reference.double().pow(2).mean().sqrt())
