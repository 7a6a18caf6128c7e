"""What a model family tells the engine and the controller, and helpers every family shares.

A family adapter has two halves:
- the model: its ordered block list, how inputs are embedded into the state that flows between blocks (``flow``),
  the per-row constants every block reads (``row_consts``, batch-first), the constants shared by all rows
  (``shared``), how one block is called, and the output head;
- the pipeline: how one transformer call inside the pipeline's denoising loop maps to branches (uncond, cond), the
  guidance scale, and what value to hand back so that the pipeline's own CFG line yields Eq. 4.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

Flow = List[Optional[torch.Tensor]]


@dataclass
class LaneState:
    """The state of one batch of rows between blocks. ``None`` in ``flow`` marks a slot no later block reads
    (SD3's last block returns no text stream)."""

    flow: Flow
    row_consts: List[torch.Tensor]
    shared: Dict[str, Any]


class BranchRows:
    """The model inputs of ``count`` branches (uncond, cond, ...) of B rows each.

    ``stacked`` holds all branches concatenated along the batch dimension (what one batched call takes), and
    ``branch(j)`` one branch's inputs; with two branches, the one that is not ``cond_branch`` is the uncond one.
    Inputs named in ``batched_keys`` carry the batch dimension; the others
    (position ids, attention kwargs) are shared and must be equal across branches to be stacked.
    """

    def __init__(self, batched_keys: Sequence[str], count: int, stacked: Dict[str, Any] = None,
                 branches: Sequence[Dict[str, Any]] = None, cond_branch: Optional[int] = None):
        if (stacked is None) == (branches is None):
            raise ValueError("BranchRows needs exactly one of stacked and branches")
        self.batched_keys = tuple(batched_keys)
        self.count = count
        # Which branch is the conditional one (the sub-networks fork from it): the last by default ([uncond, cond]
        # or [cond]); DiT's pipeline stacks [cond, uncond].
        self.cond_branch = count - 1 if cond_branch is None else cond_branch
        self._stacked = stacked
        self._branches = list(branches) if branches is not None else None
        self._unstackable = False
        if self._branches is not None and len(self._branches) != count:
            raise ValueError(f"BranchRows: {len(self._branches)} branches given for count={count}")

    @property
    def rows_per_branch(self) -> int:
        if self._branches is not None:
            return self._branches[0]["hidden_states"].shape[0]
        return self._stacked["hidden_states"].shape[0] // self.count

    def branch(self, j: int) -> Dict[str, Any]:
        if self._branches is not None:
            return self._branches[j]
        b = self.rows_per_branch
        return {k: (v.narrow(0, j * b, b) if k in self.batched_keys and v is not None else v)
                for k, v in self._stacked.items()}

    def stacked(self) -> Optional[Dict[str, Any]]:
        """All branches in one batch, or None when their shared inputs differ (they cannot share a call)."""
        if self._stacked is None and not self._unstackable:
            self._stacked = _stack(self._branches, self.batched_keys)
            self._unstackable = self._stacked is None
        return self._stacked


def _stack(branches: Sequence[Dict[str, Any]], batched_keys: Sequence[str]) -> Optional[Dict[str, Any]]:
    first = branches[0]
    out: Dict[str, Any] = {}
    for k, v in first.items():
        if k in batched_keys and v is not None:
            out[k] = torch.cat([b[k] for b in branches], dim=0)
        elif all(_same(v, b[k]) for b in branches[1:]):
            out[k] = v
        else:
            return None
    return out


def _same(a, b) -> bool:
    if a is b:
        return True
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))
    try:
        return bool(a == b)
    except (RuntimeError, TypeError, ValueError):  # e.g. dicts holding tensors: treat as different, run apart
        return False


