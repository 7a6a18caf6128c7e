"""Improved precision and recall (k-NN manifolds, Kynkäänniemi et al. 2019) on cases with known answers."""

import pytest
import torch
from s2fast_eval.quality.metrics import knn_radii, manifold_coverage, precision_recall


def line(*values):
    return torch.tensor(values, dtype=torch.float64).unsqueeze(1)


def test_knn_radius_is_the_distance_to_the_kth_other_point():
    points = line(0, 1, 3, 7)
    assert knn_radii(points, 1).tolist() == [1, 1, 2, 4]
    assert knn_radii(points, 2).tolist() == [3, 2, 3, 6]
    # a duplicate is a neighbour at distance 0, the point itself is not
    assert knn_radii(line(0, 0, 5), 1).tolist() == [0, 0, 5]


def test_coverage_counts_queries_inside_any_ball_closed_at_the_radius():
    reference = line(0, 1, 2, 3, 4, 5, 6, 7, 8, 9)  # k = 1: every ball has radius 1
    assert manifold_coverage(line(0.5, 100), reference, k=1) == 0.5
    assert manifold_coverage(line(10.0), reference, k=1) == 1.0      # exactly on the last ball's edge
    assert manifold_coverage(line(10.001), reference, k=1) == 0.0


def test_identical_sets_score_one_and_far_apart_sets_zero():
    x = torch.randn(200, 8, generator=torch.Generator().manual_seed(0))
    assert precision_recall(x, x) == {"precision": 1.0, "recall": 1.0}
    assert precision_recall(x + 100, x) == {"precision": 0.0, "recall": 0.0}


def test_mode_collapse_keeps_precision_and_loses_recall():
    # real: 10 well-separated clusters; generated: the same count, all in cluster 0
    g = torch.Generator().manual_seed(1)
    centres = torch.arange(10, dtype=torch.float64).unsqueeze(1) * 100
    real = (centres.repeat_interleave(20, 0) + torch.randn(200, 1, generator=g, dtype=torch.float64))
    collapsed = real[:20].repeat(10, 1)  # ten copies of cluster 0's real points: every k-NN radius is 0
    scores = precision_recall(collapsed, real, k=3)
    assert scores["precision"] == 1.0
    # the generated manifold is cluster 0's 20 points themselves (radius 0, closed balls): recall 20/200
    assert scores["recall"] == pytest.approx(0.1)


def test_k_out_of_range_is_refused():
    with pytest.raises(ValueError, match="k must lie in 1..2"):
        knn_radii(line(0, 1, 2), 3)
