"""Which of torch's scaled-dot-product-attention backends the wrapped transformer runs, S2Config(attention=...).

diffusers' attention processors for SD3, Flux, DiT and Wan call ``F.scaled_dot_product_attention`` (directly or
through its dispatcher's native backend), so ``torch.nn.attention.sdpa_kernel`` around the transformer's blocks
selects the kernel for every block without touching the model.

- ``"default"`` (the default): torch's own dispatch. Nothing changes, so results are the stock pipeline's.
- ``"fastest"``: at the first step of each input shape, one prediction of the model is timed under every backend
  that accepts its attention (``time_backends``), and the fastest is used from then on (before any block graph
  is captured, so graphs replay the chosen kernels). Backends round differently, so this can
  change results in the last bits; it is an opt-in for that reason.
- ``"flash"``, ``"efficient"``, ``"cudnn"``, ``"math"``: that backend, always (an error if it cannot run the shape).

The flash-attn *package* is not one of torch's backends: diffusers selects it with
``pipe.transformer.set_attention_backend("flash")`` for the processors that use its dispatcher (Flux, Wan), and
s2fast runs whatever processor the model has, so the two combine.
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

BACKENDS = ("flash", "efficient", "cudnn", "math")
CHOICES = ("default", "fastest") + BACKENDS


def sdpa_backend(name: str):
    from torch.nn.attention import SDPBackend

    return {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[name]


@contextlib.contextmanager
def attention_backend(name: Optional[str]):
    """Run the enclosed attention calls on backend ``name`` (None or "default": torch's own choice)."""
    if name in (None, "default"):
        yield
        return
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel([sdpa_backend(name)]):
        yield


def _wall_timer(fn: Callable[[], None], device: torch.device, rounds: int) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()  # warm-up: first-call set-up stays out
    sync()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def time_backends(run: Callable[[], object], device: torch.device, names: Sequence[str] = BACKENDS, rounds: int = 3,
                  timer=None) -> Dict[str, Optional[float]]:
    """Median seconds of ``run()`` (one prediction of the wrapped model) under each backend; None for a backend
    that refuses the model's attention shape, dtype or device."""
    timer = timer or _wall_timer
    out: Dict[str, Optional[float]] = {}
    for name in names:
        call = lambda n=name: _under(n, run)  # noqa: E731
        try:
            call()
        except RuntimeError:  # "No available kernel": this backend cannot run it here
            out[name] = None
            continue
        out[name] = timer(call, device, rounds)
    return out


def _under(name: str, run: Callable[[], object]) -> None:
    with attention_backend(name):
        run()


def fastest(times: Dict[str, Optional[float]]) -> str:
    usable = {k: v for k, v in times.items() if v is not None}
    if not usable:
        raise RuntimeError("no scaled-dot-product-attention backend could run this model's attention")
    return min(usable, key=usable.get)


class AttentionChoice:
    """The backend of one wrap: fixed, or measured once per input signature ("fastest") on the model itself."""

    def __init__(self, choice: str, timer=None):
        self.choice = choice
        self.timer = timer
        self.measured: Dict[Tuple, Dict[str, Optional[float]]] = {}
        self.chosen: Dict[Tuple, str] = {}

    def backend_for(self, key: Tuple, run: Callable[[], object], device: torch.device) -> Optional[str]:
        if self.choice != "fastest":
            return None if self.choice == "default" else self.choice
        if key not in self.chosen:
            self.measured[key] = time_backends(run, device, timer=self.timer)
            self.chosen[key] = fastest(self.measured[key])
        return self.chosen[key]
