"""How s2fast attaches to a denoiser model: one callable at the base of the model's forward chain.

``wrap`` never patches a class and never replaces ``pipe.transformer``: it sets a ``ModelForward`` where the model's
own forward would be looked up. That is the instance attribute ``forward`` on a model nobody hooked, and one level
down when something already wraps the forward:

- accelerate's model CPU offload (``enable_model_cpu_offload``) keeps the model's forward in ``_old_forward`` and
  installs its own ``forward`` that first moves the model to the execution device; s2fast goes in
  ``_old_forward``, so offloading keeps working and S² runs where the model runs;
- a diffusers ``HookRegistry`` keeps the forward it wrapped in the first hook's ``HookFunctionReference``; s2fast
  goes there, so a model-level hook sees the pipeline's call and s2fast's answer to it, as it would see the stock
  forward's.

Hooks added after ``wrap`` wrap whatever forward they find, which is then s2fast's: the chain keeps it at the base.
``unwrap`` finds it wherever it is and puts back what was there before (the model's own forward), so a model
that another hook still wraps becomes stock, not half-wrapped.

A ``ModelForward`` holds no S² state. At every call it looks for the pipeline call it serves: the model must have
been called by the ``__call__`` of a pipeline itself (torch's module call and any hooks in between), and that
pipeline must be wrapped by s2fast with this model as a denoiser. Any other call — a direct
``pipe.transformer(...)``, a preview inside ``callback_on_step_end``, a pipeline that shares the transformer but is
not wrapped — runs the stock forward.
"""

from __future__ import annotations

import copy
import sys
import types
import weakref
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch

# Hooks that may sit on a denoiser or its submodules while s2fast runs it, by registry name.
# layerwise casting (and the PEFT input hook it brings) casts weights around each leaf call: the same for any rows.
_COMPATIBLE_HOOKS = frozenset({"layerwise_casting", "peft_autocast_disable"})
# Hooks refused by name, with what they are. Caches reuse results across calls and steps keyed to the stock call
# pattern (one batch per cache context, one call per branch and step); S² batches branches, forks sub-networks and
# calls some blocks twice a step, so a cache would serve wrong values or fail on shapes.
_KNOWN_HOOKS = {
    "pyramid_attention_broadcast": "PyramidAttentionBroadcast (a cache)",
    "faster_cache_denoiser": "FasterCache (a cache)",
    "faster_cache_block": "FasterCache (a cache)",
    "fbc_leader_block_hook": "FirstBlockCache (a cache)",
    "fbc_block_hook": "FirstBlockCache (a cache)",
    "mag_cache_leader_block_hook": "MagCache (a cache)",
    "mag_cache_block_hook": "MagCache (a cache)",
    "taylorseer_cache": "TaylorSeerCache (a cache)",
    "sea_cache_root": "SeaCache (a cache)",
    "sea_cache_leader_block": "SeaCache (a cache)",
    "sea_cache_block": "SeaCache (a cache)",
    "sea_cache_post_norm": "SeaCache (a cache)",
    "text_kv_cache_transformer": "TextKVCache (a cache)",
    "text_kv_cache_block": "TextKVCache (a cache)",
    "group_offloading": "group offloading (it onloads weights in the order of the first stock forward)",
    "lazy_prefetch_group_offloading": "group offloading (it onloads weights in the order of the first stock forward)",
    "layer_execution_tracker": "group offloading (it onloads weights in the order of the first stock forward)",
    "layer_skip_hook": "a guider's layer-skip hook",
    "smoothed_energy_guidance_hook": "a guider's smoothed-energy hook",
}


# serving(pipe, model) -> the controller that answers model's call from pipe's loop, or None. The controller hands
# it over at install (s2fast.serving.serving_controller), so this module imports nothing of s2fast's.
Serving = Callable[[Any, Any], Optional[Any]]


class ModelForward:
    """The forward s2fast sets on a denoiser (see the module docstring). ``previous`` is what the slot held before:
    None (nothing: the class's forward) or the model's own bound forward, put back by ``remove``; ``serving``
    finds the controller of a pipeline call."""

    def __init__(self, model, previous, serving: Serving):
        self._model = weakref.ref(model)
        self.previous = previous
        self.serving = serving

    @property
    def model(self):
        return self._model()

    def __call__(self, *args, **kwargs):
        model = self._model()
        caller = calling_pipeline(model)
        if caller is not None:
            pipe, frame_locals = caller
            controller = self.serving(pipe, model)
            if controller is not None:
                args, kwargs = call_as_made(model, args, kwargs)
                return controller.forward(pipe, model, frame_locals, args, kwargs)
        return type(model).forward(model, *args, **kwargs)

    # A copy of a wrapped model carries a ModelForward of its own, bound to the copy (the copied pipeline's
    # controller, or none, decides what it serves); pickling rebuilds one the same way.
    def __deepcopy__(self, memo):
        model = memo.get(id(self._model()))
        if model is None:
            return self
        return ModelForward(model, copy.deepcopy(self.previous, memo), self.serving)

    def __reduce__(self):
        return (ModelForward, (self._model(), self.previous, self.serving))


