"""The forward a modular guider sets on the transformer for one guider batch, and its removal.

It goes where s2fast.wrap's ModelForward goes (s2fast/binding.py): at the base of the model's forward chain, so
accelerate's model offload still moves the model before s2fast runs it, and a model-level diffusers hook sees the
loop's call and the guider's answer. It serves exactly one call and then takes itself out, so nothing stays on the
transformer after the batch, even where the loop fails after the call and before ``cleanup_models`` (which
removes it too).

It answers only the call of the loop that prepared it: the frame that called ``prepare_models`` must still be
running, below the call. A loop that fails between ``prepare_models`` and its call (a forward pre-hook that
raises, any error in between) leaves a forward whose loop has ended; it never answers: the model's next call,
whoever makes it, takes it out and runs the stock forward, and the next guider batch or ``s2fast.wrap`` takes it
out before looking at the model (``binding.drop_expired``).
"""

from __future__ import annotations

import copy
import sys
import types
import weakref
from typing import Any, Callable, Optional

from .. import binding

# (model, args, kwargs) -> the value the transformer call returns
Serve = Callable[[Any, tuple, dict], Any]


class GuiderForward:
    """One batch's transformer call, answered by ``serve``; ``previous`` is what the slot held before."""

    def __init__(self, model, previous, serve: Serve, loop: Optional[types.FrameType] = None):
        self._model = weakref.ref(model)
        self.previous = previous
        self.serve = serve
        self._loop = loop  # the frame that called prepare_models (held only while this forward is on the model)

    def __call__(self, *args, **kwargs):
        model = self._model()
        if not self._called_by_its_loop():
            remove(model)  # its loop failed before calling: this call is someone else's, and stock
            return type(model).forward(model, *args, **kwargs)
        try:
            args, kwargs = binding.call_as_made(model, args, kwargs)  # before a context-parallel root split
            return self.serve(model, args, kwargs)
        finally:
            remove(model)

    def _called_by_its_loop(self, max_depth: int = 64) -> bool:
        if self._loop is None:
            return True
        frame = sys._getframe(2)
        for _ in range(max_depth):
            if frame is None:
                return False
            if frame is self._loop:
                return True
            frame = frame.f_back
        return False

    def s2fast_expired(self) -> bool:
        """Whether the loop that prepared this forward has ended without calling the model (no thread runs it)."""
        if self._loop is None:
            return False
        for top in sys._current_frames().values():
            frame = top
            while frame is not None:
                if frame is self._loop:
                    return False
                frame = frame.f_back
        return True

    def __deepcopy__(self, memo):
        # a copy of the model mid-batch is a stock model: its own forward (what binding accepts as the model's own)
        model = memo.get(id(self._model()))
        if self.previous is not None:
            return copy.deepcopy(self.previous, memo)
        return None if model is None else types.MethodType(type(model).forward, model)

    def __reduce__(self):
        raise TypeError("a transformer cannot be pickled between a guider's prepare_models and its call")


def install(model, serve: Serve, loop: Optional[types.FrameType] = None) -> GuiderForward:
    """Answer ``model``'s next call from the running frame ``loop`` (the modular loop's) with ``serve``. ValueError
    (nothing changed) where the forward chain holds something the engine would bypass, or s2fast.wrap's own
    forward."""
    remove(model)  # a stale one (a loop that failed between prepare_models and the call)
    if binding.find(model) is not None:
        raise ValueError(f"s2fast: this {type(model).__name__} is attached to a pipeline by s2fast.wrap; "
                         "s2fast.unwrap that pipeline before using it under an s2fast guider")
    slot = binding.base_slot(model)
    if slot is None:
        raise ValueError(binding.unknown_forward_message(model))
    holder, name = slot
    hook = GuiderForward(model, binding._get(holder, name), serve, loop)
    binding._set(holder, name, hook)
    return hook


def remove(model) -> bool:
    """Take the guider's forward out of ``model``'s chain, putting back what its slot held; True if one was found."""
    for holder, name in binding._slots(model):
        value = binding._get(holder, name)
        if isinstance(value, GuiderForward):
            binding.restore(model, holder, name, value.previous)
            return True
    return False


def installed(model) -> bool:
    return any(isinstance(binding._get(h, n), GuiderForward) for h, n in binding._slots(model))
