"""The per-pipeline controller behind s2fast.wrap: it stands in for the transformer's forward.

wrap sets an *instance* attribute ``forward`` on ``pipe.transformer`` (what diffusers' own HookRegistry does), so
the pipeline object, its config, ``.to()``, ``save_pretrained`` and the transformer's class all stay as they were;
unwrap deletes the attribute. A call that does not come from the wrapped pipeline's denoising loop (a direct
``pipe.transformer(...)``, another pipeline sharing the transformer) runs the stock forward.
"""

from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from . import masks as mask_sampling
from .adapters.base import FamilyAdapter, StepRequest, find_pipeline_locals
from .attention import AttentionChoice, attention_backend
from .config import Mask, S2Config, public_step_form
from .engine import EngineOptions, predict
from .fused_step import FusedStep, SchedulerHook, fused_step_for_call
from .graphs import BlockGraphs, kept_graphs, release_graphs, warmup_subnets


def cuda_graphs_refusal(device) -> str:
    return (f"S2Config.cuda_graphs=True needs the transformer on a CUDA device, it is on {device} "
            "(use 'auto' to graph only where CUDA is available)")


# predictor(adapter, model, rows, subnets, options) -> [branch predictions..., sub-network predictions...]
Predictor = Callable[..., List[torch.Tensor]]


@dataclass
class _Run:
    """The state of one pipeline call: its mask schedule, what it used, and a value to serve a follow-up call."""

    timesteps: Any
    schedule: List[Tuple[Mask, ...]]
    trace: List[Tuple[Mask, ...]]
    memo: Dict[str, Any] = field(default_factory=dict)
    served: Optional[Tuple[int, torch.Tensor, int]] = None  # (step, D, follow-up calls left)
    fused: Optional[FusedStep] = None
    fused_decided: bool = False  # at the call's first step, when the prediction's shape is known
    steps_served: int = 0


