"""One prompt sampled with each method from the same noise, in memory: the core that ``s2fast generate`` writes to
files and ``s2fast ui`` shows on its page (one implementation of sampling for both)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch

from .errors import UserError
from .methods import METHODS
from .runtime import StepClock


@dataclass
class MethodRun:
    """One method's call: the pipeline's output, its per-step and total times, and the masks of every step (None
    for the stock pipeline)."""

    output: Any
    total_time_s: float
    step_times_s: List[float]
    trace: Optional[List]

    def record(self) -> Dict:
        return {"total_time_s": self.total_time_s, "step_times_s": self.step_times_s, "trace": self.trace}


def attach(method: str, pipe, args) -> None:
    """Set ``pipe`` up for ``method``; a config the model cannot serve (SGG's blocks beyond its depth) is one line."""
    try:
        METHODS[method].attach(pipe, args)
    except ValueError as e:
        raise UserError(f"--method {method}: {str(e).strip().splitlines()[0]}") from None


def sample_methods(pipes: Dict, methods: List[str], args, kwargs: Dict, seed: int, device: torch.device,
                   where: str) -> Dict[str, MethodRun]:
    """Call each method's pipeline (``pipes[method]``, set up by ``method_pipelines``) with ``kwargs`` and a CPU
    generator seeded with ``seed`` (the same noise for every method), in the order of ``methods``. Under model
    offload every method shares one pipeline and is attached before its call. ``where`` names the prompt in the
    out-of-memory message."""
    import s2fast

    runs = {}
    for method in methods:
        pipe = pipes[method]
        if args.offload:  # one pipeline for every method (see method_pipelines): set it up for this one
            attach(method, pipe, args)
        clock = StepClock(pipe, device)
        generator = torch.Generator(device="cpu").manual_seed(seed)
        try:
            with clock as timing:
                result = pipe(**kwargs, generator=generator, output_type="pil", **timing)
        except torch.OutOfMemoryError:
            raise UserError(f"out of memory on {device} at {where} (try --offload model, a smaller --height/--width "
                            "or --dtype bf16)") from None
        except (ValueError, TypeError) as e:  # the pipeline's own refusal of an option value
            raise UserError(f"{type(pipe).__name__} refused the options: {str(e).strip().splitlines()[0]}") from None
        trace = s2fast.trace(pipe) if s2fast.config_of(pipe) is not None else None
        runs[method] = MethodRun(result, clock.total, clock.step_times,
                                 None if trace is None else [_jsonable(m) for m in trace])
    return runs


def _jsonable(mask):
    return [_jsonable(m) for m in mask] if isinstance(mask, (tuple, list)) else int(mask)
