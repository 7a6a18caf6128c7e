"""S2Guidance and SGGGuidance: s2fast's methods as diffusers guiders for the modular pipelines.

A modular denoise step asks its guider for batches (``prepare_inputs``: one per prediction, tagged with the
guider's identifier), calls the transformer once per batch between ``prepare_models`` and ``cleanup_models``, and
hands the predictions back to the guider (``__call__`` → ``forward``). Done naively that is three sequential
forwards per step. Here ``prepare_models`` of the step's first batch (the cond one) sets a one-call forward on the
transformer (s2fast/guiders/hook.py) that runs s2fast's engine: uncond and cond rows in one batched call, the
sub-network forked off the cond rows at its first dropped block. It keeps the predictions and answers that call with
the cond one; the other batches' calls are answered from what it kept, each matched by the identifier of the
batch being prepared (never by tensor identity: Wan's loop casts every batch to the transformer's dtype). ``forward``
combines the loop's predictions with s2fast's own kernel (Eq. 4 in the pipelines' rounding order).

The engine needs the uncond inputs at the cond call: they are the cond call's arguments with the fields in which
the uncond batch differs replaced, cast to the dtype and device the loop gave the cond argument.
"""

from __future__ import annotations

import math
import numbers
import sys
from dataclasses import fields
from typing import Any, Dict, List, Optional, Tuple

import torch
from diffusers.guiders.guider_utils import BaseGuidance, GuiderOutput

from .. import binding, plan
from .. import masks as mask_sampling
from ..adapters.base import model_output
from ..adapters.rows import BranchRows
from ..config import S2Config, public_step_form
from ..controller import _USERS, Controller, _call_inputs, _Run
from ..graphs import release_graphs
from ..kernels import guided_prediction, mean_of_subs
from ..plan import StepGuidance
from ..sgg import SGGConfig
from . import hook
from .families import ModularFamily, family_for

COND, UNCOND = "pred_cond", "pred_uncond"


def _config_dict(config) -> Dict[str, Any]:
    """The config as JSON-ready values (tuples become lists when saved; the config accepts lists back)."""
    return {f.name: getattr(config, f.name) for f in fields(config)}


