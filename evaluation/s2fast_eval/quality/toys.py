"""The paper's toy distributions (its Figs. 3, 9, 10): class-conditional Gaussian mixtures with known truth.

Class c is N(μ_c, σ² I); the unconditional distribution is the equal-weight mixture. CFG with λ > 1 is known to
push each class away from the others (its samples' mean overshoots μ_c); the paper shows S² pulling it back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch


@dataclass(frozen=True)
class Mixture:
    name: str
    means: Tuple[Tuple[float, ...], ...]  # one mode per class
    std: float = 1.0

    @property
    def dim(self) -> int:
        return len(self.means[0])

    @property
    def num_classes(self) -> int:
        return len(self.means)

    def mean_tensor(self) -> torch.Tensor:
        return torch.tensor(self.means, dtype=torch.float32)

    def sample(self, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One sample of the true class-conditional distribution per label."""
        noise = torch.randn(len(labels), self.dim, generator=generator)
        return self.mean_tensor()[labels] + self.std * noise

    def balanced_labels(self, n: int) -> torch.Tensor:
        """n labels, the classes in turn (so every class gets n / num_classes samples)."""
        return torch.arange(n) % self.num_classes


MIXTURE_1D = Mixture("1d", ((-4.0,), (4.0,)))
MIXTURE_2D = Mixture("2d", ((-4.0, -4.0), (-4.0, 4.0), (4.0, -4.0), (4.0, 4.0)))
MIXTURES = {m.name: m for m in (MIXTURE_1D, MIXTURE_2D)}