@dataclass
class StepRequest:
    """What one pipeline transformer call asks of the engine.

    ``guidance_scale`` is λ when the rows hold [uncond, cond] branches, None when they hold cond only.
    ``respond(D, predictions)`` turns the guided prediction D into the value this call returns to the pipeline
    (``predictions`` are the engine's, for families whose output carries more than what is guided).
    ``guided_part`` selects what Eq. 4 combines from a prediction (DiT: the eps channels, not the learned sigma).
    """

    rows: BranchRows
    guidance_scale: Optional[float]
    respond: Callable[[torch.Tensor, List[torch.Tensor]], Any]
    notes: Dict[str, Any] = field(default_factory=dict)
    guided_part: Optional[Callable[[torch.Tensor], torch.Tensor]] = None

    @property
    def cond_branch(self) -> int:
        return self.rows.cond_branch

    @property
    def uncond_branch(self) -> Optional[int]:
        return 1 - self.rows.cond_branch if self.rows.count == 2 else None


class FamilyAdapter:
    """Base of the per-family adapters. Subclasses fill in the class attributes and the model methods."""

    model_classes: Tuple[str, ...] = ()
    batched_inputs: Tuple[str, ...] = ()
    attention_kwargs_key: str = "joint_attention_kwargs"
    # Locals of the pipeline's __call__ that the binding reads; checked once per call for a clear error.
    pipeline_locals: Tuple[str, ...] = ("i", "t", "timesteps", "latents")
    # Whether the pipeline's loop fits the fused step (x_t in `latents`, `scheduler.step(noise_pred, t, latents)`).
    supports_fused_step: bool = True

    # --- model -------------------------------------------------------------------------------------------
    def blocks(self, model) -> List[torch.nn.Module]:
        raise NotImplementedError

    def embed(self, model, inputs: Dict[str, Any]) -> LaneState:
        raise NotImplementedError

    def run_block(self, block, flow: Flow, row_consts: List[torch.Tensor], shared: Dict[str, Any]) -> Flow:
        raise NotImplementedError

    def head(self, model, state: LaneState) -> torch.Tensor:
        raise NotImplementedError

    def skipped_block_output(self, args: tuple, kwargs: Dict[str, Any]) -> Any:
        """What a skipped block returns, in the block's own return order: its inputs, unchanged."""
        raise NotImplementedError

    # --- pipeline ------------------------------------------------------------------------------------------
    def request(self, pipe, call_locals: Dict[str, Any], inputs: Dict[str, Any], memo: Dict[str, Any]) -> StepRequest:
        raise NotImplementedError

    def call_schedule(self, pipe, call_locals: Dict[str, Any]):
        """The call's timesteps: a new object for every pipeline call (set_timesteps makes one), len() = steps."""
        return call_locals["timesteps"]

    def step_index(self, call_locals: Dict[str, Any], steps_so_far: int) -> int:
        """This step's index; ``steps_so_far`` counts the steps of this call already served."""
        return int(call_locals["i"])

    def is_follow_up(self, call_locals: Dict[str, Any], inputs: Dict[str, Any]) -> bool:
        """True for a second transformer call of the same step whose value was computed by the first one."""
        return False

    def follow_up_response(self, d: torch.Tensor, inputs: Dict[str, Any]):
        """The value a follow-up call returns, given the D its step's first call computed."""
        return model_output(d, inputs.get("return_dict", True))

    def check_call(self, call_locals: Dict[str, Any], inputs: Dict[str, Any]) -> None:
        """Raise a clear error for pipeline features that S² cannot serve (checked at each call)."""

    def num_blocks(self, model) -> int:
        return len(self.blocks(model))


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


def find_pipeline_locals(pipe, required: Sequence[str], max_depth: int = 24) -> Optional[Dict[str, Any]]:
    """The locals of ``pipe.__call__`` when the current transformer call comes from its denoising loop, else None.

    diffusers exposes the same locals by name to ``callback_on_step_end``; reading them here lets a wrapped
    pipeline keep its own ``__call__``. A missing name means an unsupported diffusers version: a clear error.
    """
    frame = sys._getframe(2)
    for _ in range(max_depth):
        if frame is None:
            return None
        if frame.f_code.co_name == "__call__" and frame.f_locals.get("self") is pipe:
            found = frame.f_locals
            missing = [name for name in required if name not in found]
            if missing:
                import diffusers

                raise RuntimeError(
                    f"s2fast cannot read {missing} in {type(pipe).__name__}.__call__ (diffusers {diffusers.__version__}); "
                    "s2fast supports the pipelines of diffusers 0.42"
                )
            return found
        frame = frame.f_back
    return None


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
