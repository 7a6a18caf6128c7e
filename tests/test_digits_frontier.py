"""The digits frontier tooling: AutoGuidance on the pipeline, the method settings, frontiers and the report."""

import json

import pytest
import torch
from s2fast_eval.digits import frontier, frontier_report, train
from s2fast_eval.digits.autoguidance import autoguided

from s2fast import S2Config
from s2fast.digits.model import build_scheduler, build_transformer
from s2fast.digits.pipeline import DigitsFlowPipeline, load_default_pipeline
from s2fast.sgg import SGGConfig

LABELS = torch.tensor([3, 7, 0, 9])


def tiny(seed):
    torch.manual_seed(seed)
    return build_transformer(num_layers=4, attention_head_dim=8).eval()


@pytest.fixture(scope="module")
def pipe():
    p = DigitsFlowPipeline(tiny(0), build_scheduler())
    p.set_progress_bar_config(disable=True)
    return p


def sample(pipe, lam, steps=4):
    return pipe(LABELS, guidance_scale=lam, num_inference_steps=steps, output_type="pt",
                generator=torch.Generator().manual_seed(0)).images


@torch.no_grad()
def test_autoguidance_matches_a_plain_loop(pipe):
    weak = tiny(1)
    with autoguided(pipe, weak):
        got = sample(pipe, 2.5)
    scheduler = build_scheduler()
    scheduler.set_timesteps(4)
    x = torch.randn((4, 1, 28, 28), generator=torch.Generator().manual_seed(0))
    for t in scheduler.timesteps:
        ts = t.expand(4)
        c = pipe.transformer(x, timestep=ts, class_labels=LABELS).sample
        w = weak(x, timestep=ts, class_labels=LABELS).sample
        x = scheduler.step(w + 2.5 * (c - w), t, x, return_dict=False)[0]
    # batch-B forwards in both: the same shapes and kernels, so only the combination's rounding can differ
    torch.testing.assert_close(got, (x / 2 + 0.5).clamp(0, 1), atol=1e-6, rtol=0)
    assert (got - sample(pipe, 2.5)).abs().max() > 1e-3  # not CFG: the weak model changes the result
    assert "forward" not in pipe.transformer.__dict__  # the pipeline is itself again


def test_autoguidance_with_the_model_itself_is_the_conditional_model(pipe):
    with autoguided(pipe, pipe.transformer):
        got = sample(pipe, 3.0)
    torch.testing.assert_close(got, sample(pipe, 1.0), atol=1e-6, rtol=0)  # W = C: D = C + λ·0


def test_autoguidance_needs_the_cfg_batch(pipe):
    with autoguided(pipe, tiny(1)), pytest.raises(RuntimeError, match="guidance_scale > 1"):
        sample(pipe, 1.0)
    assert "forward" not in pipe.transformer.__dict__


def test_settings_build_the_configs_the_docs_name():
    s2 = frontier.Setting("s2", 2.0, 0.25, frontier.CENTRAL_80).config(seed=4)
    assert s2 == S2Config(omega=0.25, seed=4, sigma_interval=(0.1, 0.9))
    assert frontier.Setting("naive", 2.0, 0.5).config(1).num_masks == 4
    slg = frontier.Setting("slg", 2.0, 1.0).config(0)
    assert isinstance(slg, SGGConfig) and slg.cfg_window == slg.skip_window == (0.0, 1.0) and slg.skip_blocks == (3,)
    sgg = frontier.Setting("sgg", 2.0, 1.0).config(0)
    assert sgg.cfg_window == (0.0, 0.5) and sgg.skip_window == (0.5, 1.0)
    assert frontier.Setting("cfg", 2.0).config(0) is None and frontier.Setting("auto", 2.0).config(0) is None
    grid = frontier.settings("s2", [1.5], [0.1, 0.5], [1.0], [1.5, 2.0])
    assert len(grid) == 8 and sum(s.sigma_interval is not None for s in grid) == 4


def row(family, acc, fid, **extra):
    # two seeds at mean ± half the range: the standard error over them is half the range
    per_seed = [{"accuracy": acc + d * 0.005, "frechet": fid + d * 0.5, "precision": 0.5, "recall": 0.5} for d in (-1, 1)]
    return {"family": family, "lam": 2.0, "omega": 0.0, "sigma_interval": None, "name": f"{family} {acc} {fid}",
            "accuracy": acc, "frechet": fid, "accuracy_spread": 0.01, "frechet_spread": 1.0, "precision": 0.5,
            "precision_spread": 0.0, "recall": 0.5, "recall_spread": 0.0, "seconds": 1.0, "per_seed": per_seed,
            **extra}


