"""Trains the judge of generated digits (s2fast/digits/classifier.py: accuracy for the requested class, and a
Fréchet distance in its penultimate features) on the 4500 training images the generator learns from.

    PYTHONPATH=evaluation python -m s2fast_eval.digits.classifier   # about 1 minute on 2 CPU cores

The 500 held-out images give its test accuracy and the Fréchet distance of real data (the floor a perfect generator
would reach at that sample size). The file (weights/classifier.safetensors in the package) also stores the mean
and covariance of the features of the 4500 training images, the reference every Fréchet distance is against, so
the demo needs no dataset.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm.auto import tqdm

from s2fast.digits.classifier import CLASSIFIER_FILE, DigitClassifier, DigitJudge, features_of
from s2fast.digits.metrics import gaussian_stats
from s2fast.digits.pipeline import DEFAULT_WEIGHTS

from .data import load_mnist, split


@torch.enable_grad()
def train_classifier(seed: int = 0, epochs: int = 8, out_dir: str = DEFAULT_WEIGHTS) -> DigitJudge:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    (train_x, train_y), (test_x, test_y) = split(*load_mnist())
    model = DigitClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in tqdm(range(epochs), desc="train classifier", unit="epoch"):
        order = torch.randperm(len(train_x), generator=generator)
        for i in range(0, len(order), 64):
            idx = order[i:i + 64]
            # one-pixel random shifts: a judge that is not fooled by a digit drawn slightly off-centre
            dx, dy = torch.randint(-1, 2, (2,), generator=generator).tolist()
            x = torch.roll(train_x[idx], shifts=(dy, dx), dims=(2, 3))
            loss = F.cross_entropy(model(x), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    train_feats, _ = features_of(model, train_x)
    ref_mean, ref_cov = gaussian_stats(train_feats)
    judge = DigitJudge(model, ref_mean, ref_cov, {})
    held_out = judge.score(test_x, test_y)
    judge.meta = {"test_accuracy": held_out["accuracy"], "real_frechet_500": held_out["frechet"], "seed": float(seed)}
    os.makedirs(out_dir, exist_ok=True)
    tensors = {f"model.{k}": v.contiguous() for k, v in model.state_dict().items()}
    tensors.update({"reference.mean": ref_mean, "reference.cov": ref_cov})
    save_file(tensors, os.path.join(out_dir, CLASSIFIER_FILE), metadata={k: repr(v) for k, v in judge.meta.items()})
    return judge


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m s2fast_eval.digits.classifier", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=DEFAULT_WEIGHTS, help="output folder (default: the package's weights)")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.add_argument("--epochs", type=int, default=8, help="epochs (default 8)")
    args = p.parse_args(argv)
    if args.epochs < 1:
        p.error("--epochs must be at least 1")
    judge = train_classifier(args.seed, args.epochs, args.out)
    print(f"held-out accuracy {judge.meta['test_accuracy']:.4f}, real-data Fréchet (500 images) "
          f"{judge.meta['real_frechet_500']:.3f}; saved to {os.path.join(args.out, CLASSIFIER_FILE)}")


if __name__ == "__main__":
    main()
