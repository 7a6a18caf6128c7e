"""The per-pipeline controller behind s2fast.wrap: it answers the denoiser calls of the pipeline's loop.

s2fast/binding.py sets a ModelForward at the base of each denoiser's forward chain; a call made by the denoising
loop of a pipeline wrapped with a controller reaches ``Controller.forward`` with the pipeline and the locals of
its ``__call__`` (every other call runs the stock forward). The controller keeps what lasts across calls — the
config, the adapter, per-denoiser state (block count, graphs, compiled blocks, attention choice) — and the state of
the current pipeline call (``_Run``). It holds no reference to its pipeline but a weak one: the pipeline holds it.
"""

from __future__ import annotations

import inspect
import logging
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from . import binding, context_parallel, distributed, fork_choice, plan
from . import masks as mask_sampling
from .adapters import check_model
from .adapters.base import FamilyAdapter, PipelineLocals, StepRequest
from .attention import AttentionChoice, attention_backend
from .config import Mask, S2Config, public_step_form
from .engine import EngineOptions, graph_context, predict
from .fused_step import FusedStep, SchedulerHook, fused_step_for_call
from .graphs import BlockGraphs, kept_graphs, release_graphs
from .kernels import correction_of, guided_prediction
from .kernels.dispatch import log_once
from .plan import StepGuidance
from .serving import serving_controller
from .step_cache import CacheStore, StepCache
from .step_trace import StepRecord

logger = logging.getLogger("s2fast")


def cuda_graphs_refusal(device) -> str:
    return (f"S2Config.cuda_graphs=True needs the transformer on a CUDA device, it is on {device} "
            "(use 'auto' to graph only where CUDA is available)")


OFFLOAD_GRAPHS_REFUSAL = ("S2Config.cuda_graphs=True cannot serve a transformer under enable_model_cpu_offload: a graph "
                          "reads the weights where it was captured, and offloading moves them at every call (use "
                          "'auto', which runs such a model without graphs)")

# predictor(adapter, model, rows, subnets, options) -> [branch predictions..., sub-network predictions...]
Predictor = Callable[..., List[torch.Tensor]]

# model -> the controllers that serve it (a transformer may be shared by pipelines): its ModelForward stays while
# one of them is active, and graphs are released with the last one.
_USERS: "weakref.WeakKeyDictionary[torch.nn.Module, weakref.WeakSet]" = weakref.WeakKeyDictionary()


@dataclass
class _FollowUp:
    """A value the step's first call computed for the calls the loop makes after it in the same step."""

    step: int
    value: torch.Tensor
    remaining: int


@dataclass
class _StoredCorrection:
    """One denoiser's S² correction Δ = S̄ − D_c in a pipeline call (S2Config.correction_every), and the S² steps
    that have reused it since the step that computed it."""

    delta: torch.Tensor
    reused: int = 0


@dataclass
class _Run:
    """The state of one pipeline call: its plan, what it used, and a value to serve a follow-up call."""

    timesteps: Any
    steps: int
    trace: List[Tuple[Mask, ...]]
    denoisers: List[Optional[str]]                    # which denoiser attribute ran each step
    schedules: Dict[Tuple, List[StepGuidance]] = field(default_factory=dict)  # per block count, fixed blocks
    seed: Optional[int] = None                        # drawn once per call when the config's seed is None
    memo: Dict[str, Any] = field(default_factory=dict)
    follow_up: Optional[_FollowUp] = None
    fused: Optional[FusedStep] = None
    fused_decided: bool = False                        # at the call's first step, when the prediction's shape is known
    steps_served: int = 0
    sigmas: Optional[List[float]] = None               # the scheduler's noise levels, read when S² needs them
    # Whether the call's plan differs from stock CFG at some step (a sub-network; SGG: a step without CFG or a
    # scheduled λ). A call whose plan does not is stock's: served by the engine (batched branches) where nothing
    # s2fast refuses is present (stock_forward False), by the stock forward where something is (True); None until
    # its first transformer call.
    guided: bool = True
    stock_forward: Optional[bool] = None
    # BlockCache (s2fast/step_cache.py): one residual store per denoiser model (Wan 2.2's experts keep their own),
    # living as long as this call
    stores: Dict[int, CacheStore] = field(default_factory=dict)
    # per denoiser attribute (each expert its own): the last computed correction, for correction_every > 1
    corrections: Dict[str, _StoredCorrection] = field(default_factory=dict)
    records: List[Optional[StepRecord]] = field(default_factory=list)  # what each step ran (s2fast.trace_steps)

    def guidance(self, config, step: int, num_blocks: int, fixed_blocks: Tuple[int, ...] = ()) -> StepGuidance:
        """This step's plan for a denoiser of ``num_blocks`` blocks (experts may differ in block count);
        ``fixed_blocks`` are never dropped (context parallelism's split blocks, s2fast/context_parallel.py)."""
        key = (num_blocks, fixed_blocks)
        if key not in self.schedules:
            config = context_parallel.with_protected(config, fixed_blocks)
            self.schedules[key] = plan.guidance_steps(config, self.steps, num_blocks, seed=self.seed,
                                                      sigmas=self.sigmas)
        return self.schedules[key][step]


