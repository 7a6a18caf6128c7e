"""The public entry points: wrap, unwrap, trace, trace_denoisers, trace_steps, config_of, graph_stats."""

from __future__ import annotations

from typing import Optional, Tuple, Union

from . import branch_parallel
from .adapters import adapter_for
from .config import S2Config
from .controller import Controller, Predictor
from .fused_step import unsupported_reason
from .serving import controller_of, forget, remember
from .sgg import SGGConfig


def wrap(pipe, config: Union[S2Config, SGGConfig, None] = None, *, _predictor: Optional[Predictor] = None,
         _graph_backend=None):
    """Make ``pipe`` sample with S²-Guidance (an S2Config, the default) or segmented guidance (an SGGConfig);
    returns ``pipe``.

    The pipeline's own call keeps its arguments, callbacks, progress bar and output types; its guidance scale is
    λ of Eq. 4. Wrapping a wrapped pipeline replaces its config. Every check runs before anything changes: on a
    ValueError the pipeline is exactly as it was (wrapped with its old config, or not at all).
    ``s2fast.unwrap(pipe)`` restores it.

    Works with ``enable_model_cpu_offload`` and diffusers' context parallelism (``enable_parallelism``; before or
    after wrap: s2fast/context_parallel.py) and with model-level diffusers hooks; refuses
    caches, sequential offload and group offloading, naming them. ``branch_parallel=True`` in the config splits each
    step's passes over the ranks of the default torch.distributed group (every rank calls the pipeline alike).
    A copy of a wrapped pipeline (``copy.copy``, ``copy.deepcopy``, pickling) is wrapped with the same config.
    A transformer shared by several pipelines serves each as it is wrapped or not.
    """
    config = S2Config() if config is None else config
    if not isinstance(config, (S2Config, SGGConfig)):
        raise TypeError(f"s2fast.wrap expects an S2Config or an SGGConfig, got {type(config).__name__}")
    if config.branch_parallel:
        if _predictor is not None:
            raise ValueError("branch_parallel=True brings its own predictor; it cannot be combined with another")
        reason = branch_parallel.refusal(config)
        if reason:
            raise ValueError(reason)
        _predictor = branch_parallel.predict
    adapter = adapter_for(pipe)
    controller = Controller(adapter, config, **({"predictor": _predictor} if _predictor else {}),
                            graph_backend=_graph_backend)
    controller.check_pipeline(pipe)
    _check_fused_step(pipe, config, adapter)
    _check_compile_backend(config)
    previous = controller_of(pipe)
    if previous is not None:
        previous.detach(release_graphs_too=False)  # a re-wrap keeps the captured block graphs: they serve any config
    try:
        controller.attach(pipe)
    except BaseException:
        controller.detach(release_graphs_too=False)
        if previous is not None:
            previous.attach(pipe)
        raise
    remember(pipe, controller)
    return pipe


def unwrap(pipe):
    """Undo :func:`wrap`: the pipeline's outputs are then bit-identical to a never-wrapped pipeline. Returns pipe;
    a pipeline that is not wrapped is returned unchanged."""
    controller = controller_of(pipe)
    if controller is not None:
        controller.detach(release_graphs_too=True)
    forget(pipe)
    return pipe



def trace(pipe) -> Tuple:
    """The masks of the last call of a wrapped pipeline: one entry per denoising step, the tuple of dropped block
    indices (a tuple of such tuples when num_masks > 1), () where S² was off. Valid as ``S2Config(masks=...)``.
    With an SGGConfig: skip_blocks at the steps that ran the skip pass, () at the others."""
    controller = controller_of(pipe)
    if controller is None:
        raise ValueError("s2fast.trace: this pipeline is not wrapped (call s2fast.wrap(pipe, config) first)")
    return controller.trace()


def trace_denoisers(pipe) -> Tuple:
    """Beside :func:`trace`: which denoiser (the pipeline attribute, ``"transformer"`` or ``"transformer_2"``) ran
    each step of the last call, None for a step that ran none (interrupted). For pipelines with two experts (Wan
    2.2): a step's mask indexes the blocks of the expert named here."""
    controller = controller_of(pipe)
    if controller is None:
        raise ValueError("s2fast.trace_denoisers: this pipeline is not wrapped (call s2fast.wrap(pipe, config) first)")
    return controller.trace_denoisers()


def trace_steps(pipe) -> Tuple:
    """Beside :func:`trace`: a StepRecord (s2fast/step_trace.py) per step of the last call, what the step ran:
    ``correction`` is "computed" where the sub-networks ran, "reused" where the stored correction of an earlier
    step stood in (S2Config.correction_every), "none" where the step had no sub-network term; ``blocks`` is "full"
    where the blocks ran. None for a step that ran none (interrupted)."""
    controller = controller_of(pipe)
    if controller is None:
        raise ValueError("s2fast.trace_steps: this pipeline is not wrapped (call s2fast.wrap(pipe, config) first)")
    return controller.trace_steps()


def graph_stats(pipe) -> Optional[dict]:
    """The block graphs of a wrapped pipeline: {"graphs", "captures", "replays", "eager_calls", "static_bytes",
    "pool_bytes", "invalidations", "capture_failures", "order_fallbacks", "pools"}, counted since the graphs were
    created (a re-wrap keeps them; unwrap releases them), summed over the pipeline's denoisers; None when graphs are
    off (or not decided yet: they are at the first step). A capture failure means the wrap runs its blocks eagerly
    (the reason is logged once)."""
    controller = controller_of(pipe)
    return None if controller is None else controller.graph_stats()


def config_of(pipe) -> Union[S2Config, SGGConfig, None]:
    """The config (S2Config or SGGConfig) a pipeline is wrapped with, or None."""
    controller = controller_of(pipe)
    return None if controller is None else controller.config


def _check_fused_step(pipe, config: S2Config, adapter) -> None:
    if config.fused_step is True:
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
