"""What a model family tells the engine and the controller, and helpers every family shares.

A family adapter has two halves:
- the model: its ordered block list, how inputs are embedded into the state that flows between blocks (``flow``),
  the per-row constants every block reads (``row_consts``, batch-first), the constants shared by all rows
  (``shared``), how one block is called, and the output head;
- the pipeline: how one transformer call inside the pipeline's denoising loop maps to branches (uncond, cond), the
  guidance scale, and what value to hand back so that the pipeline's own CFG line yields Eq. 4.
"""

from __future__ import annotations

import abc
import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from .rows import BranchRows

Flow = List[Optional[torch.Tensor]]


@dataclass
class LaneState:
    """The state of one batch of rows between blocks. ``None`` in ``flow`` marks a slot no later block reads
    (SD3's last block returns no text stream)."""

    flow: Flow
    row_consts: List[torch.Tensor]
    shared: Dict[str, Any]


@dataclass
class StepRequest:
    """What one pipeline transformer call asks of the engine.

    ``guidance_scale`` is λ when the rows hold [uncond, cond] branches, None when they hold cond only.
    ``respond(D, predictions)`` turns the guided prediction D into the value this call returns to the pipeline
    (``predictions`` are the engine's, for families whose output carries more than what is guided).
    ``follow_ups`` is how many more transformer calls the pipeline's loop makes in this step (Flux's true CFG calls
    cond, then uncond): the first call computes every branch and those calls are served its D, in order.
    ``guided_part`` selects what Eq. 4 combines from a prediction (DiT: the eps channels, not the learned sigma).
    ``finish(D, cond)`` is the pipeline's own post-processing of its combined prediction, applied to Eq. 4's D with
    the true cond prediction where the pipeline reads its cond (Qwen-Image's norm rescale ``D·‖C‖/‖D‖``): its result
    is what this call and its follow-ups return, and the pipeline's own post-processing of that value (both calls
    served the same value) changes nothing. A step with ``finish`` or ``combine`` runs unfused (set
    ``supports_fused_step = False`` on such an adapter, so that ``fused_step=True`` is refused at wrap).
    """

    rows: BranchRows
    guidance_scale: Optional[float]
    respond: Callable[[torch.Tensor, List[torch.Tensor]], Any]
    follow_ups: int = 0
    guided_part: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    finish: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None
    # combine(cond, uncond, subs, λ, ω) -> D: Eq. 4 in the pipeline's own form and precision where it differs from
    # ``U + λ(C − U)`` in the model dtype (Z-Image: ``C + λ(C − U)`` in fp32); None is kernels.guided_prediction.
    combine: Optional[Callable[..., torch.Tensor]] = None

    @property
    def cond_branch(self) -> int:
        return self.rows.cond_branch

    @property
    def uncond_branch(self) -> Optional[int]:
        return 1 - self.rows.cond_branch if self.rows.count == 2 else None


class PipelineLocals:
    """The locals of a pipeline's ``__call__`` at one transformer call, as an adapter may read them: only the names
    it declares (``pipeline_locals``, bound at every call, and ``optional_locals``, read only where the loop has set
    them). diffusers hands the same locals by name to ``callback_on_step_end``, which is what keeps them stable;
    a declared name the installed pipeline lacks is a clear error, an undeclared read a bug in the adapter."""

    def __init__(self, frame_locals: Dict[str, Any], adapter: "FamilyAdapter", pipe):
        missing = [name for name in adapter.pipeline_locals if name not in frame_locals]
        if missing:
            import diffusers

            raise RuntimeError(
                f"s2fast cannot read {missing} in {type(pipe).__name__}.__call__ (diffusers {diffusers.__version__}); "
                "s2fast supports the pipelines of diffusers 0.42"
            )
        self._locals = frame_locals
        self._declared = frozenset(adapter.pipeline_locals) | frozenset(adapter.optional_locals)
        self._owner = f"{type(adapter).__name__} ({type(pipe).__name__})"

    def _check(self, name: str) -> None:
        if name not in self._declared:
            raise RuntimeError(f"s2fast: {self._owner} reads the pipeline local {name!r} without declaring it in "
                               "pipeline_locals or optional_locals")

    def __getitem__(self, name: str):
        self._check(name)
        try:
            return self._locals[name]
        except KeyError:
            raise RuntimeError(f"s2fast: {self._owner}: the pipeline's loop has not set {name!r} here") from None

    def get(self, name: str, default=None):
        self._check(name)
        return self._locals.get(name, default)


