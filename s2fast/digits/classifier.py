"""A small MNIST classifier, the judge of generated digits: accuracy for the requested class, and a Fréchet
distance in its penultimate features (FID's formula with this network in place of Inception).

    python -m s2fast.digits.classifier       # about 1 minute on 2 CPU cores; writes weights/classifier.safetensors

Trained on the same 4500 images as the generator; the 500 held-out images give its test accuracy and the Fréchet
distance of real data (the floor a perfect generator would reach at that sample size). The file also stores the
mean and covariance of the features of the 4500 training images, the reference every Fréchet distance is against,
so the demo needs no dataset.
"""

from __future__ import annotations

import argparse
import os
from typing import Dict, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..quality.metrics import frechet_distance, gaussian_stats
from .pipeline import DEFAULT_WEIGHTS

CLASSIFIER_FILE = "classifier.safetensors"


class DigitClassifier(nn.Module):
    """Two conv layers and a 128-wide penultimate layer; input (N, 1, 28, 28) in [-1, 1]."""

    def __init__(self, width: int = 128):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc = nn.Linear(64 * 7 * 7, width)
        self.out = nn.Linear(width, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return F.relu(self.fc(x.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.features(x))


@torch.no_grad()
def features_of(model: DigitClassifier, images: torch.Tensor, batch: int = 1000) -> Tuple[torch.Tensor, torch.Tensor]:
    """(penultimate features, logits) of ``images`` in [-1, 1]."""
    feats = torch.cat([model.features(images[i:i + batch].float()) for i in range(0, len(images), batch)])
    return feats, model.out(feats)


class DigitJudge:
    """The trained classifier and its reference statistics."""

    def __init__(self, model: DigitClassifier, ref_mean: torch.Tensor, ref_cov: torch.Tensor, meta: Dict[str, float]):
        self.model, self.ref_mean, self.ref_cov, self.meta = model.eval(), ref_mean, ref_cov, meta

    def score(self, images: torch.Tensor, labels: torch.Tensor) -> Dict[str, float]:
        """accuracy (the classifier's argmax equals the requested label) and Fréchet distance to the training
        images, for ``images`` in [-1, 1] of shape (N, 1, 28, 28)."""
        if images.dim() != 4 or tuple(images.shape[1:]) != (1, 28, 28):
            raise ValueError(f"images must be (N, 1, 28, 28), got {tuple(images.shape)}")
        feats, logits = features_of(self.model, images)
        mean, cov = gaussian_stats(feats)
        return {"accuracy": float((logits.argmax(1) == labels.to(logits.device)).double().mean()),
                "frechet": frechet_distance(mean, cov, self.ref_mean, self.ref_cov)}


@torch.enable_grad()
def train_classifier(seed: int = 0, epochs: int = 8, out_dir: str = DEFAULT_WEIGHTS) -> DigitJudge:
    from .data import load_mnist, split

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


def load_judge(weights_dir: str = DEFAULT_WEIGHTS) -> DigitJudge:
    """The embedded classifier, offline."""
    path = os.path.join(weights_dir, CLASSIFIER_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no classifier at {path} (train one: python -m s2fast.digits.classifier)")
    with safe_open(path, "pt") as f:  # one read: the tensors and the training run's figures in its metadata
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = {k: float(v) for k, v in (f.metadata() or {}).items()}
    model = DigitClassifier()
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    return DigitJudge(model, tensors["reference.mean"], tensors["reference.cov"], meta)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m s2fast.digits.classifier", description=__doc__.split("\n\n")[0])
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