def test_pareto_and_cfg_at_matched_accuracy():
    rows = [row("cfg", 0.90, 10), row("cfg", 0.95, 12), row("cfg", 0.94, 15), row("cfg", 0.99, 30)]
    assert [r["frechet"] for r in frontier_report.pareto(rows)] == [10, 12, 30]  # (0.94, 15) is dominated
    assert frontier_report.best_at(rows, 0.93)["frechet"] == 12
    assert frontier_report.best_at(rows, 0.995) is None
    curve = [dict(row("cfg", a, f), lam=lam) for lam, a, f in ((1.0, 0.3, 400), (2.0, 0.5, 300), (3.0, 0.7, 280))]
    assert frontier_report.cfg_at(curve, 0.4) == pytest.approx(350)   # halfway between λ = 1 and 2
    assert frontier_report.cfg_at(curve, 0.65) == pytest.approx(285)
    assert frontier_report.cfg_at(curve, 0.75) is None                # beyond the grid: no extrapolation


def test_report_merges_family_files(tmp_path):
    meta = {"step": 600, "weak_step": 150, "samples": 200, "seeds": [0, 1], "steps": 16, "device": "cpu",
            "seconds": 60.0, "command": "PYTHONPATH=evaluation python -m s2fast_eval.digits.frontier run ..."}
    files = {"none": [row("none", 0.85, 20)], "cfg": [row("cfg", 0.95, 15), row("cfg", 0.99, 25)],
             "s2": [row("s2", 0.96, 14), row("s2", 0.97, 16, sigma_interval=[0.1, 0.9])]}
    for name, rows in files.items():
        (tmp_path / f"{name}.json").write_text(json.dumps({"meta": {**meta, "family": name}, "rows": rows}))
    (tmp_path / "floor.json").write_text(json.dumps({**row("real", 0.97, 8), "meta": meta}))
    frontier.main(["report", "--out", str(tmp_path)])
    text = (tmp_path / "results.md").read_text()
    assert "training step 600" in text and "S² (σ in [0.1, 0.9])" in text
    # S² at 96 % accuracy: CFG's λ curve there is 15 + (0.01 / 0.04) · (25 − 15) = 17.5, so Δ = 14 − 17.5
    assert "| S² (all steps) | s2 0.96 14 | 96.0 ± 0.5 | 14.00 ± 0.50 | 17.50 | -3.50 |" in text
    assert "standard error over seeds (n = 2" in text
    assert (tmp_path / "frontier.png").stat().st_size > 1000


def test_report_gives_config_kwargs_methods_their_own_frontier(tmp_path):
    meta = {"step": 600, "weak_step": None, "samples": 200, "seeds": [0, 1], "steps": 16, "device": "cpu",
            "seconds": 60.0, "command": "run ..."}
    files = {"none": [row("none", 0.85, 20)], "cfg": [row("cfg", 0.95, 15), row("cfg", 0.99, 25)],
             "s2_cached": [row("s2", 0.96, 13, method="s2[cache=2]", extra={"cache": 2})]}
    for name, rows in files.items():
        (tmp_path / f"{name}.json").write_text(json.dumps({"meta": {**meta, "family": name}, "rows": rows}))
    frontier.main(["report", "--out", str(tmp_path)])
    assert "| S² (all steps)[cache=2] | s2 0.96 13 |" in (tmp_path / "results.md").read_text()


def test_training_saves_earlier_checkpoints_with_their_step(tmp_path):
    train.main(["--out", str(tmp_path), "--steps", "6", "--batch-size", "4", "--warmup", "1", "--save-at", "2,4",
                "--stop-at", "4"])
    steps = {p.name: json.loads((p / "training.json").read_text())["step"] for p in tmp_path.iterdir()}
    assert steps == {"step_2": 2, "step_4": 4}
    full = tmp_path / "full"
    train.main(["--out", str(full), "--steps", "6", "--batch-size", "4", "--warmup", "1", "--save-at", "4"])
    a = load_default_pipeline(str(tmp_path / "step_4")).transformer.state_dict()
    b = load_default_pipeline(str(full / "step_4")).transformer.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # stopping early changes nothing before the stop


@pytest.mark.parametrize("argv", [["--save-at", "9"], ["--stop-at", "7"], ["--save-at", "x"]])
def test_training_refuses_bad_checkpoint_steps(tmp_path, argv):
    with pytest.raises(SystemExit):
        train.main(["--out", str(tmp_path), "--steps", "6", *argv])