def _own_forward(model, value) -> bool:
    """True for the model's own forward bound to it: what diffusers and accelerate leave behind when they remove a
    hook (an instance attribute equal to the class's forward)."""
    return isinstance(value, types.MethodType) and value.__self__ is model and value.__func__ is type(model).forward


def _slots(model) -> Iterator[Tuple[Any, str]]:
    """Every place a forward of ``model``'s chain can be stored: (holder, attribute); a dict holder is the model's
    ``__dict__``."""
    yield model.__dict__, "forward"
    if "_old_forward" in model.__dict__:  # accelerate's add_hook_to_module
        yield model.__dict__, "_old_forward"
    registry = model.__dict__.get("_diffusers_hook")
    for fn_ref in getattr(registry, "_fn_refs", ()):
        yield fn_ref, "forward"
        yield fn_ref, "original_forward"


def _get(holder, name):
    return holder.get(name) if isinstance(holder, dict) else getattr(holder, name, None)


def _set(holder, name, value) -> None:
    if isinstance(holder, dict):
        if value is None:
            holder.pop(name, None)
        else:
            holder[name] = value
    else:
        setattr(holder, name, value)


def find(model) -> Optional[ModelForward]:
    """The ModelForward in ``model``'s forward chain, or None."""
    for holder, name in _slots(model):
        value = _get(holder, name)
        if isinstance(value, ModelForward):
            return value
    return None


def restore(model, holder, name: str, previous) -> None:
    """Put ``previous`` (None: nothing, the class's forward) back in a slot of ``model``'s chain."""
    if previous is None and not isinstance(holder, dict):
        previous = types.MethodType(type(model).forward, model)  # a hook's slot must hold a callable
    _set(holder, name, previous)


def drop_expired(model) -> None:
    """Take out a one-call forward whose caller has ended without calling (a modular guider's, whose loop failed
    between ``prepare_models`` and the call: s2fast/guiders/hook.py); it would never answer again."""
    for holder, name in list(_slots(model)):
        value = _get(holder, name)
        expired = getattr(value, "s2fast_expired", None)
        if expired is not None and expired():
            restore(model, holder, name, value.previous)


def base_slot(model) -> Optional[Tuple[Any, str]]:
    """Where the model's own forward sits in its chain (the slot a ModelForward takes), or None when the chain ends
    in something s2fast does not know."""
    drop_expired(model)
    top = model.__dict__.get("forward")
    if top is None or _own_forward(model, top):
        return model.__dict__, "forward"
    for holder, name in _slots(model):
        if (holder, name) != (model.__dict__, "forward") and _own_forward(model, _get(holder, name)):
            return holder, name
    return None


def install(model, serving: Serving) -> ModelForward:
    """Put a ModelForward at the base of ``model``'s forward chain (or return the one already there); ``serving``
    finds the controller of each pipeline call."""
    existing = find(model)
    if existing is not None:
        return existing
    slot = base_slot(model)
    if slot is None:
        raise ValueError(unknown_forward_message(model))
    holder, name = slot
    binding = ModelForward(model, _get(holder, name), serving)
    _set(holder, name, binding)
    return binding


def remove(model) -> bool:
    """Take the ModelForward out of ``model``'s chain, putting back what its slot held; True if one was found."""
    for holder, name in _slots(model):
        value = _get(holder, name)
        if isinstance(value, ModelForward):
            restore(model, holder, name, value.previous)
            return True
    return False


def unknown_forward_message(model) -> str:
    return (f"s2fast: {type(model).__name__}.forward is replaced by {model.__dict__.get('forward')!r}, which is not "
            "a diffusers hook, accelerate's model offload or the model's own forward; s2fast calls the blocks "
            "itself and would bypass it. Remove it before s2fast.wrap")


