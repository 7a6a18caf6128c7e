"""Which backend runs a kernel op: explicit override → compiled extension → Triton → torch reference.

The override is the op's ``backend=`` argument, else the environment variable S2FAST_BACKEND (torch|triton|cuda),
read at each call. An override that cannot run raises a clear error; without one, every backend that is skipped
logs its reason once (logger "s2fast"). Neither Triton nor the extension is imported before an op needs it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Optional, Sequence, Tuple

import torch

BACKENDS = ("torch", "triton", "cuda")
ENV_VAR = "S2FAST_BACKEND"

logger = logging.getLogger("s2fast")
_logged: set = set()
_imports: dict = {}


def log_once(message: str, level: int = logging.INFO) -> None:
    if message not in _logged:
        _logged.add(message)
        logger.log(level, message)


def requested_backend(backend: Optional[str]) -> Optional[str]:
    """The explicit override: the argument, else S2FAST_BACKEND, else None (choose automatically)."""
    source = "backend"
    if backend is None:
        backend, source = os.environ.get(ENV_VAR) or None, ENV_VAR
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"s2fast: {source}={backend!r} is not a backend; choose one of {BACKENDS}")
    return backend


def _import(name: str):
    """Import an optional module once; returns (module or None, why not)."""
    if name not in _imports:
        try:
            if name == "cuda":
                from . import flow_step_cuda as module
            else:
                from . import flow_step_triton as module
            _imports[name] = (module, "")
        except ImportError as e:  # an optional dependency: not installed, or the extension not built
            _imports[name] = (None, str(e))
    return _imports[name]


def unavailable(name: str, tensors: Sequence[torch.Tensor], same_dtype: bool) -> str:
    """Why backend ``name`` cannot run these tensors, or "" when it can."""
    if name == "torch":
        return ""
    device = tensors[0].device
    if not all(t.is_contiguous() for t in tensors):
        return f"the {name} backend needs contiguous tensors"
    if name == "cuda":
        if device.type != "cuda":
            return f"the cuda backend needs CUDA tensors, got {device.type}"
        if not same_dtype:
            return "the cuda backend needs the sample in the predictions' dtype"
    if name == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return f"the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), got {device.type}"
    module, why = _import(name)
    if module is None:
        return f"the {name} backend is not available ({why})"
    return ""


def choose(backend: Optional[str], tensors: Sequence[torch.Tensor], same_dtype: bool,
           skip: Sequence[str] = ()) -> Tuple[str, object]:
    """(backend name, its module or None for torch) for this call; ``skip``: backends that lack an input the call
    has (the CUDA extension takes no stored correction)."""
    wanted = requested_backend(backend)
    if wanted is not None:
        why = f"the {wanted} backend has no input for a stored correction" if wanted in skip else ""
        why = why or unavailable(wanted, tensors, same_dtype)
        if why:
            raise ValueError(f"s2fast: {why}")
        return wanted, _import(wanted)[0] if wanted != "torch" else None
    for name in ("cuda", "triton"):
        if name in skip:
            continue
        why = unavailable(name, tensors, same_dtype)
        if not why:
            return name, _import(name)[0]
        log_once(f"s2fast: not using {name}: {why}")
    return "torch", None


def fast_backend_for(device: torch.device, backend: Optional[str] = None) -> Optional[str]:
    """The kernel backend (cuda or triton) that would run contiguous tensors on ``device``, or None when only the
    torch reference would; fused_step="auto" fuses only then. Without an explicit request only a CUDA device
    counts: Triton's CPU interpreter runs kernels but is an emulator, never the fast path."""
    probe = torch.empty(0, device=device)
    wanted = requested_backend(backend)
    if wanted is None and device.type != "cuda":
        return None
    names = (wanted,) if wanted is not None else ("cuda", "triton")
    for name in names:
        if name != "torch" and not unavailable(name, [probe], True):
            return name
    return None


def launch_guard(device: torch.device):
    """Make ``device`` the current CUDA device for a kernel launch (Triton and the extension launch on the current
    device: a pipeline on cuda:1 would otherwise launch on cuda:0); nothing for other devices."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()