class _EngineGuidance(BaseGuidance):
    """What S2Guidance and SGGGuidance share: the batches of a step, the hook, the engine call and the combination."""

    _config_class: type = S2Config
    _sub_prediction: str = ""
    _graph_backend = None  # tests set graphs.EagerBackend() to run the graph bookkeeping on a CPU

    def __init__(self, guidance_scale: float, config, start: float, stop: float, enabled: bool):
        name = type(self).__name__
        if config is None:
            config = self._config_class()
        elif isinstance(config, dict):
            config = self._config_class(**{k: v for k, v in config.items()})
        elif not isinstance(config, self._config_class):
            raise TypeError(f"s2fast.{name}: config must be an {self._config_class.__name__} (or its dict form), "
                            f"got {type(config).__name__}")
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, numbers.Real) \
                or not math.isfinite(guidance_scale):
            raise ValueError(f"s2fast.{name}: guidance_scale must be a finite number, got {guidance_scale!r}")
        if config.fused_step is True:
            raise ValueError(f"s2fast.{name}: fused_step=True cannot apply: the modular loop steps its scheduler in a "
                             "block of its own (use 'auto' or False; both run the stock step)")
        if getattr(config, "sigma_interval", None) is not None:
            # The guider decides its batches in set_state, from the step index alone, before any scheduler is seen.
            raise ValueError(f"s2fast.{name}: sigma_interval is not supported by the guiders (they see step "
                             "indices, not the scheduler's sigmas); place S² with S2Config.interval or the guider's "
                             "start/stop, or use s2fast.wrap")
        if config.compile_blocks is not None:
            raise ValueError(f"s2fast.{name}: compile_blocks is not supported by the guiders (it would leave compiled "
                             "blocks on the transformer after the call); use it with s2fast.wrap")
        if config.cache is not None:
            raise ValueError(f"s2fast.{name}: cache is not supported by the guiders (the modular loop asks for its "
                             "batches one by one, so no step sees every lane); use it with s2fast.wrap")
        if config.branch_parallel:
            raise ValueError(f"s2fast.{name}: branch_parallel is not supported by the guiders (the modular loop asks "
                             "for its batches one by one); use it with s2fast.wrap")
        if getattr(config, "correction_every", 1) != 1:
            raise ValueError(f"s2fast.{name}: correction_every is not supported by the guiders (a guider keeps no "
                             "state across the steps of a call); use it with s2fast.wrap")
        super().__init__(start, stop, enabled)
        self.guidance_scale = float(guidance_scale)
        self.s2fast_config = config
        self.register_to_config(guidance_scale=self.guidance_scale, config=_config_dict(config), enabled=enabled)
        self._controllers: Dict[type, Controller] = {}  # adapter class -> controller (engine options, graphs, state)
        self._run: Optional[_Run] = None                 # the current (or last) pipeline call
        self._last_step: Optional[int] = None
        self._names: List[str] = []                      # this step's batch identifiers, in the loop's order
        self._batches: List[Any] = []
        self._served: Dict[str, torch.Tensor] = {}       # this step's predictions, by identifier
        self._step_plan: Optional[StepGuidance] = None   # this step's plan at the model's block count
        self._family: Optional[ModularFamily] = None     # the family of the transformer this step ran

    # --- diffusers' guider protocol --------------------------------------------------------------------------
    def new(self, **kwargs):
        """A copy with some settings changed (``config=`` too: diffusers' own ``new`` cannot take that name)."""
        init = {k: v for k, v in self.config.items() if not k.startswith("_")}
        init.update(kwargs)
        return type(self)(**init)

    def set_state(self, step: int, num_inference_steps: int, timestep: torch.LongTensor) -> None:
        if num_inference_steps is None:
            raise ValueError(f"s2fast.{type(self).__name__} needs num_inference_steps in set_state (its plan is per "
                             "step of the call)")
        super().set_state(step, num_inference_steps, timestep)
        run = self._run
        if run is None or run.steps != num_inference_steps or self._last_step is None or step <= self._last_step:
            # A new pipeline call (Wan 2.2's second expert has its own guider, which first sees a later step).
            seed = getattr(self.s2fast_config, "seed", None)
            seed = seed if seed is not None else mask_sampling.fresh_seed()
            n = num_inference_steps
            self._run = _Run(None, n, [()] * n, [None] * n, seed=seed)
        self._last_step = step
        self._names = self._batch_names(step)
        self._batches = []
        self._served = {}
        self._step_plan = None
        self._family = None

    def prepare_inputs(self, data: Dict[str, Any]) -> List[Any]:
        self._batches = [self._prepare_batch(data, self._tuple_index(n), n) for n in self._names]
        return self._batches

    def prepare_inputs_from_block_state(self, data, input_fields: Dict[str, Any]) -> List[Any]:
        self._batches = [self._prepare_batch_from_block_state(input_fields, data, self._tuple_index(n), n)
                         for n in self._names]
        return self._batches

    def prepare_models(self, denoiser: torch.nn.Module) -> None:
        self._count_prepared += 1
        index = self._count_prepared - 1
        if index >= len(self._names):
            raise RuntimeError(f"s2fast.{type(self).__name__}: batch {index + 1} prepared, but this step has "
                               f"{len(self._names)} ({self._names}); the loop is not diffusers' modular loop")
        if index == 0:
            family = family_for(denoiser, type(self).__name__)
            controller = self._controller(family, denoiser)
            self._family = family

            def serve(model, args, kwargs):
                return self._compute(controller, family, model, args, kwargs)
        else:
            name = self._names[index]

            def serve(model, args, kwargs):
                return self._serve(name, args, kwargs)
        hook.install(denoiser, serve, self._loop_frame())

    def _loop_frame(self):
        """The frame that called prepare_models (past this guider's own frames, a subclass's included)."""
        frame = sys._getframe(2)
        while frame is not None and frame.f_locals.get("self") is self:
            frame = frame.f_back
        return frame

    def cleanup_models(self, denoiser: torch.nn.Module) -> None:
        hook.remove(denoiser)

    def _combine(self, pred_cond, pred_uncond, pred_sub) -> GuiderOutput:
        step = self._step_plan or StepGuidance()
        scale = None if pred_uncond is None else self.guidance_scale + step.guidance_offset
        subs = [] if pred_sub is None else [pred_sub]
        pred = guided_prediction(pred_cond, pred_uncond, subs, scale, step.omega)
        reported_cond = pred_cond
        if self._family is not None and self._family.cond_norm_rescale and not self._cfg_on():
            reported_cond = pred  # the loop's rescale by ‖pred_cond‖/‖pred‖ is then exactly 1 (ModularFamily)
        return GuiderOutput(pred=pred, pred_cond=reported_cond, pred_uncond=pred_uncond)

    def _cfg_on(self) -> bool:
        """Whether this call runs CFG, as a classic pipeline decides it for the whole call (λ ≠ 1)."""
        return self._enabled and not math.isclose(self.guidance_scale, 1.0)

    @property
    def is_conditional(self) -> bool:
        index = self._count_prepared - 1
        return 0 <= index < len(self._names) and self._names[index] != UNCOND

    @property
    def num_conditions(self) -> int:
        return len(self._names) or 1

    # --- what the guider reports ---------------------------------------------------------------------------------
    def trace(self) -> Tuple:
        """The sub-network masks of each step of the last call, in s2fast.trace's form (() where none ran);
        ``S2Config(masks=guider.trace())`` replays them."""
        steps = self._run.trace if self._run is not None else []
        return tuple(public_step_form(step, plan.num_masks(self.s2fast_config)) for step in steps)

    def graph_stats(self) -> Optional[Dict[str, int]]:
        """The block graphs this guider's engine runs (as s2fast.graph_stats reports a wrapped pipeline's); None when
        graphs are off (cuda_graphs='auto' uses them where the transformer is on a CUDA device)."""
        stats = [s for s in (c.graph_stats() for c in self._controllers.values()) if s is not None]
        return {k: sum(s[k] for s in stats) for k in stats[0]} if stats else None

    def release_graphs(self) -> None:
        """Free the block graphs (and their device memory) kept for this guider's transformers; graphs a pipeline
        wrapped by s2fast.wrap still uses are kept. Swapping the guider out does not free them: the graphs live as
        long as the transformer, so that the next call with this guider replays them."""
        for controller in self._controllers.values():
            for model in list(controller._models.keys()):
                if not any(c.active for c in _USERS.get(model, ())):
                    release_graphs(model)
        self._controllers.clear()

    # --- the step's batches ------------------------------------------------------------------------------------
    def _tuple_index(self, name: str) -> int:
        return 1 if name == UNCOND else 0

    def _batch_names(self, step: int) -> List[str]:
        if not self._enabled:
            return [COND]
        # Which steps run a sub-network does not depend on the model's block count (only which blocks it drops),
        # and the batches are made before the guider sees the model: a small stand-in count decides here.
        probe = self._run.guidance(self.s2fast_config, step, self._probe_blocks())
        names = [COND]
        if probe.uncond and self._cfg_in_range() and not math.isclose(self.guidance_scale + probe.guidance_offset, 1.0):
            names.append(UNCOND)
        if probe.subnets:
            names.append(self._sub_prediction)
        return names

    def _cfg_in_range(self) -> bool:
        """start ≤ step < stop as ClassifierFreeGuidance counts them (int(start · N), int(stop · N))."""
        n = self._num_inference_steps
        return int(self._start * n) <= self._step < int(self._stop * n)

    def _probe_blocks(self) -> int:
        c = self.s2fast_config
        named = tuple(getattr(c, "protected_blocks", ())) + tuple(getattr(c, "skip_blocks", ()))
        return max(named, default=0) + 2

    # --- the engine, at the cond batch's call -------------------------------------------------------------------
    def _controller(self, family: ModularFamily, model) -> Controller:
        adapter_class = family.adapter_class()
        controller = self._controllers.get(adapter_class)
        if controller is None:
            controller = Controller(adapter_class(), self.s2fast_config, graph_backend=self._graph_backend)
            self._controllers[adapter_class] = controller
        if self._sub_prediction in self._names:  # a step without a sub-network runs any model
            self.s2fast_config.check_blocks(controller.adapter.num_blocks(model))
        controller.adapter.check_denoiser(model)
        found = binding.incompatible_hooks(model)
        if found:
            raise ValueError(f"s2fast.{type(self).__name__} cannot run under what is on the {type(model).__name__}: "
                             + "; ".join(found))
        return controller

    def _compute(self, controller: Controller, family: ModularFamily, model, args, kwargs):
        adapter = controller.adapter
        state = controller.state(model)
        inputs = _call_inputs(state.signature, model, args, kwargs)
        return_dict = inputs.pop("return_dict", True)
        if family.sample_lists:
            inputs = _from_sample_lists(inputs)
        self._check_inputs(adapter, family, model, inputs)
        run, step = self._run, self._step
        controller.share_seed(run, [model])  # under context parallelism: the first rank's masks on every rank
        planned = run.guidance(self.s2fast_config, step, state.num_blocks, controller.fixed_blocks(run, model))
        with_sub = self._sub_prediction in self._names
        if self._enabled and bool(planned.subnets) != with_sub:
            raise RuntimeError(f"s2fast.{type(self).__name__}: step {step}'s plan changed with the block count")
        subnets = planned.subnets if with_sub else ()
        branches = [inputs]
        if UNCOND in self._names:
            branches.insert(0, self._uncond_inputs(family, inputs))
        if family.sample_lists and len(branches) > 1:
            # one batch of [uncond..., cond...] samples, as the family's own pipeline stacks them (lists concatenate)
            rows = BranchRows(adapter.batched_inputs, 2, stacked=_stack_samples(branches, adapter.batched_inputs))
        else:
            rows = BranchRows(adapter.batched_inputs, len(branches), branches=branches)
        predictions = controller.predictions(model, state, run, rows, subnets)
        cond = predictions[rows.count - 1]
        self._served = {COND: cond}
        if UNCOND in self._names:
            self._served[UNCOND] = predictions[0]
        if subnets:
            self._served[self._sub_prediction] = mean_of_subs(predictions[rows.count:])
        self._step_plan = planned
        run.trace[step] = subnets
        return self._answer(cond, return_dict)

    def _answer(self, prediction: torch.Tensor, return_dict):
        family = self._family
        return model_output(list(prediction.unbind(0)) if family is not None and family.sample_lists else prediction,
                            return_dict)

    def _serve(self, name: str, args, kwargs):
        if name not in self._served:
            raise RuntimeError(f"s2fast.{type(self).__name__}: the {name} batch was called before the {COND} batch "
                               "of its step; the loop is not diffusers' modular loop")
        return self._answer(self._served[name], kwargs.get("return_dict", True))

    def _check_inputs(self, adapter, family: ModularFamily, model, inputs: Dict[str, Any]) -> None:
        """Every argument the loop passes must be one the engine reads: anything else would be silently ignored."""
        name = type(self).__name__
        for key, what in getattr(adapter, "unsupported_inputs", {}).items():
            if inputs.get(key) is not None:
                raise ValueError(f"s2fast.{name} does not combine with {what}")
        known = set(adapter.batched_inputs) | {adapter.attention_kwargs_key} | set(family.extra_inputs)
        unknown = sorted(k for k, v in inputs.items() if v is not None and k not in known)
        if unknown:
            raise ValueError(f"s2fast.{name}: the loop passes {unknown} to {type(model).__name__}, which s2fast's "
                             f"{type(adapter).__name__} does not read; use diffusers' own guiders for this call")
        if "ip_adapter_image_embeds" in (inputs.get(adapter.attention_kwargs_key) or {}):
            raise ValueError(f"s2fast.{name} does not support IP-Adapter yet")

    def _uncond_inputs(self, family: ModularFamily, cond_inputs: Dict[str, Any]) -> Dict[str, Any]:
        """The cond call's arguments with the fields where the uncond batch differs replaced, as the loop would pass
        them (same dtype and device as its cond argument)."""
        if len(self._batches) != len(self._names):
            raise RuntimeError(f"s2fast.{type(self).__name__}: the loop called the transformer without this step's "
                               "prepare_inputs; the loop is not diffusers' modular loop")
        cond_batch = self._batches[self._names.index(COND)].as_dict()
        uncond_batch = self._batches[self._names.index(UNCOND)].as_dict()
        out = dict(cond_inputs)
        for field_name, cond_value in cond_batch.items():
            uncond_value = uncond_batch.get(field_name)
            if field_name == self._identifier_key or uncond_value is cond_value:
                continue
            argument = family.argument(field_name)
            if argument not in cond_inputs:
                raise RuntimeError(f"s2fast.{type(self).__name__}: the guider input {field_name!r} reached the "
                                   f"transformer under no argument {argument!r}; its family's field map is wrong")
            passed = cond_inputs[argument]
            if isinstance(passed, torch.Tensor) and isinstance(cond_value, torch.Tensor) \
                    and passed.shape != cond_value.shape:
                raise RuntimeError(f"s2fast.{type(self).__name__}: the guider input {field_name!r} has shape "
                                   f"{tuple(cond_value.shape)}, the transformer's {argument!r} {tuple(passed.shape)}")
            if isinstance(passed, torch.Tensor) and isinstance(uncond_value, torch.Tensor):
                uncond_value = uncond_value.to(device=passed.device, dtype=passed.dtype)
            elif isinstance(passed, list) and isinstance(uncond_value, list) and passed \
                    and isinstance(passed[0], torch.Tensor):  # per-sample lists (Z-Image's caption features)
                uncond_value = [v.to(device=passed[0].device, dtype=passed[0].dtype) for v in uncond_value]
            out[argument] = uncond_value
        return out