@dataclass
class _Denoiser:
    """What the controller keeps per denoiser model."""

    num_blocks: int
    signature: inspect.Signature
    attention: AttentionChoice
    graphs: Optional[BlockGraphs] = None
    graphs_decided: bool = False
    compiled_blocks: List[torch.nn.Module] = field(default_factory=list)


class Controller:
    def __init__(self, adapter: FamilyAdapter, config: S2Config, predictor: Predictor = predict, graph_backend=None):
        self.adapter = adapter
        self.config = config
        self.predictor = predictor
        # graph_backend overrides the graph choice (tests pass graphs.EagerBackend() to run the bookkeeping on a CPU)
        self._graph_backend = graph_backend
        self.fork_timer = None  # fork_mode "auto"'s clock (s2fast/fork_choice.py); tests set a fake one
        self.active = False
        self._owner: Optional[weakref.ref] = None
        self._models: "weakref.WeakKeyDictionary[torch.nn.Module, _Denoiser]" = weakref.WeakKeyDictionary()
        self._run: Optional[_Run] = None  # the last (or current) pipeline call
        self._scheduler_hooks: List[SchedulerHook] = []  # every scheduler whose step this controller replaced

    # --- attachment --------------------------------------------------------------------------------------------
    @property
    def owner(self):
        return self._owner() if self._owner is not None else None

    def denoiser_models(self, pipe) -> List[Tuple[str, torch.nn.Module]]:
        return [(name, getattr(pipe, name)) for name in self.adapter.denoisers if getattr(pipe, name, None) is not None]

    def serves(self, pipe, model) -> bool:
        return self.active and any(m is model for _, m in self.denoiser_models(pipe))

    def check_pipeline(self, pipe) -> None:
        """Every check wrap makes on ``pipe``'s denoisers, before anything changes (ValueError naming the problem)."""
        for name, model in self.denoiser_models(pipe):
            check_attachable(self.adapter, self.config, pipe, name, model, self._graph_backend)

    def attach(self, pipe) -> None:
        """Serve ``pipe``: a ModelForward on each of its denoisers (checked first with :meth:`check_pipeline`)."""
        self._owner = weakref.ref(pipe)
        self.active = True
        for _, model in self.denoiser_models(pipe):
            self._bind(model)

    def clone(self) -> "Controller":
        """A controller with the same settings and no state (for a copy of the pipeline)."""
        clone = Controller(type(self.adapter)(), self.config, self.predictor, self._graph_backend)
        clone.active = self.active
        return clone

    def _bind(self, model) -> None:
        binding.install(model, serving_controller)
        _USERS.setdefault(model, weakref.WeakSet()).add(self)
        self.state(model)

    def _release(self, model, release_graphs_too: bool) -> None:
        state = self._models.pop(model, None)
        if state is not None:
            for block in state.compiled_blocks:
                block._compiled_call_impl = None  # what nn.Module.compile set: the block's own forward again
        users = _USERS.get(model)
        if users is not None:
            users.discard(self)
        if not any(c.active for c in (users or ())):
            binding.remove(model)
            if release_graphs_too:
                release_graphs(model)

    def detach(self, release_graphs_too: bool = True) -> None:
        """Stop serving: models nobody else serves get their own forward back. The block graphs are kept for a
        re-wrap (wrap replacing a config) and released otherwise (s2fast.unwrap): they hold device memory."""
        self.active = False
        for model in list(self._models.keys()):
            self._release(model, release_graphs_too)
        owner = self.owner
        schedulers = self._scheduler_hooks + [SchedulerHook.installed_on(getattr(owner, "scheduler", None))]
        for hook in schedulers:
            if hook is not None:
                hook.uninstall()
        self._scheduler_hooks.clear()
        self._run = None

    def check_denoisers(self, pipe) -> None:
        """At the start of a pipeline call: a denoiser replaced since wrap (``pipe.transformer = other``) is served
        from now on, after the checks wrap makes (ValueError naming the problem otherwise); one removed is released."""
        current = self.denoiser_models(pipe)
        for name, model in current:
            if model in self._models:
                continue
            check_attachable(self.adapter, self.config, pipe, name, model, self._graph_backend)
            self._bind(model)
            logger.info("s2fast: %s.%s was replaced since s2fast.wrap; S² now serves the new %s",
                        type(pipe).__name__, name, type(model).__name__)
        for model in list(self._models.keys()):
            if not any(model is m for _, m in current):
                self._release(model, release_graphs_too=True)

    def state(self, model) -> _Denoiser:
        state = self._models.get(model)
        if state is None:
            state = _Denoiser(self.adapter.num_blocks(model), inspect.signature(type(model).forward),
                              AttentionChoice(self.config.attention))
            self._models[model] = state
            if self.config.compile_blocks:
                # Regional compilation (nn.Module.compile): the engine calls each block as a module, so the compiled
                # block serves every mask. Blocks the user compiled are theirs: neither recompiled nor undone.
                for block in self.adapter.blocks(model):
                    if getattr(block, "_compiled_call_impl", None) is None:
                        block.compile(backend=self.config.compile_blocks)
                        state.compiled_blocks.append(block)
        return state

    # A pickled or deep-copied controller keeps its settings, not its state; the first pipeline that reaches it
    # (the copy it belongs to) attaches it (s2fast.serving.controller_of).
    def __getstate__(self):
        return {"adapter": type(self.adapter), "config": self.config, "predictor": self.predictor, "active": self.active}

    def __setstate__(self, state):
        self.__init__(state["adapter"](), state["config"], state["predictor"])
        self.active = state["active"]

    def __deepcopy__(self, memo):
        return self.clone()

    # --- graphs and attention ---------------------------------------------------------------------------------
    def options(self, state: _Denoiser, fork_mode: str, cache: Optional[StepCache] = None) -> EngineOptions:
        c = self.config
        return EngineOptions(c.batch_branches, c.reuse_prefix, fork_mode, state.graphs, cache)

    def _fork_mode(self, model, state: _Denoiser, run: _Run, rows) -> str:
        """The fork mode of this call: the config's, or "auto"'s choice for these inputs (s2fast/fork_choice.py:
        measured once per model and input shape, eagerly and before any graph capture; looked up once per call)."""
        c = self.config
        if c.fork_mode != "auto":
            return c.fork_mode
        memo = ("fork_mode", id(model))
        mode = run.memo.get(memo)
        if mode is None:
            cp = self.context_parallel(run, model)
            subnets = plan.warmup_subnets(self._plan_config(cp), state.num_blocks)  # fork as early as any step can
            if not c.batch_branches or not subnets or not run.guided or self.predictor is not predict:
                mode = "separate"  # no step of this call forks, nothing to join, or a predictor without modes
            else:
                # counted at the weights' element size, so that the choice does not depend on autocast
                flow = self.adapter.embed(model, rows.branch(rows.cond_branch)).flow
                size = next(model.parameters()).element_size()
                row_bytes = sum(t.numel() for t in flow if t is not None) * size // rows.rows_per_branch
                # timed on one block (the first any mask can fork at), not on whole predictions: what the modes
                # differ in is the calls of each block the sub-network runs (s2fast/fork_choice.py)
                fork_block = min(min(m) for m in subnets)
                trial = fork_choice.block_trial(self.adapter, model, rows, fork_block, len(subnets))
                mode = fork_choice.fork_mode_for(model, self._input_key(rows), trial, row_bytes, rows.rows_per_branch,
                                                 len(subnets), self.fork_timer)
                # ranks that share a sample run the first rank's choice: their collectives must pair up
                mode = distributed.broadcast_object(mode, cp.group if cp is not None else None)
            run.memo[memo] = mode
        return mode

    def _decide_graphs(self, model, state: _Denoiser, cp=None) -> None:
        if cp is not None:  # no block graphs under context parallelism (refused at wrap when asked for)
            if state.graphs is not None:
                release_graphs(model)
                state.graphs = None
            state.graphs_decided = False  # decided afresh if the parallelism is removed
            log_once("s2fast: cuda_graphs='auto' runs without block graphs under context parallelism")
            return
        if state.graphs is not None and binding.model_offloaded(model):
            # offloading enabled after the graphs were captured: they would be recaptured at every call
            log_once("s2fast: block graphs dropped: the transformer is under model CPU offload")
            release_graphs(model)
            state.graphs = None
        if state.graphs_decided:
            return
        state.graphs_decided = True
        if self.predictor is not predict:  # another predictor (the naive three-pass reference) runs no blocks here
            return
        offloaded = binding.model_offloaded(model)
        if self.config.cuda_graphs is True and offloaded:
            raise ValueError(OFFLOAD_GRAPHS_REFUSAL)
        if self._graph_backend is not None:
            state.graphs = kept_graphs(model, self._graph_backend)
        elif self.config.cuda_graphs is not False and model.device.type == "cuda" and not offloaded:
            state.graphs = kept_graphs(model)
        elif self.config.cuda_graphs is True:
            raise ValueError(cuda_graphs_refusal(model.device))
        elif offloaded and model.device.type == "cuda":
            log_once("s2fast: cuda_graphs='auto' runs without block graphs under model CPU offload (offloading moves "
                     "the weights a graph would read at every call)")
        if state.graphs is not None:
            state.graphs.failure = None  # a capture that failed under an earlier wrap is tried again

    @staticmethod
    def _input_key(rows) -> Tuple:
        first = rows.branch(0)
        return (rows.count, tuple((k, tuple(v.shape), v.dtype) for k, v in first.items() if isinstance(v, torch.Tensor)))

    def _attention_for(self, model, state: _Denoiser, rows, key: Tuple, cp=None) -> Optional[str]:
        """The attention backend for these inputs ("fastest": measured here, eagerly, before any graph capture;
        under context parallelism, the first rank's measurement on every rank)."""
        c = self.config
        if c.attention != "fastest":  # every step goes through here: nothing to build for a fixed choice
            return None if c.attention == "default" else c.attention
        eager = EngineOptions(c.batch_branches, c.reuse_prefix, "separate", None)
        subnets = plan.warmup_subnets(self._plan_config(cp), state.num_blocks)
        run = lambda: self.predictor(self.adapter, model, rows, subnets, eager)  # noqa: E731
        measured = key in state.attention.chosen
        backend = state.attention.backend_for(key, run, model.device)
        if cp is not None and not measured:
            backend = state.attention.chosen[key] = distributed.broadcast_object(backend, cp.group)
        return backend

    def _warm_up(self, model, state: _Denoiser, rows, key: Tuple, fork_mode: str) -> None:
        """Before the first step of a new input shape (or LoRA scale, autocast state, config, fork mode):
        discarded predictions whose sub-networks fork as early as any mask can (plan.warmup_predictions), so
        every (block, lane) graph a later mask needs is captured now, not mid-sampling."""
        predictions = plan.warmup_predictions(self.config, state.num_blocks, fork_mode)
        done = (key, predictions, state.graphs.variant, graph_context(self.adapter, rows), fork_mode)
        if done in state.graphs.warmed or state.graphs.failure is not None:  # done already, or graphs failed
            return
        state.graphs.warmed.add(done)
        for subnets in predictions:
            self.predictor(self.adapter, model, rows, subnets, self.options(state, fork_mode))

    # --- the forward that the pipeline calls ------------------------------------------------------------------
    def forward(self, pipe, model, frame_locals: Dict[str, Any], args: tuple, kwargs: Dict[str, Any]):
        """One transformer call of ``pipe``'s denoising loop (s2fast/binding.py decided it is one)."""
        state = self.state(model)
        call_locals = PipelineLocals(frame_locals, self.adapter, pipe)
        inputs = _call_inputs(state.signature, model, args, kwargs)
        run = self._run_for(pipe, call_locals)
        if run.guided:
            self.adapter.check_call(call_locals, inputs)
        elif self._stock_call(run, call_locals, inputs):
            return self._stock_forward(pipe, model, run, call_locals, args, kwargs)
        step = self.adapter.step_index(call_locals, run.steps_served)
        # The calls of one step come in the loop's order: after the first, the ones it announced are served.
        follow_up = run.follow_up
        if follow_up is not None and follow_up.step == step:
            follow_up.remaining -= 1
            if follow_up.remaining == 0:
                run.follow_up = None
            return self.adapter.follow_up_response(follow_up.value, inputs)
        if step >= run.steps:
            raise RuntimeError(f"s2fast: step {step} of a {run.steps}-step call; the pipeline's loop is not "
                               "the one s2fast supports")
        request = self.adapter.request(pipe, call_locals, inputs, run.memo)
        guidance = run.guidance(self.config, step, state.num_blocks, self.fixed_blocks(run, model))
        denoiser = self.adapter.denoiser_called(pipe, call_locals, model)
        cache = self._step_cache(run, model, step, denoiser)
        stored = run.corrections.get(denoiser)
        guidance = plan.with_correction_reuse(self.config, guidance, None if stored is None else stored.reused)
        d, predictions = self._guided(pipe, model, state, run, call_locals, request, guidance, denoiser, cache)
        if request.finish is not None:  # the pipeline's post-processing, with the true cond (StepRequest.finish)
            part = request.guided_part or (lambda p: p)
            d = request.finish(d, part(predictions[request.cond_branch]))
        run.trace[step] = guidance.subnets  # a reuse step's mask too: drawn as at k = 1, so trace replays the call
        run.denoisers[step] = denoiser
        run.records[step] = step_record(guidance, cache)
        run.steps_served += 1
        run.follow_up = _FollowUp(step, d, request.follow_ups) if request.follow_ups else None
        return request.respond(d, predictions)

    def _stock_call(self, run: _Run, call_locals: PipelineLocals, inputs: Dict[str, Any]) -> bool:
        """Whether this call, which needs no sub-network at any step, runs the stock forward: where something s2fast
        refuses is present (a hook found at the call's start, or an input check_call refuses, decided at its first
        transformer call). Otherwise the engine serves it, batching the branches a two-call loop makes separately
        (the same function, to batch rounding)."""
        if run.stock_forward is None:
            try:
                self.adapter.check_call(call_locals, inputs)
                run.stock_forward = False
            except ValueError:
                run.stock_forward = True
        return run.stock_forward

    def _stock_forward(self, pipe, model, run: _Run, call_locals: PipelineLocals, args: tuple, kwargs: Dict[str, Any]):
        step = self.adapter.step_index(call_locals, run.steps_served)
        if 0 <= step < run.steps:
            run.denoisers[step] = self.adapter.denoiser_called(pipe, call_locals, model)
            run.records[step] = StepRecord("full", "none")
        run.steps_served += 1  # counts calls here; only adapters with one call a step (DiT) index steps by it
        return type(model).forward(model, *args, **kwargs)

    def _step_cache(self, run: _Run, model, step: int, denoiser: Optional[str]) -> Optional[StepCache]:
        """This step's BlockCache state, or None without a cache. The first and last steps, the warm-up steps and a
        step whose denoiser differs from the last step's (an expert switch) run fully whatever the change."""
        cache = getattr(self.config, "cache", None)
        if cache is None:
            return None
        store = run.stores.setdefault(id(model), CacheStore())
        forced = (step == 0 or step >= run.steps - 1 or step < cache.warmup_steps
                  or run.denoisers[step - 1] != denoiser)
        return StepCache(cache, store, may_cache=not forced)

    def _guided(self, pipe, model, state: _Denoiser, run: _Run, call_locals: PipelineLocals, request: StepRequest,
                guidance: StepGuidance, denoiser: Optional[str] = None, cache: Optional[StepCache] = None):
        """(D, the predictions for ``request.respond``) for this step; with the fused step, x_{t−1} too (stashed for
        the scheduler's step). A step whose plan has no uncond rows computes the cond rows only, and the cond
        prediction stands in the uncond branch's place for ``respond``. A step that reuses the S² correction runs
        no sub-network and combines with ``denoiser``'s stored Δ; a step that computes one stores its Δ when the
        config reuses it (correction_every > 1)."""
        rows = request.rows
        with_uncond = rows.count == 2 and guidance.uncond
        if rows.count == 2 and not with_uncond:
            rows = rows.only(request.cond_branch)
        subnets = guidance.subnets if guidance.computes_subnets else ()
        preds = self.predictions(model, state, run, rows, subnets, cache)
        if rows is not request.rows:  # [cond, subs...] -> the request's branches, cond in the uncond slot too
            preds = [preds[0]] * request.rows.count + list(preds[1:])
        part = request.guided_part or (lambda p: p)
        branches = request.rows.count
        uncond = part(preds[request.uncond_branch]) if with_uncond else None
        cond, subs = part(preds[request.cond_branch]), [part(p) for p in preds[branches:]]
        scale = None if uncond is None else request.guidance_scale + guidance.guidance_offset
        correction = None
        if guidance.reuse_correction:
            stored = run.corrections[denoiser]
            stored.reused += 1
            correction = stored.delta
        elif guidance.correction == "computed" and getattr(self.config, "correction_every", 1) > 1:
            run.corrections[denoiser] = _StoredCorrection(correction_of(cond, subs))
        if not run.fused_decided:
            # An adapter without the fused step never gets here with fused_step=True: wrap refuses that.
            run.fused = None
            if self.adapter.supports_fused_step:
                latents, _ = self.adapter.loop_sample(call_locals)
                run.fused = fused_step_for_call(pipe, self.config, latents, cond.shape, self._scheduler_hooks)
            run.fused_decided = True
        # the fused step computes x_{t−1} from guided_prediction's D: not from a family's own combine or finish
        if run.fused is not None and request.combine is None and request.finish is None:
            latents, t = self.adapter.loop_sample(call_locals)
            d = run.fused.step(pipe.scheduler, latents, t, cond, uncond, subs, scale, guidance.omega,
                               correction=correction)
        elif correction is not None:
            d = (request.combine or guided_prediction)(cond, uncond, subs, scale, guidance.omega, correction=correction)
        else:
            d = (request.combine or guided_prediction)(cond, uncond, subs, scale, guidance.omega)
        return d, preds

    def predictions(self, model, state: _Denoiser, run: _Run, rows, subnets,
                    cache: Optional[StepCache] = None) -> List[torch.Tensor]:
        """The engine's predictions of ``rows`` (each branch) and ``subnets`` (each sub-network of the cond branch)
        under the config's engine options: block graphs, the attention backend and the fork mode decided here.
        Under context parallelism every branch's rows are split as the plan splits the model's own inputs, and the
        predictions come back whole (s2fast/context_parallel.py)."""
        cp = self.context_parallel(run, model)
        if cp is not None:
            rows = rows.map_inputs(lambda inputs: context_parallel.shard_inputs(cp, inputs))
        self._decide_graphs(model, state, cp)
        graphs = state.graphs
        # the input signature keys graph warm-ups and attention measurements; plain runs skip computing it
        key = self._input_key(rows) if graphs is not None or self.config.attention == "fastest" else None
        backend = self._attention_for(model, state, rows, key, cp)
        with attention_backend(backend):
            fork_mode = self._fork_mode(model, state, run, rows)
            if graphs is not None:
                if ("graphs_checked", id(model)) not in run.memo:  # once per call: weights replaced since? recapture
                    run.memo[("graphs_checked", id(model))] = True
                    graphs.check_model(model)
                graphs.ping_pong = self.config.graph_outputs == "ping_pong"
                graphs.variant = (backend, self.config.compile_blocks, self.config.graph_outputs)
                self._warm_up(model, state, rows, key, fork_mode)
            predictions = self.predictor(self.adapter, model, rows, subnets, self.options(state, fork_mode, cache))
        if cp is not None and cp.root_gather is not None:
            predictions = [context_parallel.gather_prediction(cp, model, p) for p in predictions]
        return predictions

    # --- context parallelism (s2fast/context_parallel.py) --------------------------------------------------------
    def context_parallel(self, run: _Run, model) -> Optional[context_parallel.ContextParallel]:
        """The context parallelism on ``model`` for this pipeline call (looked up once per call: it may be enabled
        between calls); ValueError for what the config asks that it cannot serve."""
        memo = ("context_parallel", id(model))
        if memo not in run.memo:
            cp = context_parallel.find(self.adapter, model) if self.hooked(run, model) else None
            if cp is not None:
                refuse_under_context_parallel(cp, self.config, model, self.adapter.num_blocks(model))
            run.memo[memo] = cp
        return run.memo[memo]

    def hooked(self, run: _Run, model) -> bool:
        """Whether ``model`` carries any diffusers or accelerate hook at this pipeline call: one walk of its modules
        per call (context parallelism and the hook check both ask; at a launch-bound shape a walk is ~0.2 ms)."""
        memo = ("hooked", id(model))
        if memo not in run.memo:
            run.memo[memo] = binding.has_hooks(model)
        return run.memo[memo]

    def fixed_blocks(self, run: _Run, model) -> Tuple[int, ...]:
        cp = self.context_parallel(run, model)
        return cp.fixed_blocks if cp is not None else ()

    def share_seed(self, run: _Run, models) -> None:
        """A seed drawn for this call (the config's is None), made the same on every rank that shares the sample:
        the default group under branch parallelism, else the first context-parallel mesh among ``models``. Ranks
        that drew their own masks would wait in collectives forever."""
        if getattr(self.config, "seed", None) is not None or run.memo.get("seed_shared"):
            return
        run.memo["seed_shared"] = True
        if getattr(self.config, "branch_parallel", False):
            group = torch.distributed.group.WORLD
        else:
            cp = next((cp for cp in (self.context_parallel(run, m) for m in models) if cp is not None), None)
            group = cp.group if cp is not None else None
        if group is not None:
            run.seed = distributed.shared_seed(None, lambda: run.seed, group)
            run.schedules.clear()

    def _plan_config(self, cp):
        return context_parallel.with_protected(self.config, cp.fixed_blocks) if cp is not None else self.config

    def _run_for(self, pipe, call_locals: PipelineLocals) -> _Run:
        timesteps = self.adapter.call_schedule(pipe, call_locals)
        if self._run is None or self._run.timesteps is not timesteps:
            # A new pipeline call: set_timesteps made a new tensor. The plan of every denoiser is made before the
            # first step runs, so a schedule error (explicit masks of the wrong length, a model with nothing to
            # drop) is raised before anything is computed, and whether any step needs a sub-network is known. A
            # call whose every step is plain CFG (no sub-network) is stock's: nothing is refused (_stock_call).
            # Otherwise hooks added since wrap (or present at wrap, where the config left the need to the call)
            # are refused.
            n = len(timesteps)
            seed = getattr(self.config, "seed", None)
            seed = seed if seed is not None else mask_sampling.fresh_seed()
            run = _Run(timesteps, n, [()] * n, [None] * n, seed=seed, sigmas=call_sigmas(self.config, pipe, timesteps),
                       records=[None] * n)
            models = self.denoiser_models(pipe)
            self.share_seed(run, [model for _, model in models])  # ranks that share the sample: rank 0's seed
            for _, model in models:
                run.guidance(self.config, 0, self.state(model).num_blocks, self.fixed_blocks(run, model))
            # a cache changes the result too: such a call is never stock's
            run.guided = getattr(self.config, "cache", None) is not None or any(
                step.subnets or not step.uncond or step.guidance_offset != 0
                for steps in run.schedules.values() for step in steps)
            if run.guided:
                since_wrap = bool(self.config.subnets_needed())
                for name, model in models:  # incompatible_hooks walks again, with names, only where a hook is
                    if self.hooked(run, model):
                        refuse_incompatible_hooks(pipe, name, model, since_wrap=since_wrap)
            elif any(self.hooked(run, model) and binding.incompatible_hooks(model) for _, model in models):
                run.stock_forward = True
            self._run = run
        return self._run

    def trace(self) -> Tuple:
        steps = self._run.trace if self._run is not None else []
        return tuple(public_step_form(step, plan.num_masks(self.config)) for step in steps)

    def trace_steps(self) -> Tuple[Optional[StepRecord], ...]:
        return tuple(self._run.records) if self._run is not None else ()

    def trace_denoisers(self) -> Tuple[Optional[str], ...]:
        return tuple(self._run.denoisers) if self._run is not None else ()

    def graph_stats(self) -> Optional[Dict[str, int]]:
        stats = [s.graphs.stats.as_dict() for s in self._models.values() if s.graphs is not None]
        if not stats:
            return None
        return {k: sum(s[k] for s in stats) for k in stats[0]}


