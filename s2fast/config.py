"""S2Config: every option of S²-Guidance sampling, validated on construction."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields, replace
from typing import Optional, Sequence, Tuple, Union

from .step_cache import BlockCache

# One sub-network: the sorted block indices it drops.
Mask = Tuple[int, ...]
# One step: () for "S² off", a Mask (num_masks == 1), or a tuple of num_masks Masks (naive S², Eq. 3).
StepMasks = Union[Mask, Tuple[Mask, ...]]

FORK_MODES = ("auto", "join", "separate")
FUSED_STEP = ("auto", True, False)
STEP_MODES = ("fp32", "exact")
CUDA_GRAPHS = ("auto", True, False)
MAX_NUM_MASKS = 64  # naive S² averages N sub-networks, one more pass each: a bound, not a tuning knob
GRAPH_OUTPUTS = ("ping_pong", "per_block")  # s2fast/graphs.py
ATTENTION = ("default", "fastest", "flash", "efficient", "cudnn", "math")  # s2fast/attention.py


@dataclass(frozen=True, kw_only=True)
class EngineSettings:
    """How the engine runs the rows, shared by every guidance config (S2Config documents each field): one place
    for the defaults and for what each accepts, so S2Config and SGGConfig cannot drift apart. Keyword-only, so a
    config's own fields keep their positions."""

    batch_branches: bool = True
    reuse_prefix: bool = True
    fork_mode: str = "auto"
    fused_step: Union[str, bool] = "auto"
    step_mode: str = "fp32"
    cuda_graphs: Union[str, bool] = "auto"
    graph_outputs: str = "ping_pong"
    attention: str = "default"
    compile_blocks: Optional[str] = None
    branch_parallel: bool = False
    cache: Optional[BlockCache] = None

    def _check_engine(self) -> None:
        """Validate the engine fields (ValueError naming ``<Config>.<field>``); numpy bools become bools."""
        owner = type(self).__name__
        for name in ("batch_branches", "reuse_prefix", "branch_parallel"):
            value = getattr(self, name)
            if not (isinstance(value, bool) or (type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_"))):
                raise ValueError(f"{owner}.{name} must be a bool, got {value!r}")
            object.__setattr__(self, name, bool(value))
        if self.fork_mode not in FORK_MODES:
            raise ValueError(f"{owner}.fork_mode must be one of {FORK_MODES}, got {self.fork_mode!r}")
        if not (self.fused_step is True or self.fused_step is False or self.fused_step == "auto"):
            raise ValueError(f"{owner}.fused_step must be 'auto', True or False, got {self.fused_step!r}")
        if not (self.cuda_graphs is True or self.cuda_graphs is False or self.cuda_graphs == "auto"):
            raise ValueError(f"{owner}.cuda_graphs must be 'auto', True or False, got {self.cuda_graphs!r}")
        if self.graph_outputs not in GRAPH_OUTPUTS:
            raise ValueError(f"{owner}.graph_outputs must be one of {GRAPH_OUTPUTS}, got {self.graph_outputs!r}")
        if self.compile_blocks is not None and (not isinstance(self.compile_blocks, str) or not self.compile_blocks):
            raise ValueError(f"{owner}.compile_blocks must be None or a torch.compile backend name such as "
                             f"'inductor', got {self.compile_blocks!r}")
        if self.attention not in ATTENTION:
            raise ValueError(f"{owner}.attention must be one of {ATTENTION}, got {self.attention!r}")
        if self.step_mode not in STEP_MODES:
            raise ValueError(f"{owner}.step_mode must be one of {STEP_MODES}, got {self.step_mode!r}")
        if self.cache is not None and not isinstance(self.cache, BlockCache):
            raise ValueError(f"{owner}.cache must be None or an s2fast.BlockCache, got {type(self.cache).__name__}")
        if self.cache is not None and self.branch_parallel:
            raise ValueError(f"{owner}: cache and branch_parallel cannot be combined (the ranks would each decide "
                             "which steps to cache from rows only one of them holds)")

    def __repr__(self) -> str:  # the method's own fields first, then the engine's (dataclass order is base first)
        names = [f.name for f in fields(self) if f.name not in ENGINE_FIELDS] + list(ENGINE_FIELDS)
        return f"{type(self).__name__}(" + ", ".join(f"{n}={getattr(self, n)!r}" for n in names) + ")"


ENGINE_FIELDS = tuple(f.name for f in fields(EngineSettings))


@dataclass(frozen=True, repr=False)
class S2Config(EngineSettings):
    """Options of S²-Guidance (Chen et al. 2025, arXiv 2508.12880) for :func:`s2fast.wrap`.

    Per denoising step, with the pipeline's own guidance scale λ::

        D = D_u + λ (D_c − D_u) − ω (D_s − D_c)        (paper Eq. 4)
        D = D_c − ω (D_s − D_c)                         (when the pipeline runs without CFG)

    where D_s is the conditional prediction of a sub-network that skips a random set of transformer blocks
    (a skipped block's output is its input). The sub-network is drawn afresh at every step.

    Args:
        omega: ω, the S² scale. Paper default 0.25. ``0`` turns S² off (no sub-network is computed, the result is
            the pipeline's own CFG). Must be finite and ≥ 0.
        drop_ratio: fraction of the droppable blocks each sub-network skips: ``round(drop_ratio · droppable)``
            blocks, at least one. Paper default 0.1. Must lie in (0, 1).
        protected_blocks: block indices that are never dropped (the paper keeps the first block). Indices are
            positions in the family's ordered block list (Flux: the double-stream blocks, then the single-stream
            ones). Checked against the model at :func:`~s2fast.wrap`.
        num_masks: sub-networks per step. ``1`` is S² (Eq. 4); ``N > 1`` is naive S² (Eq. 3): D_s is the mean of
            N sub-network predictions, each with its own mask. At most 64 (each is one more pass per step).
        interval: ``(start, stop)``, the fraction of the steps where S² applies: step ``i`` of ``n`` uses S² when
            ``start ≤ i/n < stop``; the other steps run plain CFG. The paper's ablation finds the central
            ``(0.1, 0.9)`` as good as ``(0.0, 1.0)`` (the default).
        sigma_interval: ``(low, high)``, where S² applies counted in noise levels instead of steps: step ``i`` uses
            S² when ``low ≤ σ_i ≤ high``, σ_i being the scheduler's sigma of the step the loop runs as its i-th (the
            noise level the step starts from; with ``strength`` the loop runs the last part of the schedule), read
            at each call after the pipeline has set its timesteps. ``None`` (default) leaves the choice
            to ``interval``. For flow-matching schedulers, whose σ runs from 1 (noise) to 0 (data), the paper's
            "central 80 % of noise levels" is ``(0.1, 0.9)``. A scheduler without ``sigmas`` (DDIM, DDPM) is
            refused at the call with a ValueError. Cannot be combined with ``masks`` or a non-default ``interval``;
            ``s2fast.trace`` reports the steps that ran S², so ``masks=s2fast.trace(pipe)`` still replays a call.
        seed: seed of the mask generator, which is separate from the pipeline's ``generator`` (turning S² on never
            changes the initial noise, nor torch's global RNG). The same seed gives the same masks on every call;
            ``None`` draws fresh masks on each call. Step ``i``'s masks depend only on the seed and ``i``, so a
            different ``interval`` keeps the masks of the steps both intervals share.
        masks: explicit masks, one entry per denoising step, overriding sampling (and ``interval``): ``()`` turns S²
            off at that step, a tuple of block indices drops those blocks (``num_masks == 1``), and with
            ``num_masks > 1`` each entry is a tuple of ``num_masks`` such tuples. :func:`s2fast.trace` returns
            exactly this form, so ``masks=s2fast.trace(pipe)`` replays a call. The length must equal the number
            of steps of the call.
        correction_every: ``k``, compute the sub-networks on every k-th S² step only, and on the S² steps between
            reuse the correction Δ = S̄ − D_c of the last step that computed it: D = D_u + λ(D_c − D_u) − ωΔ, with
            D_u and D_c of the current step. ``1`` (default) computes them at every S² step (the paper's method,
            bit for bit). ``k > 1`` changes the output (Δ is stale by up to k − 1 steps) and costs between CFG and
            S²: a reuse step runs CFG's rows only. The S² steps (those with a mask, ω > 0) of each denoiser are
            counted: its first one in a call computes, then every k-th (Wan 2.2's experts each keep their own Δ,
            so the first S² step after the switch computes). The masks drawn do not depend on k: a computed step
            drops the blocks it drops at k = 1, a reuse step's mask is drawn and not run, and
            ``s2fast.trace`` reports it, so ``masks=s2fast.trace(pipe)`` with the same k replays a call;
            ``s2fast.trace_steps`` says which steps computed and which reused. Δ is kept per pipeline call and
            denoiser, in the prediction's dtype; nothing carries over to the next call.
        batch_branches: run the uncond, cond and sub-network rows in shared batched block calls (default). When
            ``False`` every branch runs as its own batch-B pass, like separate forward calls; results agree up to
            batch-size rounding (about 1e-6 relative in fp32).
        reuse_prefix: the sub-network starts from the cond rows' cached state at its first dropped block instead of
            recomputing the blocks before it (default). Exact: a block's output does not depend on the rows
            beside it, up to batch-size rounding.
        fork_mode: how the sub-network rows run after the fork, when ``batch_branches`` is on: ``"join"`` appends
            them to the uncond/cond batch (one call per block at batch 3B); ``"separate"`` gives them their own
            batch-B call per block, which keeps the uncond/cond rows bit-identical to the stock batched forward and
            the activation peak at stock's. Joining wins where a step costs per block *call* (small latents, fast
            GPUs: on CPU, S² cost 1.04–1.16 × CFG joined against 1.5–2.2 × separate at 4×4 latents) and only
            costs memory where it costs per row. ``"auto"`` (default) times one prediction in each mode at the
            first step of each input shape (before any graph capture) and joins only when that is at least 5 %
            faster and the extra working set stays under 10 % of the weights; the choice is logged and kept for
            the process, per architecture and input shape, so copies of a model choose alike
            (s2fast/fork_choice.py). Results of the two modes differ by batch-size rounding (~1e-6
            relative in fp32): force a mode where runs in different processes must agree bit for bit.
        fused_step: compute the guidance combination and the FlowMatchEulerDiscreteScheduler update in one kernel
            (s2fast.kernels.guided_flow_step) instead of ten elementwise torch ops; the scheduler's ``step``
            then returns that result and keeps its own state (step index) as the stock step does. ``"auto"``
            (default) fuses when the pipeline's scheduler is FlowMatchEulerDiscreteScheduler and a kernel backend
            (CUDA extension or Triton on a GPU) is available, and otherwise runs unfused (a one-time log notice
            says why); ``True`` always fuses (on the CPU with the torch reference) and raises ValueError for
            another scheduler; ``False`` never fuses. The environment variable S2FAST_BACKEND=torch|triton|cuda
            forces the kernel backend.
        step_mode: the rounding of the fused step. ``"fp32"`` (default) combines and steps in fp32 and rounds once,
            closer to the exact result than the stock sequence; ``"exact"`` reproduces the unfused sequence's
            rounding op by op, bit for bit (use it to compare with diffusers' own output). Unfused steps are always
            the stock sequence.
        cuda_graphs: run every transformer block through a captured CUDA graph (s2fast/graphs.py): one graph per
            (block, lane, shapes), so every mask pattern replays the same graphs and none is recaptured after the
            first step of a new input shape (which runs a warm-up that captures them all: one discarded
            prediction, num_masks + 1 when the sub-network rows join). A capture that fails (a block that synchronises
            with the host) leaves that wrap running its blocks eagerly, logged once.
            ``"auto"`` (default) uses them when the transformer is on a CUDA device; ``True`` requires one
            (ValueError otherwise); ``False`` runs blocks eagerly. ``s2fast.graph_stats(pipe)`` reports the graphs,
            captures, replays and their memory. Numerics are those of the eager blocks (same kernels, replayed).
            A different LoRA scale gets its own graphs, and replaced parameter tensors (a LoRA loaded or fused)
            drop every graph at the next call; other Python-side model changes (set_adapters weights) need an
            unwrap and a wrap. Wrapping again with another config keeps the captured graphs (a graph computes one
            block on one lane, whatever ω or the masks); ``s2fast.unwrap`` releases them and their memory.
        graph_outputs: where block graphs keep their outputs. ``"ping_pong"`` (default): two buffers per lane, block
            j writing where block j − 2's output was, so static memory does not grow with the block count
            (docs/PERFORMANCE.md gives the formula), at one device copy of each block's outputs per call;
            ``"per_block"``: each graph keeps its own outputs (no copy; static memory grows with depth). Results
            are the same either way.
        attention: torch's scaled-dot-product-attention backend for the transformer. ``"default"`` (default) keeps
            torch's own dispatch, so results are the stock pipeline's; ``"fastest"`` times one prediction under
            each backend at the first step of an input shape and keeps the fastest (backends round differently:
            results may change in the last bits); ``"flash"``, ``"efficient"``, ``"cudnn"`` or ``"math"`` forces one.
            The flash-attn package is diffusers' own option (``transformer.set_attention_backend("flash")``).
        compile_blocks: regional compilation: ``torch.compile`` each transformer block with this backend
            (``"inductor"``; ``"eager"`` or ``"aot_eager"`` to debug) while wrapped, so one compiled block function
            serves every mask (a compiled whole model would recompile per skip list). ``None`` (default) compiles
            nothing. Off by default because inductor's fusions change results in the last bits. unwrap restores
            the blocks; blocks the user compiled already are left as they are.
        branch_parallel: split each step's passes (uncond U, cond C, the sub-network S) over the ranks of the
            default ``torch.distributed`` process group, for the latency of one sample: every rank runs the same
            pipeline call (launch with ``torchrun`` or ``accelerate launch``, initialise the group before
            ``s2fast.wrap``), computes its share, all-gathers the predictions and steps identically, so every rank
            ends with the same output. 3 ranks run U ‖ C ‖ S (critical path L block-rows per step, the latency of
            2-GPU CFG-parallel); 2 ranks split U's blocks so both run (3L − k − d)/2 (k: the first dropped block,
            d: blocks dropped), against 3L − k − d in one process (s2fast/branch_parallel.py). Results are those of
            ``batch_branches=False`` in one process. ``reuse_prefix`` sends C's state at the fork to the rank that
            runs S (else S recomputes its prefix there). A config without ``seed`` draws its masks from rank 0's
            seed. ``False`` (default) runs in one process. Refused at wrap (ValueError) without an initialised
            group, with other than 2 or 3 ranks, with ``num_masks > 1``, ``cuda_graphs=True`` or ``attention=
            "fastest"``; the modular guiders do not take it.
        cache: an :class:`s2fast.BlockCache`, a step cache over every lane (uncond, cond and the sub-network):
            steps whose early blocks barely changed the cond rows since the last full step skip the remaining
            blocks and add each lane's own residual from that step (s2fast/step_cache.py). Changes the output, like
            every step cache; ``None`` (default) caches nothing. ``probe_blocks`` must stay below the first
            droppable block (checked here).
    """

    omega: float = 0.25
    drop_ratio: float = 0.1
    protected_blocks: Tuple[int, ...] = (0,)
    num_masks: int = 1
    interval: Tuple[float, float] = (0.0, 1.0)
    seed: Optional[int] = None
    masks: Optional[Tuple[StepMasks, ...]] = None
    sigma_interval: Optional[Tuple[float, float]] = None
    correction_every: int = 1

    def __post_init__(self) -> None:
        # numpy scalars are accepted wherever Python numbers are, and stored as Python numbers (hashable, printable,
        # and equal configs compare equal)
        omega = _real("omega", self.omega)
        if omega < 0:
            raise ValueError(f"S2Config.omega must be >= 0 (it scales the subtracted sub-network term), got {self.omega}")
        object.__setattr__(self, "omega", omega)
        drop_ratio = _real("drop_ratio", self.drop_ratio)
        if not 0.0 < drop_ratio < 1.0:
            raise ValueError(f"S2Config.drop_ratio must lie in (0, 1), got {self.drop_ratio}")
        object.__setattr__(self, "drop_ratio", drop_ratio)
        if not _is_int(self.num_masks) or not 1 <= self.num_masks <= MAX_NUM_MASKS:
            raise ValueError(f"S2Config.num_masks must be an integer from 1 to {MAX_NUM_MASKS} (each mask is one more "
                             f"sub-network pass per step), got {_short(self.num_masks)}")
        object.__setattr__(self, "num_masks", int(self.num_masks))
        if not _is_int(self.correction_every) or self.correction_every < 1:
            raise ValueError("S2Config.correction_every must be an integer >= 1 (1 computes the sub-network at every "
                             f"S² step), got {_short(self.correction_every)}")
        object.__setattr__(self, "correction_every", int(self.correction_every))
        object.__setattr__(self, "protected_blocks", _index_tuple("protected_blocks", self.protected_blocks))
        object.__setattr__(self, "interval", _interval(self.interval))
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"S2Config.seed must be an integer or None, got {self.seed!r}")
        if self.seed is not None:
            object.__setattr__(self, "seed", int(self.seed))
        self._check_engine()
        if self.cache is not None:
            droppable = next(b for b in range(len(self.protected_blocks) + 1) if b not in self.protected_blocks)
            self.cache.check_first_droppable(droppable, "S2Config", "protected_blocks leaves block")
        if self.sigma_interval is not None:
            object.__setattr__(self, "sigma_interval", _sigma_interval(self.sigma_interval))
            if self.masks is not None or self.interval != (0.0, 1.0):
                raise ValueError(
                    "S2Config: sigma_interval says where S² applies in noise levels; give it alone, without masks "
                    f"or a step interval (got masks={'set' if self.masks is not None else None}, "
                    f"interval={self.interval})"
                )
        if self.masks is not None:
            if self.interval != (0.0, 1.0):
                raise ValueError(
                    "S2Config: give either masks or interval, not both (explicit masks already say, step by step, "
                    "where S² applies: use () for the steps outside your interval)"
                )
            entries = enumerate(_as_sequence("masks", self.masks))
            steps = tuple(_step_masks(i, entry, self.num_masks) for i, entry in entries)
            object.__setattr__(self, "masks", tuple(public_step_form(s, self.num_masks) for s in steps))
            dropped = [b for step in steps for mask in step for b in mask]
            if self.cache is not None and dropped:
                self.cache.check_first_droppable(min(dropped), "S2Config", "masks drop block")

    def replace(self, **changes) -> "S2Config":
        """A copy with some fields changed (validated like the original)."""
        return replace(self, **changes)

    def step_masks(self) -> Optional[Tuple[Tuple[Mask, ...], ...]]:
        """The explicit masks as one tuple of sub-network masks per step (() where S² is off), or None."""
        if self.masks is None:
            return None
        return tuple(() if not m else ((m,) if self.num_masks == 1 else m) for m in self.masks)

    def subnets_needed(self) -> Optional[bool]:
        """Whether a pipeline call under this config computes a sub-network: True for every call (ω > 0 from the
        first step, or explicit masks with a non-empty step), False for none (ω = 0, or masks all ()), None where it
        depends on the call (an interval that starts after step 0, a sigma_interval: the scheduler decides).
        s2fast.wrap checks the model against the config, and refuses what S² cannot run under, only where this is
        True; where it is None the same checks run per call, for calls that need a sub-network."""
        if self.omega == 0:
            return False
        if self.masks is not None:
            return any(self.masks)
        if self.sigma_interval is not None or self.interval[0] > 0:
            return None
        return True

    def check_blocks(self, num_blocks: int) -> None:
        """Validate the block indices against a model with ``num_blocks`` blocks (called by wrap). A sub-network
        keeps at least one block, sampled or explicit (s2fast.masks.num_dropped), so a model where every block is
        protected, or that has a single block, has nothing a mask may drop."""
        if self.cache is not None:
            self.cache.check_blocks(num_blocks, "S2Config")
        for b in self.protected_blocks:
            if b >= num_blocks:
                raise ValueError(f"S2Config.protected_blocks names block {b}, but the model has {num_blocks} blocks")
        if len(set(self.protected_blocks)) >= num_blocks or num_blocks < 2:
            raise ValueError(
                f"S2Config.protected_blocks {self.protected_blocks} leaves nothing to drop on a model of {num_blocks} "
                "block(s) (a sub-network keeps at least one block and never drops a protected one); S² with ω > 0 "
                "needs a model with a droppable block (ω = 0 runs any model as stock)"
            )
        for i, step in enumerate(self.step_masks() or ()):
            for mask in step:
                for b in mask:
                    if b >= num_blocks:
                        raise ValueError(f"S2Config.masks[{i}] drops block {b}, but the model has {num_blocks} blocks")
                    if b in self.protected_blocks:
                        raise ValueError(f"S2Config.masks[{i}] drops block {b}, which protected_blocks protects")
                if len(mask) >= num_blocks:
                    raise ValueError(f"S2Config.masks[{i}] drops every block of the model")


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _short(x) -> str:
    text = repr(x)
    return text if len(text) <= 40 else f"{text[:20]}…{text[-8:]} ({len(text)} characters)"


def _real(name: str, x) -> float:
    """``x`` as a finite Python float (Python or numpy real numbers), else a ValueError naming the field."""
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise ValueError(f"S2Config.{name} must be a finite number, got {x!r}")
    try:
        value = float(x)
    except OverflowError:  # an int too large for a float
        raise ValueError(f"S2Config.{name} must be a finite number, got {_short(x)} (too large)") from None
    if not math.isfinite(value):
        raise ValueError(f"S2Config.{name} must be a finite number, got {x!r}")
    return value


def _as_sequence(name: str, x) -> Sequence:
    if isinstance(x, (str, bytes)) or not isinstance(x, Sequence):
        raise ValueError(f"S2Config.{name} must be a tuple or list, got {type(x).__name__}")
    return x


def _index_tuple(name: str, x) -> Tuple[int, ...]:
    items = _as_sequence(name, x)
    for b in items:
        if not _is_int(b) or b < 0:
            raise ValueError(f"S2Config.{name} must hold non-negative block indices, got {b!r}")
    if len(set(items)) != len(items):
        raise ValueError(f"S2Config.{name} repeats a block index: {tuple(items)}")
    return tuple(sorted(int(b) for b in items))


def _interval(x) -> Tuple[float, float]:
    items = _as_sequence("interval", x)
    if len(items) != 2:
        raise ValueError(f"S2Config.interval must be (start, stop), got {tuple(items)!r}")
    start, stop = _real("interval", items[0]), _real("interval", items[1])
    if not (0.0 <= start < stop <= 1.0):
        raise ValueError(f"S2Config.interval must satisfy 0 <= start < stop <= 1, got ({start}, {stop})")
    return (start, stop)


def _sigma_interval(x) -> Tuple[float, float]:
    items = _as_sequence("sigma_interval", x)
    if len(items) != 2:
        raise ValueError(f"S2Config.sigma_interval must be (low, high) noise levels, got {tuple(items)!r}")
    low, high = _real("sigma_interval", items[0]), _real("sigma_interval", items[1])
    if not 0.0 <= low < high:
        raise ValueError(f"S2Config.sigma_interval must satisfy 0 <= low < high, got ({low}, {high})")
    return (low, high)


def _step_masks(i: int, entry, num_masks: int) -> Tuple[Mask, ...]:
    """Normalise one step's entry of S2Config.masks to a tuple of sorted masks (() when S² is off)."""
    entry = _as_sequence(f"masks[{i}]", entry)
    if len(entry) == 0:
        return ()
    nested = all(isinstance(m, (tuple, list)) for m in entry)
    if num_masks == 1:
        if nested:
            raise ValueError(f"S2Config.masks[{i}] is a tuple of masks, but num_masks is 1: give one tuple of block indices")
        return (_index_tuple(f"masks[{i}]", entry),)
    if not nested or len(entry) != num_masks:
        raise ValueError(
            f"S2Config.masks[{i}] must be () or a tuple of num_masks={num_masks} tuples of block indices, got {tuple(entry)!r}"
        )
    masks = tuple(_index_tuple(f"masks[{i}]", m) for m in entry)
    for m in masks:
        if not m:
            raise ValueError(f"S2Config.masks[{i}] holds an empty mask; use () for the whole step to turn S² off")
    return masks


def public_step_form(step: Tuple[Mask, ...], num_masks: int) -> StepMasks:
    if not step:
        return ()
    return step[0] if num_masks == 1 else step
