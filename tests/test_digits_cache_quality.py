"""The cache-quality run of the digits frontiers (s2fast_eval.digits.cache_quality): its setting specs, its two
block-row counts (a hook on every block against the cost model from s2fast.trace_steps) on a small random digits
model, and its report's paired differences on a synthetic folder."""

import json

import pytest
import torch
from s2fast_eval.digits import cache_quality, cache_report

from s2fast import BlockCache
from s2fast.digits.model import build_scheduler, build_transformer
from s2fast.digits.pipeline import DigitsFlowPipeline

STEPS, LAYERS = 8, 4


def test_setting_specs():
    parse = cache_quality.parse_setting
    assert parse("cfg@2", 0.5).config(0) is None and parse("none@1", 0.5).config(0) is None
    c = parse("cfgcache@2.5:0.1", 0.5).config(3)
    assert (c.omega, c.cache, c.correction_every) == (0.0, BlockCache(threshold=0.1), 1)  # CFG: ω = 0
    c = parse("s2cache@2:0.15", 0.25).config(3)
    assert (c.omega, c.seed, c.cache.threshold) == (0.25, 3, 0.15)
    c = parse("s2reuse@2:3", 0.25).config(0)
    assert (c.omega, c.cache, c.correction_every) == (0.25, None, 3)
    assert parse("s2reuse@2:3", 0.25).name == "S² reuse λ=2 ω=0.25 k=3"
    for bad, words in (("cfg2", "METHOD@λ"), ("fbc@2:0.1", "unknown method"), ("cfgcache@2", "needs :threshold"),
                       ("cfg@2:0.1", "takes no"), ("none@2", "λ = 1"), ("s2reuse@2:1", "k must"),
                       ("s2cache@2:-1", "threshold")):
        with pytest.raises(ValueError, match=words):
            parse(bad, 0.5)


@pytest.fixture
def digits():
    torch.manual_seed(0)
    pipe = DigitsFlowPipeline(build_transformer(num_layers=LAYERS, attention_head_dim=8).eval(), build_scheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_counted_block_rows_equal_the_cost_model(digits):
    labels = torch.tensor([3, 7, 0, 1])
    out = {}
    for spec in ("none@1", "cfg@4", "cfgcache@4:0", "cfgcache@4:1e9", "s2@4", "s2cache@4:1e9", "s2reuse@4:2"):
        images, cost = cache_quality.sample(digits, cache_quality.parse_setting(spec, 0.5), labels, 0, STEPS)
        assert cost["block_rows"] == cost["model_block_rows"], spec
        out[spec] = images, cost
    assert out["none@1"][1]["block_rows"] == LAYERS * STEPS  # the cond branch alone
    assert out["cfg@4"][1]["block_rows"] == 2 * LAYERS * STEPS
    # threshold 0 caches nothing: s2fast's CFG, the same images as the plain pipeline (up to the batching of rows)
    assert out["cfgcache@4:0"][1]["cached_steps"] == 0
    torch.testing.assert_close(out["cfgcache@4:0"][0], out["cfg@4"][0], atol=1e-4, rtol=0)
    # a huge threshold caches every step but the first and the last: those run 2 × L, the others the probe block
    big = out["cfgcache@4:1e9"][1]
    assert big["cached_steps"] == STEPS - 2 and big["block_rows"] == 2 * (2 * LAYERS) + (STEPS - 2) * 2
    s2, cached, reuse = out["s2@4"][1], out["s2cache@4:1e9"][1], out["s2reuse@4:2"][1]
    # the sub-network costs S² rows on top of CFG; k = 2 computes it on half the steps
    assert s2["block_rows"] > reuse["block_rows"] > out["cfg@4"][1]["block_rows"]
    assert cached["reused_corrections"] == STEPS - 2 and reuse["reused_corrections"] == STEPS // 2


def _row(method, lam, per_seed, threshold=None):
    return {"family": "s2", "method": method, "name": f"{method} {lam}", "lam": lam, "omega": 0.0, "threshold": threshold,
            "per_seed": [dict(v, model_block_rows=v["block_rows"]) for v in per_seed],
            **{k: per_seed[0][k] for k in per_seed[0]}, **{k + "_se": None for k in per_seed[0]},
            "cached_steps": 0.0, "reused_corrections": 0.0, "seconds": 1.0}


def _m(acc, f, rows):
    return {"accuracy": acc, "frechet": f, "frechet_heldout": f, "kid_heldout": 0.0, "block_rows": rows}


def test_report_pairs_each_seed_with_its_own_reference_curve(tmp_path):
    meta = {"checkpoint": "c", "samples": 10, "seeds": [0, 1], "steps": 4, "omega": 0.5, "device": "d",
            "command": "x", "seconds": 60}
    rows = [_row("none", 1.0, [_m(0.2, 500, 24), _m(0.3, 480, 24)]),
            _row("cfg", 2.0, [_m(0.4, 400, 48), _m(0.5, 420, 48)]),
            _row("cfgcache", 2.0, [_m(0.4, 410, 20), _m(0.5, 440, 20)], 0.1),
            _row("s2cache", 2.0, [_m(0.3, 430, 26), _m(0.45, 400, 26)], 0.1)]
    (tmp_path / "a.json").write_text(json.dumps({"meta": meta, "rows": rows}))
    text = cache_report.write_report(str(tmp_path))
    comps = {(c["setting"], c["reference"]): c for c in json.loads((tmp_path / "results.json").read_text())["comparisons"]}
    # against CFG: seed 0 halfway between (0.2, 500) and (0.4, 400) → 450, Δ −20; seed 1 ¾ of (0.3, 480)→(0.5, 420)
    # → 435, Δ −35: mean −27.5, SE 7.5
    mean, se, n = comps[("s2cache 2.0", "CFG")]["frechet_matched"]
    assert (mean, se, n) == pytest.approx((-27.5, 7.5, 2))
    # against CFG + cache t=0.1: seed 0 → 455, Δ −25; seed 1 → (480 + ¾ (440 − 480)) = 450, Δ −50
    mean, se, n = comps[("s2cache 2.0", "CFG + cache t=0.1")]["frechet_matched"]
    assert (mean, se, n) == pytest.approx((-37.5, 12.5, 2))
    assert comps[("s2cache 2.0", "CFG + cache t=0.1")]["frechet_same_lam"][0] == pytest.approx((20 - 40) / 2)
    assert ("cfgcache 2.0", "CFG + cache t=0.1") not in comps  # a point on its own curve
    assert "| s2cache 2.0 | 26.0 |" in text
    # the cache's own cost: CFG + cache against CFG at λ = 2, seed by seed: (410 − 400, 440 − 420) → +15.0 ± 5.0
    assert "| cfgcache 2.0 | cfg 2.0 | 20.0 / 48.0 | +0.0 ± 0.0 (2) | +15.0 ± 5.0 (2) |" in text
    rows[3]["per_seed"][1]["model_block_rows"] = 25  # a cost model that disagrees with the count: refused
    (tmp_path / "a.json").write_text(json.dumps({"meta": meta, "rows": rows}))
    with pytest.raises(ValueError, match="cost model"):
        cache_report.write_report(str(tmp_path))