class ModelAdapter(abc.ABC):
    """The model half of an adapter: what the engine needs to run a family's blocks (s2fast/engine.py). Every
    method mirrors the family's ``forward`` op for op, so a pass through them is the stock forward."""

    model_classes: Tuple[str, ...] = ()
    batched_inputs: Tuple[str, ...] = ()
    attention_kwargs_key: str = "joint_attention_kwargs"

    @abc.abstractmethod
    def blocks(self, model) -> List[torch.nn.Module]:
        """The model's blocks in the order its forward runs them (block indices of masks index this list)."""

    @abc.abstractmethod
    def embed(self, model, inputs: Dict[str, Any]) -> LaneState:
        """The model's forward up to its first block: the flow, the per-row constants and the shared ones."""

    @abc.abstractmethod
    def run_block(self, block, flow: Flow, row_consts: List[torch.Tensor], shared: Dict[str, Any]) -> Flow:
        """One block on one lane's rows."""

    @abc.abstractmethod
    def head(self, model, state: LaneState) -> torch.Tensor:
        """The model's forward after its last block: the prediction of every row of the lane."""

    @abc.abstractmethod
    def skipped_block_output(self, args: tuple, kwargs: Dict[str, Any]) -> Any:
        """What a skipped block returns when called as the model's forward calls it (``args``, ``kwargs``): its
        inputs, unchanged, in the block's own return order (the naive three-pass reference uses it)."""

    def num_blocks(self, model) -> int:
        return len(self.blocks(model))


class FamilyAdapter(ModelAdapter):
    """A model half plus the pipeline half: how one transformer call of the pipeline's denoising loop maps to
    branches (uncond, cond), the guidance scale, and what value to hand back so that the pipeline's own CFG line
    yields Eq. 4. Register one for a pipeline class with :func:`s2fast.register_adapter`."""

    # The pipeline attributes that hold the models this adapter drives (several where the loop switches between
    # experts by step); the controller serves whichever the loop calls.
    denoisers: Tuple[str, ...] = ("transformer",)
    # Locals of the pipeline's __call__ the adapter reads (PipelineLocals): bound at every transformer call, or
    # (optional_locals) read only where the loop has set them. A test checks them against the installed pipelines.
    pipeline_locals: Tuple[str, ...] = ("i", "t", "timesteps", "latents")
    optional_locals: Tuple[str, ...] = ()
    # Whether the pipeline's loop fits the fused step (x_t and t in loop_sample's locals, then
    # `scheduler.step(noise_pred, t, latents)`).
    supports_fused_step: bool = True
    # Why not, for the error S2Config(fused_step=True) raises at wrap when supports_fused_step is False.
    fused_step_refusal: str = "its loop keeps x_t where the fused step cannot take it"
    # What the README's table of supported pipelines says of this adapter (written from the registry by
    # s2fast/adapters/table.py): the family ("" -> the adapter's module name), how its pipeline applies CFG and
    # how S² is served there, the schedulers it runs with, and what it refuses while wrapped (ValueError at the call).
    family: str = ""
    cfg_style: str = "the pipeline's CFG line, handed a value that makes it yield Eq. 4"
    schedulers: str = "the pipeline's own"
    refuses: Tuple[str, ...] = ()

    @abc.abstractmethod
    def request(self, pipe, call_locals: PipelineLocals, inputs: Dict[str, Any], memo: Dict[str, Any]) -> StepRequest:
        """What this transformer call asks of the engine (the first call of a step)."""

    def call_schedule(self, pipe, call_locals: PipelineLocals):
        """The call's timesteps: a new object for every pipeline call (set_timesteps makes one), len() = steps."""
        return call_locals["timesteps"]

    def step_index(self, call_locals: PipelineLocals, steps_so_far: int) -> int:
        """This step's index; ``steps_so_far`` counts the steps of this call already served."""
        return int(call_locals["i"])

    def denoiser_called(self, pipe, call_locals: PipelineLocals, model) -> Optional[str]:
        """The pipeline attribute through which the loop called ``model`` (what ``s2fast.trace_denoisers`` names). An
        adapter whose loop picks among attributes that may hold one model (Wan 2.2's experts) reads the loop's
        choice from its locals."""
        return next((name for name in self.denoisers if getattr(pipe, name, None) is model), None)

    def loop_sample(self, call_locals: PipelineLocals) -> Tuple[torch.Tensor, Any]:
        """(x_t, t) as the loop will pass them to ``scheduler.step``: what the fused step computes x_{t−1} from."""
        return call_locals["latents"], call_locals["t"]

    def follow_up_response(self, d: torch.Tensor, inputs: Dict[str, Any]):
        """The value a follow-up call returns, given the D its step's first call computed."""
        return model_output(d, inputs.get("return_dict", True))

    def check_call(self, call_locals: PipelineLocals, inputs: Dict[str, Any]) -> None:
        """Raise a clear error for pipeline features that S² cannot serve (checked at each call)."""

    def check_denoiser(self, model) -> None:
        """Raise a clear error for a model of the right class whose configuration S² cannot serve (checked at wrap
        and for a denoiser replaced since)."""


