"""The public entry points: wrap, unwrap, trace."""

from __future__ import annotations

from typing import Optional, Tuple

from .adapters import adapter_for
from .config import S2Config
from .controller import Controller, Predictor, cuda_graphs_refusal

_ATTR = "_s2fast_controller"  # where the controller lives on the pipeline object (an instance attribute)


def wrap(pipe, config: Optional[S2Config] = None, *, _predictor: Optional[Predictor] = None, _graph_backend=None):
    """Make ``pipe`` sample with S²-Guidance; returns ``pipe``.

    The pipeline's own call keeps its arguments, callbacks, progress bar and output types; its guidance scale is
    λ of Eq. 4. Wrapping a wrapped pipeline replaces its config. Every check runs before anything changes: on a
    ValueError the pipeline is exactly as it was (wrapped with its old config, or not at all).
    ``s2fast.unwrap(pipe)`` restores it.
    """
    config = S2Config() if config is None else config
    if not isinstance(config, S2Config):
        raise TypeError(f"s2fast.wrap expects an S2Config, got {type(config).__name__}")
    adapter = adapter_for(pipe)
    controller = Controller(pipe, adapter, config, **({"predictor": _predictor} if _predictor else {}),
                            graph_backend=_graph_backend)
    config.check_blocks(controller.num_blocks)
    _check_hooks(pipe)
    _check_fused_step(pipe, config, adapter)
    if config.cuda_graphs is True and _graph_backend is None and pipe.transformer.device.type != "cuda":
        raise ValueError(cuda_graphs_refusal(pipe.transformer.device))
    _uninstall(pipe, release_graphs=False)  # a re-wrap keeps the captured block graphs: they serve any config
    controller.install()
    object.__setattr__(pipe, _ATTR, controller)
    return pipe


def unwrap(pipe):
    """Undo :func:`wrap`: the pipeline's outputs are then bit-identical to a never-wrapped pipeline. Returns pipe;
    a pipeline that is not wrapped is returned unchanged."""
    _uninstall(pipe, release_graphs=True)
    return pipe


def _uninstall(pipe, release_graphs: bool) -> None:
    controller = _controller(pipe)
    if controller is not None:
        controller.uninstall(release_graphs_too=release_graphs)
        del pipe.__dict__[_ATTR]


def trace(pipe) -> Tuple:
    """The masks of the last call of a wrapped pipeline: one entry per denoising step, the tuple of dropped block
    indices (a tuple of such tuples when num_masks > 1), () where S² was off. Valid as ``S2Config(masks=...)``."""
    controller = _controller(pipe)
    if controller is None:
        raise ValueError("s2fast.trace: this pipeline is not wrapped (call s2fast.wrap(pipe, config) first)")
    return controller.trace()


def graph_stats(pipe) -> Optional[dict]:
    """The block graphs of a wrapped pipeline: {"graphs", "captures", "replays", "eager_calls", "static_bytes",
    "pool_bytes", "invalidations"}, counted since the graphs were created (a re-wrap keeps them; unwrap releases
    them); None when graphs are off (or not decided yet: they are at the first step)."""
    controller = _controller(pipe)
    if controller is None or controller.graphs is None:
        return None
    return controller.graphs.stats.as_dict()


def config_of(pipe) -> Optional[S2Config]:
    """The S2Config a pipeline is wrapped with, or None."""
    controller = _controller(pipe)
    return None if controller is None else controller.config


def _controller(pipe) -> Optional[Controller]:
    return getattr(pipe, "__dict__", {}).get(_ATTR)


def _check_hooks(pipe) -> None:
    # accelerate's offload hooks and diffusers' HookRegistry replace model.forward too; S² calls the blocks directly
    # and would bypass them (weights left on the CPU, caches skipped), so refuse clearly instead.
    model = pipe.transformer
    if getattr(model, "_hf_hook", None) is not None:
        raise ValueError(
            "s2fast does not support a transformer with accelerate hooks (enable_model_cpu_offload / "
            "enable_sequential_cpu_offload); remove the offloading before s2fast.wrap"
        )
    current = model.__dict__.get("forward")
    ours = _controller(pipe)
    if current is not None and (ours is None or current != ours.forward):
        raise ValueError(
            "s2fast: pipe.transformer.forward is already replaced by another hook (a diffusers cache or offloading "
            "hook?); s2fast drives the blocks itself and would bypass it. Remove that hook before s2fast.wrap"
        )


def _check_fused_step(pipe, config: S2Config, adapter) -> None:
    if config.fused_step is True:
        from .fused_step import unsupported_reason

        reason = unsupported_reason(pipe.scheduler) if adapter.supports_fused_step else (
            f"{type(pipe).__name__}'s loop keeps x_t where the fused step cannot take it")
        if reason:
            raise ValueError(f"S2Config(fused_step=True) cannot fuse this pipeline's step: {reason}; use fused_step='auto'")
