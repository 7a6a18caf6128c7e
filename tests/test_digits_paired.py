"""The paired statistics of the digits frontiers (s2fast_eval.digits.paired) on hand examples, the pooled metrics'
multiplicity form against the plain computation, and the paired report on a synthetic folder."""

import json

import numpy as np
import pytest
import torch
from s2fast_eval.digits import frontier, paired
from s2fast_eval.quality.metrics import frechet_distance, gaussian_stats, kid


def test_mean_se():
    assert paired.mean_se([]) == (None, None, 0)
    assert paired.mean_se([3.0]) == (3.0, None, 1)
    mean, se, n = paired.mean_se([1.0, 2.0, 6.0])  # sd² = ((−2)² + (−1)² + 3²) / 2 = 7
    assert (mean, n) == (3.0, 3) and se == pytest.approx((7 / 3) ** 0.5)


def test_on_curve_is_linear_in_accuracy_between_neighbouring_lambdas():
    curve = [(2.0, 0.5, 300.0), (1.0, 0.3, 400.0), (3.0, 0.7, 280.0)]  # given out of λ order on purpose
    assert paired.on_curve(curve, 0.4) == pytest.approx(350.0)
    assert paired.on_curve(curve, 0.65) == pytest.approx(285.0)
    assert paired.on_curve(curve, 0.75) is None and paired.on_curve(curve, 0.2) is None  # no extrapolation
    # a curve that turns back in accuracy: the first segment in λ order that spans the value
    assert paired.on_curve([(1.0, 0.3, 400.0), (2.0, 0.6, 300.0), (3.0, 0.5, 290.0)], 0.55) == pytest.approx(316 + 2 / 3)


def test_seed_differences_use_each_seeds_own_cfg_curve():
    cfg = {1.0: {0: {"accuracy": 0.2, "f": 500.0}, 1: {"accuracy": 0.3, "f": 480.0}},
           2.0: {0: {"accuracy": 0.4, "f": 400.0}, 1: {"accuracy": 0.5, "f": 420.0}}}
    method = {0: {"accuracy": 0.3, "f": 430.0}, 1: {"accuracy": 0.45, "f": 400.0}, 2: {"accuracy": 0.3, "f": 1.0}}
    # seed 0: halfway between (0.2, 500) and (0.4, 400) → 450, Δ = −20; seed 1: ¾ of the way from (0.3, 480) to
    # (0.5, 420) → 435, Δ = −35. Seed 2 has no CFG curve: left out. On a pooled curve both would read otherwise.
    assert paired.seed_differences(method, cfg, "f") == pytest.approx({0: -20.0, 1: -35.0})
    assert paired.seed_differences(method, cfg, "f", lam=2.0) == pytest.approx({0: 30.0, 1: -20.0})
    assert paired.seed_differences(method, cfg, "f", lam=3.0) == {}
    beyond = {0: {"accuracy": 0.9, "f": 1.0}}
    assert paired.seed_differences(beyond, cfg, "f") == {}


def _pooled(n=60, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n, d, generator=g).abs() * 3
    ref = torch.randn(40, d, generator=g).abs() * 3
    correct = torch.rand(n, generator=g) < 0.6
    stats = {"fd": gaussian_stats(ref)}
    return feats, correct, ref, paired.PooledImages(feats, correct, stats, ref, kid_scale=2.0)


def test_pooled_metrics_once_each_are_the_plain_metrics():
    feats, correct, ref, pooled = _pooled()
    got = pooled.metrics()
    assert got["accuracy"] == pytest.approx(float(correct.double().mean()))
    # the same float64 operations in another order: rounding only
    assert got["fd"] == pytest.approx(frechet_distance(*gaussian_stats(feats), *gaussian_stats(ref)), rel=1e-9)
    assert got["kid"] == pytest.approx(kid(feats / 2.0, ref / 2.0), rel=1e-9, abs=1e-12)


def test_pooled_metrics_with_multiplicities_are_the_metrics_of_repeated_rows():
    feats, correct, ref, pooled = _pooled()
    counts = torch.randint(0, 4, (len(feats),), generator=torch.Generator().manual_seed(3))
    rows = torch.repeat_interleave(torch.arange(len(feats)), counts)
    got = pooled.metrics(counts)
    assert got["accuracy"] == pytest.approx(float(correct[rows].double().mean()))
    assert got["fd"] == pytest.approx(frechet_distance(*gaussian_stats(feats[rows]), *gaussian_stats(ref)), rel=1e-9)
    assert got["kid"] == pytest.approx(kid(feats[rows] / 2.0, ref / 2.0), rel=1e-9, abs=1e-12)


def test_cell_draws_keep_every_cell_size_and_are_seeded():
    cells = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    draws = list(paired.cell_draws(cells, 20, seed=5))
    for counts in draws:
        for c in range(3):
            assert counts[cells == c].sum() == (cells == c).sum()
    assert all(torch.equal(a, b) for a, b in zip(draws, paired.cell_draws(cells, 20, seed=5)))
    assert not all(torch.equal(draws[0], d) for d in draws[1:])


