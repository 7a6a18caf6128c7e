"""The toy metrics on cases with known answers, and the toy model through s2fast's engine."""

import math

import pytest
import torch

from s2fast.quality.metrics import all_metrics, mmd2, mode_mean_errors, sliced_wasserstein
from s2fast.quality.toys import MIXTURE_1D, MIXTURE_2D, MIXTURES

N = 4000


def truth_pair(mixture, seed_a=1, seed_b=2):
    labels = mixture.balanced_labels(N)
    return labels, mixture.sample(labels, torch.Generator().manual_seed(seed_a)), \
        mixture.sample(labels, torch.Generator().manual_seed(seed_b))


@pytest.mark.parametrize("name", MIXTURES)
def test_the_truth_scores_near_zero(name):
    mixture = MIXTURES[name]
    labels, a, b = truth_pair(mixture)
    # Sampling error of a class mean: σ·sqrt(dim / n_class) ≈ 0.03–0.045 here; 4 standard errors of slack.
    bound = 4 * math.sqrt(mixture.dim * mixture.num_classes / N)
    assert float(mode_mean_errors(a, labels, mixture.mean_tensor()).max()) < bound
    assert sliced_wasserstein(a, b) < 0.1   # two 4000-sample draws of one distribution: W1 ≈ 0.03–0.06
    assert abs(mmd2(a[:2000], b[:2000])) < 5e-3


@pytest.mark.parametrize("shift", [0.5, 2.0])
def test_a_shifted_mixture_scores_its_shift(shift):
    # 1-D: every class mean moves by `shift` and W1 between a distribution and its translate is exactly |shift|.
    labels, a, b = truth_pair(MIXTURE_1D)
    moved = b + shift
    errors = mode_mean_errors(moved, labels, MIXTURE_1D.mean_tensor())
    assert torch.allclose(errors, torch.full_like(errors, shift), atol=0.1)
    assert sliced_wasserstein(a, moved) == pytest.approx(shift, abs=0.06)
    assert mmd2(a[:2000], moved[:2000]) > 10 * abs(mmd2(a[:2000], b[:2000]))
    # 2-D, shift along x: the sliced W1 is E|θ·δ| = |δ|·E|cos φ| = |δ|·2/π over uniform directions.
    labels2, a2, b2 = truth_pair(MIXTURE_2D)
    moved2 = b2 + torch.tensor([shift, 0.0])
    assert sliced_wasserstein(a2, moved2, projections=2048) == pytest.approx(shift * 2 / math.pi, abs=0.06)


def test_all_metrics_keys():
    labels, a, b = truth_pair(MIXTURE_2D)
    m = all_metrics(a, labels, b, MIXTURE_2D.mean_tensor())
    assert set(m) == {"mode_mean_error", "sliced_w1", "mmd2"}
