"""The toy metrics on cases with known answers, and the toy model through s2fast's engine."""

import math

import pytest
import torch
from s2fast_eval.quality.metrics import (
    all_metrics,
    frechet_distance,
    gaussian_stats,
    kid,
    mmd2,
    mode_mean_errors,
    rms_coordinate,
    sliced_wasserstein,
)
from s2fast_eval.quality.toys import MIXTURE_1D, MIXTURE_2D, MIXTURES

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


def _random_cov(d, seed):
    a = torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return a @ a.T / d + 0.1 * torch.eye(d, dtype=torch.float64)


def test_frechet_of_a_gaussian_with_itself_is_zero_and_a_shift_scores_its_square():
    cov, mean = _random_cov(16, 0), torch.randn(16, dtype=torch.float64)
    assert abs(frechet_distance(mean, cov, mean, cov)) < 1e-9
    shift = torch.zeros(16, dtype=torch.float64)
    shift[3] = 2.0
    assert frechet_distance(mean + shift, cov, mean, cov) == pytest.approx(4.0, abs=1e-9)


def test_frechet_matches_the_closed_form_for_commuting_covariances():
    # diagonal covariances commute: tr(A + B − 2 (AB)^½) = Σ (√a − √b)²
    a, b = torch.rand(8, dtype=torch.float64) + 0.5, torch.rand(8, dtype=torch.float64) * 3
    expected = float(((a.sqrt() - b.sqrt()) ** 2).sum())
    zero = torch.zeros(8, dtype=torch.float64)
    assert frechet_distance(zero, torch.diag(a), zero, torch.diag(b)) == pytest.approx(expected, rel=1e-9)
    # and it is symmetric for non-commuting ones
    ca, cb = _random_cov(8, 1), _random_cov(8, 2)
    assert frechet_distance(zero, ca, zero, cb) == pytest.approx(frechet_distance(zero, cb, zero, ca), rel=1e-9)


def test_frechet_from_samples_separates_same_from_shifted():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4000, 4, generator=g), torch.randn(4000, 4, generator=g)
    same = frechet_distance(*gaussian_stats(a), *gaussian_stats(b))
    shifted = frechet_distance(*gaussian_stats(a + 1.0), *gaussian_stats(b))
    assert 0 <= same < 0.02  # sampling error of 4000 draws in 4 dimensions: ~d²/n ≈ 0.005
    assert shifted == pytest.approx(4.0 + same, abs=0.1)  # |(1, 1, 1, 1)|² = 4


def _kid_brute_force(x, y):
    """KID's unbiased estimator written out as its three sums over index pairs (Bińkowski et al. 2018, Eq. 3)."""
    def k(a, b):
        return (float(a.double() @ b.double()) / len(a) + 1.0) ** 3
    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_kid_matches_the_brute_force_estimator():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(7, 5, generator=g), torch.randn(9, 5, generator=g) + 0.3
    # the same float64 sums in another order: only summation rounding differs
    assert kid(x, y) == pytest.approx(_kid_brute_force(x, y), rel=1e-10, abs=1e-12)
    assert kid(x, x.clone()) != 0.0  # unbiased: a set against itself is not exactly zero (the diagonals are left out)


def test_kid_is_unbiased_near_zero_for_one_distribution_and_grows_with_a_shift():
    g = torch.Generator().manual_seed(1)
    values = [kid(torch.randn(100, 8, generator=g), torch.randn(150, 8, generator=g)) for _ in range(40)]
    mean = sum(values) / len(values)
    sd = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    assert abs(mean) < 4 * sd / len(values) ** 0.5  # zero in expectation, even at 100 against 150 rows
    assert min(values) < 0 < max(values)            # and so negative at times
    shifted = kid(torch.randn(100, 8, generator=g) + 1.0, torch.randn(150, 8, generator=g))
    assert shifted > 20 * sd


def test_kid_refuses_sets_it_cannot_estimate_on():
    with pytest.raises(ValueError, match="≥ 2 rows"):
        kid(torch.zeros(1, 3), torch.zeros(4, 3))
    with pytest.raises(ValueError, match="one width"):
        kid(torch.zeros(3, 3), torch.zeros(4, 2))


def test_rms_coordinate():
    assert rms_coordinate(torch.full((4, 3), -2.0)) == pytest.approx(2.0)
    assert rms_coordinate(torch.tensor([[3.0, 4.0]])) == pytest.approx((12.5) ** 0.5)


# --- the premise test of S² on the toys (evaluation/s2fast_eval/quality/toy_alignment.py) ---------------------------------------
def test_exact_velocity_transports_noise_to_each_class():
    """Euler-integrating the closed-form velocity from σ = 1 to 0 turns N(0, I) into N(μ_c, s² I): the known answer
    of the flow. 400 steps keep the discretisation error far below the sampling error (about 0.03 here)."""
    from s2fast_eval.quality.toy_alignment import exact_velocity

    labels = MIXTURE_2D.balanced_labels(4000)
    x = torch.randn(4000, 2, generator=torch.Generator().manual_seed(0))
    sigmas = torch.linspace(1.0, 0.0, 401)
    for i in range(400):
        x = x + (sigmas[i + 1] - sigmas[i]) * exact_velocity(MIXTURE_2D, x, float(sigmas[i]), labels)
    for c in range(4):
        xc = x[labels == c]
        assert (xc.mean(0) - MIXTURE_2D.mean_tensor()[c]).abs().max() < 0.1
        assert (xc.std(0) - 1.0).abs().max() < 0.1