def step_record(guidance: StepGuidance, cache: Optional[StepCache]) -> StepRecord:
    """What a step ran, for s2fast.trace_steps: its blocks, and its correction (the sub-network term)."""
    cached = cache is not None and cache.cached
    correction = guidance.correction  # "none", "computed", or "reused" (S2Config.correction_every's stored Δ)
    if correction == "computed" and cached and not cache.recompute_subnets:
        correction = "reused"  # the sub-network rows took the last full step's residual (BlockCache subnet "reuse")
    return StepRecord("cached" if cached else "full", correction)


def call_sigmas(config, pipe, timesteps) -> Optional[List[float]]:
    """The noise level each step of this call starts from, when the config places S² by noise level: the
    scheduler's ``sigmas`` as set_timesteps left them for this call, from the first step the loop runs. A loop
    with ``strength`` (image-to-image, inpainting, video-to-video) runs the last ``len(timesteps)`` steps of the
    scheduler's schedule, so its step i starts from ``sigmas[len(scheduler.timesteps) − len(timesteps) + i]``.
    ValueError for a scheduler without sigmas, or a loop whose timesteps are not the end of the scheduler's."""
    if getattr(config, "sigma_interval", None) is None:
        return None
    num_steps = len(timesteps)
    scheduler = getattr(pipe, "scheduler", None)
    sigmas = getattr(scheduler, "sigmas", None)
    full = getattr(scheduler, "timesteps", None)
    start = len(full) - num_steps if full is not None and len(full) >= num_steps else 0
    if sigmas is None or len(sigmas) < start + num_steps:
        raise ValueError(
            f"S2Config.sigma_interval places S² by noise level, but the pipeline's scheduler "
            f"({type(scheduler).__name__}) has no sigmas for the {num_steps} steps of this call; use interval "
            "(fractions of the steps) with this scheduler"
        )
    if start and not _same_steps(full[start:], timesteps):
        raise ValueError(
            f"S2Config.sigma_interval: the loop's {num_steps} timesteps are not the last {num_steps} of its "
            f"scheduler's {len(full)}, so their noise levels cannot be read from the scheduler's sigmas; use "
            "interval (fractions of the steps) with this pipeline"
        )
    return [float(s) for s in sigmas[start:start + num_steps]]


