"""The public entry points: wrap, unwrap, trace, trace_denoisers, config_of, graph_stats."""

from __future__ import annotations

import sys
import weakref
from typing import Optional, Tuple, Union

from .adapters import adapter_for
from .config import S2Config
from .controller import Controller, Predictor, check_attachable
from .sgg import SGGConfig

_ATTR = "_s2fast_controller"  # where the controller lives on the pipeline object (an instance attribute)
_GUARD = "progress_bar"  # the pipeline method every supported loop calls once, before its first step


def wrap(pipe, config: Union[S2Config, SGGConfig, None] = None, *, _predictor: Optional[Predictor] = None,
         _graph_backend=None):
    """Make ``pipe`` sample with S²-Guidance (an S2Config, the default) or segmented guidance (an SGGConfig);
    returns ``pipe``.

    The pipeline's own call keeps its arguments, callbacks, progress bar and output types; its guidance scale is
    λ of Eq. 4. Wrapping a wrapped pipeline replaces its config. Every check runs before anything changes: on a
    ValueError the pipeline is exactly as it was (wrapped with its old config, or not at all).
    ``s2fast.unwrap(pipe)`` restores it.

    Works with ``enable_model_cpu_offload`` (before or after wrap) and with model-level diffusers hooks; refuses
    caches, sequential offload and group offloading, naming them. A copy of a wrapped pipeline (``copy.copy``,
    ``copy.deepcopy``, pickling) is wrapped with the same config. A transformer shared by several pipelines serves
    each as it is wrapped or not.
    """
    config = S2Config() if config is None else config
    if not isinstance(config, (S2Config, SGGConfig)):
        raise TypeError(f"s2fast.wrap expects an S2Config or an SGGConfig, got {type(config).__name__}")
    adapter = adapter_for(pipe)
    controller = Controller(adapter, config, **({"predictor": _predictor} if _predictor else {}),
                            graph_backend=_graph_backend)
    for name, model in controller.denoiser_models(pipe):
        check_attachable(adapter, config, pipe, name, model, _graph_backend)
    _check_fused_step(pipe, config, adapter)
    _check_compile_backend(config)
    previous = _controller(pipe)
    if previous is not None:
        previous.detach(release_graphs_too=False)  # a re-wrap keeps the captured block graphs: they serve any config
    try:
        controller.attach(pipe)
    except BaseException:
        controller.detach(release_graphs_too=False)
        if previous is not None:
            previous.attach(pipe)
        raise
    object.__setattr__(pipe, _ATTR, controller)
    if not isinstance(pipe.__dict__.get(_GUARD), _CallGuard):
        object.__setattr__(pipe, _GUARD, _CallGuard(pipe))
    return pipe


def unwrap(pipe):
    """Undo :func:`wrap`: the pipeline's outputs are then bit-identical to a never-wrapped pipeline. Returns pipe;
    a pipeline that is not wrapped is returned unchanged."""
    controller = _controller(pipe)
    if controller is not None:
        controller.detach(release_graphs_too=True)
    _forget(pipe)
    return pipe


def _forget(pipe) -> None:
    state = getattr(pipe, "__dict__", {})
    state.pop(_ATTR, None)
    if isinstance(state.get(_GUARD), _CallGuard):
        del state[_GUARD]


def trace(pipe) -> Tuple:
    """The masks of the last call of a wrapped pipeline: one entry per denoising step, the tuple of dropped block
    indices (a tuple of such tuples when num_masks > 1), () where S² was off. Valid as ``S2Config(masks=...)``.
    With an SGGConfig: skip_blocks at the steps that ran the skip pass, () at the others."""
    controller = _controller(pipe)
    if controller is None:
        raise ValueError("s2fast.trace: this pipeline is not wrapped (call s2fast.wrap(pipe, config) first)")
    return controller.trace()


def trace_denoisers(pipe) -> Tuple:
    """Beside :func:`trace`: which denoiser (the pipeline attribute, ``"transformer"`` or ``"transformer_2"``) ran
    each step of the last call, None for a step that ran none (interrupted). For pipelines with two experts (Wan
    2.2): a step's mask indexes the blocks of the expert named here."""
    controller = _controller(pipe)
    if controller is None:
        raise ValueError("s2fast.trace_denoisers: this pipeline is not wrapped (call s2fast.wrap(pipe, config) first)")
    return controller.trace_denoisers()