# --- hooks that S² cannot run under ---------------------------------------------------------------------------
def incompatible_hooks(model) -> List[str]:
    """What on ``model`` or its submodules S² cannot run under, one line each (empty: nothing).

    diffusers hooks: known caches and offloading by name; unknown hooks when they keep state across calls
    (``_is_stateful``) or replace the module's forward (``new_forward``), since S² calls blocks in other batches
    than the stock forward. accelerate: model offload of the denoiser itself is supported; a hook on a submodule
    (``enable_sequential_cpu_offload``, a device map) is not.
    """
    found: Dict[str, None] = {}
    placed: Dict[str, List[str]] = {}  # accelerate hook type -> where, summed up in one line
    if not _any_hook(model):  # the common case, checked at every pipeline call: no walk with module names
        return []
    for path, module in model.named_modules():
        where = f"{type(model).__name__}.{path}" if path else type(model).__name__
        registry = module.__dict__.get("_diffusers_hook")
        for name, hook in getattr(registry, "hooks", {}).items():
            if name in _COMPATIBLE_HOOKS:
                continue
            if name in _KNOWN_HOOKS:
                found[f"{_KNOWN_HOOKS[name]}, hook '{name}'"] = None
            elif getattr(hook, "_is_stateful", False) or hasattr(hook, "new_forward"):
                kind = "keeps state across calls" if getattr(hook, "_is_stateful", False) else "replaces the forward"
                found[f"the diffusers hook '{name}' ({type(hook).__name__}) on {where}, which {kind}"] = None
        accelerate_hook = module.__dict__.get("_hf_hook")
        if accelerate_hook is not None and not (module is model and _is_model_offload(accelerate_hook)):
            placed.setdefault(type(accelerate_hook).__name__, []).append(where)
    for kind, where in placed.items():
        found[f"accelerate's {kind} on {len(where)} module(s), {where[0]} first (enable_sequential_cpu_offload or a "
              "device map: it moves every layer's weights at each use, and s2fast calls a block once per lane and "
              "step, so each weight would cross the bus up to twice a step; not supported, use "
              "enable_model_cpu_offload)"] = None
    return list(found)


def has_hooks(model) -> bool:
    """Whether ``model`` or a submodule carries a diffusers or accelerate hook (a cheap walk; see _any_hook)."""
    return _any_hook(model)


def _any_hook(model) -> bool:
    """Whether ``model`` or a submodule carries a diffusers or accelerate hook. A plain walk of ``_modules``: about
    a third of ``named_modules``' time, which builds a name and fills a set per module (the check runs at each
    pipeline call, and a launch-bound 8-step call spent ~5 % of its host time in that walk)."""
    stack = [model]
    while stack:
        module = stack.pop()
        if module is None:  # a registered slot left empty
            continue
        d = module.__dict__
        if "_diffusers_hook" in d or "_hf_hook" in d:
            return True
        stack.extend(d["_modules"].values())
    return False


def _is_model_offload(hook) -> bool:
    hooks = getattr(hook, "hooks", None)  # accelerate's SequentialHook holds several
    if hooks is not None:
        return all(_is_model_offload(h) for h in hooks)
    return type(hook).__name__ == "CpuOffload"


def model_offloaded(model) -> bool:
    """True when accelerate's model CPU offload moves ``model`` to its execution device at each call."""
    hook = model.__dict__.get("_hf_hook")
    return hook is not None and _is_model_offload(hook)


# --- which pipeline call is this? -------------------------------------------------------------------------------
ROOT_SPLIT_HOOK = "cp_input---"  # diffusers' context parallelism: the plan's split of the model's own inputs


def call_as_made(model, args: tuple, kwargs: Dict[str, Any]) -> Tuple[tuple, Dict[str, Any]]:
    """The arguments of the call ``model(...)`` that reached the base of its chain, as the caller passed them.

    Only context parallelism's root split (``cp_input---``, s2fast/context_parallel.py) rewrites a call's arguments
    on the way down: it shards the pipeline's tensors for this call alone, while S² builds its other branches from
    the pipeline's locals, unsharded, and shards every branch itself. Then the arguments are read from torch's
    module call of ``model`` up the stack, before any hook ran; otherwise they are returned as they came.
    """
    registry = model.__dict__.get("_diffusers_hook")
    if registry is None or ROOT_SPLIT_HOOK not in getattr(registry, "hooks", {}):
        return args, kwargs
    module_call = torch.nn.Module._wrapped_call_impl.__code__
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is module_call and frame.f_locals.get("self") is model:
            return tuple(frame.f_locals["args"]), dict(frame.f_locals["kwargs"])
        frame = frame.f_back
    raise RuntimeError(f"s2fast: {type(model).__name__} runs under context parallelism, and its call was not made "
                       "through torch's module call; s2fast cannot read the arguments before the plan's split")


def calling_pipeline(model, max_depth: int = 32) -> Optional[Tuple[Any, Dict[str, Any]]]:
    """(pipeline, the locals of its ``__call__``) when ``model`` was called by a pipeline's ``__call__`` itself,
    else None.

    The nearest ``__call__`` frame up the stack that is not a module's or s2fast's is the candidate; the call is
    the loop's own when the frame just below it is torch's module call of ``model`` (whatever hooks ran after
    that). A callback, or any function the pipeline calls that then calls the transformer, sits in between.
    """
    module_call = torch.nn.Module._wrapped_call_impl.__code__
    below, frame = None, sys._getframe(2)  # above ModelForward.__call__, which called this
    for _ in range(max_depth):
        if frame is None:
            return None
        if frame.f_code.co_name == "__call__":
            owner = frame.f_locals.get("self")
            if owner is not None and not isinstance(owner, (torch.nn.Module, ModelForward)):
                direct = below is not None and below.f_code is module_call and below.f_locals.get("self") is model
                return (owner, frame.f_locals) if direct else None
        below, frame = frame, frame.f_back
    return None