def _same_steps(scheduled, timesteps) -> bool:
    loop = torch.as_tensor(timesteps).detach().to("cpu", scheduled.dtype)
    return loop.shape == scheduled.shape and bool(torch.equal(loop, scheduled.detach().cpu()))


def _call_inputs(signature: inspect.Signature, model, args: tuple, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """The call's arguments by name. Pipelines pass keywords (SD3, Flux): then a dict of them, checked against the
    forward's parameters; ``Signature.bind`` only where there are positional ones (DiT), since it costs ~70 µs a call
    on a 2-core CPU against ~3 µs."""
    if args:
        inputs = signature.bind(model, *args, **kwargs).arguments
        inputs.pop("self", None)
        return inputs
    unknown = [k for k in kwargs if k not in signature.parameters]
    if unknown and not any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
        raise TypeError(f"{type(model).__name__}.forward() got unexpected keyword arguments {unknown}")
    return dict(kwargs)


def refuse_incompatible_hooks(pipe, name: str, model, since_wrap: bool = False) -> None:
    found = binding.incompatible_hooks(model)
    if found:
        when = " (added after s2fast.wrap)" if since_wrap else ""
        cache = any("(a cache)" in f for f in found)
        hint = " (a cache: transformer.disable_cache())" if cache else ""
        instead = (". For a step cache under S² use s2fast's own, which keeps a residual per branch and "
                   "sub-network: S2Config(cache=s2fast.BlockCache(threshold=...))") if cache else ""
        raise ValueError(
            f"s2fast cannot run S² under what is on {type(pipe).__name__}.{name}{when}: " + "; ".join(found)
            + f". Remove it{hint}, or s2fast.unwrap the pipeline to use it{instead}")


def refuse_under_context_parallel(cp, config, model, num_blocks: int) -> None:
    found = context_parallel.refusals(cp, config, num_blocks)
    if found:
        raise ValueError(f"s2fast cannot run S² on this {type(model).__name__} under context parallelism: "
                         + "; ".join(found))


def check_attachable(adapter, config: S2Config, pipe, name: str, model, graph_backend=None) -> None:
    """Every check wrap makes on one denoiser, before anything changes (ValueError naming the problem)."""
    check_model(adapter, pipe, name, model)
    needed = config.subnets_needed()
    if needed is not False:  # the config names blocks this model lacks: wrong for every call that uses them
        config.check_blocks(adapter.num_blocks(model))
    elif getattr(config, "cache", None) is not None:  # a cache serves calls without a sub-network too
        config.cache.check_blocks(adapter.num_blocks(model), type(config).__name__)
    if needed:  # otherwise per call, for the calls that need a sub-network (Controller._run_for)
        refuse_incompatible_hooks(pipe, name, model)
    cp = context_parallel.find(adapter, model) if binding.has_hooks(model) else None
    if cp is not None:
        refuse_under_context_parallel(cp, config, model, adapter.num_blocks(model))
    if binding.find(model) is None and binding.base_slot(model) is None:
        raise ValueError(binding.unknown_forward_message(model))
    if config.cuda_graphs is True and graph_backend is None:
        if binding.model_offloaded(model):
            raise ValueError(OFFLOAD_GRAPHS_REFUSAL)
        if model.device.type != "cuda":
            raise ValueError(cuda_graphs_refusal(model.device))
