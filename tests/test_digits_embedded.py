"""The embedded default: the trained digits pipeline and classifier load offline and work; training, evaluation
and the demo run end to end at a reduced size."""

import json
import os

import pytest
import torch
from PIL import Image
from s2fast_eval.digits import evaluate, train
from s2fast_eval.digits.data import load_mnist, split

from s2fast import demo
from s2fast.digits.classifier import load_judge
from s2fast.digits.pipeline import DEFAULT_WEIGHTS, load_default_pipeline


@pytest.fixture(scope="module")
def offline():
    # no network: these variables make huggingface_hub refuse any request
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    yield
    for k, v in saved.items():
        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


@pytest.fixture(scope="module")
def embedded(offline):
    return load_default_pipeline(), load_judge()


def test_embedded_files_are_small_safetensors():
    sizes = {}
    for root, _, files in os.walk(DEFAULT_WEIGHTS):
        for f in files:
            sizes[os.path.relpath(os.path.join(root, f), DEFAULT_WEIGHTS)] = os.path.getsize(os.path.join(root, f))
    assert "transformer/diffusion_pytorch_model.safetensors" in sizes and "classifier.safetensors" in sizes
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in sizes)  # no pickles in the package
    assert sum(sizes.values()) < 12e6


def test_embedded_pipeline_samples_the_requested_digits(embedded):
    pipe, judge = embedded
    labels = torch.arange(10).repeat(3)
    images = pipe(labels, guidance_scale=4.0, num_inference_steps=10, output_type="pt",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (30, 1, 28, 28) and 0 <= images.min() and images.max() <= 1
    # A trained model: the judge reads the requested class far above chance (10 %); an untrained or mis-loaded
    # model scores near 10 %. The evaluation measures ~the real figure on 1000 digits (benchmarks/quality).
    assert judge.score(images * 2 - 1, labels)["accuracy"] >= 0.7


def test_embedded_classifier_reads_real_held_out_digits(embedded):
    _, judge = embedded
    _, (test_x, test_y) = split(*load_mnist())
    scores = judge.score(test_x, test_y)
    assert scores["accuracy"] >= 0.95  # 96-98 % when trained (judge.meta has the figure of the training run)
    # the figure recorded at training; another CPU's float kernels may sum in another order, hence 1e-3
    assert scores["frechet"] == pytest.approx(judge.meta["real_frechet_500"], rel=1e-3)
    assert judge.ref_cov.shape == (128, 128)
    with pytest.raises(ValueError, match=r"\(N, 1, 28, 28\)"):
        judge.score(test_x[:, 0], test_y)


def test_demo_runs_end_to_end(tmp_path, capsys, offline):
    demo.main(["--samples", "20", "--per-class", "2", "--steps", "3", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "CFG" in out and "S²" in out and "block-row floor" in out
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert len(metrics["masks"]) == 3 and 0 <= metrics["S²"]["accuracy"] <= 1
    assert metrics["S² / CFG step time"] > 0
    assert "1 round only" in metrics["timing warning"] and "!! this timing is untrustworthy" in out  # one call each
    grid = Image.open(tmp_path / "grid.png")
    assert grid.size == (2 * 2 * 56 + 12, 10 * 56 + 18)  # two blocks of 2 digits at scale 2, ten rows, title band


@pytest.mark.parametrize("argv, words", [(["--samples", "15"], "multiple of 10"), (["--steps", "1"], "--steps"),
                                          (["--guidance", "1"], "--guidance"), (["--samples", "20"], "--per-class"),
                                          (["--omega", "-1"], "omega must be >= 0"), (["--omega", "nan"], "omega"),
                                          (["--guidance", "inf"], "--guidance")])
def test_demo_rejects_bad_options(argv, words, capsys):
    with pytest.raises(SystemExit):
        demo.main(argv)
    assert words in capsys.readouterr().err


def test_evaluation_runs_end_to_end(tmp_path, offline):
    evaluate.main(["--samples", "10", "--steps", "2", "--lams", "2", "--omegas", "0.5", "--batch", "10",
                   "--out", str(tmp_path)])
    result = json.loads((tmp_path / "results.json").read_text())
    assert [r["name"] for r in result["rows"]] == ["none", "CFG", "S²", "naive S² (N=4)", "skip block 3"]
    assert all(len(r["per_seed"]) == 2 for r in result["rows"])
    assert "| S² | 2 | 0.5 |" in (tmp_path / "results.md").read_text()
    evaluate.main(["--samples", "10", "--steps", "2", "--lams", "2", "--extras-omegas", "0.1,0.5", "--kinds", "naive",
                   "--batch", "10", "--out", str(tmp_path / "extras")])
    extras = json.loads((tmp_path / "extras" / "results.json").read_text())["rows"]
    assert [(r["kind"], r["omega"]) for r in extras] == [("naive", 0.1), ("naive", 0.5)]


def test_evaluation_rejects_unknown_kinds(capsys):
    with pytest.raises(SystemExit):
        evaluate.main(["--kinds", "cfg,autoguidance"])
    assert "--kinds" in capsys.readouterr().err


def test_training_is_one_seeded_command(tmp_path):
    for run in ("a", "b"):
        train.main(["--out", str(tmp_path / run), "--steps", "3", "--batch-size", "4", "--warmup", "1"])
    a, b = (load_default_pipeline(str(tmp_path / r)).transformer.state_dict() for r in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)  # same seed, same weights
    record = json.loads((tmp_path / "a" / "training.json").read_text())
    assert record["args"]["steps"] == 3 and len(record["loss_every_100"]) == 1
