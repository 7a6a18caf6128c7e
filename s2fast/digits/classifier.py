"""A small MNIST classifier, the judge of generated digits: accuracy for the requested class, and a Fréchet
distance in its penultimate features (FID's formula with this network in place of Inception).

Trained (``PYTHONPATH=evaluation python -m s2fast_eval.digits.classifier`` from the repository, about 1 minute on 2
CPU cores; it writes weights/classifier.safetensors) on the same 4500 images as the generator; the 500 held-out
images give its test accuracy and the Fréchet distance of real data (the floor a perfect generator would reach at
that sample size). The file also stores the mean and covariance of the features of the 4500 training images, the
reference every Fréchet distance is against, so the demo needs no dataset.
"""

from __future__ import annotations

import os
from typing import Dict, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open

from .metrics import frechet_distance, gaussian_stats
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


def load_judge(weights_dir: str = DEFAULT_WEIGHTS) -> DigitJudge:
    """The embedded classifier, offline."""
    path = os.path.join(weights_dir, CLASSIFIER_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no classifier at {path} (train one from a checkout of the repository: "
                                "PYTHONPATH=evaluation python -m s2fast_eval.digits.classifier)")
    with safe_open(path, "pt") as f:  # one read: the tensors and the training run's figures in its metadata
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = {k: float(v) for k, v in (f.metadata() or {}).items()}
    model = DigitClassifier()
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    return DigitJudge(model, tensors["reference.mean"], tensors["reference.cov"], meta)