def _from_sample_lists(inputs: Dict[str, Any]) -> Dict[str, Any]:
    """A per-sample-list call's arguments (x, t) under the adapter's names (ModularFamily.sample_lists)."""
    out = dict(inputs)
    x = out.pop("x", None)
    if isinstance(x, list) and x and isinstance(x[0], list):
        raise ValueError("s2fast's guiders do not support Z-Image's omni mode (nested lists); use diffusers' own "
                         "guiders for this call")
    out["hidden_states"] = torch.stack(x) if isinstance(x, list) else x
    out["timestep"] = out.pop("t", None)
    return out


def _stack_samples(branches: List[Dict[str, Any]], batched: Tuple[str, ...]) -> Dict[str, Any]:
    out = dict(branches[-1])
    for key in batched:
        values = [b.get(key) for b in branches]
        if all(isinstance(v, list) for v in values):
            out[key] = [item for v in values for item in v]
        elif all(isinstance(v, torch.Tensor) for v in values):
            out[key] = torch.cat(values, dim=0)
    return out


class S2Guidance(_EngineGuidance):
    """S²-Guidance (Chen et al. 2025) as a diffusers guider, for the modular pipelines
    (``pipe.update_components(guider=s2fast.S2Guidance(...))``)::

        D = D_u + λ (D_c − D_u) − ω (D_s − D_c)      (D = D_c − ω (D_s − D_c) where CFG is off)

    Args:
        guidance_scale: λ (the guider's own, as ClassifierFreeGuidance's).
        config: an :class:`s2fast.S2Config` (ω, drop ratio, protected blocks, interval, seed or explicit masks,
            engine options), or its dict form (how the guider's config saves it). ``fused_step=True`` and
            ``compile_blocks`` are refused: the modular loop steps its own scheduler.
        start, stop, enabled: as ClassifierFreeGuidance's: the CFG term applies at steps int(start·N) ≤ i <
            int(stop·N) and where λ is not 1; the S² term follows the config (``interval``, ``masks``).
            ``enabled=False`` gives D = D_c.

    The batches are ``pred_cond``, ``pred_uncond`` (where CFG applies) and ``pred_cond_sub`` (where S² applies).
    The engine computes them all at the ``pred_cond`` call; ``guider.trace()`` reports each step's masks.
    """

    _input_predictions = [COND, UNCOND, "pred_cond_sub"]
    _config_class = S2Config
    _sub_prediction = "pred_cond_sub"

    def __init__(self, guidance_scale: float = 7.0, config: Optional[S2Config] = None, start: float = 0.0,
                 stop: float = 1.0, enabled: bool = True):
        super().__init__(guidance_scale, config, start, stop, enabled)
        self.register_to_config(start=start, stop=stop)

    def forward(self, pred_cond: torch.Tensor, pred_uncond: Optional[torch.Tensor] = None,
                pred_cond_sub: Optional[torch.Tensor] = None) -> GuiderOutput:
        return self._combine(pred_cond, pred_uncond, pred_cond_sub)