class Controller:
    def __init__(self, pipe, adapter: FamilyAdapter, config: S2Config, predictor: Predictor = predict,
                 graph_backend=None):
        self.pipe_ref = weakref.ref(pipe)
        self.model = pipe.transformer
        self.adapter = adapter
        self.config = config
        self.predictor = predictor
        self.num_blocks = adapter.num_blocks(self.model)
        self._signature = inspect.signature(type(self.model).forward)
        self._run: Optional[_Run] = None  # the last (or current) pipeline call
        self._scheduler_hooks: List[SchedulerHook] = []  # every scheduler whose step this wrap replaced
        # Block graphs: decided at the first step (the device is known then); graph_backend overrides the choice
        # (tests pass graphs.EagerBackend() to run the graph bookkeeping on the CPU).
        self._graph_backend = graph_backend
        self.graphs: Optional[BlockGraphs] = None
        self._graphs_decided = False
        self.attention = AttentionChoice(config.attention)
        self._compiled_blocks: List[torch.nn.Module] = []

    # --- installation ------------------------------------------------------------------------------------
    def install(self) -> None:
        self.model.forward = self.forward  # nn.Module.__setattr__ stores a plain attribute for a bound method
        if self.config.compile_blocks:
            # Regional compilation (nn.Module.compile): the engine calls each block as a module, so the compiled
            # block serves every mask. Blocks the user compiled are theirs: neither recompiled nor undone.
            for block in self.adapter.blocks(self.model):
                if getattr(block, "_compiled_call_impl", None) is None:
                    block.compile(backend=self.config.compile_blocks)
                    self._compiled_blocks.append(block)

    def uninstall(self, release_graphs_too: bool = True) -> None:
        """Restore the model. The block graphs are kept for a re-wrap (wrap replacing a config) and released
        otherwise (s2fast.unwrap): they hold device memory."""
        if release_graphs_too:
            release_graphs(self.model)
        for block in self._compiled_blocks:
            block._compiled_call_impl = None  # what nn.Module.compile set: the block's own forward again
        self._compiled_blocks.clear()
        if self.model.__dict__.get("forward") == self.forward:
            del self.model.__dict__["forward"]
        for hook in self._scheduler_hooks:
            hook.uninstall()
        self._scheduler_hooks.clear()

    def stock_forward(self, *args, **kwargs):
        return type(self.model).forward(self.model, *args, **kwargs)

    @property
    def options(self) -> EngineOptions:
        c = self.config
        return EngineOptions(c.batch_branches, c.reuse_prefix, c.fork_mode, self.graphs)

    def _decide_graphs(self, device: torch.device) -> None:
        if self._graphs_decided:
            return
        self._graphs_decided = True
        if self.predictor is not predict:  # another predictor (the naive three-pass reference) runs no blocks here
            return
        if self._graph_backend is not None:
            self.graphs = kept_graphs(self.model, self._graph_backend)
        elif self.config.cuda_graphs is not False and device.type == "cuda":
            self.graphs = kept_graphs(self.model)
        elif self.config.cuda_graphs is True:
            raise ValueError(cuda_graphs_refusal(device))

    @staticmethod
    def _input_key(rows) -> Tuple:
        first = rows.branch(0)
        return (rows.count, tuple((k, tuple(v.shape), v.dtype) for k, v in first.items() if isinstance(v, torch.Tensor)))

    def _attention_for(self, rows, key: Tuple) -> Optional[str]:
        """The attention backend for these inputs ("fastest": measured here, eagerly, before any graph capture)."""
        c = self.config
        if c.attention != "fastest":  # every step goes through here: nothing to build for a fixed choice
            return None if c.attention == "default" else c.attention
        eager = EngineOptions(c.batch_branches, c.reuse_prefix, c.fork_mode, None)
        run = lambda: self.predictor(self.adapter, self.model, rows, warmup_subnets(self.num_blocks, c), eager)  # noqa: E731
        return self.attention.backend_for(key, run, self.model.device)

    def _warm_up(self, rows, key: Tuple) -> None:
        """Before the first step of a new input shape: one discarded prediction whose sub-networks fork as early
        as any mask can, so every (block, lane) graph a later mask needs is captured now, not mid-sampling."""
        subnets = warmup_subnets(self.num_blocks, self.config)
        done = (key, subnets, self.graphs.variant)
        if done in self.graphs.warmed:  # by this wrap, or by an earlier one of the same model
            return
        self.graphs.warmed.add(done)
        self.predictor(self.adapter, self.model, rows, subnets, self.options)

    # --- the forward that the pipeline calls ------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        pipe = self.pipe_ref()
        call_locals = find_pipeline_locals(pipe, self.adapter.pipeline_locals) if pipe is not None else None
        if call_locals is None:
            return self.stock_forward(*args, **kwargs)
        inputs = self._signature.bind(self.model, *args, **kwargs).arguments
        inputs.pop("self", None)
        self.adapter.check_call(call_locals, inputs)
        run = self._run_for(self.adapter.call_schedule(pipe, call_locals))
        step = self.adapter.step_index(call_locals, run.steps_served)
        if self.adapter.is_follow_up(call_locals, inputs):
            return self._serve(run, step, inputs)
        if step >= len(run.schedule):
            raise RuntimeError(f"s2fast: step {step} of a {len(run.schedule)}-step call; the pipeline's loop is not "
                               "the one s2fast supports")
        request = self.adapter.request(pipe, call_locals, inputs, run.memo)
        subnets = run.schedule[step]
        d, predictions = self._guided(pipe, run, call_locals, request, subnets)
        run.trace[step] = subnets
        run.steps_served += 1
        follow_ups = request.notes.get("follow_ups", 0)
        run.served = (step, d, follow_ups) if follow_ups else None
        return request.respond(d, predictions)

    def _guided(self, pipe, run: _Run, call_locals, request: StepRequest, subnets: Tuple[Mask, ...]):
        """(D, the engine's predictions) for this step; with the fused step, x_{t−1} too (stashed for the
        scheduler's step)."""
        from .kernels import guided_prediction

        self._decide_graphs(self.model.device)
        # the input signature keys graph warm-ups and attention measurements; plain runs skip computing it
        key = self._input_key(request.rows) if self.graphs is not None or self.config.attention == "fastest" else None
        backend = self._attention_for(request.rows, key)
        with attention_backend(backend):
            if self.graphs is not None:
                if "graphs_checked" not in run.memo:  # once per pipeline call: weights replaced since? recapture
                    run.memo["graphs_checked"] = True
                    self.graphs.check_model(self.model)
                self.graphs.variant = (backend, self.config.compile_blocks)
                self._warm_up(request.rows, key)
            preds = self.predictor(self.adapter, self.model, request.rows, subnets, self.options)
        part = request.guided_part or (lambda p: p)
        branches = request.rows.count
        uncond = part(preds[request.uncond_branch]) if branches == 2 else None
        cond, subs = part(preds[request.cond_branch]), [part(p) for p in preds[branches:]]
        if not run.fused_decided:
            # An adapter without the fused step never gets here with fused_step=True: wrap refuses that.
            run.fused = None
            if self.adapter.supports_fused_step:
                run.fused = fused_step_for_call(pipe, self.config, call_locals["latents"], cond.shape,
                                                self._scheduler_hooks)
            run.fused_decided = True
        if run.fused is not None:
            d = run.fused.step(pipe.scheduler, call_locals, cond, uncond, subs, request.guidance_scale,
                               self.config.omega)
        else:
            d = guided_prediction(cond, uncond, subs, request.guidance_scale, self.config.omega)
        return d, preds

    def _serve(self, run: _Run, step: int, inputs: Dict[str, Any]):
        if run.served is None or run.served[0] != step or run.served[2] < 1:
            raise RuntimeError(
                f"s2fast: step {step} made a second transformer call before the first one; "
                "the pipeline's loop is not the one s2fast supports"
            )
        _, d, left = run.served
        run.served = (step, d, left - 1) if left > 1 else None
        return self.adapter.follow_up_response(d, inputs)

    def _run_for(self, timesteps) -> _Run:
        if self._run is None or self._run.timesteps is not timesteps:
            # A new pipeline call: set_timesteps made a new tensor. Draw its masks before the first step runs, so
            # a schedule error (explicit masks of the wrong length) is raised before anything is computed.
            n = len(timesteps)
            schedule = mask_sampling.schedule(self.config, n, self.num_blocks)
            self._run = _Run(timesteps, schedule, [()] * n)
        return self._run

    def trace(self) -> Tuple:
        steps = self._run.trace if self._run is not None else []
        return tuple(public_step_form(step, self.config.num_masks) for step in steps)
