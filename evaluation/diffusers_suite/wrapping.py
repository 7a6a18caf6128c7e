"""Wrapping every instance of a pipeline class s2fast supports at its first call (the diffusers-suite plugin's
part that changes what the tests run; no side effect at import)."""

from __future__ import annotations

import collections
import functools
import os
from typing import Optional

# The wrapping already done: id(pipe) -> pipe (kept alive so that an id is never reused by a new pipeline).
_SEEN: dict = {}
_ORIGINAL_CALLS: dict = {}
# How many instances of each class were wrapped: the run's evidence that the wrapping happened.
WRAPPED: collections.Counter = collections.Counter()


def omega_from(option: Optional[str]) -> Optional[float]:
    value = option if option is not None else os.environ.get("S2FAST_SUITE_OMEGA")
    if value in (None, "", "stock"):
        return None
    omega = float(value)
    if omega < 0:
        raise ValueError(f"--s2fast-omega must be >= 0, got {value!r}")
    return omega


def install(omega: float) -> list:
    """Replace ``__call__`` of every diffusers pipeline class s2fast supports by one that wraps the instance with
    ``S2Config(omega=omega)`` at its first call, then runs the original; returns the patched classes' names."""
    import diffusers

    import s2fast
    from s2fast.adapters import DIFFUSERS_PIPELINES

    patched = []
    for name in DIFFUSERS_PIPELINES:
        cls = getattr(diffusers, name, None)
        if cls is None or cls in _ORIGINAL_CALLS:
            continue
        original = cls.__dict__["__call__"]

        @functools.wraps(original)
        def call(self, *args, _original=original, **kwargs):
            if id(self) not in _SEEN:
                _SEEN[id(self)] = self
                s2fast.wrap(self, s2fast.S2Config(omega=omega))
                WRAPPED[type(self).__name__] += 1
            return _original(self, *args, **kwargs)

        _ORIGINAL_CALLS[cls] = original
        cls.__call__ = call
        patched.append(name)
    return patched


def forget_pipelines() -> None:
    _SEEN.clear()


def uninstall() -> None:
    for cls, original in _ORIGINAL_CALLS.items():
        cls.__call__ = original
    _ORIGINAL_CALLS.clear()
    _SEEN.clear()
    WRAPPED.clear()