class SGGGuidance(_EngineGuidance):
    """Segmented guidance (SGG, Yuan et al.) and skip-layer guidance as a diffusers guider, for the modular
    pipelines. Per step, as :class:`s2fast.SGGConfig` describes: CFG inside ``cfg_window`` (no ``pred_uncond``
    batch outside it), the skip term ``s (D_c − D_skip)`` inside ``skip_window`` (a ``pred_cond_skip`` batch,
    whose rows the engine forks off the cond rows at the first skipped block).

    Args:
        guidance_scale: λ. CFG is off where λ is 1 (as ClassifierFreeGuidance).
        config: an :class:`s2fast.SGGConfig` or its dict form.
        enabled: ``False`` gives D = D_c.
    """

    _input_predictions = [COND, UNCOND, "pred_cond_skip"]
    _config_class = SGGConfig
    _sub_prediction = "pred_cond_skip"

    def __init__(self, guidance_scale: float = 4.5, config: Optional[SGGConfig] = None, enabled: bool = True):
        super().__init__(guidance_scale, config, 0.0, 1.0, enabled)

    def forward(self, pred_cond: torch.Tensor, pred_uncond: Optional[torch.Tensor] = None,
                pred_cond_skip: Optional[torch.Tensor] = None) -> GuiderOutput:
        return self._combine(pred_cond, pred_uncond, pred_cond_skip)
