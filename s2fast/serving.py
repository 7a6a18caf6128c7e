"""Which controller serves a pipeline: the instance attribute ``s2fast.wrap`` sets, copies of wrapped pipelines,
and the progress-bar guard that checks the denoisers at the start of each call.

This module sits below the controller (s2fast/controller.py imports it, never the reverse): it only reads what
wrap stored on the pipeline and calls that controller's methods (``active``, ``owner``, ``clone``,
``check_pipeline``, ``attach``, ``serves``, ``check_denoisers``). The controller hands :func:`serving_controller`
to the binding (s2fast/binding.py) when it installs a ModelForward, so the binding finds the controller of a call
without importing anything above it.
"""

from __future__ import annotations

import sys
import weakref
from typing import Any, Optional

ATTR = "_s2fast_controller"  # where the controller lives on the pipeline object (an instance attribute)
GUARD = "progress_bar"  # the pipeline method every supported loop calls once, before its first step


def controller_of(pipe) -> Optional[Any]:
    """The active controller that serves ``pipe``, or None. A copy of a wrapped pipeline carries its original's
    controller (copy.copy shares it, deepcopy and pickle copy its settings): the copy gets one of its own here."""
    state = getattr(pipe, "__dict__", None)
    controller = state.get(ATTR) if state is not None else None
    if controller is None:
        return None
    if not controller.active:  # the pipeline it was copied from was unwrapped since
        forget(pipe)
        return None
    owner = controller.owner
    if owner is pipe:
        return controller
    if owner is not None:  # a shallow copy: same config, state of its own, the same transformer
        controller = controller.clone()
    try:
        controller.check_pipeline(pipe)
        controller.attach(pipe)
    except ValueError as e:
        forget(pipe)
        raise ValueError(f"s2fast: this copy of a wrapped pipeline cannot be served ({e}); it is unwrapped now") from e
    object.__setattr__(pipe, ATTR, controller)
    return controller


def serving_controller(pipe, model) -> Optional[Any]:
    """The controller that answers ``model``'s call from ``pipe``'s loop (s2fast/binding.py asks), or None."""
    if ATTR not in getattr(pipe, "__dict__", {}):
        return None
    controller = controller_of(pipe)
    return controller if controller is not None and controller.serves(pipe, model) else None


def remember(pipe, controller) -> None:
    """Record ``controller`` as ``pipe``'s and put the call guard in place (once)."""
    object.__setattr__(pipe, ATTR, controller)
    if not isinstance(pipe.__dict__.get(GUARD), CallGuard):
        object.__setattr__(pipe, GUARD, CallGuard(pipe))


def forget(pipe) -> None:
    """Remove what :func:`remember` put on ``pipe``."""
    state = getattr(pipe, "__dict__", {})
    state.pop(ATTR, None)
    if isinstance(state.get(GUARD), CallGuard):
        del state[GUARD]


class CallGuard:
    """Stands in for ``pipe.progress_bar`` (an instance attribute; unwrap removes it), which every supported loop
    calls once before its first step: it makes sure the pipeline's denoisers are the ones S² serves — a
    ``pipe.transformer`` replaced since wrap is checked and served, or the call fails with a clear error, never a
    silent stock run — then returns the pipeline's own progress bar."""

    def __init__(self, pipe):
        self._pipe = weakref.ref(pipe)

    def __call__(self, *args, **kwargs):
        caller = sys._getframe(1).f_locals.get("self")
        pipe = caller if getattr(caller, "__dict__", {}).get(GUARD) is self else self._pipe()
        controller = controller_of(pipe)
        if controller is not None:
            controller.check_denoisers(pipe)
        return type(pipe).progress_bar(pipe, *args, **kwargs)

    def __deepcopy__(self, memo):
        pipe = memo.get(id(self._pipe()))
        return CallGuard(pipe) if pipe is not None else self

    def __reduce__(self):
        return (CallGuard, (self._pipe(),))