def graph_stats(pipe) -> Optional[dict]:
    """The block graphs of a wrapped pipeline: {"graphs", "captures", "replays", "eager_calls", "static_bytes",
    "pool_bytes", "invalidations", "capture_failures", "order_fallbacks", "pools"}, counted since the graphs were
    created (a re-wrap keeps them; unwrap releases them), summed over the pipeline's denoisers; None when graphs are
    off (or not decided yet: they are at the first step). A capture failure means the wrap runs its blocks eagerly
    (the reason is logged once)."""
    controller = _controller(pipe)
    return None if controller is None else controller.graph_stats()


def config_of(pipe) -> Union[S2Config, SGGConfig, None]:
    """The config (S2Config or SGGConfig) a pipeline is wrapped with, or None."""
    controller = _controller(pipe)
    return None if controller is None else controller.config


def _controller(pipe) -> Optional[Controller]:
    """The active controller that serves ``pipe``, or None. A copy of a wrapped pipeline carries its original's
    controller (copy.copy shares it, deepcopy and pickle copy its settings): the copy gets one of its own here."""
    state = getattr(pipe, "__dict__", None)
    controller = state.get(_ATTR) if state is not None else None
    if controller is None:
        return None
    if not controller.active:  # the pipeline it was copied from was unwrapped since
        _forget(pipe)
        return None
    owner = controller.owner
    if owner is pipe:
        return controller
    if owner is not None:  # a shallow copy: same config, state of its own, the same transformer
        controller = controller.clone()
    try:
        for name, model in controller.denoiser_models(pipe):
            check_attachable(controller.adapter, controller.config, pipe, name, model)
        controller.attach(pipe)
    except ValueError as e:
        _forget(pipe)
        raise ValueError(f"s2fast: this copy of a wrapped pipeline cannot be served ({e}); it is unwrapped now") from e
    object.__setattr__(pipe, _ATTR, controller)
    return controller


def serving_controller(pipe, model) -> Optional[Controller]:
    """The controller that answers ``model``'s call from ``pipe``'s loop (s2fast/binding.py), or None."""
    if _ATTR not in getattr(pipe, "__dict__", {}):
        return None
    controller = _controller(pipe)
    return controller if controller is not None and controller.serves(pipe, model) else None


class _CallGuard:
    """Stands in for ``pipe.progress_bar`` (an instance attribute; unwrap removes it), which every supported loop
    calls once before its first step: it makes sure the pipeline's denoisers are the ones S² serves — a
    ``pipe.transformer`` replaced since wrap is checked and served, or the call fails with a clear error, never a
    silent stock run — then returns the pipeline's own progress bar."""

    def __init__(self, pipe):
        self._pipe = weakref.ref(pipe)

    def __call__(self, *args, **kwargs):
        caller = sys._getframe(1).f_locals.get("self")
        pipe = caller if getattr(caller, "__dict__", {}).get(_GUARD) is self else self._pipe()
        controller = _controller(pipe)
        if controller is not None:
            controller.check_denoisers(pipe)
        return type(pipe).progress_bar(pipe, *args, **kwargs)

    def __deepcopy__(self, memo):
        pipe = memo.get(id(self._pipe()))
        return _CallGuard(pipe) if pipe is not None else self

    def __reduce__(self):
        return (_CallGuard, (self._pipe(),))


def _check_fused_step(pipe, config: S2Config, adapter) -> None:
    if config.fused_step is True:
        from .fused_step import unsupported_reason

        reason = unsupported_reason(pipe.scheduler) if adapter.supports_fused_step else (
            f"{type(pipe).__name__}: {adapter.fused_step_refusal}")
        if reason:
            raise ValueError(f"S2Config(fused_step=True) cannot fuse this pipeline's step: {reason}; use fused_step='auto'")


def _check_compile_backend(config: S2Config) -> None:
    """compile_blocks names a torch.compile backend: look it up now, before anything changes (torch.compile would
    raise InvalidBackend only once blocks are being compiled)."""
    if config.compile_blocks is None:
        return
    from torch._dynamo import list_backends
    from torch._dynamo.backends.registry import lookup_backend

    try:
        lookup_backend(config.compile_blocks)
    except Exception as e:  # torch's InvalidBackend, or an error raised while importing the backend
        raise ValueError(f"S2Config.compile_blocks: {config.compile_blocks!r} is not a torch.compile backend here "
                         f"({type(e).__name__}); available: {', '.join(list_backends())}") from e