def test_exact_velocity_at_the_ends():
    from s2fast_eval.quality.toy_alignment import exact_velocity

    x, labels = torch.tensor([[1.0, -2.0]]), torch.tensor([3])
    mu = MIXTURE_2D.mean_tensor()[3]
    torch.testing.assert_close(exact_velocity(MIXTURE_2D, x, 1.0, labels), x - mu)  # x is pure noise: v = ε − μ
    torch.testing.assert_close(exact_velocity(MIXTURE_2D, x, 0.0, labels), -x)      # x is data: E[ε] = 0


def test_alignment_fit_on_known_lines():
    from s2fast_eval.quality.toy_alignment import fit

    x = torch.randn(500, 2, generator=torch.Generator().manual_seed(0))
    exact = fit(x, 2.5 * x)
    assert exact["beta"] == pytest.approx(2.5) and exact["r2"] == pytest.approx(1.0)
    orthogonal = fit(x, torch.stack([-x[:, 1], x[:, 0]], dim=1))  # rotated by 90°: no component along x
    assert abs(orthogonal["beta"]) < 1e-12 and orthogonal["r2"] == pytest.approx(0.0, abs=1e-12)
    flipped = fit(x, -0.5 * x + 0.5 * torch.stack([-x[:, 1], x[:, 0]], dim=1))  # half along −x, half across
    assert flipped["beta"] == pytest.approx(-0.5) and flipped["r2"] == pytest.approx(0.5)


def test_exact_unconditional_velocity_transports_noise_to_the_mixture():
    """Integrating the class-posterior-weighted velocity carries N(0, I) to the equal-weight mixture: every sample
    lands near one mode, each mode gets about a quarter (sampling error of a share at n = 4000 is about 0.007), and
    within a mode the spread is the class's s = 1 (tolerance 0.1, as for the conditional test above)."""
    from s2fast_eval.quality.toy_alignment import exact_unconditional_velocity

    x = torch.randn(4000, 2, generator=torch.Generator().manual_seed(1))
    sigmas = torch.linspace(1.0, 0.0, 401)
    for i in range(400):
        x = x + (sigmas[i + 1] - sigmas[i]) * exact_unconditional_velocity(MIXTURE_2D, x, float(sigmas[i]))
    nearest = torch.cdist(x, MIXTURE_2D.mean_tensor()).argmin(1)
    for c in range(4):
        xc = x[nearest == c]
        assert abs(len(xc) / 4000 - 0.25) < 0.03
        assert (xc.mean(0) - MIXTURE_2D.mean_tensor()[c]).abs().max() < 0.15  # modes 8 apart: truncation is tiny
        assert (xc.std(0) - 1.0).abs().max() < 0.1


def test_along_path_fits_each_target_on_its_own_error():
    """Step 0 of a CFG path, recomputed here from the definitions: each target's fit is of D_s − D_c on its own
    error (a swapped target changes the fitted β and sizes, which the comparison at 1e-9 would catch). An
    untrained model suffices: the wiring, not the premise, is under test. A λ = 1 path fits the conditional target
    only (the CFG prediction is D_c there)."""
    from s2fast.config import S2Config
    from s2fast.masks import sample_step
    from s2fast_eval.quality.toy_alignment import (along_path, exact_unconditional_velocity, exact_velocity, fit,
                                                   subnetwork)
    from s2fast_eval.quality.toy_model import ToyDenoiser

    torch.manual_seed(0)
    model = ToyDenoiser(2, 4, hidden=16, num_blocks=6).eval()
    with torch.no_grad():
        rows = along_path(MIXTURE_2D, model, 3.0, samples=40, steps=4, masks_per_step=2, seed=5)
        assert list(along_path(MIXTURE_2D, model, 1.0, samples=40, steps=4, masks_per_step=2, seed=5)) == ["cond"]
        labels = MIXTURE_2D.balanced_labels(40)
        x = torch.randn(40, 2, generator=torch.Generator().manual_seed(5))
        sigma = torch.ones(40)
        cond, uncond = model(x, sigma, labels), model(x, sigma, torch.full_like(labels, 4))
        d = uncond + 3.0 * (cond - uncond)
        exact_c, exact_u = exact_velocity(MIXTURE_2D, x, 1.0, labels), exact_unconditional_velocity(MIXTURE_2D, x, 1.0)
        masks = [sample_step(5000 + k, 0, S2Config(seed=5), 6)[0] for k in range(2)]
        deviation = torch.cat([subnetwork(model, x, sigma, labels, m) - cond for m in masks])
    expected = {"cond": cond - exact_c, "cfg": d - exact_c, "cfg_exact": d - (exact_u + 3.0 * (exact_c - exact_u))}
    assert set(rows) == set(expected)
    for name, error in expected.items():
        want = fit(error.repeat(2, 1), deviation)
        got = rows[name][0]
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12), (name, key)


def test_alignment_across_seeds():
    """β's mean, standard error (sample std / √n) and positive count over seeds, on numbers worked by hand."""
    from s2fast_eval.quality.toy_alignment import across_seeds

    part = lambda beta: [{"sigma_from": 1.0, "sigma_to": 0.5, "beta_pooled": beta, "r2_mean": 0.1,
                          "rms_model_error": 0.2, "rms_subnet_deviation": 0.3}]
    (row,) = across_seeds([part(0.1), part(-0.2), part(0.4)])
    assert row["n"] == 3 and row["beta_positive"] == 2
    assert row["beta_mean"] == pytest.approx(0.1)
    assert row["beta_se"] == pytest.approx(0.3 / 3 ** 0.5)  # deviations 0, −0.3, 0.3: sample std 0.3
    assert row["r2_mean"] == pytest.approx(0.1)