class TwoStreamAdapter(FamilyAdapter):
    """Families whose blocks take ``(hidden_states, encoder_hidden_states, temb, ..., joint_attention_kwargs)`` and
    return ``(encoder, hidden)``, encoder first (SD3, Flux). The flow is kept as [hidden, encoder]."""

    # call inputs S² cannot serve -> what they are, for the error message
    unsupported_inputs: Dict[str, str] = {}

    def block_extras(self, shared: Dict[str, Any]) -> Dict[str, Any]:
        """Family-specific block arguments taken from the lane's shared constants (Flux: rotary embeddings)."""
        return {}

    def run_block(self, block, flow, row_consts, shared):
        encoder, hidden = block(
            hidden_states=flow[0],
            encoder_hidden_states=flow[1],
            temb=row_consts[0],
            joint_attention_kwargs=shared["attention_kwargs"],
            **self.block_extras(shared),
        )
        return [hidden, encoder]

    def skipped_block_output(self, args, kwargs):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        encoder = kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else args[1]
        return encoder, hidden

    def check_call(self, call_locals, inputs):
        for key, what in self.unsupported_inputs.items():
            if inputs.get(key) is not None:
                raise ValueError(f"s2fast does not combine S² with {what}; unwrap the pipeline (s2fast.unwrap) to use it")
        kwargs = inputs.get(self.attention_kwargs_key) or {}
        if "ip_adapter_image_embeds" in kwargs:
            raise ValueError("s2fast does not support IP-Adapter yet; unwrap the pipeline (s2fast.unwrap) to use it")


def model_output(value: torch.Tensor, return_dict: bool):
    """Wrap a prediction the way diffusers' transformers return it."""
    if not return_dict:
        return (value,)
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    return Transformer2DModelOutput(sample=value)


def split_lora_scale(kwargs: Optional[Dict[str, Any]]) -> Tuple[Optional[Dict[str, Any]], float]:
    """The attention kwargs without ``scale``, and that LoRA scale (1.0 when absent), as ``apply_lora_scale`` does."""
    if kwargs is None or "scale" not in kwargs:
        return kwargs, 1.0
    kwargs = dict(kwargs)
    return kwargs, kwargs.pop("scale")


@contextlib.contextmanager
def lora_scale_context(model, scale: float):
    """Scale the PEFT LoRA layers for the duration, as diffusers' ``apply_lora_scale`` does around a forward."""
    from diffusers.utils import USE_PEFT_BACKEND, scale_lora_layers, unscale_lora_layers

    if USE_PEFT_BACKEND:
        scale_lora_layers(model, scale)
    try:
        yield
    finally:
        if USE_PEFT_BACKEND:
            unscale_lora_layers(model, scale)