def test_bootstrap_of_a_paired_difference_is_tighter_than_of_either_side():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(400, 4, generator=g)
    ref = torch.randn(100, 4, generator=g)
    stats = {"fd": gaussian_stats(ref)}
    correct = torch.ones(400, dtype=torch.bool)
    a = paired.PooledImages(base, correct, stats, ref)
    b = paired.PooledImages(base + 0.2 + 0.05 * torch.randn(400, 4, generator=g), correct, stats, ref)
    cells = torch.arange(400) % 10
    out = paired.bootstrap({"a": a, "b": b}, cells, {"diff": lambda m: m["b"]["fd"] - m["a"]["fd"],
                                                    "a": lambda m: m["a"]["fd"]}, draws=200)
    assert out["diff"]["low"] < out["diff"]["value"] < out["diff"]["high"]
    assert out["diff"]["low"] > 0  # the shift is there on every draw of the same images
    assert out["diff"]["high"] - out["diff"]["low"] < out["a"]["high"] - out["a"]["low"]
    assert out["diff"]["defined"] == 200


def _write_family(folder, name, rows, seeds, labels, feats):
    meta = {"step": 300, "samples": len(labels), "steps": 16, "seeds": seeds, "weak_step": None, "device": "cpu",
            "seconds": 1.0, "command": "run ..."}
    (folder / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}))
    np.savez_compressed(folder / f"{name}.npz", names=np.array([r["name"] for r in rows]), seeds=np.array(seeds),
                        labels=labels.numpy().astype(np.int8), features=np.stack(feats).astype(np.float16),
                        predicted=np.stack([np.stack([labels.numpy()] * len(seeds))] * len(rows)).astype(np.int8))


def test_paired_report_on_a_synthetic_folder(tmp_path):
    seeds, labels = [0, 1, 2], torch.arange(20) % 10
    g = torch.Generator().manual_seed(0)

    def per_seed(acc, fid):
        return [{"accuracy": a, "frechet": f, "frechet_heldout": f, "kid_heldout": f / 1000} for a, f in zip(acc, fid)]

    def row(family, lam, name, acc, fid):
        return {"family": family, "lam": lam, "omega": 0.5, "sigma_interval": None, "name": name, "seconds": 1.0,
                "per_seed": per_seed(acc, fid)}

    feats = lambda: (torch.randn(3, 20, 128, generator=g).abs() * 5).numpy()  # noqa: E731
    _write_family(tmp_path, "none", [row("none", 1.0, "none", [0.2, 0.2, 0.2], [500, 510, 520])], seeds, labels,
                  [feats()])
    _write_family(tmp_path, "cfg", [row("cfg", 2.0, "cfg λ=2", [0.4, 0.4, 0.4], [400, 400, 420])], seeds, labels,
                  [feats()])
    _write_family(tmp_path, "s2", [row("s2", 2.0, "s2 λ=2 ω=0.5", [0.3, 0.3, 0.5], [430, 460, 300])], seeds, labels,
                  [feats()])
    frontier.main(["paired", "--out", str(tmp_path), "--bootstrap", "20"])
    text = (tmp_path / "paired.md").read_text()
    # same λ: Δ per seed +30, +60, −120 → mean −10, SE √(((40)² + (70)² + (110)²) / 2 / 3) = √3100
    assert f"| -10.0 ± {3100 ** 0.5:.1f} (3) | +30.0, +60.0, -120.0 |" in text
    # matched accuracy: seed 0 at 0.3 on (0.2, 500)–(0.4, 400) → 450, Δ −20; seed 1 → 455, Δ +5; seed 2 outside
    assert "| -7.5 ± 12.5 (2) |" in text
    assert "n = 60 per setting (3 seeds × 20)" in text
    record = json.loads((tmp_path / "paired.json").read_text())
    assert record["per_seed"][0]["per_seed"]["frechet_matched"] == pytest.approx({"0": -20.0, "1": 5.0})


def test_config_kwargs_make_a_new_method_without_code():
    grid = frontier.settings("s2", [], [0.5], [], [1.5], [None], {"num_masks": 2})
    assert grid[0].config(3).num_masks == 2 and grid[0].method == "s2[num_masks=2]"
    assert grid[0].name == "s2[num_masks=2] λ=1.5 ω=0.5"
    slg = frontier.settings("slg", [], [], [1.0], [2.0], config_kwargs={"skip_blocks": [2, 4]})[0].config(0)
    assert slg.skip_blocks == (2, 4)  # a JSON list becomes the tuple the config takes
    with pytest.raises(ValueError, match="apply to"):
        frontier.settings("cfg", [2.0], [], [], [], config_kwargs={"num_masks": 2})


@pytest.mark.parametrize("kwargs", ['{"no_such_option": 1}', '[1]', '{"num_masks": 0}', 'x'])
def test_bad_config_kwargs_fail_before_sampling(kwargs):
    with pytest.raises(SystemExit):
        frontier.parse_args(["run", "--checkpoint", "c", "--out", "o", "--families", "s2", "--config-kwargs", kwargs])


def test_config_kwargs_need_a_family_that_takes_them():
    with pytest.raises(SystemExit):
        frontier.parse_args(["run", "--checkpoint", "c", "--out", "o", "--families", "cfg",
                             "--config-kwargs", '{"num_masks": 2}'])


def test_summarise_gives_the_standard_error():
    out = frontier.summarise([{"a": 1.0}, {"a": 2.0}, {"a": 6.0}])
    assert out["a"] == 3.0 and out["a_spread"] == 5.0 and out["a_se"] == pytest.approx((7 / 3) ** 0.5)
    assert frontier.summarise([{"a": 1.0}])["a_se"] is None
